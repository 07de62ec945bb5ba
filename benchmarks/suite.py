"""The speed suite at the paper's configuration (issue 7): WRN-16-2 teacher -> WRN-16-1 student,
batch 128, 32x32x3 images, 1 generator + 10 student steps per ZSKT pseudo-batch.

    python -m benchmarks.suite [--cases teacher_forward kd_step zskt zskt_sv zskt_sr [student_fwd_bwd]]
                               [--size 32] [--teacher wrn16_2] [--batch 128] [--repeats 5] [--json]
                               [--zskt FIELD=VALUE ...]

Per case: compile time (for the host-looped SR pseudo-batch: its first call minus one steady
call), median / min / max of the steady-state wall time over `--repeats` calls, the FLOP count
XLA's cost analysis gives for the compiled step (for SR: the same pseudo-batch lowered unrolled,
not compiled; on a GPU the compiled count leaves out the convolutions handed to cuDNN, so there
it and the GFLOP/s are far too low: take the FLOP count from a CPU run of the same case), the
achieved GFLOP/s, XLA's buffer sizes for the step, and the process's peak RSS
so far. Random weights (speed does not depend on them); the same script runs unchanged on a GPU.
`--json` prints one JSON object per case with `median_ms`, `min_ms`, `max_ms`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from abd_jax.data.base import Dataset
from abd_jax.kd.clean import make_clean_kd_step
from abd_jax.kd.common import DFKDHooks
from abd_jax.kd.zskt_train import ZSKTConfig, build_zskt, sr_phase
from abd_jax.models import get_model, init_model
from abd_jax.optim import make_optimizer
from abd_jax.state import create_train_state
from benchmarks.timing import time_repeats

DEFAULT_CASES = ("teacher_forward", "kd_step", "zskt", "zskt_sv", "zskt_sr")  # issue 7's table
CASES = (*DEFAULT_CASES, "student_fwd_bwd")


def _geometry(size: int) -> Dataset:
    """A dataset shell with the paper's geometry (only shapes and normalization are used)."""
    x = np.zeros((1, size, size, 3), np.uint8)
    return Dataset(name="bench", x_train=x, y_train=np.zeros(1, np.int32), x_test=x, y_test=np.zeros(1, np.int32),
                   num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def setup(args):
    """The geometry, the teacher model and its (random) variables every case shares."""
    ds = _geometry(args.size)
    teacher = get_model(args.teacher, 10)
    return ds, teacher, init_model(teacher, jax.random.key(0), ds.image_shape)


def cost_flops(lowered_or_compiled) -> float | None:
    """XLA's FLOP estimate (best effort: None where the backend gives none). Loop bodies are
    counted once, so only loop-free (unrolled) steps give a whole-step count."""
    try:
        cost = lowered_or_compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - best effort by design (jax.stages docs)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def buffer_mib(compiled) -> dict[str, float]:
    """XLA's argument / output / temporary buffer sizes of a compiled step, in MiB."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return {}
    if m is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    return {f"{f.split('_size')[0]}_mib": round(getattr(m, f) / 2**20, 1) for f in fields if hasattr(m, f)}


def peak_rss_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024 if sys.platform != "darwin" else kb / 2**20, 1)


def time_jitted(fn: Callable, state: Any, const: Any, repeats: int, donate: bool = True) -> dict:
    """Compile `fn(state, const)` ahead of time, then time steady calls."""
    jitted = jax.jit(fn, donate_argnums=(0,) if donate else ())
    t0 = time.perf_counter()
    compiled = jitted.lower(state, const).compile()
    compile_s = time.perf_counter() - t0
    state = jax.tree.map(jnp.copy, state)
    state, out = compiled(state, const)  # warm-up call
    jax.block_until_ready((state, out))
    _, timing = time_repeats(compiled, state, const, repeats)
    return {"compile_s": round(compile_s, 2), **timing, "flops": cost_flops(compiled), **buffer_mib(compiled)}


def case_teacher_forward(args, ds, teacher, tvars) -> dict:
    x = jax.random.normal(jax.random.key(1), (args.batch, *ds.image_shape))

    def fwd(x, tv):  # (state, const) shape for the timer: the images play the state
        return x, teacher.apply(tv, x, train=False)[0]

    return time_jitted(fwd, x, tvars, args.repeats, donate=False)


def student_fwd_bwd_step(args, ds):
    """(function, images, student variables) of the student_fwd_bwd case, in the timer's
    (state, const) shape (also what benchmarks.profile_trace traces)."""
    student = get_model(args.student, 10)
    svars = init_model(student, jax.random.key(2), ds.image_shape)
    x = jax.random.normal(jax.random.key(1), (args.batch, *ds.image_shape))

    def grads(x, sv):
        def loss(params):
            (logits, _), _ = student.apply({**sv, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.mean(jnp.square(logits))

        return x, jax.grad(loss)(sv["params"])

    return grads, x, svars


def case_student_fwd_bwd(args, ds, teacher, tvars) -> dict:
    """The student's forward + backward in train mode (parameter gradients of a scalar of its
    logits): the part of the KD step that differs most between XLA:CPU and PyTorch."""
    fn, x, svars = student_fwd_bwd_step(args, ds)
    return time_jitted(fn, x, svars, args.repeats, donate=False)


def case_kd_step(args, ds, teacher, tvars) -> dict:
    student = get_model(args.student, 10)
    tx = make_optimizer("adam", 2e-3, clip_norm=5.0)
    s_state = create_train_state(init_model(student, jax.random.key(2), ds.image_shape), tx, jax.random.key(3))
    step = make_clean_kd_step(teacher, student, tx, ds.mean, ds.std, temperature=1.0, alpha=1.0, augment=False)
    x = jax.random.randint(jax.random.key(4), (args.batch, *ds.image_shape), 0, 256).astype(jnp.uint8)
    y = jnp.zeros((args.batch,), jnp.int32)
    return time_jitted(lambda s, c: step(s, c[0], c[1], c[2]), s_state, (tvars, x, y), args.repeats)


def zskt_overrides(items: list[str]) -> dict:
    """`--zskt sr_bn_replay=false ...`: ZSKTConfig fields for the zskt cases, each parsed as its
    field's type; an unknown field names the fix."""
    from experiments.overrides import parse_fields

    return parse_fields(items, ZSKTConfig, "--zskt")


