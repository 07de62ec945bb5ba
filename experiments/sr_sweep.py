"""Self-Retrospection settings on the quickstart: `python -m experiments.sr_sweep --workdir DIR
[--seed 0] [--sv] [--variants "portion=0.02" "portion=0.5,rounds=20" ...]`.

Trains (or reuses, from DIR/teacher) the quickstart's poisoned teacher, runs the quickstart's ZSKT
(with `--sv` the ZSKT+SV run) up to pseudo-batch N - k once, then resumes it with SR once per
variant (each a comma-separated list of `ZSKTConfig` SR fields: sr_ prefix optional), and prints
and appends to DIR/sr_sweep.jsonl the final Acc / ASR / clean target rate of each, beside the
plain (no-SR) ending. Used to choose the quickstart's SR setting (docs/ABD_SR.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax

from abd_jax.jobs import teacher_and_eval, zskt_config_from
from abd_jax.kd.common import DFKDHooks
from abd_jax.kd.loop import run_steps
from abd_jax.kd.zskt_train import build_zskt, sr_phase
from abd_jax.pipeline import evaluator
from experiments.configs.quickstart import get_config


def parse_variant(spec: str) -> dict:
    """"portion=0.5,rounds=20" -> {"sr_portion": 0.5, "sr_rounds": 20}."""
    out = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=")
        key = key if key.startswith("sr_") else f"sr_{key}"
        try:
            out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:  # e.g. trigger_model=student
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sv", action="store_true", help="resume the ZSKT+SV run instead of vanilla ZSKT")
    ap.add_argument("--sr-pseudo-batches", type=int, default=10)
    ap.add_argument("--variants", nargs="+", default=["portion=0.02"])
    args = ap.parse_args(argv)
    cfg = get_config()
    cfg.seed = args.seed
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dataset, eval_sets, teacher, tvars, _ = teacher_and_eval(cfg, workdir)
    zc = dataclasses.replace(zskt_config_from(cfg.zskt), sv=args.sv, sr_pseudo_batches=args.sr_pseudo_batches)
    student, generator, state, step = build_zskt(teacher, dataset, zc, args.seed, DFKDHooks(), tvars)
    ev = evaluator(student, dataset.mean, dataset.std, eval_sets)
    evaluate = lambda s: ev(s.student.variables)  # noqa: E731
    main_steps = zc.pseudo_batches - zc.sr_pseudo_batches
    state, _ = run_steps(step, state, tvars, num_steps=main_steps, desc="prefix")
    _, plain = run_steps(step, state, tvars, num_steps=zc.pseudo_batches, start_step=main_steps,
                         evaluate=evaluate, desc="plain")
    rows = [{"variant": "plain (no SR)", **plain[-1]}]
    hooks = DFKDHooks()
    if args.sv:
        from abd_jax.kd.zskt_train import sv_penalty_hook

        hooks = hooks._replace(generator_penalty=sv_penalty_hook(teacher))
    for spec in args.variants:
        vc = dataclasses.replace(zc, **parse_variant(spec))
        t0 = time.perf_counter()
        sr_state, sr_step = sr_phase(teacher, student, generator, state, vc, hooks)
        _, hist = run_steps(sr_step, sr_state, tvars, num_steps=vc.pseudo_batches, start_step=main_steps,
                            evaluate=evaluate, desc=f"SR {spec}", jit_step=vc.sr_fuse != "host")
        rows.append({"variant": spec, **hist[-1], "seconds": round(time.perf_counter() - t0, 1)})
    with open(workdir / "sr_sweep.jsonl", "a") as f:
        for r in rows:
            r = {**r, "seed": args.seed, "sv": args.sv, "sr_pseudo_batches": zc.sr_pseudo_batches,
                 "device": jax.devices()[0].device_kind}
            f.write(json.dumps(r) + "\n")
            print(f"{r['variant']:40s} acc {r['acc']:5.1f}  asr {r['asr']:5.1f}  ctr {r['clean_target_rate']:5.1f}")
    return rows


if __name__ == "__main__":
    main()
