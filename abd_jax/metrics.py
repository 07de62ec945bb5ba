"""Clean accuracy, attack success rate and the clean target rate (spec 7).

ASR is measured on the test images whose true class is not the target, with the trigger applied:
the fraction predicted as the target. Beside it we report the *clean target rate*: the same images
without the trigger predicted as the target. A student that collapses onto the target class has a
high ASR without carrying any backdoor; this number exposes it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

PredictFn = Callable[[jax.Array], jax.Array]  # uint8/float pixel images [B,H,W,C] -> logits [B,C]


def batched_predict(predict_fn: PredictFn, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Top-1 predictions over a host array in fixed-size batches (the last batch is padded).

    Padding to a fixed size keeps a single compiled shape for the jitted predict function.
    """
    n = len(x)
    preds = np.empty((n,), np.int32)
    for start in range(0, n, batch_size):
        chunk = x[start : start + batch_size]
        m = len(chunk)
        if m < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - m, axis=0)])
        logits = predict_fn(jnp.asarray(chunk))
        preds[start : start + m] = np.asarray(jnp.argmax(logits, axis=-1))[:m]
    return preds


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float(100.0 * np.mean(preds == labels)) if len(labels) else float("nan")


def target_rate(preds: np.ndarray, target: int) -> float:
    """Percent of predictions equal to the target class (ASR on triggered non-target images)."""
    return float(100.0 * np.mean(preds == target)) if len(preds) else float("nan")


def evaluate_backdoor(
    predict_fn: PredictFn,
    x_test: np.ndarray,
    y_test: np.ndarray,
    x_triggered: np.ndarray,
    x_triggered_clean: np.ndarray,
    target: int,
    batch_size: int = 500,
) -> dict[str, float]:
    """Acc on the full clean test set, ASR and clean target rate on the non-target images.

    Args:
      predict_fn: maps pixel-space images to logits (normalization inside).
      x_test, y_test: the full clean test set.
      x_triggered: non-target-class test images with the trigger (from `make_asr_set`).
      x_triggered_clean: the same images without the trigger.
      target: the attack's target class.

    Returns:
      {"acc", "asr", "clean_target_rate"} in percent.
    """
    acc = accuracy(batched_predict(predict_fn, x_test, batch_size), y_test)
    asr = target_rate(batched_predict(predict_fn, x_triggered, batch_size), target)
    ctr = target_rate(batched_predict(predict_fn, x_triggered_clean, batch_size), target)
    return {"acc": acc, "asr": asr, "clean_target_rate": ctr}
