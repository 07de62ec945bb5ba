"""Every data-free KD method with and without ABD: `python -m experiments.methods --workdir DIR
[--methods cmi ood ...] [--triggers badnets_grid trojan_wm] [--seeds 0 1 2] [--abd-parts sv sr] [--smoke]
[--resume]`.

For each trigger and seed: train (or reuse) the poisoned teacher on the embedded digits, then run
each method's config (experiments/configs/<method>.py) twice, vanilla and +ABD, into
DIR/<trigger>/seed_<seed>/<method>[+abd]. Rows already finished (recorded in that seed's
rows.json) are not rerun, so an interrupted sweep continues where it stopped; `--resume` also
continues the row that was interrupted from its checkpoints. Writes DIR/results.json (every value
and the mean and standard deviation over seeds) and DIR/summary.md, and prints the method x
(vanilla, +ABD) table of Acc / ASR / clean target rate.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

from abd_jax.jobs import checkpoint_policy, discard_checkpoints, run_method, teacher_and_eval
from abd_jax.methods import ABD_PARTS, METHODS
from abd_jax.report import fmt, markdown_table, write_json, write_text
from experiments.quickstart_seeds import METRICS, mean_std

DEFAULT_METHODS = ("cmi", "ood")
DEFAULT_TRIGGERS = ("badnets_grid", "trojan_wm")


def method_cfg(method: str, trigger: str, seed: int, smoke: bool):
    """The method's config file with the sweep's trigger and seed, and the quickstart's teacher: a
    comparison of methods distils one teacher per trigger and seed (the ZSKT config alone trains
    the spec's WRN-16-2 by default, docs/ZSKT.md)."""
    from experiments.configs.quickstart import get_config as quickstart_config

    arg = "smoke" if smoke else None
    cfg = importlib.import_module(f"experiments.configs.{method}").get_config(arg)
    cfg.teacher = quickstart_config(arg).teacher
    cfg.attack.trigger = trigger
    cfg.seed = seed
    return cfg


def run_seed(workdir: Path, methods: list[str], trigger: str, seed: int, abd_parts: tuple[str, ...],
             smoke: bool, resume: bool) -> dict:
    """One trigger and seed: the teacher, then each method vanilla and +ABD. Returns
    {"teacher": metrics, "rows": {row: metrics}}; rows.json records each finished row."""
    rows_file = workdir / "rows.json"
    done = json.loads(rows_file.read_text()) if rows_file.exists() else {"rows": {}}
    for method in methods:
        cfg = method_cfg(method, trigger, seed, smoke)
        # The teacher depends only on data, attack, teacher config and seed, which every method
        # config shares: trained once per trigger and seed, reused (fingerprint) by every row.
        policy = checkpoint_policy(cfg, workdir, resume)
        dataset, eval_sets, teacher, tvars, meta = teacher_and_eval(cfg, workdir, policy)
        done["teacher"] = {k: meta[k] for k in METRICS if k in meta}
        for name, parts in ((method, ()), (f"{method}+abd", abd_parts)):
            if name in done["rows"]:
                continue
            t0 = time.time()
            row = run_method(cfg, workdir, method, name=name, abd_parts=parts, dataset=dataset,
                             eval_sets=eval_sets, teacher=teacher, tvars=tvars, checkpoint=policy)
            done["rows"][name] = {**row, "wall_s": round(time.time() - t0, 1)}
            done.setdefault("config", {})[method] = cfg.to_dict()
            write_json(rows_file, done)
            discard_checkpoints(policy)  # the row's results are written; its checkpoints are not needed
    return done


def aggregate(per_run: dict[tuple[str, int], dict], methods: list[str]) -> dict:
    """{trigger: {row: {metric: {mean, std, values}}}} over the seeds, teacher first."""
    out: dict[str, dict] = {}
    for trigger in dict.fromkeys(t for t, _ in per_run):
        runs = [r for (t, _), r in per_run.items() if t == trigger]
        names = ["teacher", *(n for m in methods for n in (m, f"{m}+abd"))]
        out[trigger] = {
            name: {k: mean_std([float((r["teacher"] if name == "teacher" else r["rows"][name])[k]) for r in runs])
                   for k in METRICS}
            for name in names
        }
    return out


def table(agg: dict, methods: list[str]) -> str:
    """Method x (vanilla, +ABD): Acc / ASR / clean target rate, mean ± std over seeds."""

    def cell(v: dict) -> str:
        return " / ".join(f"{fmt(v[k]['mean'])} ± {fmt(v[k]['std'])}" for k in METRICS)

    header = ["trigger", "method", "teacher", "vanilla", "+ABD", "ASR % per seed (vanilla -> +ABD)"]
    body = []
    for trigger, rows in agg.items():
        for m in methods:
            van, abd = rows[m], rows[f"{m}+abd"]
            per_seed = ", ".join(f"{fmt(a)} -> {fmt(b)}" for a, b in zip(van["asr"]["values"], abd["asr"]["values"]))
            body.append([trigger, m, cell(rows["teacher"]), cell(van), cell(abd), per_seed])
    return ("Each cell: Acc / ASR / clean target rate in %, mean ± std over seeds.\n\n"
            + markdown_table(header, body))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(METHODS))
    ap.add_argument("--triggers", nargs="+", default=list(DEFAULT_TRIGGERS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--abd-parts", nargs="+", default=list(ABD_PARTS), choices=ABD_PARTS,
                    help="what +ABD switches on: the Shuffling Vaccine (sv), Self-Retrospection (sr)")
    ap.add_argument("--smoke", action="store_true", help="seconds-long runs for tests")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted row from its checkpoints")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    t0 = time.time()
    per_run = {(t, s): run_seed(workdir / t / f"seed_{s}", args.methods, t, s, tuple(args.abd_parts), args.smoke,
                                args.resume)
               for t in args.triggers for s in args.seeds}
    agg = aggregate(per_run, args.methods)
    text = table(agg, args.methods)
    wall = {f"{t}/seed_{s}": {n: r["wall_s"] for n, r in run["rows"].items()} for (t, s), run in per_run.items()}
    write_json(workdir / "results.json", {
        "methods": args.methods, "triggers": args.triggers, "seeds": args.seeds, "abd_parts": args.abd_parts,
        "rows": agg, "per_run": {f"{t}/seed_{s}": r for (t, s), r in per_run.items()}, "wall_s": wall,
        "total_wall_s": round(time.time() - t0, 1),
    })
    write_text(workdir / "summary.md", "# Data-free KD methods with and without ABD (embedded digits)\n\n" + text
               + f"\n+ABD = {', '.join(args.abd_parts)}; seeds {', '.join(map(str, args.seeds))}. Per-row "
               "results, curves and samples under each trigger/seed directory.\n")
    print(text)
    return agg


def run() -> None:
    """The console entry: SIGTERM writes a checkpoint and exits with 143 (rerun with --resume)."""
    from abd_jax.resume import run_preemptible

    run_preemptible(main)


if __name__ == "__main__":
    run()
