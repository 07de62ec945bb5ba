"""Every data-free KD method with and without ABD: `python -m experiments.methods --workdir DIR
[--methods cmi ood ...] [--triggers badnets_grid trojan_wm] [--seeds 0 1 2] [--abd-parts sv sr] [--smoke]
[--resume] [--set PATH=VALUE ...]`.

A table of experiments.tables built from the flags: one line per trigger, the columns teacher,
<method> and <method>+abd for each method (each with its config file's settings,
experiments/configs/<method>.py, and the quickstart's teacher; the ZSKT columns run the spec 9.4
ablation with the quickstart's `--abd` settings). Rows go to the shared row store DIR/rows/ (a
finished row is never rerun; `--resume` continues the one that was interrupted), the report to
DIR/methods_sweep/ (report.md with the paper's numbers where it has them, results.json, plots).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from abd_jax.methods import ABD_PARTS, METHODS
from experiments.configs.tables.base import table_config
from experiments.configs.tables.methods import PAPER

DEFAULT_METHODS = ("cmi", "ood")
DEFAULT_TRIGGERS = ("badnets_grid", "trojan_wm")


def sweep_table(methods: list[str], triggers: list[str], seeds: list[int], abd_parts: list[str], smoke: bool):
    """The table the flags describe (experiments/configs/tables/base.table_config)."""
    columns = ["teacher", *(c for m in methods for c in (m, f"{m}+abd"))]
    paper = {t: {c: v for c, v in PAPER[t].items() if c in columns} for t in triggers if t in PAPER}
    t = table_config("methods_sweep", "smoke" if smoke else "digits", title="Data-free KD methods with and without ABD",
                     spec="9.2", columns=columns, groups={t: {"trigger": t} for t in triggers}, paper=paper,
                     abd_parts={m: list(abd_parts) for m in methods},
                     note="Paper: CIFAR-10, WRN-16-2 -> WRN-16-1 (spec 9.2).")
    t.seeds = list(seeds)
    return t


def main(argv: list[str] | None = None) -> dict:
    from experiments.tables import run_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(METHODS))
    ap.add_argument("--triggers", nargs="+", default=list(DEFAULT_TRIGGERS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--abd-parts", nargs="+", default=list(ABD_PARTS), choices=ABD_PARTS,
                    help="what +ABD switches on: the Shuffling Vaccine (sv), Self-Retrospection (sr)")
    ap.add_argument("--smoke", action="store_true", help="seconds-long runs for tests")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted row from its checkpoints")
    ap.add_argument("--set", nargs="+", default=[], metavar="PATH=VALUE",
                    help="change every job config, e.g. sections.ood.sv_push_cap=uniform (experiments.tables --set)")
    args = ap.parse_args(argv)
    table = sweep_table(args.methods, args.triggers, args.seeds, args.abd_parts, args.smoke)
    command = "python -m experiments.methods " + " ".join(argv if argv is not None else sys.argv[1:])
    return run_table(table, Path(args.workdir), resume=args.resume, command=command, overrides=args.set)


def run() -> None:
    """The console entry: SIGTERM writes a checkpoint and exits with 143 (rerun with --resume)."""
    from abd_jax.resume import run_preemptible
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation: XLA reads its flags once
    run_preemptible(main)


if __name__ == "__main__":
    run()
