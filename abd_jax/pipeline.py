"""Poisoned-teacher training end to end, with explicit keyword arguments (no configs here).

dataset -> trigger -> poisoned training set (spec 7) -> supervised training (spec 8) ->
Acc / ASR / clean target rate on the test set.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from abd_jax.attacks import make_asr_set, make_trigger, pgd_perturb, poison_training_set
from abd_jax.attacks.poison import is_clean_label
from abd_jax.attacks.triggers import Trigger
from abd_jax.augment import normalize
from abd_jax.data.base import Dataset
from abd_jax.metrics import evaluate_backdoor
from abd_jax.models import get_model, init_model
from abd_jax.optim import cosine_schedule, make_optimizer
from abd_jax.resume import CheckpointPolicy
from abd_jax.state import create_train_state
from abd_jax.teacher import fit, make_predict_fn, make_supervised_step

PyTree = Any


@dataclasses.dataclass(frozen=True)
class EvalSets:
    """What every evaluation of a (possibly backdoored) model needs, in pixel space (uint8)."""

    x_test: np.ndarray
    y_test: np.ndarray
    x_triggered: np.ndarray
    x_triggered_clean: np.ndarray
    target: int


def make_eval_sets(dataset: Dataset, trigger: Trigger, target: int) -> EvalSets:
    if not 0 <= target < dataset.num_classes:
        raise ValueError(
            f"target class {target} is outside the {dataset.num_classes} classes of {dataset.name}; "
            f"choose a target in [0, {dataset.num_classes - 1}]"
        )
    x_bd, x_bd_clean = make_asr_set(dataset.x_test, dataset.y_test, trigger, target)
    return EvalSets(dataset.x_test, dataset.y_test, x_bd, x_bd_clean, target)


def normalized_test_images(sets: EvalSets, mean, std) -> dict[str, np.ndarray]:
    """{"clean_test", "triggered_test"}: the test images and their triggered non-target copies in
    the models' input space, as the end-of-run suspicion reports look at them (a diagnosis only:
    a defender has no test data, spec 3.4)."""
    return {"clean_test": np.asarray(normalize(sets.x_test, mean, std)),
            "triggered_test": np.asarray(normalize(sets.x_triggered, mean, std))}


def evaluator(model, mean, std, sets: EvalSets, batch_size: int = 500):
    """Returns `evaluate(variables) -> {"acc", "asr", "clean_target_rate"}` (percent)."""
    predict = make_predict_fn(model, mean, std)

    def evaluate(variables: PyTree) -> dict[str, float]:
        return evaluate_backdoor(
            lambda x: predict(variables, x),
            sets.x_test,
            sets.y_test,
            sets.x_triggered,
            sets.x_triggered_clean,
            sets.target,
            batch_size=min(batch_size, max(len(sets.x_test), 1)),
        )

    return evaluate


@dataclasses.dataclass
class TrainedModel:
    model: Any
    variables: PyTree
    metrics: dict[str, float]
    history: list[dict[str, float]]


def _check_training_set(x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    """Rejects what would train silently on garbage: float or wrongly shaped images, labels that do
    not fit the class count (one_hot of an out-of-range label is all zeros)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(
            f"x_train must be uint8 pixel images [N, H, W, C] in [0, 255], got {x.dtype} {x.shape}; "
            "convert images in [0, 1] with np.rint(x * 255).astype(np.uint8)"
        )
    if y.shape != (len(x),):
        raise ValueError(f"y_train must hold one label per image, shape ({len(x)},), got {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"labels span [{y.min()}, {y.max()}] but num_classes={num_classes}; pass the dataset's "
            "class count (Dataset.num_classes)"
        )


def train_classifier(
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    model_name: str,
    num_classes: int,
    mean,
    std,
    eval_sets: EvalSets | None,
    epochs: int,
    batch_size: int = 128,
    optimizer: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    augment: bool = True,
    flip: bool = True,
    seed: int = 0,
    eval_every: int = 1,
    desc: str = "teacher",
    checkpoint: CheckpointPolicy | None = None,
    mesh=None,
) -> TrainedModel:
    """Supervised training with a cosine LR (spec 8); keeps the best-clean-accuracy epoch.

    `checkpoint`: where it checkpoints and whether it resumes (abd_jax.resume); `mesh`: data
    parallelism over a device mesh (abd_jax.parallel).
    """
    _check_training_set(x_train, y_train, num_classes)
    model = get_model(model_name, num_classes=num_classes)
    key = jax.random.key(seed)
    k_init, k_train = jax.random.split(key)
    variables = init_model(model, k_init, x_train.shape[1:])
    total = epochs * (len(x_train) // batch_size)
    tx = make_optimizer(optimizer, cosine_schedule(lr, total), momentum=momentum, weight_decay=weight_decay)
    state = create_train_state(variables, tx, k_train)
    step = make_supervised_step(model, tx, mean, std, augment=augment, flip=flip)
    evaluate = None
    if eval_sets is not None:
        ev = evaluator(model, mean, std, eval_sets)
        evaluate = lambda s: ev(s.variables)  # noqa: E731
    _, best, history = fit(
        step, state, x_train, y_train, epochs=epochs, batch_size=batch_size, seed=seed,
        evaluate=evaluate, eval_every=eval_every, desc=desc,
        select_key="acc" if evaluate is not None else None, checkpoint=checkpoint, mesh=mesh,
    )
    metrics = evaluate(best) if evaluate is not None else {}
    return TrainedModel(model, best.variables, metrics, history)


def poison(
    dataset: Dataset,
    *,
    trigger_name: str,
    target: int,
    ratio: float = 0.1,
    holdout: float = 0.05,
    trigger_seed: int = 0,
    pattern_file: str | None = None,
    clean_model: TrainedModel | None = None,
    pgd_eps: float = 16.0,
    seed: int = 0,
):
    """Builds the trigger, the poisoned training set and the evaluation sets.

    For the clean-label CL attack, `clean_model` (a classifier trained on clean data) supplies the
    PGD perturbation of the target-class images (spec 7).
    """
    trigger = make_trigger(trigger_name, dataset.image_shape[0], dataset.image_shape[2],
                           seed=trigger_seed, pattern_file=pattern_file)
    perturb_fn = None
    if trigger_name == "cl" and clean_model is not None:
        predict = make_predict_fn(clean_model.model, dataset.mean, dataset.std)

        def perturb_fn(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
            out = pgd_perturb(
                jax.numpy.asarray(images, jax.numpy.float32), jax.numpy.asarray(labels),
                lambda x: predict(clean_model.variables, x), eps=pgd_eps, key=jax.random.key(seed),
            )
            return np.asarray(out)

    poisoned = poison_training_set(
        dataset.x_train, dataset.y_train, trigger, target=target, num_classes=dataset.num_classes,
        ratio=ratio, holdout=holdout, clean_label=is_clean_label(trigger_name), perturb_fn=perturb_fn,
    )
    return trigger, poisoned, make_eval_sets(dataset, trigger, target)
