"""One command per table of the paper (spec 9): `python -m experiments.tables --table
experiments/configs/tables/<table>.py[:scale] --workdir DIR [--seeds 0 1 2] [--groups ...] [--resume]
[--report-only] [--restore-rows RESULTS_JSON ...]`.

A table config (experiments/configs/tables/) lists its lines (groups: a trigger, optionally a
teacher or a dataset), its columns (teacher, a data-free KD method, "<method>+abd", clean_kd) and
the paper's numbers. The scale (`:digits` by default, `:cifar10`, `:gtsrb`, `:smoke`) picks the
job config of every row (experiments/configs/tables/base.py).

Every row is stored once per (dataset, teacher, trigger, seed) under DIR/rows/, in that seed's
rows.json with a hash of the config that made it, so tables that share rows (the ZSKT rows of
9.1, 9.2, 9.3 and 9.4) compute them once, a finished row is never rerun, and a row made by a
different config is an error rather than a silent reuse. `--resume` also continues the row that
was interrupted (SIGTERM checkpoints it and exits 143). `--restore-rows` fills the store from the
results.json of earlier reports (a report committed without its store). Seeds run one after another in one
process; to spread them over machines or devices, start one process per seed (`--seeds N`) on the
same DIR and run `--report-only` at the end.

The report, in DIR/<table>/: report.md (our Acc / ASR, mean ± std over seeds, beside the paper's),
results.json (every value), acc_asr.png (ours against the paper's), and per line (first seed):
curves_<line>.png (Acc and ASR of every data-free row during training), samples_<line>.png (the
synthetic images) and suspicion_<line>.png (the shuffled-teacher divergences of flagged and
unflagged samples) where a vaccine ran.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from abd_jax.jobs import (
    checkpoint_policy,
    discard_checkpoints,
    run_clean_kd,
    run_method,
    run_zskt_abd,
    teacher_and_eval,
)
from abd_jax.methods import get_method
from abd_jax.report import fmt, markdown_table, write_json, write_text
from experiments.configs.common import abd_section
from experiments.configs.tables.base import job_config
from experiments.overrides import apply_overrides
from experiments.quickstart_seeds import METRICS, mean_std

ZSKT_ROWS = ("zskt", "zskt+sv", "zskt+sr", "zskt+abd")  # what one distill_zskt_ablation produces
EMBEDDED = ("digits", "smoke")


def load_table(spec: str):
    """`path/to/table.py[:scale]`, or a table's name (`ablation[:scale]`) -> the table's ConfigDict."""
    path, _, arg = spec.partition(":")
    if "/" not in path and not path.endswith(".py"):  # a name: the config shipped with the package
        import experiments.configs.tables as shipped

        path = str(Path(shipped.__file__).parent / f"{path}.py")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no table config {path!r}; the tables are experiments/configs/tables/*.py")
    mod_spec = importlib.util.spec_from_file_location(f"_table_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def group_job_config(table, label: str):
    """The job config of one line, or None where the line has no data at this scale (GTSRB on the
    embedded digits)."""
    g = table.groups[label]
    scale = table.scale
    if g["dataset"] == "gtsrb":
        if scale in EMBEDDED:
            return None
        scale = "gtsrb"
    cfg = job_config(scale)
    cfg.attack.trigger = g["trigger"]
    if g["teacher"]:
        cfg.teacher.model = g["teacher"]
    return cfg


def seed_dir(workdir: Path, cfg, seed: int) -> Path:
    variant = f"{cfg.data.name}{cfg.data.image_size}_{cfg.teacher.model}"
    return workdir / "rows" / variant / cfg.attack.trigger / f"seed_{seed}"


def with_seed(cfg, seed: int):
    """A copy of one line's job config for one seed."""
    cfg = cfg.copy_and_resolve_references()
    cfg.seed = seed
    return cfg


def read_rows(rows_file: Path) -> dict:
    """One seed's rows.json: {"rows", "keys"} (and "restored", where rows came from a report);
    empty when nothing has finished there yet."""
    return json.loads(rows_file.read_text()) if rows_file.exists() else {"rows": {}, "keys": {}}


