"""experiments.tables: every table config builds at every scale, and one line of each table runs
through the runner (smoke scale) into a report beside the paper's numbers."""

import json
import shutil
from pathlib import Path

import pytest

from abd_jax.methods import METHODS
from experiments import tables
from experiments.configs.tables.base import SCALES

TABLE_DIR = Path(__file__).parents[1] / "experiments" / "configs" / "tables"
TABLES = sorted(p.stem for p in TABLE_DIR.glob("*.py") if p.stem not in ("__init__", "base"))
# The line each table runs in the smoke test: the BadNets-grid line, which every table has, so the
# four tables share one teacher and one ZSKT ablation through the row store.
SMOKE_LINE = "badnets_grid"


def test_the_five_tables_of_spec_9_are_there():
    assert TABLES == ["ablation", "datasets", "methods", "teachers", "zskt_attacks"]


@pytest.mark.parametrize("name", TABLES)
def test_table_config_is_consistent_at_every_scale(name):
    for scale in SCALES:
        t = tables.load_table(f"{TABLE_DIR / name}.py:{scale}")
        assert t.scale == scale and t.seeds == [0, 1, 2]
        assert (TABLE_DIR / f"{name}.py").read_text().startswith(
            f'"""python -m experiments.tables --table experiments/configs/tables/{name}.py')
        for col in t.columns:
            assert col in ("teacher", "clean_kd") or col.partition("+")[0] in METHODS, col
        assert set(t.paper) <= set(t.groups)
        for label, cells in t.paper.items():
            assert set(cells) <= set(t.columns), (label, cells)
            assert all(0 <= v <= 100 for cell in cells.values() for v in cell)
        for label, g in t.groups.items():
            cfg = tables.group_job_config(t, label)
            if g["dataset"] == "gtsrb" and scale in ("digits", "smoke"):
                assert cfg is None
                continue
            assert cfg.attack.trigger == g["trigger"]
            assert cfg.teacher.model == (g["teacher"] or cfg.teacher.model)
            if g["dataset"] == "gtsrb":
                assert (cfg.data.name, cfg.attack.target) == ("gtsrb", 1)


def test_paper_scale_configs_follow_the_spec():
    t = tables.load_table(f"{TABLE_DIR / 'datasets'}.py:cifar10")
    cfg = tables.group_job_config(t, "wrn40_2_trojan_wm")
    assert (cfg.data.name, cfg.data.image_size, cfg.teacher.model) == ("cifar10", 32, "wrn40_2")
    assert (cfg.zskt.pseudo_batches, cfg.zskt.sr_pseudo_batches, cfg.teacher.epochs) == (80_000, 601, 200)
    g = tables.group_job_config(t, "gtsrb_badnets_grid")
    assert (g.zskt.pseudo_batches, g.zskt.sr_pseudo_batches, g.zskt.sv_verify_after) == (10_000, 201, 50)


def test_abd_columns_name_the_parts_they_ran():
    parts = {"zskt": ["sv"], "cmi": ["sr", "sv"], "ood": ["sv"]}
    assert tables.source_row("zskt+abd", parts) == "zskt+sv"  # the ablation's SV-only row
    assert tables.source_row("zskt+abd", {"zskt": ["sv", "sr"]}) == "zskt+abd"
    assert tables.source_row("cmi+abd", parts) == "cmi+abd"
    assert tables.source_row("ood+abd", parts) == "ood+sv"
    assert tables.source_row("ood", parts) == "ood"


def test_a_later_field_at_its_default_keeps_the_stored_row_keys():
    t = tables.load_table(f"{TABLE_DIR / 'methods'}.py:digits")
    cfg = tables.group_job_config(t, "badnets_grid")
    before = tables.row_key(cfg, "ood+sv", t.abd_parts)
    assert cfg.sections["ood"].sv_push_cap == "none"
    old = cfg.copy_and_resolve_references()
    del old.sections.ood["sv_push_cap"]  # the config as it was before the field existed
    assert tables.row_key(old, "ood+sv", t.abd_parts) == before
    cfg.sections["ood"].sv_push_cap = "uniform"  # a different computation: a different key
    assert tables.row_key(cfg, "ood+sv", t.abd_parts) != before


