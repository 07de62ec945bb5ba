"""What every data-free KD method shares: the extension points ABD plugs into, and the
student's KD update.

A KD method calls only these hooks, so ABD (issue 4), or any other defense, changes a method's
behaviour without the method knowing its internals (DESIGN.md, "ABD as composable pieces").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from abd_jax.abd.self_retrospection import sr_is_on
from abd_jax.losses import attention_transfer, kl_elementwise
from abd_jax.state import TrainState

Metrics = dict[str, jax.Array]
# (teacher_logits [B,C], x [B,H,W,C] normalized, key[, hook_state]) -> (scalar added to the
# generator loss, metrics)
GeneratorPenalty = Callable[..., tuple[jax.Array, Metrics]]
# (teacher_variables, x [B,H,W,C] normalized, key[, hook_state]) -> (teacher output (logits,
# features), scalar added to the generator loss, metrics): a GeneratorPenalty that runs the teacher
# itself, so that it can share the teacher's work (the vaccine's copies start from the teacher's
# own prefix activation).
TeacherAndPenalty = Callable[..., tuple[Any, jax.Array, Metrics]]
# (teacher_logits [B,C], x[, hook_state]) -> [B] signed per-sample weights for the KD loss (OOD-KD)
SampleWeights = Callable[..., jax.Array]
# (student_variables, teacher_variables, x, key, prepared) -> gradient pytree like the student's
# params (Self-Retrospection; the teacher's variables are passed because the trigger model is the
# teacher by default, spec 4.1, and a hook must not close over arrays that jit would embed as
# constants). `prepared` is what `student_sr_prepare` returned for this x, or None without one.
StudentExtraGrads = Callable[[Any, Any, jax.Array, jax.Array, Any], Any]
# (teacher_variables, x, key, student_variables) -> anything the SR gradient needs that depends on
# the images (the teacher-synthesized trigger) and the student as it stands when the batch arrives
# (`ABDOptions.sr_refine_rounds` refines the trigger on it): computed once per image batch, not once
# per student step. `key` is the batch's own (for random trigger-search starts,
# `ABDOptions.sr_fresh_starts`).
StudentSRPrepare = Callable[[Any, jax.Array, jax.Array, Any], Any]
# (student_variables, x, key, prepared) -> the student's BN `batch_stats` after the reference's SR
# forwards (reference-faithful running statistics, spec 4.1): the method's KD forward starts from them.
StudentSRStats = Callable[[Any, jax.Array, jax.Array, Any], Any]


class DFKDHooks(NamedTuple):
    """The only extension points a data-free KD method calls. All default to "absent".

    generator_penalty: added to the generator / inversion loss (Shuffling Vaccine, spec 3.3).
    teacher_and_penalty: the same penalty in a form that also runs the teacher on the generator's
      images and returns its output, so the two can share work. A method whose generator loss
      needs only the teacher's plain output (ZSKT) calls it in place of its teacher forward and
      `generator_penalty`; give one of the two, not both.
    sample_weights: per-sample weights of the KD loss (Shuffling Vaccine in OOD-KD, spec 3.3).
    student_sr: an extra gradient for each student step (Self-Retrospection, spec 4.1); the method
      hands it to the student optimizer as `sr_grads` (or, to skip the work while SR is off, as
      `sr_grad_fn`), which an `abd.self_retrospection` transform adds to the KD gradient and any
      other transform ignores.
    student_sr_prepare: the part of `student_sr` that depends only on the images (and the frozen
      teacher, and the student as the batch arrives): ZSKT takes 10 student steps on one image
      batch, so it runs this once per pseudo-batch and hands the result to every `student_sr`
      call of that batch.
    student_sr_stats: the BN running statistics that the reference's SR forwards leave behind
      (`abd.sr_running_stats`); a method that calls it runs its KD forward from them, so the running
      averages move as in the reference. Absent: only the KD forwards move them.

    A hook whose behaviour depends on state that changes during a run (the vaccine's shuffled
    copies and coefficient) receives it as a trailing `hook_state` argument: the method carries
    that state in its own state pytree, so it flows through jit (no retrace when it changes) and
    into checkpoints.
    """

    generator_penalty: GeneratorPenalty | None = None
    sample_weights: SampleWeights | None = None
    student_sr: StudentExtraGrads | None = None
    student_sr_prepare: StudentSRPrepare | None = None
    teacher_and_penalty: TeacherAndPenalty | None = None  # last: positional construction unchanged
    student_sr_stats: StudentSRStats | None = None  # after it, for the same reason


def with_hook_state(hook_state: Any) -> tuple[Any, ...]:
    """The trailing hook arguments: none when the method carries no hook state."""
    return () if hook_state is None else (hook_state,)


def sr_stats_state(hooks: DFKDHooks, s_state: TrainState, x: jax.Array, key: jax.Array, prepared: Any) -> TrainState:
    """The student state a method's KD forward starts from: with `hooks.student_sr_stats`, the BN
    running statistics the reference's SR forwards leave behind, where SR is on (the optimizer's SR
    coef nonzero). With SR off they stay as they are, so a run with every ABD coefficient 0 is the
    plain run, running statistics included. `key` is the SR gradient's (the same perturbed subset)."""
    if hooks.student_sr_stats is None:
        return s_state
    replayed = hooks.student_sr_stats(s_state.variables, x, key, prepared)
    on = sr_is_on(s_state.opt_state)
    return s_state.replace(batch_stats=jax.tree.map(lambda r, b: jnp.where(on, r, b), replayed, s_state.batch_stats))


def forward(model: nn.Module, state: TrainState, x: jax.Array, *, train: bool, key: jax.Array | None = None):
    """Runs `model` on normalized images; returns ((logits, features), new_batch_stats).

    In train mode BatchNorm uses batch statistics and the running statistics are updated (as
    PyTorch does on every train-mode forward); in eval mode they are read only.
    """
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    rngs = {"dropout": key} if key is not None else None
    if train:
        out, upd = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
        return out, upd.get("batch_stats", state.batch_stats)
    return model.apply(variables, x, train=False), state.batch_stats


def kd_loss(
    teacher_logits: jax.Array,
    teacher_feats: Sequence[jax.Array],
    student_logits: jax.Array,
    student_feats: Sequence[jax.Array],
    *,
    temperature: float,
    beta: float,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """ZSKT student loss (spec 6.1): KL_tau(T||S) averaged over B*C, plus beta * attention transfer.

    `weights` ([B], optional) re-weights the per-sample terms; with weights None the reduction is
    the plain mean, exactly the reference's `reduction='mean'`.
    """
    kl = jnp.mean(kl_elementwise(teacher_logits, student_logits, temperature), axis=-1)  # [B]
    at = attention_transfer(teacher_feats, student_feats) if beta else jnp.zeros_like(kl)
    per_sample = kl + beta * at
    loss = jnp.mean(per_sample) if weights is None else jnp.mean(weights * per_sample)
    return loss, {"kl": jnp.mean(kl), "at": jnp.mean(at)}


def apply_gradients(
    state: TrainState, tx: optax.GradientTransformation, grads: Any, batch_stats: Any, **extra_args: Any
) -> TrainState:
    """One optimizer update; the step counter and BN statistics move with it.

    `extra_args` (e.g. `sr_grad_fn`) go to transformations that take extra arguments
    (`optax.GradientTransformationExtraArgs`); `optax.chain` hides them from those that do not.
    """
    if extra_args:
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra_args)
    else:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        batch_stats=batch_stats,
        step=state.step + 1,
    )