PART_ROWS = {frozenset({"sv"}): "sv", frozenset({"sr"}): "sr", frozenset({"sv", "sr"}): "abd"}
ROW_PARTS = {"sv": ("sv",), "sr": ("sr",), "abd": ("sv", "sr")}


def source_row(column: str, abd_parts: dict) -> str:
    """The stored row that makes a column: "<method>+abd" is "<method>+sv", "+sr" or "+abd" (both)
    after the table's ABD parts for that method, so rows with different parts never collide in the
    store (and ZSKT's come from its ablation)."""
    method, _, abd = column.partition("+")
    if abd != "abd":
        return column
    return f"{method}+{PART_ROWS[frozenset(abd_parts[method])]}"


# Config fields added after rows were stored. At these values a row computes what it did before the
# field existed, so they stay out of its hash and the stored rows keep matching their commands. At
# their defaults sv_share_prefix, sv_share_teacher and generator_upsample (2026-11-27/28,
# docs/PERFORMANCE.md) compute the same values in another float order, which over a run can change
# a row's outcome: they enter the hash, so rows made before them are not silently mixed with rows
# made after.
LATER_FIELDS = {"ood": {"sv_push_cap": "none"}}
LATER_FIELDS_EVERY_METHOD = {"sv_share_prefix": False, "sv_share_teacher": False, "generator_upsample": "separate",
                             "sr_init_scale": 0.0, "sr_restarts": 1, "sr_bn_replay": False,
                             "sr_fresh_starts": False, "sr_refine_rounds": 0}


def _section_for_key(cfg, method: str, uses_sv: bool, uses_sr: bool = True) -> dict:
    section = cfg.sections[method].to_dict()
    for field, value in {**LATER_FIELDS_EVERY_METHOD, **LATER_FIELDS.get(method, {})}.items():
        if section.get(field) == value:
            section.pop(field)
    if not uses_sv:  # no vaccine in this row: how its copies would run changes nothing
        section.pop("sv_share_prefix", None)
    if not uses_sv or section.get("method", "zskt") != "zskt":  # only ZSKT's generator step reads it
        section.pop("sv_share_teacher", None)
    if section.get("synthesizer") == "deepinversion":  # inverts images directly: no generator
        section.pop("generator_upsample", None)
    if not uses_sr:  # the SR fields among them (trigger start, BN replay, refinement) matter only where SR runs
        for field in [f for f in LATER_FIELDS_EVERY_METHOD if f.startswith("sr_")]:
            section.pop(field, None)
    return section