def _zskt_cfg(args, **kw) -> ZSKTConfig:
    kw = {**kw, **zskt_overrides(getattr(args, "zskt", None) or [])}
    return ZSKTConfig(pseudo_batches=1000, batch_size=args.batch, student=args.student, **kw)


def zskt_step(args, ds, teacher, tvars, sv: bool = False):
    """(pseudo-batch function, state) of the ZSKT case at the suite's configuration (also what
    benchmarks.profile_trace traces)."""
    _, _, state, step = build_zskt(teacher, ds, _zskt_cfg(args, sv=sv), seed=0, teacher_vars=tvars)
    return step, state


def case_zskt(args, ds, teacher, tvars, sv: bool = False) -> dict:
    step, state = zskt_step(args, ds, teacher, tvars, sv)
    return time_jitted(step, state, tvars, args.repeats)


def case_zskt_sr(args, ds, teacher, tvars) -> dict:
    """The SR pseudo-batch as the runs use it (`sr_fuse="host"`: the generator half and one SR
    student step compiled separately, looped in Python)."""
    cfg = _zskt_cfg(args, sr_pseudo_batches=10)
    student, generator, state, _ = build_zskt(teacher, ds, cfg, seed=0, teacher_vars=tvars)
    state, step = sr_phase(teacher, student, generator, state, cfg, DFKDHooks())
    # FLOPs from the unrolled form of the same pseudo-batch (lowered only: compiling it takes minutes).
    unrolled = sr_phase(teacher, student, generator, state, dataclasses.replace(cfg, sr_fuse="unroll"), DFKDHooks())[1]
    flops = cost_flops(jax.jit(unrolled).lower(state, tvars))
    state = jax.tree.map(jnp.copy, state)
    t0 = time.perf_counter()
    state, m = step(state, tvars)
    jax.block_until_ready((state, m))
    first_s = time.perf_counter() - t0
    _, timing = time_repeats(step, state, tvars, args.repeats)
    return {"compile_s": round(max(first_s - timing["median_ms"] / 1000, 0.0), 2), **timing, "flops": flops}


RUNNERS = {"teacher_forward": case_teacher_forward, "kd_step": case_kd_step, "zskt": case_zskt,
           "zskt_sv": lambda *a: case_zskt(*a, sv=True), "zskt_sr": case_zskt_sr,
           "student_fwd_bwd": case_student_fwd_bwd}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=CASES)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--teacher", default="wrn16_2")
    ap.add_argument("--student", default="wrn16_1")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--zskt", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="ZSKTConfig fields for the zskt, zskt_sv and zskt_sr cases, e.g. sr_bn_replay=false")
    args = ap.parse_args(argv)
    zskt_overrides(args.zskt)  # a typo fails before anything compiles
    ds, teacher, tvars = setup(args)
    rows = []
    for case in args.cases:
        r = RUNNERS[case](args, ds, teacher, tvars)
        gflops = r["flops"] / r["median_ms"] / 1e6 if r.get("flops") else None
        row = {"case": case, "size": args.size, "batch": args.batch, "teacher": args.teacher,
               "student": args.student, **r, "gflop_per_s": round(gflops, 1) if gflops else None,
               "peak_rss_mib": peak_rss_mib(), "device": jax.devices()[0].device_kind,
               "backend": jax.default_backend(), "jax": jax.__version__,
               "xla_flags": os.environ.get("XLA_FLAGS", "")}
        if args.zskt and case.startswith("zskt"):
            row["zskt"] = args.zskt
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            gf = f"{row['gflop_per_s']:.0f} GFLOP/s" if row["gflop_per_s"] else "GFLOP/s n/a"
            print(f"{case:16s} compile {row['compile_s']:7.1f} s   median {row['median_ms']:9.1f} ms "
                  f"(min {row['min_ms']:.1f}, max {row['max_ms']:.1f})   {gf}   peak RSS {row['peak_rss_mib']:.0f} MiB"
                  f"   on {row['device']}", flush=True)
    return rows


if __name__ == "__main__":
    from abd_jax.xla_cpu import use_eigen_convolutions

    use_eigen_convolutions()  # before the first computation: XLA reads its flags once
    main()
