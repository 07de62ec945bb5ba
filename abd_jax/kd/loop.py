"""The host-side driver shared by data-free KD methods: jitted steps, periodic evaluation,
a progress bar with the current Acc/ASR, and a NaN guard that stops with a clear message."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from abd_jax.parallel import in_mesh, jit_data_parallel, put_replicated
from abd_jax.progress import progress_bar
from abd_jax.resume import CheckpointPolicy, closing, stop_if_preempted

PyTree = Any


def check_finite(metrics: dict, step: int, desc: str) -> dict[str, float]:
    """The scalar training losses as floats; raises FloatingPointError on NaN/Inf (before anything
    is saved, so the last checkpoint stays the last good one)."""
    losses = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
    bad = [k for k, v in losses.items() if not np.isfinite(v)]
    if bad:
        raise FloatingPointError(
            f"{desc}: {', '.join(bad)} became NaN/Inf at step {step}; lower the learning rates or the "
            "loss weights (saved checkpoints are left intact)"
        )
    return losses


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
    checkpoint: CheckpointPolicy | None = None,
    host_state: dict[str, np.ndarray] | None = None,
    mesh: Mesh | None = None,
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
      checkpoint: where this phase (named `desc` and its step range) checkpoints; with
        `checkpoint.resume` it continues from its latest checkpoint (see abd_jax.resume).
      host_state: numpy arrays that `on_step` fills in place (sample pools); checkpointed with the
        state and restored in place.
      mesh: data parallelism over this device mesh (abd_jax.parallel): the state and `const`
        replicated, the batch a step draws split over the devices (`constrain_batch`).

    Returns:
      (final state, history of evaluations, each with "step" and the training losses).
    """
    jitted = jit_data_parallel(step_fn, mesh, batch_argnums=()) if jit_step else in_mesh(step_fn, mesh)
    history: list[dict[str, float]] = []
    phase = checkpoint.open(desc, start_step, num_steps) if checkpoint is not None else None
    restored = phase.restore(state, host_state) if phase is not None else None
    if restored is not None:
        state, start_step, history, host, _ = restored
        for k, v in host.items():
            np.copyto(host_state[k], v)
    # Donation needs every leaf in its own buffer; states built from one key can alias leaves.
    state = jax.tree.map(jnp.copy, state)
    if mesh is not None:
        state, const = put_replicated(state, mesh), put_replicated(const, mesh)

    def save(i: int, metrics: dict, wait: bool = False) -> None:
        check_finite(metrics, i, desc)
        phase.save(i, state, history, host=host_state, wait=wait)

    with progress_bar(total=num_steps, desc=desc) as bar, closing(phase):
        bar.update(start_step)
        for i in range(start_step, num_steps):
            state, metrics = jitted(state, const)
            if on_step is not None:
                on_step(i, state)
            bar.update(1)
            if (eval_every and (i + 1) % eval_every == 0) or i + 1 == num_steps:
                losses = check_finite(metrics, i + 1, desc)  # also without an evaluator
                if evaluate is not None:
                    record = {"step": i + 1, **losses, **evaluate(state)}
                    history.append(record)
                    bar.set_postfix({k: f"{record[k]:.1f}" for k in ("acc", "asr") if k in record})
                    if on_eval is not None:
                        on_eval(i + 1, state, record)
            if phase is not None and phase.due(i + 1):
                save(i + 1, metrics)
            stop_if_preempted(phase, i + 1, lambda: save(i + 1, metrics, wait=True))  # noqa: B023
    return state, history