def test_fields_that_change_float_order_key_only_the_rows_they_change():
    """sv_share_prefix, sv_share_teacher, generator_upsample (ZSKT family and CMI; DeepInversion has
    no generator) and the SR trigger-start fields: at their old values a row keeps
    its stored key (so `--set` reproduces stored rows), at their defaults the rows they change get
    new keys, and the vaccine switches leave rows without a vaccine (or, for sv_share_teacher,
    methods other than ZSKT) alone."""
    t = tables.load_table(f"{TABLE_DIR / 'methods'}.py:digits")
    cfg = tables.group_job_config(t, "badnets_grid")
    fields = ("sv_share_prefix", "sv_share_teacher", "generator_upsample")
    old = cfg.copy_and_resolve_references()  # the config as it was before the fields existed
    for method in cfg.sections:
        for field in fields:
            if field in old.sections[method]:
                del old.sections[method][field]
    at_old_values = cfg.copy_and_resolve_references()
    for method in cfg.sections:
        for field, value in (("sv_share_prefix", False), ("sv_share_teacher", False), ("generator_upsample", "separate")):
            if field in at_old_values.sections[method]:
                at_old_values.sections[method][field] = value
    columns = [c for m in cfg.sections for c in (m, f"{m}+sv", f"{m}+sr", f"{m}+abd")]
    for column in columns:
        assert tables.row_key(at_old_values, column, t.abd_parts) == tables.row_key(old, column, t.abd_parts)
    changed = {c for c in ("zskt", "zskt+sr", "zskt+sv", "cmi", "cmi+sr", "cmi+sv", "ood+sv")
               if tables.row_key(cfg, c, t.abd_parts) != tables.row_key(old, c, t.abd_parts)}
    assert changed == {"zskt", "zskt+sr", "zskt+sv", "cmi", "cmi+sr", "cmi+sv", "ood+sv"}
    assert tables.row_key(cfg, "deepinversion", t.abd_parts) == tables.row_key(old, "deepinversion", t.abd_parts)
    # sv_share_teacher alone: only ZSKT rows with a vaccine
    teacher_apart = cfg.copy_and_resolve_references()
    for method in cfg.sections:
        if "sv_share_teacher" in teacher_apart.sections[method]:
            teacher_apart.sections[method].sv_share_teacher = False
    changed = {c for c in columns if tables.row_key(cfg, c, t.abd_parts) != tables.row_key(teacher_apart, c, t.abd_parts)}
    assert changed == {"zskt+sv", "zskt+abd"}
    # The SR trigger-start fields: only rows that run SR
    random_start = cfg.copy_and_resolve_references()  # another start than the config's (quickstart: 1e-3, 4)
    random_start.sections.zskt.sr_init_scale, random_start.sections.zskt.sr_restarts = 2e-3, 2
    changed = {c for c in columns if tables.row_key(cfg, c, t.abd_parts) != tables.row_key(random_start, c, t.abd_parts)}
    assert changed == {"zskt+sr", "zskt+abd"}
    # sr_bn_replay: on by default, it keys only the ZSKT rows that run SR; off, a row keeps the key it
    # had before the field existed
    no_replay, before_field = cfg.copy_and_resolve_references(), cfg.copy_and_resolve_references()
    no_replay.sections.zskt.sr_bn_replay = False
    del before_field.sections.zskt["sr_bn_replay"]
    changed = {c for c in columns if tables.row_key(cfg, c, t.abd_parts) != tables.row_key(no_replay, c, t.abd_parts)}
    assert changed == {"zskt+sr", "zskt+abd"}
    assert all(tables.row_key(no_replay, c, t.abd_parts) == tables.row_key(before_field, c, t.abd_parts) for c in columns)
    # sr_refine_rounds (2026-12-06): the quickstart's 20 keys only the ZSKT rows that run SR; at 0 a
    # row keeps the key it had before the field existed
    unrefined, before_refine = cfg.copy_and_resolve_references(), cfg.copy_and_resolve_references()
    assert cfg.sections.zskt.sr_refine_rounds == 20
    unrefined.sections.zskt.sr_refine_rounds = 0
    for method in before_refine.sections:
        if "sr_refine_rounds" in before_refine.sections[method]:
            del before_refine.sections[method]["sr_refine_rounds"]
    changed = {c for c in columns if tables.row_key(cfg, c, t.abd_parts) != tables.row_key(unrefined, c, t.abd_parts)}
    assert changed == {"zskt+sr", "zskt+abd"}
    assert all(tables.row_key(unrefined, c, t.abd_parts) == tables.row_key(before_refine, c, t.abd_parts)
               for c in columns)


