"""Poisoning the teacher's training set and building the ASR test set (spec 7, spec 8).

Host-side numpy on uint8 pixel-space images [N, S, S, C] (the `Dataset` layout of
abd_jax/data/base.py); the only jax code is the PGD used to build clean-label (CL) poisons.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from abd_jax.attacks.triggers import Trigger, apply_trigger_np

# spec 7: SIG and CL poison target-class images and keep their labels.
CLEAN_LABEL_TRIGGERS: frozenset[str] = frozenset({"sig", "cl"})

# (float32 pixel images [n, S, S, C], int labels [n]) -> perturbed pixel images [n, S, S, C].
PerturbFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def is_clean_label(name: str) -> bool:
    """True for the clean-label attacks of spec 7 (sig, cl)."""
    return name in CLEAN_LABEL_TRIGGERS


@dataclasses.dataclass(frozen=True)
class PoisonedTrainSet:
    """A poisoned training set in the original index order.

    The teacher trains on `x_train, y_train` = (poisoned split) ∪ (clean holdout) (spec 8,
    upstream recipe); `holdout` marks the clean held-out part, `poisoned` the triggered images.

    Attributes:
      x_train: uint8 [N, S, S, C]: every training image, poisoned ones triggered.
      y_train: int32 [N]: labels, poisoned ones relabelled to `target` (dirty-label attacks).
      poisoned: bool [N]: True where a trigger was applied.
      holdout: bool [N]: True for the clean held-out images (the first floor(holdout * N)).
      target: the target class.
      clean_label: whether labels were left unchanged (sig, cl).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    poisoned: np.ndarray
    holdout: np.ndarray
    target: int
    clean_label: bool

    @property
    def x_holdout(self) -> np.ndarray:
        return self.x_train[self.holdout]

    @property
    def y_holdout(self) -> np.ndarray:
        return self.y_train[self.holdout]

    @property
    def x_split(self) -> np.ndarray:
        """The non-holdout split (where the poisons live)."""
        return self.x_train[~self.holdout]

    @property
    def y_split(self) -> np.ndarray:
        return self.y_train[~self.holdout]

    @property
    def num_poisoned(self) -> int:
        return int(self.poisoned.sum())


def _floor_frac(frac: float, n: int) -> int:
    # floor(frac * n), robust to float error (0.29 * 100 = 28.999...); the reference uses int().
    return math.floor(frac * n + 1e-9)


def _check_target(target: int, num_classes: int) -> None:
    if not (0 <= int(target) < num_classes) or int(target) != target:
        raise ValueError(f"target must be an integer class in [0, {num_classes}), got {target!r}")


def _select(y_split: np.ndarray, target: int, n_poison: int, clean_label: bool) -> np.ndarray:
    """Indices (into the split) of the first n_poison candidates, in order (spec 7).

    Dirty-label: non-target images. Clean-label: target-class images, n = min(n, #target).
    """
    cand = np.flatnonzero(y_split == target) if clean_label else np.flatnonzero(y_split != target)
    if not clean_label and len(cand) < n_poison:
        warnings.warn(
            f"only {len(cand)} non-target images to poison, fewer than the requested {n_poison}",
            stacklevel=3,
        )
    return cand[:n_poison]


def _perturb(x: np.ndarray, y: np.ndarray, perturb_fn: PerturbFn, batch_size: int) -> np.ndarray:
    """Runs perturb_fn in batches and stores the result as uint8, as the CL .npy files do."""
    out = np.empty_like(x)
    for i in range(0, len(x), batch_size):
        p = np.asarray(perturb_fn(x[i : i + batch_size].astype(np.float32), y[i : i + batch_size]))
        out[i : i + batch_size] = np.rint(np.clip(p, 0.0, 255.0)).astype(np.uint8)
    return out


