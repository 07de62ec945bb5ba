"""The host-side driver shared by data-free KD methods: jitted steps, periodic evaluation,
a progress bar with the current Acc/ASR, and a NaN guard that stops with a clear message."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from abd_jax.progress import progress_bar

PyTree = Any


def run_steps(
    step_fn: Callable[[PyTree, PyTree], tuple[PyTree, dict]],
    state: PyTree,
    const: PyTree,
    *,
    num_steps: int,
    evaluate: Callable[[PyTree], dict[str, float]] | None = None,
    eval_every: int = 0,
    desc: str = "distill",
    start_step: int = 0,
    on_eval: Callable[[int, PyTree, dict[str, float]], None] | None = None,
    jit_step: bool = True,
    on_step: Callable[[int, PyTree], None] | None = None,
) -> tuple[PyTree, list[dict[str, float]]]:
    """Runs `state = step_fn(state, const)` for steps start_step..num_steps-1.

    Args:
      step_fn: a pure step (jitted here once, with the state donated).
      const: what the step reads but never changes (the teacher's variables): passed as an
        argument rather than closed over so XLA does not embed it as a constant.
      evaluate: returns {"acc", "asr", ...} for a state; run every `eval_every` steps and at the end.
      on_eval: called after each evaluation (checkpointing, plotting).
      jit_step: False for a step that compiles its own pieces (ZSKT's fuse="host").
      on_step: called as on_step(i, state) after step i (0-based), e.g. to pool samples.

    Returns:
      (final state, history of evaluations, each with "step" and the training losses).
    """
    jitted = jax.jit(step_fn, donate_argnums=(0,)) if jit_step else step_fn
    # Donation needs every leaf in its own buffer; states built from one key can alias leaves.
    state = jax.tree.map(jnp.copy, state)
    history: list[dict[str, float]] = []
    with progress_bar(total=num_steps, desc=desc) as bar:
        bar.update(start_step)
        for i in range(start_step, num_steps):
            state, metrics = jitted(state, const)
            if on_step is not None:
                on_step(i, state)
            bar.update(1)
            last = i + 1 == num_steps
            if evaluate is not None and ((eval_every and (i + 1) % eval_every == 0) or last):
                losses = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
                bad = [k for k, v in losses.items() if not np.isfinite(v)]
                if bad:
                    raise FloatingPointError(
                        f"{desc}: {', '.join(bad)} became NaN/Inf at step {i + 1}; lower the "
                        "learning rates or the loss weights (saved checkpoints are left intact)"
                    )
                record = {"step": i + 1, **losses, **evaluate(state)}
                history.append(record)
                bar.set_postfix({k: f"{record[k]:.1f}" for k in ("acc", "asr") if k in record})
                if on_eval is not None:
                    on_eval(i + 1, state, record)
    return state, history
