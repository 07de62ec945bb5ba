"""The main job: `python -m experiments.quickstart --workdir DIR [--seed N] [--abd] [--smoke] [--resume]
[--set zskt.FIELD=VALUE ...]`.

On the embedded digits (no download): train (or reuse) a BadNets-grid poisoned WRN-16-1 teacher,
distil it with vanilla ZSKT (with `--abd` also with ZSKT+SV, ZSKT+SR and ZSKT+ABD) and with clean KD, print the table and write into DIR `results.json`,
`summary.md`, the PNG curves and a grid of synthetic images.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from abd_jax.jobs import (
    checkpoint_policy,
    discard_checkpoints,
    run_clean_kd,
    run_zskt,
    run_zskt_abd,
    teacher_and_eval,
    write_results,
)
from experiments.configs.quickstart import add_abd_settings, get_config
from experiments.overrides import apply_overrides


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="output directory (created)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a seconds-long run for tests")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted run from WORKDIR/checkpoints (same other flags)")
    ap.add_argument("--abd", action="store_true",
                    help="add the ABD rows zskt+sv, zskt+sr, zskt+abd (SR over the last "
                         "zskt.sr_pseudo_batches of the run)")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="PATH=VALUE",
                    help="change a job-config field, e.g. zskt.generator_upsample=separate zskt.sv_share_prefix=false "
                         "(the float order of runs before 2026-11-27)")
    args = ap.parse_args(argv)
    cfg = get_config("smoke" if args.smoke else None)
    cfg.seed = args.seed
    if args.abd:
        add_abd_settings(cfg, args.smoke)
    apply_overrides(cfg, args.overrides)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    policy = checkpoint_policy(cfg, workdir, args.resume)
    dataset, eval_sets, teacher, tvars, meta = teacher_and_eval(cfg, workdir, policy)
    shared = dict(dataset=dataset, eval_sets=eval_sets, teacher=teacher, tvars=tvars, checkpoint=policy)
    if args.abd:
        rows = run_zskt_abd(cfg, workdir, **shared)
    else:
        rows = {"zskt": run_zskt(cfg, workdir, **shared)}
    rows["clean_kd"] = run_clean_kd(cfg, workdir, **shared)
    table = write_results(workdir, cfg, meta, rows, time.time() - t0,
                          "Quickstart: poisoned teacher, ZSKT and clean KD on the embedded digits")
    discard_checkpoints(policy)
    print(table)
    print(f"wrote {workdir / 'results.json'} and {workdir / 'summary.md'}")
    import json
    return json.loads((workdir / "results.json").read_text())


def run() -> None:
    """The console entry: SIGTERM writes a checkpoint and exits with 143 (rerun with --resume)."""
    from abd_jax.resume import run_preemptible
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation: XLA reads its flags once
    run_preemptible(main)


if __name__ == "__main__":
    run()
