"""Time one ZSKT pseudo-batch with the student steps unrolled, in `lax.scan` (with unroll=k) or
looped on the host over one jitted step ("host").

    python -m benchmarks.zskt_fuse [--size 16] [--batch 128] [--teacher wrn16_2] [--sv]
                                   [--repeats 5] [--variants unroll host ...] [--json]

WRN teacher (random weights: speed does not depend on them) -> WRN-16-1 student, embedded
digits geometry, 1 generator + 10 student steps; `--sv` adds the Shuffling Vaccine penalty to the
generator step (3 copies, last 5 convs). Prints the first call (compile; for "host" the first
call minus one steady call, as its pieces compile on first use) and median/min/max of the
steady-state pseudo-batch time per variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax

from abd_jax.data.embedded import load_digits
from abd_jax.kd.zskt_train import ZSKTConfig, build_zskt
from abd_jax.models import get_model, init_model
from benchmarks.timing import time_repeats

VARIANTS = {"unroll": dict(fuse="unroll"), "host": dict(fuse="host"), "scan": dict(fuse="scan", scan_unroll=1),
            "scan_unroll2": dict(fuse="scan", scan_unroll=2), "scan_unroll5": dict(fuse="scan", scan_unroll=5)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--teacher", default="wrn16_2")
    ap.add_argument("--sv", action="store_true", help="with the Shuffling Vaccine penalty")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ds = load_digits(args.size)
    teacher = get_model(args.teacher, 10)
    tvars = init_model(teacher, jax.random.key(0), ds.image_shape)
    for name in args.variants:
        cfg = dataclasses.replace(ZSKTConfig(pseudo_batches=1000, batch_size=args.batch, sv=args.sv),
                                  **VARIANTS[name])
        _, _, state, step = build_zskt(teacher, ds, cfg, seed=0, teacher_vars=tvars)
        compiled = step if cfg.fuse == "host" else jax.jit(step)  # "host" jits its own pieces
        t0 = time.perf_counter()
        state, m = compiled(state, tvars)
        jax.block_until_ready((state, m))
        first_s = time.perf_counter() - t0
        state, timing = time_repeats(compiled, state, tvars, args.repeats)
        row = {"case": f"zskt{'_sv' if args.sv else ''}_pseudo_batch_{name}", "size": args.size,
               "batch": args.batch, "teacher": args.teacher, "first_call_s": round(first_s, 2), **timing,
               "device": jax.devices()[0].device_kind}
        print(json.dumps(row) if args.json else
              f"{name:14s} first call {first_s:6.1f} s   median {row['median_ms']:8.1f} ms  "
              f"(min {row['min_ms']:.1f}, max {row['max_ms']:.1f}) on {row['device']}", flush=True)


if __name__ == "__main__":
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation: XLA reads its flags once
    main()
