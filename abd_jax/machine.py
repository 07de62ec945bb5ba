"""What machine a result came from, recorded next to it (results.json, sweep rows).

Why: the same code, seed and pinned packages give different runs on different CPUs. XLA:CPU and
the kernel libraries it calls pick instructions by what the CPU offers, which changes rounding,
and a few hundred adversarial pseudo-batches turn rounding into a different run (on the
quickstart, even into whether the backdoor transfers; README "The CPU changes the run too").
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import jax

# The x86 extensions that decide which vector code XLA and oneDNN/YNNPACK/Eigen run.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_description(cpuinfo: str | None = None) -> dict[str, object]:
    """{"cpu": model name, "isa": the `ISA_FLAGS` it has}, from /proc/cpuinfo where there is one."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags]}


def machine_info() -> dict[str, object]:
    """The accelerator, the CPU, XLA_FLAGS and the JAX version (starts JAX's backends).

    XLA_FLAGS as this process runs with them: the entry points add their Eigen-convolution flag
    (`abd_jax.xla_cpu`, unless ABD_JAX_XLA_DEFAULTS=1) to whatever the shell set, so the flag appears
    even when the shell set none."""
    return {"device": jax.devices()[0].device_kind, **cpu_description(), "cores": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}
