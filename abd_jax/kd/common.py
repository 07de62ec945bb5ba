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

from abd_jax.losses import attention_transfer, kl_elementwise
from abd_jax.state import TrainState

Metrics = dict[str, jax.Array]
# (teacher_logits [B,C], x [B,H,W,C] normalized, key) -> (scalar added to the generator loss, metrics)
GeneratorPenalty = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Metrics]]
# (teacher_logits [B,C], x) -> [B] signed per-sample weights for the KD loss (OOD-KD)
SampleWeights = Callable[[jax.Array, jax.Array], jax.Array]


class DFKDHooks(NamedTuple):
    """The only extension points a data-free KD method calls. All default to "absent"."""

    generator_penalty: GeneratorPenalty | None = None
    sample_weights: SampleWeights | None = None


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


def apply_gradients(state: TrainState, tx: optax.GradientTransformation, grads: Any, batch_stats: Any) -> TrainState:
    """One optimizer update; the step counter and BN statistics move with it."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        batch_stats=batch_stats,
        step=state.step + 1,
    )
