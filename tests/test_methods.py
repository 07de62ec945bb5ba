"""The method registry (abd_jax/methods.py), the method configs, and the method x (vanilla, +ABD)
runner (experiments/methods.py)."""

import importlib
import json

import pytest

from abd_jax.methods import METHODS, method_config, with_abd


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arg", ["smoke", None])
def test_every_method_has_a_config_that_builds_its_typed_config(method, arg):
    cfg = importlib.import_module(f"experiments.configs.{method}").get_config(arg)
    assert cfg.job == method
    section = METHODS[method].section
    typed = method_config(method, cfg[section])
    for k, v in METHODS[method].fixed.items():  # e.g. DFAD's config really runs DFAD
        assert getattr(typed, k) == v
    assert not typed.sv and getattr(typed, METHODS[method].sr_field) == 0  # the config as written is vanilla
    abd = with_abd(method, typed, sr_steps=cfg.abd.sr_steps)
    assert abd.sv and getattr(abd, METHODS[method].sr_field) == cfg.abd.sr_steps > 0
    # The runner gives every row the quickstart's teacher, so one saved teacher serves all rows.
    from experiments.configs.quickstart import get_config as quickstart_config
    from experiments.methods import method_cfg

    assert method_cfg(method, "blend", 3, arg == "smoke").teacher == quickstart_config(arg).teacher


def test_unknown_method_field_and_abd_part_name_the_fix():
    with pytest.raises(ValueError, match="unknown cmi fields"):
        method_config("cmi", {"roundz": 3})
    with pytest.raises(ValueError, match="unknown data-free KD method"):
        method_config("cmi2", {})
    cfg = method_config("ood", {"sr_steps": 5})
    with pytest.raises(ValueError, match="unknown ABD parts"):
        with_abd("ood", cfg, ("sv", "vaccine"))
    with pytest.raises(ValueError, match="positive ood.sr_steps"):
        with_abd("ood", method_config("ood", {}), ("sr",))
    van = with_abd("ood", cfg, ())
    assert not van.sv and van.sr_steps == 0


def test_fixed_settings_win_over_the_section():
    # A "dfad" job is DFAD even when its section says otherwise.
    assert method_config("dfad", {"method": "zskt"}).method == "dfad"


def test_methods_runner_smoke_writes_the_table_and_skips_finished_rows(tmp_path, capsys):
    from experiments import methods

    argv = [f"--workdir={tmp_path}", "--smoke", "--methods", "ood", "--triggers", "badnets_grid", "--seeds", "0",
            "--abd-parts", "sv"]
    agg = methods.main(argv)
    out = capsys.readouterr().out
    assert "| badnets_grid | ood |" in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["rows"]["badnets_grid"]) == {"teacher", "ood", "ood+abd"}
    assert res["abd_parts"] == ["sv"]
    seed_dir = tmp_path / "badnets_grid" / "seed_0"
    rows = json.loads((seed_dir / "rows.json").read_text())["rows"]
    for name in ("ood", "ood+abd"):
        assert {"acc", "asr", "clean_target_rate", "wall_s"} <= set(rows[name])
        assert (seed_dir / name / "curves.png").exists() and (seed_dir / name / "student").exists()
    assert (seed_dir / "ood+abd" / "suspicion.json").exists()  # the SV row's report
    assert not (seed_dir / "ood" / "suspicion.json").exists()
    assert not (seed_dir / "checkpoints").exists()
    # A second call finds every row done: nothing is retrained, the table is the same.
    stamp = (seed_dir / "ood" / "history.json").stat().st_mtime
    assert methods.main(argv) == agg
    assert (seed_dir / "ood" / "history.json").stat().st_mtime == stamp