def test_set_changes_a_field_with_its_type_and_names_the_fix():
    t = tables.load_table(f"{TABLE_DIR / 'methods'}.py:digits")
    cfg = tables.group_job_config(t, "badnets_grid")
    tables.apply_overrides(cfg, ["sections.ood.sv_push_cap=uniform", "sections.ood.sv=True", "sections.ood.steps=7"])
    assert (cfg.sections.ood.sv_push_cap, cfg.sections.ood.sv, cfg.sections.ood.steps) == ("uniform", True, 7)
    for bad, fix in [("x", "path.to.field=value"), ("sections.nope.a=1", "it has: cmi, dafl"),
                     ("sections.ood.nope=1", "no field 'nope'"), ("sections.ood.steps=many", "not a valid int"),
                     ("sections.ood.sv=maybe", "write True or False")]:
        with pytest.raises(ValueError, match=fix):
            tables.apply_overrides(cfg, [bad])


def test_bad_table_arguments_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="unknown scale"):
        tables.load_table(f"{TABLE_DIR / 'ablation'}.py:imagenet")
    with pytest.raises(FileNotFoundError, match="experiments/configs/tables"):
        tables.load_table("nope.py")
    with pytest.raises(FileNotFoundError, match="experiments/configs/tables"):
        tables.load_table("nope")
    assert tables.load_table("ablation:cifar10").to_dict() == tables.load_table(
        f"{TABLE_DIR / 'ablation'}.py:cifar10").to_dict()  # a name finds the shipped config
    with pytest.raises(ValueError, match="it has: badnets_grid, trojan_wm"):
        tables.main(["--table", f"{TABLE_DIR / 'ablation'}.py:smoke", "--workdir", str(tmp_path), "--groups", "x"])


@pytest.fixture(scope="module")
def table_runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tables")
    runs = {name: tables.main(["--table", f"{TABLE_DIR / name}.py:smoke", "--workdir", str(workdir),
                               "--groups", SMOKE_LINE, "--seeds", "0"]) for name in TABLES}
    return workdir, runs


@pytest.mark.parametrize("name", TABLES)
def test_one_line_of_each_table_runs_into_a_report(table_runs, name):
    workdir, runs = table_runs
    t = tables.load_table(f"{TABLE_DIR / name}.py:smoke")
    res = json.loads((workdir / name / "results.json").read_text())
    assert res["scale"] == "smoke" and res["command"].startswith("python -m experiments.tables")
    for col in t.columns:
        cell = res["rows"][SMOKE_LINE][col]
        assert 0 <= cell["acc"]["mean"] <= 100 and 0 <= cell["asr"]["mean"] <= 100
        assert cell["asr"]["values"] == [runs[name][SMOKE_LINE][0]["rows"][tables.source_row(col, t.abd_parts)]["asr"]]
    report = (workdir / name / "report.md").read_text()
    assert "| paper |" in report
    paper = t.paper.get(SMOKE_LINE, {})
    for col, (acc, asr) in paper.items():  # the paper's numbers are printed beside ours
        assert f"{acc:.1f} / {asr:.1f}" in report
    assert (workdir / name / "acc_asr.png").stat().st_size > 0
    if name != "teachers":
        assert (workdir / name / f"curves_{SMOKE_LINE}.png").exists()
        assert (workdir / name / f"samples_{SMOKE_LINE}.png").exists()


