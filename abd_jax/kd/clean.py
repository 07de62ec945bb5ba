"""The clean-data KD baseline (spec 6.4): the "Clean KD" comparison row.

A student distilled on a fixed fraction of the *real, clean* training set with
0.95 * T^2 * KL_T(T||S) + 0.05 * CE(S, y), T = 6, SGD(0.1, momentum 0.9, wd 5e-4), constant LR.
On clean in-distribution data the backdoor is not expected to transfer (spec 1.2.1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from abd_jax.augment import normalize, random_crop_flip
from abd_jax.kd.common import Metrics, apply_gradients, forward
from abd_jax.losses import cross_entropy, kl_elementwise
from abd_jax.state import TrainState

PyTree = Any


def clean_subset(x: np.ndarray, y: np.ndarray, fraction: float, seed: int = 230) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random subset of the clean training set (the reference uses 20% with seed 230)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    idx = np.random.default_rng(seed).permutation(len(x))[: max(1, int(round(fraction * len(x))))]
    return x[idx], y[idx]


def make_clean_kd_step(
    teacher: nn.Module,
    student: nn.Module,
    tx: optax.GradientTransformation,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    temperature: float = 6.0,
    alpha: float = 0.95,
    augment: bool = True,
    flip: bool = True,
) -> Callable[[TrainState, PyTree, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """Returns `step(student_state, teacher_variables, x_uint8, y) -> (state, metrics)`; not jitted."""

    def step(state: TrainState, teacher_vars: PyTree, x: jax.Array, y: jax.Array):
        key = jax.random.fold_in(state.key, state.step)
        xb = random_crop_flip(key, x, flip=flip) if augment else x
        xb = normalize(xb, mean, std)
        t_logits, _ = teacher.apply(teacher_vars, xb, train=False)

        def loss_fn(params):
            (s_logits, _), stats = forward(student, state.replace(params=params), xb, train=True)
            kl = jnp.mean(kl_elementwise(t_logits, s_logits, temperature))
            ce = jnp.mean(cross_entropy(s_logits, y))
            loss = alpha * temperature**2 * kl + (1.0 - alpha) * ce
            return loss, (stats, kl, ce)

        (loss, (stats, kl, ce)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return apply_gradients(state, tx, grads, stats), {"loss": loss, "kl": kl, "ce": ce}

    return step
