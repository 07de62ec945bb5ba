"""The embedded offline default dataset: scikit-learn's bundled handwritten digits.

1,797 real 8x8 grey images of the digits 0-9 ship inside scikit-learn (no download). They are
scaled from 0..16 to 0..255, replicated to 3 channels and upsampled (nearest neighbour) to
`image_size` so that every model, trigger and config written for 32x32x3 CIFAR-10 runs unchanged.
The train/test split is fixed (seeded, stratified), so numbers are comparable across runs.
"""

from __future__ import annotations

import numpy as np

from abd_jax.data.base import Dataset, channel_stats, resize_nearest

TEST_FRACTION = 0.25
SPLIT_SEED = 0


def load_digits(image_size: int = 32) -> Dataset:
    """Loads the embedded digits dataset.

    Args:
      image_size: output side length (>= 8); 32 matches CIFAR-10, 16 is a faster CPU setting.

    Returns:
      A Dataset with 1,347 train and 450 test images (uint8 [N, S, S, 3]).
    """
    from sklearn.datasets import load_digits as sk_load_digits

    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    bunch = sk_load_digits()
    images = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int32)
    images = resize_nearest(images[..., None], image_size)
    images = np.repeat(images, 3, axis=-1)

    # Stratified fixed split: the same images are test images on every machine.
    rng = np.random.default_rng(SPLIT_SEED)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test_idx.append(idx[: int(round(len(idx) * TEST_FRACTION))])
    test_mask = np.zeros(len(labels), bool)
    test_mask[np.concatenate(test_idx)] = True
    train_idx = rng.permutation(np.flatnonzero(~test_mask))
    test_idx_sorted = np.flatnonzero(test_mask)

    x_train, y_train = images[train_idx], labels[train_idx]
    mean, std = channel_stats(x_train)
    return Dataset(
        name="digits",
        x_train=x_train,
        y_train=y_train,
        x_test=images[test_idx_sorted],
        y_test=labels[test_idx_sorted],
        num_classes=10,
        mean=mean,
        std=std,
    )