def test_tables_share_rows_and_report_only_rebuilds(table_runs):
    workdir, runs = table_runs
    store = list((workdir / "rows").rglob("rows.json"))
    assert len(store) == 1  # one teacher, trigger and seed for all five tables
    rows = json.loads(store[0].read_text())["rows"]
    assert {"teacher", *tables.ZSKT_ROWS, "clean_kd", "cmi", "cmi+abd", "ood", "ood+sv"} <= set(rows)
    for row in ("zskt+sv", "zskt+abd", "ood+sv"):  # the per-sample suspicion report of each SV run
        summary = json.loads((store[0].parent / row / "suspicion.json").read_text())
        assert {"clean_test", "triggered_test"} <= set(summary), summary
        assert (store[0].parent / row / "suspicion.npz").exists()
    assert not (store[0].parent / "zskt" / "suspicion.json").exists()
    sr_hist = json.loads((store[0].parent / "zskt+abd" / "history.json").read_text())
    assert sr_hist[-1].get("sr") == 1.0 and sr_hist[-1]["step"] == 2  # SR over the last pseudo-batch
    assert not (store[0].parent / "checkpoints").exists()
    before = json.loads((workdir / "ablation" / "results.json").read_text())["rows"]
    tables.main(["--table", f"{TABLE_DIR / 'ablation'}.py:smoke", "--workdir", str(workdir), "--seeds", "0",
                 "--report-only"])
    after = json.loads((workdir / "ablation" / "results.json").read_text())
    assert after["rows"][SMOKE_LINE] == before[SMOKE_LINE]
    assert "trojan_wm" in after["rows"] and after["rows"]["trojan_wm"] == {}  # not run: no rows, no numbers
    ds = json.loads((workdir / "datasets" / "results.json").read_text())
    assert ds["skipped"] == ["gtsrb_badnets_grid"]  # GTSRB is not embedded: not at the smoke scale
    assert "| gtsrb_badnets_grid | ours | not at this scale |" in (workdir / "datasets" / "report.md").read_text()


def test_a_row_made_by_another_config_is_an_error(table_runs, tmp_path):
    workdir, _ = table_runs
    store = next((workdir / "rows").rglob("rows.json"))
    saved = store.read_text()
    data = json.loads(saved)
    data["keys"]["clean_kd"] = "0" * 16
    store.write_text(json.dumps(data))
    try:
        with pytest.raises(ValueError, match="different config"):
            tables.main(["--table", f"{TABLE_DIR / 'ablation'}.py:smoke", "--workdir", str(workdir),
                         "--groups", SMOKE_LINE, "--seeds", "0"])
    finally:
        store.write_text(saved)


def test_methods_command_is_a_table_on_the_same_store(table_runs, capsys):
    """experiments.methods builds a table from its flags; its rows are the tables' rows, so this
    call finds every row done and only writes the report."""
    from experiments import methods

    workdir, runs = table_runs
    stamp = next((workdir / "rows").rglob("ood/history.json")).stat().st_mtime
    got = methods.main([f"--workdir={workdir}", "--smoke", "--methods", "ood", "zskt", "--triggers", "badnets_grid",
                        "--seeds", "0", "--abd-parts", "sv"])
    assert got[SMOKE_LINE][0]["rows"] == runs["methods"][SMOKE_LINE][0]["rows"]
    assert next((workdir / "rows").rglob("ood/history.json")).stat().st_mtime == stamp  # nothing rerun
    res = json.loads((workdir / "methods_sweep" / "results.json").read_text())
    assert set(res["rows"][SMOKE_LINE]) == {"teacher", "ood", "ood+abd", "zskt", "zskt+abd"}
    assert res["abd_parts"]["ood"] == ["sv"] and res["paper"][SMOKE_LINE]["ood+abd"] == [78.2, 14.5]
    # +ABD = SV for ZSKT here: the ablation's zskt+sv row.
    assert res["per_seed"][SMOKE_LINE]["0"]["zskt+sv"]["asr"] == res["rows"][SMOKE_LINE]["zskt+abd"]["asr"]["mean"]
    assert "| badnets_grid |" in capsys.readouterr().out