def poison_training_set(
    x: np.ndarray,
    y: np.ndarray,
    trigger: Trigger,
    *,
    target: int,
    num_classes: int,
    ratio: float = 0.1,
    holdout: float = 0.05,
    clean_label: bool | None = None,
    perturb_fn: PerturbFn | None = None,
    perturb_batch_size: int = 1024,
) -> PoisonedTrainSet:
    """Poisons a training set as in spec 7.

    The first floor(holdout * N) images are held out clean. N_p = floor(ratio * N) (of the FULL
    set) images of the remaining split are poisoned: dirty-label, the first N_p non-target images,
    triggered and relabelled to `target`; clean-label (sig, cl), the first min(N_p, #target)
    target-class images, triggered, labels unchanged.

    Args:
      x: uint8 [N, S, S, C] pixel-space training images.
      y: int [N] labels.
      trigger: from `make_trigger`, built for S and C.
      target: the target class, in [0, num_classes).
      num_classes: C_cls, to validate `target` and the labels.
      ratio: poison ratio (spec 7: 0.1).
      holdout: clean held-out fraction (spec 7: 0.05).
      clean_label: None (default) infers it from the trigger name (`is_clean_label`).
      perturb_fn: for "cl" only: maps (float32 [n, S, S, C], labels [n]) to adversarially
        perturbed pixel images (e.g. `functools.partial(pgd_perturb, logits_fn=..., key=...)`);
        target-class poisons are replaced by their perturbed version before the grid is stamped.
      perturb_batch_size: images per perturb_fn call.
    Returns:
      A `PoisonedTrainSet`; its `x_train, y_train` is the set the teacher trains on.
    """
    x, y = np.asarray(x), np.asarray(y).astype(np.int32)
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(y):
        raise ValueError(
            f"need uint8 pixel images x [N, S, S, C] in [0, 255] and labels y [N], got x {x.dtype} "
            f"{x.shape} and y {y.shape}; convert images in [0, 1] with "
            "np.rint(x * 255).astype(np.uint8) and pass one label per image"
        )
    _check_target(target, num_classes)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"labels span [{y.min()}, {y.max()}] but num_classes={num_classes}; pass the dataset's "
            "class count (Dataset.num_classes)"
        )
    if not (0.0 <= ratio <= 1.0 and 0.0 <= holdout < 1.0):
        raise ValueError(f"need 0 <= ratio <= 1 and 0 <= holdout < 1, got {ratio}, {holdout}")
    if clean_label is None:
        clean_label = is_clean_label(trigger.name)
    if perturb_fn is not None and trigger.name != "cl":
        raise ValueError(f"perturb_fn is for the clean-label 'cl' attack, not {trigger.name!r}")
    if trigger.name == "cl" and perturb_fn is None:
        warnings.warn(
            "'cl' without perturb_fn: target-class images get only the 4-corner grid, not the "
            "adversarial perturbation of Turner et al. (spec 7); pass perturb_fn=partial("
            "pgd_perturb, logits_fn=..., key=...) for the full attack",
            stacklevel=2,
        )

    n_hold = _floor_frac(holdout, len(x))
    idx = n_hold + _select(y[n_hold:], target, _floor_frac(ratio, len(x)), clean_label)
    x_out, y_out = x.copy(), y.copy()
    sel = x[idx]
    if perturb_fn is not None and len(idx):
        sel = _perturb(sel, y[idx], perturb_fn, perturb_batch_size)
    x_out[idx] = apply_trigger_np(sel, trigger)
    if not clean_label:
        y_out[idx] = target
    poisoned = np.zeros(len(x), bool)
    poisoned[idx] = True
    is_hold = np.zeros(len(x), bool)
    is_hold[:n_hold] = True
    return PoisonedTrainSet(x_out, y_out, poisoned, is_hold, int(target), bool(clean_label))


def make_asr_set(
    x_test: np.ndarray, y_test: np.ndarray, trigger: Trigger, target: int
) -> tuple[np.ndarray, np.ndarray]:
    """The attack-success-rate set of spec 7: test images whose true class != target.

    ASR = the fraction of the triggered images classified as `target`; the same rate on the clean
    copies (the clean target rate) is the baseline it should be read against.

    Args:
      x_test: uint8 [M, S, S, C]; y_test: int [M]; target: the target class (>= 0).
    Returns:
      (triggered uint8 [M', S, S, C], clean uint8 [M', S, S, C]) with M' = #{y_test != target}.
    """
    if int(target) != target or target < 0:
        raise ValueError(f"target must be a non-negative integer class, got {target!r}")
    keep = np.asarray(y_test) != target
    clean = np.asarray(x_test)[keep]
    return apply_trigger_np(clean, trigger), clean.copy()


def pgd_perturb(
    images: jax.Array,
    labels: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    *,
    eps: float = 16.0,
    step_size: float = 2.0,
    steps: int = 10,
    key: jax.Array,
) -> jax.Array:
    """Untargeted L-inf PGD in pixel space (the "hard to recognize" images of CL, spec 7).

    Starts from a uniform random point of the eps-ball and takes `steps` signed-gradient ascent
    steps on the cross-entropy of the true label, projecting onto the ball and [0, 255] each time.

    Args:
      images: float [B, S, S, C] in pixel units [0, 255].
      labels: int [B] true labels.
      logits_fn: pixel-space float images [B, S, S, C] -> logits [B, K] (normalize inside it).
      eps, step_size: in pixel units (spec 7: L-inf 16).
      steps: number of PGD steps.
      key: PRNG key for the random start.
    Returns:
      float32 [B, S, S, C] with |out - images| <= eps and values in [0, 255].

    Not jitted here (logits_fn is an arbitrary callable); for repeated batches wrap it once:
    `jax.jit(functools.partial(pgd_perturb, logits_fn=f, key=k))`.
    """
    x0 = jnp.asarray(images, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)

    def ce(x: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(logits_fn(x).astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, labels[:, None], axis=-1).sum()

    def project(x: jax.Array) -> jax.Array:
        return jnp.clip(jnp.clip(x, x0 - eps, x0 + eps), 0.0, 255.0)

    def step(_: int, x: jax.Array) -> jax.Array:
        return project(x + step_size * jnp.sign(jax.grad(ce)(x)))

    start = project(x0 + jax.random.uniform(key, x0.shape, jnp.float32, -eps, eps))
    return jax.lax.fori_loop(0, steps, step, start)
