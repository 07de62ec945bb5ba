"""Steady-state timing shared by the benchmark scripts: run a compiled step repeatedly and
summarize the wall times (milliseconds) as median / min / max."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def time_repeats(step: Callable[[Any, Any], tuple[Any, Any]], state: Any, const: Any,
                 repeats: int) -> tuple[Any, dict[str, float]]:
    """Calls `state, metrics = step(state, const)` `repeats` times, waiting for each result.
    Returns the last state and {"median_ms", "min_ms", "max_ms"}."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = step(state, const)
        jax.block_until_ready((state, metrics))
        times.append(1000 * (time.perf_counter() - t0))
    return state, {"median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1),
                   "max_ms": round(max(times), 1)}
