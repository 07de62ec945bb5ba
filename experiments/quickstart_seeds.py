"""The quickstart over several seeds: `python -m experiments.quickstart_seeds --workdir DIR
[--seeds 0 1 2] [--abd] [--smoke]`.

Runs `experiments.quickstart` once per seed into DIR/seed_N (a seed whose results.json already
exists is not rerun, so an interrupted sweep continues where it stopped), then writes the mean and
standard deviation of every row's Acc / ASR / clean target rate to DIR/results.json and
DIR/summary.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from abd_jax.report import fmt, markdown_table, write_json, write_text

METRICS = ("acc", "asr", "clean_target_rate")


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def aggregate(per_seed: dict[int, dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {metric: {mean, std, values}}} over the seeds' results.json, teacher first."""
    first = next(iter(per_seed.values()))
    rows = ["teacher", *first["rows"]]
    out = {}
    for row in rows:
        runs = [r["teacher"] if row == "teacher" else r["rows"][row] for r in per_seed.values()]
        out[row] = {m: mean_std([float(run[m]) for run in runs]) for m in METRICS}
    return out


def table(agg: dict, seeds: list[int]) -> str:
    header = ["model", *(f"{m.replace('_', ' ')} % (mean ± std)" for m in METRICS), "ASR % per seed"]
    body = [[row, *(f"{fmt(v[m]['mean'])} ± {fmt(v[m]['std'])}" for m in METRICS),
             " / ".join(fmt(a) for a in v["asr"]["values"])] for row, v in agg.items()]
    return f"Seeds {', '.join(map(str, seeds))}\n\n" + markdown_table(header, body)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--abd", action="store_true", help="add the ABD rows (see experiments.quickstart)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="PATH=VALUE",
                    help="passed to every seed's experiments.quickstart (e.g. zskt.generator_upsample=separate)")
    args = ap.parse_args(argv)
    from experiments import quickstart

    workdir = Path(args.workdir)
    per_seed = {}
    for seed in args.seeds:
        out = workdir / f"seed_{seed}"
        done = out / "results.json"
        if not done.exists():
            quickstart.main([f"--workdir={out}", f"--seed={seed}", *(["--abd"] if args.abd else []),
                             *(["--smoke"] if args.smoke else []),
                             *(["--set", *args.overrides] if args.overrides else [])])
        per_seed[seed] = json.loads(done.read_text())
    agg = aggregate(per_seed)
    text = table(agg, args.seeds)
    # Spec 3.4: per seed, whether the Shuffling Vaccine passed verification (absent: not verified).
    vaccine = {seed: r["rows"].get("zskt+sv", {}).get("sv_vaccine") for seed, r in per_seed.items()}
    if any(vaccine.values()):
        text += "\nShuffling Vaccine per seed: " + ", ".join(f"{s}: {v}" for s, v in vaccine.items()) + "\n"
    wall = {seed: r["wall_s"] for seed, r in per_seed.items()}
    # Per seed, not once: an interrupted sweep may finish on another machine, and the CPU alone
    # changes a run (README "The CPU changes the run too").
    machine = {seed: r.get("machine") for seed, r in per_seed.items()}
    write_json(workdir / "results.json", {"seeds": args.seeds, "rows": agg, "wall_s": wall, "sv_vaccine": vaccine,
                                          "machine": machine, "config": next(iter(per_seed.values())).get("config")})
    write_text(workdir / "summary.md", "# Quickstart over seeds\n\n" + text + "\n\nWall time per seed (s): "
               + ", ".join(f"{s}: {w:.0f}" for s, w in wall.items()) + "\n")
    print(text)
    return agg


if __name__ == "__main__":
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation: XLA reads its flags once
    main()
