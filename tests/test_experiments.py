"""Host-side helpers of the experiment scripts (no compiles)."""

import json

import pytest

from experiments.quickstart_seeds import aggregate, main as quickstart_seeds_main, table
from experiments.sr_sweep import parse_variant, quickstart_sr_fields


def _result(acc, asr):
    row = {"acc": acc, "asr": asr, "clean_target_rate": 1.0}
    return {"teacher": {"acc": 98.0, "asr": 100.0, "clean_target_rate": 0.0}, "rows": {"zskt": row}}


def test_seed_aggregate_is_mean_and_sample_std():
    agg = aggregate({0: _result(90.0, 80.0), 1: _result(94.0, 60.0), 2: _result(92.0, 70.0)})
    assert list(agg) == ["teacher", "zskt"]
    assert agg["zskt"]["acc"]["mean"] == pytest.approx(92.0)
    assert agg["zskt"]["asr"]["std"] == pytest.approx(10.0)  # sample std of 80, 60, 70
    assert agg["teacher"]["asr"]["std"] == 0.0
    assert "92.0 ± 2.0" in table(agg, [0, 1, 2])


def test_seed_sweep_records_each_seeds_machine_and_reruns_nothing_done(tmp_path):
    for seed, cpu in ((0, "AMD EPYC"), (1, "Intel Xeon")):  # seeds finished on two machines
        d = tmp_path / f"seed_{seed}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps({**_result(90.0 + seed, 80.0), "wall_s": 1.0,
                                                    "machine": {"cpu": cpu}, "config": {}}))
    quickstart_seeds_main(["--workdir", str(tmp_path), "--seeds", "0", "1"])  # both done: only aggregates
    out = json.loads((tmp_path / "results.json").read_text())
    assert out["machine"] == {"0": {"cpu": "AMD EPYC"}, "1": {"cpu": "Intel Xeon"}}
    assert out["rows"]["zskt"]["acc"]["values"] == [90.0, 91.0]


def test_sr_variant_parsing():
    assert parse_variant("portion=0.5,rounds=20") == {"sr_portion": 0.5, "sr_rounds": 20}
    assert parse_variant("sr_coef=50,trigger_model=student") == {"sr_coef": 50, "sr_trigger_model": "student"}
    assert parse_variant("coef=50,lr_generator=0") == {"sr_coef": 50, "lr_generator": 0}
    assert parse_variant("bn_replay=true,coef=50") == {"sr_bn_replay": True, "sr_coef": 50}
    assert isinstance(parse_variant("coef=50")["sr_coef"], float)  # the field's own type
    with pytest.raises(ValueError, match="no field 'sr_nope'"):
        parse_variant("nope=1")
    with pytest.raises(ValueError, match="write True or False"):
        parse_variant("bn_replay=1")
    with pytest.raises(ValueError, match="write FIELD=VALUE"):
        parse_variant("rounds")


def test_sr_sweep_quickstart_base_is_the_abd_rows_sr_setting():
    """`experiments.sr_sweep --base quickstart`: the SR fields the quickstart's --abd rows run with
    (not the spec's defaults, which `--base spec` keeps), and nothing outside SR."""
    from experiments.configs import quickstart as q

    base = quickstart_sr_fields()
    assert (base["sr_coef"], base["sr_init_scale"], base["sr_restarts"], base["sr_resume_lr"], base["sr_rounds"],
            base["sr_refine_rounds"]) == (
        q.SR_COEF, q.SR_INIT_SCALE, q.SR_RESTARTS, q.SR_RESUME_LR, q.SR_ROUNDS, q.SR_REFINE_ROUNDS)
    assert base["sr_bn_replay"] and all(k.startswith("sr_") for k in base)
    assert "sr_pseudo_batches" not in base and "sr_memory" not in base  # both shape the prefix
    assert quickstart_sr_fields(smoke=True)["sr_restarts"] == 1  # the smoke run's single start


def test_quickstart_set_reaches_the_zskt_config_and_refuses_unknown_fields(tmp_path):
    """`--set zskt.generator_upsample=separate zskt.sv_share_prefix=False` (the float order of runs
    before 2026-11-27) reaches the typed config; a misspelt field stops before anything runs."""
    from abd_jax.jobs import zskt_config_from
    from experiments import quickstart
    from experiments.configs.quickstart import get_config
    from experiments.overrides import apply_overrides

    cfg = get_config("smoke")
    default = zskt_config_from(cfg.zskt)
    assert (default.generator_upsample, default.sv_share_prefix) == ("fused", True)
    apply_overrides(cfg, ["zskt.generator_upsample=separate", "zskt.sv_share_prefix=False"])
    z = zskt_config_from(cfg.zskt)
    assert (z.generator_upsample, z.sv_share_prefix) == ("separate", False)
    with pytest.raises(ValueError, match="generator_upsample"):
        quickstart.main(["--smoke", f"--workdir={tmp_path / 'qs'}", "--set", "zskt.generator_upsampel=separate"])
    assert not (tmp_path / "qs").exists()


def test_asr_by_class_helpers():
    """`experiments.asr_by_class`: percentages per class, restricted by `keep`, None where a class
    has no sample left."""
    import numpy as np

    from abd_jax.report import percent
    from experiments.asr_by_class import by_class

    hit = np.array([True, False, True, True, False])
    labels = np.array([1, 1, 2, 2, 3])
    assert by_class(hit, labels) == {1: 50.0, 2: 100.0, 3: 0.0}
    keep = np.array([True, True, False, True, False])
    assert by_class(hit, labels, keep) == {1: 50.0, 2: 100.0, 3: None}
    assert percent(np.array([], bool)) is None and percent(np.array([True, False, False])) == 33.3


def test_append_jsonl_adds_lines_with_numpy_values(tmp_path):
    import json

    import numpy as np

    from abd_jax.report import append_jsonl

    path = tmp_path / "log.jsonl"
    append_jsonl(path, [{"a": np.float32(1.5), "b": np.arange(2)}])
    append_jsonl(path, [{"a": 2.0, "b": [3]}, {"a": float("nan")}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"a": 1.5, "b": [0, 1]}, {"a": 2.0, "b": [3]}, {"a": None}]


def test_sr_residual_probe_target_rates_per_class():
    """`experiments.sr_residual_probe.target_rates`: the share of images a model sends to the target,
    overall and per source class."""
    import jax.numpy as jnp
    import numpy as np

    from experiments.sr_residual_probe import target_rates

    logits = jnp.eye(3)[jnp.array([0, 1, 0, 0, 2])]  # predictions 0, 1, 0, 0, 2
    labels = np.array([1, 1, 2, 2, 2])
    rates = target_rates(lambda x: x, logits, labels, target=0)
    assert rates == {"all": 60.0, "by_class": {1: 50.0, 2: pytest.approx(66.7)}}