def test_rows_restored_from_a_report_rebuild_it(table_runs, tmp_path):
    """A report's results.json is enough to rebuild its row store: the same rows and keys, a
    --report-only over them gives the same numbers, and a report of another config is refused."""
    workdir, _ = table_runs
    report = workdir / "ablation" / "results.json"
    tables.main(["--table", f"{TABLE_DIR / 'ablation'}.py:smoke", "--workdir", str(tmp_path), "--seeds", "0",
                 "--report-only", "--restore-rows", str(report)])
    original = json.loads(next((workdir / "rows").rglob("rows.json")).read_text())
    restored = json.loads(next((tmp_path / "rows").rglob("rows.json")).read_text())
    assert (restored["rows"], restored["keys"]) == (original["rows"], original["keys"])
    assert set(restored["restored"]) == set(original["rows"])
    after = json.loads((tmp_path / "ablation" / "results.json").read_text())
    assert after["rows"] == json.loads(report.read_text())["rows"]
    assert "restored from earlier reports" in (tmp_path / "ablation" / "report.md").read_text()
    with pytest.raises(ValueError, match="--table ablation:smoke"):  # another table's report
        tables.main(["--table", f"{TABLE_DIR / 'datasets'}.py:smoke", "--workdir", str(tmp_path / "b"),
                     "--report-only", "--restore-rows", str(report)])
    with pytest.raises(ValueError, match="another config"):  # its recorded keys say another config
        tables.main(["--table", f"{TABLE_DIR / 'ablation'}.py:smoke", "--workdir", str(tmp_path / "c"),
                     "--report-only", "--restore-rows", str(report), "--set", "clean_kd.epochs=7"])


@pytest.mark.parametrize("name", TABLES)
def test_committed_digits_reports_are_what_their_committed_rows_give(name, tmp_path):
    """docs/results/tables_digits is a row store with its reports: rebuilding a report from the
    committed rows gives the committed numbers, so no report holds a figure its rows do not."""
    committed = Path(__file__).parents[1] / "docs" / "results" / "tables_digits"
    shutil.copytree(committed / "rows", tmp_path / "rows")
    res = json.loads((committed / name / "results.json").read_text())
    tables.main(["--table", f"{TABLE_DIR / name}.py:digits", "--workdir", str(tmp_path), "--report-only",
                 "--seeds", *map(str, res["seeds"])])
    rebuilt = json.loads((tmp_path / name / "results.json").read_text())
    assert rebuilt["rows"] == res["rows"] and rebuilt["per_seed"] == res["per_seed"]
    assert rebuilt["per_seed_keys"] == res["per_seed_keys"]


def test_a_line_whose_columns_have_different_seed_counts_says_so():
    from experiments.quickstart_seeds import mean_std

    t = tables.load_table(f"{TABLE_DIR / 'ablation'}.py:smoke")
    cell = lambda *v: {k: mean_std(list(v)) for k in ("acc", "asr", "clean_target_rate")}  # noqa: E731
    text = tables.report_table(t, {SMOKE_LINE: {"zskt": cell(90.0, 92.0), "clean_kd": cell(95.0)}}, [])
    assert f"| {SMOKE_LINE} | ours (1-2 seeds) |" in text and "91.0 ± 1.4 / 91.0 ± 1.4" in text
    text = tables.report_table(t, {SMOKE_LINE: {"zskt": cell(90.0)}}, [])
    assert f"| {SMOKE_LINE} | ours (1 seed) |" in text