def row_key(cfg, column: str, abd_parts: dict) -> str:
    """A hash of every config value the row depends on."""
    method, _, abd = column.partition("+")
    parts = {"data": cfg.data.to_dict(), "attack": cfg.attack.to_dict(), "teacher": cfg.teacher.to_dict(),
             "seed": cfg.seed}
    if column == "clean_kd":
        parts["clean_kd"] = cfg.clean_kd.to_dict()
    elif column != "teacher":
        parts[method] = _section_for_key(cfg, method, uses_sv=abd in ("sv", "abd"), uses_sr=abd in ("sr", "abd"))
        if abd and method != "zskt":
            parts["abd"] = [list(ROW_PARTS[abd]), cfg.sr_steps[method]]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_line(workdir: Path, table, cfg, seed: int, resume: bool) -> dict:
    """Every column of one line and seed: {"rows": {column: metrics}, "keys": {column: config hash}}; rows.json
    records each finished row (shared by every table run on the same DIR)."""
    cfg = with_seed(cfg, seed)
    out = seed_dir(workdir, cfg, seed)
    rows_file = out / "rows.json"
    done = read_rows(rows_file)
    columns = [source_row(c, table.abd_parts) for c in table.columns]
    for col in columns:
        if col in done["rows"] and done["keys"][col] != row_key(cfg, col, table.abd_parts):
            raise ValueError(f"{out / col} was made with a different config than this table's {col!r}; use "
                             f"another --workdir, or delete {out} to recompute that line")
    missing = [c for c in columns if c not in done["rows"]]
    if not missing:
        return done
    policy = checkpoint_policy(cfg, out, resume)
    dataset, eval_sets, teacher, tvars, meta = teacher_and_eval(cfg, out, policy)
    done["rows"]["teacher"] = {k: meta[k] for k in METRICS if k in meta}
    done["keys"]["teacher"] = row_key(cfg, "teacher", table.abd_parts)
    shared = dict(dataset=dataset, eval_sets=eval_sets, teacher=teacher, tvars=tvars, checkpoint=policy)
    for col in missing:
        if col in done["rows"]:  # the teacher, or made alongside an earlier column (the ZSKT ablation's rows)
            continue
        t0 = time.time()
        if col in ZSKT_ROWS:
            made = run_zskt_abd(cfg, out, **shared)
        elif col == "clean_kd":
            made = {col: run_clean_kd(cfg, out, **shared)}
        else:
            method, _, abd = col.partition("+")
            mcfg = cfg.copy_and_resolve_references()
            mcfg[get_method(method).section] = cfg.sections[method]  # e.g. DFAD's own "zskt" section
            mcfg.abd = abd_section(cfg.sr_steps[method])
            parts = ROW_PARTS[abd] if abd else ()
            made = {col: run_method(mcfg, out, method, name=col, abd_parts=parts, **shared)}
        wall = round(time.time() - t0, 1)
        for name, row in made.items():
            done["rows"][name] = {**row, "wall_s": wall}
            done["keys"][name] = row_key(cfg, name, table.abd_parts)
        write_json(rows_file, done)
        discard_checkpoints(policy)  # the rows are written; their checkpoints are not needed
        print(f"[{table.name}] {out.relative_to(workdir)}: {', '.join(made)} done in {wall:.0f} s", flush=True)
    write_json(rows_file, done)
    return done


def restore_rows(workdir: Path, table, configs: dict, results_file: Path) -> list[str]:
    """Writes the rows of an earlier report (`results.json`'s per-seed rows) into the row store of
    `workdir`, for the rows the store does not hold: a report committed without its store (before
    the store was committed beside it) becomes a store that `--report-only` reads and later runs
    extend. Each row's key is recomputed from this table's config; a report that recorded its keys
    must match them. Restored rows say where they came from. Returns "line seed N" per line and
    seed restored."""
    res = json.loads(Path(results_file).read_text())
    if (res.get("table"), res.get("scale")) != (table.name, table.scale):
        raise ValueError(f"{results_file} is the report of table {res.get('table')!r} at scale {res.get('scale')!r}; "
                         f"restore it with --table {res.get('table')}:{res.get('scale')}")
    source = f"{results_file} (commit {res.get('commit', 'unknown')})"
    restored = []
    for label, seeds in res["per_seed"].items():
        if configs.get(label) is None:
            continue
        for seed, rows in seeds.items():
            cfg = with_seed(configs[label], int(seed))
            keys = {name: row_key(cfg, name, table.abd_parts) for name in rows}
            recorded = res.get("per_seed_keys", {}).get(label, {}).get(seed)
            if recorded is not None and recorded != keys:
                raise ValueError(f"{results_file}, line {label} seed {seed}: its rows were made with another config "
                                 "than this table's; restore it into another --workdir with the config that made it")
            rows_file = seed_dir(workdir, cfg, int(seed)) / "rows.json"
            done = read_rows(rows_file)
            new = [name for name in rows if name not in done["rows"]]
            clash = [name for name in rows if name in done["rows"] and done["keys"][name] != keys[name]]
            if clash:
                raise ValueError(f"{rows_file}: rows {clash} were made with another config than those of "
                                 f"{results_file}; use another --workdir")
            if not new:
                continue
            for name in new:
                done["rows"][name], done["keys"][name] = rows[name], keys[name]
                done.setdefault("restored", {})[name] = source
            write_json(rows_file, done)
            restored.append(f"{label} seed {seed}")
    return restored


