"""Time one ZSKT pseudo-batch with Self-Retrospection (spec 4.1) on every student step.

    python -m benchmarks.zskt_sr [--size 16] [--batch 128] [--teacher wrn16_1] [--repeats 3]
                                 [--rounds 10] [--fp 5] [--loop-friendly on off] [--json]

WRN teacher (random weights: speed does not depend on them) -> WRN-16-1 student, embedded
digits geometry, 1 generator + 10 student steps, each student step with SR (R trigger rounds,
K fixed-point iterations). `--loop-friendly off` times the plain `lax.conv_general_dilated`
gradients inside SR's loops (abd_jax/models/conv_op.py) for comparison. Prints compile time and
median/min/max of the steady-state pseudo-batch time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from unittest import mock

import jax

from abd_jax.data.embedded import load_digits
from abd_jax.kd.common import DFKDHooks
from abd_jax.kd.zskt_train import ZSKTConfig, build_zskt, sr_phase
from abd_jax.models import conv_op, get_model, init_model
from benchmarks.timing import time_repeats


def time_case(args, loop_friendly: bool) -> dict:
    ds = load_digits(args.size)
    teacher = get_model(args.teacher, 10)
    tvars = init_model(teacher, jax.random.key(0), ds.image_shape)
    cfg = ZSKTConfig(pseudo_batches=100, batch_size=args.batch, sr_pseudo_batches=10,
                     sr_rounds=args.rounds, sr_fp_iterations=args.fp, sr_fuse=args.fuse)
    student, generator, state, _ = build_zskt(teacher, ds, cfg, seed=0, teacher_vars=tvars)
    state, step = sr_phase(teacher, student, generator, state, cfg, DFKDHooks())
    # "off" makes SR's context a no-op, so its loops trace the plain lax convolution gradients.
    sr_module = sys.modules["abd_jax.abd.self_retrospection"]
    switch = conv_op.loop_friendly_convs if loop_friendly else (lambda: conv_op.loop_friendly_convs(False))
    with mock.patch.object(sr_module, "loop_friendly_convs", switch):
        t0 = time.perf_counter()  # the first call compiles ("host": the pieces; else the whole)
        compiled = jax.jit(step) if args.fuse != "host" else step
        state, m = compiled(state, tvars)
        jax.block_until_ready((state, m))
        compile_s = time.perf_counter() - t0
    _, timing = time_repeats(compiled, state, tvars, args.repeats)
    return {"case": f"zskt_sr_pseudo_batch_loop_friendly_{'on' if loop_friendly else 'off'}",
            "size": args.size, "batch": args.batch, "teacher": args.teacher, "rounds": args.rounds,
            "fp_iterations": args.fp, "fuse": args.fuse, "first_call_s": round(compile_s, 2),
            **timing, "device": jax.devices()[0].device_kind}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--teacher", default="wrn16_1")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--fp", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fuse", default="host", choices=["host", "unroll"])
    ap.add_argument("--loop-friendly", nargs="*", default=["on", "off"], choices=["on", "off"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for mode in args.loop_friendly:
        row = time_case(args, mode == "on")
        print(json.dumps(row) if args.json else
              f"loop-friendly {mode:3s}  first call {row['first_call_s']:6.1f} s   median {row['median_ms']:9.1f} ms"
              f"  (min {row['min_ms']:.1f}, max {row['max_ms']:.1f}) on {row['device']}", flush=True)


if __name__ == "__main__":
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation: XLA reads its flags once
    main()
