"""XLA:CPU settings for abd-jax's convolutions (docs/PERFORMANCE.md, "Convolutions on XLA:CPU").

jaxlib 0.10 hands large convolutions to YNNPACK by default. On the project's 2-core AVX-512
machine, XLA's other convolution path (Eigen's) ran the WRN teacher's forward pass in 160-185 ms
instead of 235-242 ms and the KD step in 427-468 ms instead of 509-535 ms (2026-11-28,
`benchmarks.suite`). `--xla_cpu_experimental_ynn_fusion_type=individual_dot` keeps YNNPACK for
matrix products and leaves convolutions to Eigen.

XLA reads XLA_FLAGS once, when JAX starts its backends, so the entry points (CLI, experiments,
benchmarks, the test suite) call `use_eigen_convolutions()` before their first computation.
Library users who want the same do that before their own first JAX computation. It changes
rounding (another convolution algorithm), not the math.
"""

from __future__ import annotations

import os
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
EIGEN_CONVS_FLAG = f"{YNN_FLAG}=individual_dot"
# XLA aborts the process on a flag it does not know, and the YNN flag is marked experimental:
# only add it for jaxlib minor versions known to accept it (0.10 measured here, 0.11 on the GPU image).
KNOWN_JAXLIB = ((0, 10), (0, 11))
OPT_OUT_ENV = "ABD_JAX_XLA_DEFAULTS"  # "1": leave XLA_FLAGS alone


def with_eigen_convolutions(xla_flags: str, jaxlib_version: tuple[int, ...]) -> str:
    """XLA_FLAGS with the Eigen-convolution flag added: unchanged when the flags already choose a
    YNN setting (the user's choice wins) or the jaxlib version is not known to accept it."""
    if tuple(jaxlib_version[:2]) not in KNOWN_JAXLIB or YNN_FLAG in xla_flags:
        return xla_flags
    return f"{xla_flags} {EIGEN_CONVS_FLAG}".strip()


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - JAX moved it; assume the worst
        return True
    return bool(xla_bridge.backends_are_initialized())


def _jaxlib_version() -> tuple[int, ...]:
    import jaxlib

    return tuple(int(p) for p in jaxlib.__version__.split(".")[:2] if p.isdigit())


def use_eigen_convolutions() -> bool:
    """Add the flag to os.environ["XLA_FLAGS"] if JAX's backends have not started yet.

    Returns True when XLA_FLAGS now asks for Eigen convolutions. Does nothing when
    ABD_JAX_XLA_DEFAULTS=1, and warns (without changing anything) when called too late."""
    if os.environ.get(OPT_OUT_ENV) == "1":
        return False
    current = os.environ.get("XLA_FLAGS", "")
    new = with_eigen_convolutions(current, _jaxlib_version())
    if new == current:
        return EIGEN_CONVS_FLAG in current
    if _backends_started():
        warnings.warn("abd_jax.xla_cpu.use_eigen_convolutions() was called after JAX started its "
                      "backends, so XLA keeps its default convolutions; call it before the first "
                      "JAX computation.", stacklevel=2)
        return False
    os.environ["XLA_FLAGS"] = new
    return True