def aggregate(table, per_line: dict[str, dict[int, dict]]) -> dict:
    """{line: {column: {metric: {mean, std, values}}}} over the seeds that finished."""
    out = {}
    for label, seeds in per_line.items():
        out[label] = {}
        for col in table.columns:
            src = source_row(col, table.abd_parts)
            runs = [r["rows"][src] for r in seeds.values() if src in r["rows"]]
            if runs:
                out[label][col] = {k: mean_std([float(r[k]) for r in runs]) for k in METRICS if k in runs[0]}
    return out


def _cell(v: dict | None, k1: str = "acc", k2: str = "asr") -> str:
    if not v:
        return "–"
    return " / ".join(f"{fmt(v[k]['mean'])} ± {fmt(v[k]['std'])}" if len(v[k]["values"]) > 1 else fmt(v[k]["mean"])
                      for k in (k1, k2))


def report_table(table, agg: dict, skipped: list[str]) -> str:
    """Two lines per paper line: ours (Acc / ASR, mean ± std over seeds) and the paper's."""
    header = ["line", "", *table.columns]
    body = []
    for label in table.groups:
        paper = table.paper.get(label, {})
        if label in skipped:
            body.append([label, "ours", *(["not at this scale"] + ["–"] * (len(table.columns) - 1))])
        else:
            counts = sorted({len(v["acc"]["values"]) for v in agg.get(label, {}).values()})
            n = f"{counts[0]}-{counts[-1]}" if len(counts) > 1 else str(counts[0]) if counts else ""
            # A line whose columns finished on different numbers of seeds says so ("1-2 seeds").
            body.append([label, f"ours ({n} seed{'' if n == '1' else 's'})" if n else "ours: not run yet",
                         *(_cell(agg.get(label, {}).get(c)) for c in table.columns)])
        if paper:
            body.append(["", "paper", *(" / ".join(fmt(x) for x in paper[c]) if c in paper else "–"
                                        for c in table.columns)])
    ctr = [[label, *(fmt(agg[label][c]["clean_target_rate"]["mean"]) if c in agg.get(label, {}) else "–"
                     for c in table.columns)] for label in table.groups if label in agg]
    return (markdown_table(header, body) + "\n\nClean target rate % (mean over seeds; a high ASR with a high clean "
            "target rate is a collapse onto the target class, not a backdoor):\n\n"
            + markdown_table(["line", *table.columns], ctr))


