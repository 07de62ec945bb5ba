"""The one in-memory dataset type every loader returns.

Images stay uint8 in pixel space [0, 255], shape [N, H, W, 3]: triggers are defined in pixel space
(spec 7: apply, then clip to [0, 255]) and normalization happens inside the jitted steps with the
dataset's mean/std, so one array serves the teacher, the attacks and the evaluation.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled image classification dataset held in host memory.

    Attributes:
      name: registry name ("digits", "fashion_mnist", "cifar10", "gtsrb").
      x_train: uint8 [N, H, W, 3] training images in [0, 255].
      y_train: int32 [N] labels.
      x_test: uint8 [M, H, W, 3] test images.
      y_test: int32 [M] labels.
      num_classes: number of classes C.
      mean: per-channel mean of images scaled to [0, 1] (normalization constant).
      std: per-channel std of images scaled to [0, 1].
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(
                    f"{self.name}: x_{split} must be uint8 [N, H, W, 3] in [0, 255], got "
                    f"{x.dtype} {x.shape}; convert images with np.uint8 and stack 3 channels"
                )
            if len(x) != len(y):
                raise ValueError(
                    f"{self.name}: {len(x)} {split} images but {len(y)} labels; pass one label "
                    "per image"
                )
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(
                    f"{self.name}: {split} labels span [{y.min()}, {y.max()}] but num_classes="
                    f"{self.num_classes}; labels must be 0 .. num_classes - 1: set num_classes to "
                    "the number of classes or relabel"
                )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]."""
    xf = x.astype(np.float64) / 255.0
    return tuple(xf.mean(axis=(0, 1, 2)).tolist()), tuple(xf.std(axis=(0, 1, 2)).tolist())


def resize_nearest(x: np.ndarray, size: int) -> np.ndarray:
    """Resize [N, h, w, C] to [N, size, size, C] by integer pixel replication or index sampling.

    Nearest-neighbour keeps the digits' pixel values exact (no blur that a trigger could hide in).
    """
    n, h, w, c = x.shape
    rows = (np.arange(size) * h // size).astype(np.int64)
    cols = (np.arange(size) * w // size).astype(np.int64)
    return x[:, rows][:, :, cols]


class DatasetUnavailableError(FileNotFoundError):
    """A dataset's files are not on this machine (and were not, or could not be, fetched).

    The message always says how to get the files, and that the embedded `digits` dataset needs
    nothing. Subclasses FileNotFoundError so callers that already catch missing files keep working.
    """
