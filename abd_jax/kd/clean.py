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


def distill_clean(
    teacher: nn.Module,
    teacher_vars: PyTree,
    dataset,
    eval_sets,
    *,
    student: str = "wrn16_1",
    fraction: float = 0.2,
    epochs: int = 170,
    batch_size: int = 128,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    temperature: float = 6.0,
    alpha: float = 0.95,
    flip: bool = True,
    seed: int = 0,
    eval_every: int = 10,
    subset_seed: int = 230,
    checkpoint=None,
    mesh=None,
):
    """Distils `teacher` into a fresh `student` on a clean fraction of the training set (spec 6.4).

    Returns a `TrainedModel` holding the *last* epoch's student (the baseline has no model
    selection on test data) and its Acc/ASR history. `checkpoint`: an `abd_jax.resume.CheckpointPolicy`; `mesh`: a device mesh (abd_jax.parallel).
    """
    from abd_jax.models import check_classifier_fits, get_model, init_model
    from abd_jax.optim import make_optimizer
    from abd_jax.pipeline import TrainedModel, evaluator
    from abd_jax.state import create_train_state
    from abd_jax.teacher import fit

    check_classifier_fits(teacher, teacher_vars, dataset.image_shape, dataset.num_classes)
    x, y = clean_subset(dataset.x_train, dataset.y_train, fraction, seed=subset_seed)
    batch_size = min(batch_size, len(x))
    model = get_model(student, num_classes=dataset.num_classes)
    k_init, k_run = jax.random.split(jax.random.key(seed))
    tx = make_optimizer("sgd", lr, momentum=momentum, weight_decay=weight_decay)
    state = create_train_state(init_model(model, k_init, dataset.image_shape), tx, k_run)
    step = make_clean_kd_step(teacher, model, tx, dataset.mean, dataset.std,
                              temperature=temperature, alpha=alpha, flip=flip)
    ev = evaluator(model, dataset.mean, dataset.std, eval_sets)
    last, _, history = fit(step, state, x, y, epochs=epochs, batch_size=batch_size, seed=seed,
                           evaluate=lambda s: ev(s.variables), eval_every=eval_every,
                           select_key=None, desc="clean-kd", const=teacher_vars,
                           checkpoint=checkpoint, mesh=mesh)
    return TrainedModel(model, last.variables, history[-1] if history else {}, history)