def plot_comparison(path: Path, table, agg: dict) -> None:
    """Acc and ASR bars, ours (mean, with the std) against the paper's, for every line and column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [(g, c) for g in table.groups for c in table.columns if c in agg.get(g, {})]
    if not labels:
        return
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(labels) + 2), 6), dpi=110, sharex=True)
    x = np.arange(len(labels))
    for ax, k, name in zip(axes, ("acc", "asr"), ("Acc %", "ASR %")):
        ours = [agg[g][c][k]["mean"] for g, c in labels]
        err = [agg[g][c][k]["std"] for g, c in labels]
        paper = [table.paper.get(g, {}).get(c, [np.nan, np.nan])[0 if k == "acc" else 1] for g, c in labels]
        ax.bar(x - 0.2, ours, 0.4, yerr=err, label=f"ours ({table.scale})", capsize=2)
        ax.bar(x + 0.2, paper, 0.4, label="paper (CIFAR-10/GTSRB)", alpha=0.6)
        ax.set_ylabel(name)
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"spec {table.spec}: {table.title}")
    axes[1].set_xticks(x, [f"{g}\n{c}" for g, c in labels], rotation=90, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_line_curves(path: Path, curves: dict[str, list[dict]], title: str) -> None:
    """Acc (top) and ASR (bottom) against each method's own step, one colour per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(6.5, 5.5), dpi=110, sharex=True)
    for ax, k, name in zip(axes, ("acc", "asr"), ("Acc %", "ASR %")):
        for col, hist in curves.items():
            pts = [(h["step"], h[k]) for h in hist if k in h]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=col, marker="." if len(xs) < 40 else None)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title(title)
    axes[1].set_xlabel("step of each method (pseudo-batch for the ZSKT family, KD step for CMI/OOD-KD)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def line_plots(out: Path, label: str, line_dir: Path, table) -> list[str]:
    """Per line (first seed): training curves of every data-free column, the synthetic samples and
    the vaccine's divergence histogram, copied or drawn into the report. Returns the files made."""
    made = []
    curves = {}
    for col in table.columns:
        hist = line_dir / source_row(col, table.abd_parts) / "history.json"
        if col not in ("teacher", "clean_kd") and hist.exists():
            curves[col] = json.loads(hist.read_text())
    if curves:
        plot_line_curves(out / f"curves_{label}.png", curves, f"{label}: Acc and ASR during distillation")
        made.append(f"curves_{label}.png")
    srcs = [source_row(c, table.abd_parts) for c in table.columns if c not in ("teacher", "clean_kd")]
    for kind, candidates in (("samples", srcs), ("suspicion", [s for s in srcs if "+" in s])):
        for src in candidates:
            f = line_dir / src / f"{kind}.png"
            if f.exists():
                shutil.copyfile(f, out / f"{kind}_{label}.png")
                made.append(f"{kind}_{label}.png")
                break
    # Rows restored from an earlier report (restore_rows) come without their histories and images;
    # finished rows never change, so the figures that report drew from them still hold.
    if not curves and not made:
        made = [f"{kind}_{label}.png" for kind in ("curves", "samples", "suspicion")
                if (out / f"{kind}_{label}.png").exists()]
    return made


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(workdir: Path, table, per_line: dict, skipped: list[str], command: str) -> Path:
    import jax

    out = workdir / table.name
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(table, per_line)
    text = report_table(table, agg, skipped)
    rejected = [f"{label} seed {s}" for label, seeds in per_line.items() for s, run in seeds.items()
                if any(r.get("sv_vaccine") == "rejected" for r in run["rows"].values())]
    restored = sorted({src for seeds in per_line.values() for run in seeds.values()
                       for src in run.get("restored", {}).values()})
    if restored:
        text += ("\nSome rows were restored from earlier reports (`--restore-rows`; their figures are those "
                 f"reports'): {'; '.join(restored)}.\n")
    if rejected:  # spec 3.4: no shuffle passed the tail-ratio test, so SV stayed off
        text += (f"\nThe vaccine failed verification (spec 3.4) on {', '.join(rejected)}: SV stayed off there, so "
                 "each +SV row equals the row without SV (+ABD = +SR).\n")
    plot_comparison(out / "acc_asr.png", table, agg)
    figures = {}
    for label, seeds in per_line.items():
        if seeds:
            first = min(seeds)
            figures[label] = line_plots(out, label, seed_dir(workdir, group_job_config(table, label), first), table)
    device = jax.devices()[0].device_kind
    wall = {label: {str(s): {c: r.get("wall_s") for c, r in run["rows"].items()} for s, run in seeds.items()}
            for label, seeds in per_line.items()}
    write_json(out / "results.json", {
        "table": table.name, "spec": table.spec, "scale": table.scale, "seeds": list(table.seeds),
        "command": command, "commit": _commit(), "device": device, "jax": jax.__version__,
        "rows": agg, "paper": table.paper.to_dict(), "skipped": skipped, "abd_parts": table.abd_parts.to_dict(),
        "per_seed": {label: {str(s): r["rows"] for s, r in seeds.items()} for label, seeds in per_line.items()},
        "per_seed_keys": {label: {str(s): r["keys"] for s, r in seeds.items()} for label, seeds in per_line.items()},
        "wall_s": wall,
    })
    figs = "\n".join(f"- {label}: " + ", ".join(f"[{f}]({f})" for f in files) for label, files in figures.items() if files)
    write_text(out / "report.md", (
        f"# Spec {table.spec}: {table.title} ({table.scale} scale)\n\n"
        f"Made by `{command}` at commit {_commit()} on {device} (jax {jax.__version__}); seeds "
        f"{', '.join(map(str, table.seeds))}. Each cell: Acc / ASR in %, ours as mean ± std over the seeds "
        "(sample std), the paper's as printed.\n\n"
        f"{text}\n\n{table.note}\n+ABD parts per method: "
        + ", ".join(f"{m}: {'+'.join(p)}" for m, p in table.abd_parts.items() if any(c.startswith(m) for c in table.columns))
        + f".\n\n![ours against the paper](acc_asr.png)\n\nPer line (seed {min(table.seeds)}): curves, "
        f"synthetic samples, the vaccine's flagged/unflagged divergences:\n\n{figs}\n"))
    print(text)
    return out


def run_table(table, workdir: Path, labels: list[str] | None = None, *, resume: bool = False,
              report_only: bool = False, command: str = "", overrides: Sequence[str] = (),
              restore_from: Sequence[Path] = ()) -> dict[str, dict[int, dict]]:
    """Runs (or, with `report_only`, collects) every line in `labels` (default: all) for the
    table's seeds, then writes the report. `overrides` (`apply_overrides`) change every line's job
    config; `restore_from` (results.json files of earlier reports) first fills the row store with
    their rows (`restore_rows`). Returns {line: {seed: {"teacher", "rows"}}}."""
    labels = labels or list(table.groups)
    unknown = sorted(set(labels) - set(table.groups))
    if unknown:
        raise ValueError(f"unknown lines {unknown} in table {table.name}; it has: {', '.join(table.groups)}")
    # Lines this scale cannot run (GTSRB on the embedded digits), whether asked for or not: the
    # report says "not at this scale" for them, "not run yet" only for lines left out by `labels`.
    configs = {label: group_job_config(table, label) for label in table.groups}
    skipped = [label for label, cfg in configs.items() if cfg is None]
    for cfg in configs.values():
        if cfg is not None:
            apply_overrides(cfg, overrides)
    for results_file in restore_from:
        for what in restore_rows(workdir, table, configs, results_file):
            print(f"[{table.name}] restored {what} from {results_file}", flush=True)
    per_line = {}
    for label in labels:
        cfg = configs[label]
        if cfg is None:
            continue
        per_line[label] = {}
        for seed in table.seeds:
            if report_only:
                f = seed_dir(workdir, cfg, seed) / "rows.json"
                if f.exists():
                    per_line[label][seed] = read_rows(f)
            else:
                per_line[label][seed] = run_line(workdir, table, cfg, seed, resume)
    write_report(workdir, table, per_line, skipped, command)
    return per_line


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", required=True, help="experiments/configs/tables/<table>.py[:digits|cifar10|gtsrb|smoke], "
                    "or just the table's name (ablation, datasets, methods, teachers, zskt_attacks)")
    ap.add_argument("--workdir", required=True, help="rows (shared by every table) and reports go here")
    ap.add_argument("--seeds", type=int, nargs="+", help="default: the table's (0 1 2)")
    ap.add_argument("--groups", nargs="+", help="only these lines of the table (default: all)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted row from its checkpoints")
    ap.add_argument("--report-only", action="store_true", help="write the report from the rows already finished")
    ap.add_argument("--set", nargs="+", default=[], metavar="PATH=VALUE",
                    help="change every line's job config, e.g. sections.ood.sv_push_cap=uniform (rows made "
                    "with other values need their own --workdir)")
    ap.add_argument("--restore-rows", nargs="+", default=[], type=Path, metavar="RESULTS_JSON",
                    help="first copy the rows of earlier reports of this table (their results.json) into the "
                    "row store, where it lacks them, e.g. a committed report whose store was not kept")
    args = ap.parse_args(argv)
    table = load_table(args.table)
    if args.seeds:
        table.seeds = args.seeds
    command = "python -m experiments.tables " + " ".join(argv if argv is not None else sys.argv[1:])
    return run_table(table, Path(args.workdir), args.groups, resume=args.resume, report_only=args.report_only,
                     command=command, overrides=args.set, restore_from=args.restore_rows)


def run() -> None:
    """The console entry: SIGTERM writes a checkpoint and exits with 143 (rerun with --resume)."""
    from abd_jax.resume import run_preemptible
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation: XLA reads its flags once
    run_preemptible(main)


if __name__ == "__main__":
    run()
