"""Fashion-MNIST from its raw idx files, parsed with numpy (no TensorFlow, no torch, no network).

Debian ships the four files in the package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist/*.gz). Any directory holding the files (gzipped or not, in the
layout of Zalando's repo, Keras' cache or torchvision's `FashionMNIST/raw`) works too.

The 28x28 grey images are turned into the uint8 [N, S, S, 3] layout every model here expects:
  * S == 32 (the default): 2 px of zeros on each side. Fashion-MNIST's background is 0, so the
    padding adds no edge, and the garment pixels are kept exactly (CIFAR-shaped without resampling).
  * S == 28: unchanged.
  * any other S: nearest-neighbour resize (base.resize_nearest), so pixel values stay exact.
The grey channel is then replicated 3 times. Splits are the official 60,000 / 10,000.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from abd_jax.data.base import Dataset, DatasetUnavailableError, resize_nearest

# One environment variable names the root of every locally stored dataset (also used by tfds.py).
DATA_DIR_ENV = "ABD_JAX_DATA_DIR"

# Searched, in order, when no data_dir is given (after $ABD_JAX_DATA_DIR). The first is where
# `apt-get install dataset-fashion-mnist` puts the files.
DEFAULT_DIRS: tuple[str, ...] = (
    "/usr/share/datasets/fashion-mnist",
    "~/.keras/datasets/fashion-mnist",
    "~/data/fashion-mnist",
)

# Sub-directories of a search root that may hold the files (the root itself comes first).
_SUBDIRS = ("", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw")

# split -> (images file stem, labels file stem); ".gz" is tried after the plain name.
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_IDX_UBYTE = 0x08  # idx type code for unsigned bytes (the only type Fashion-MNIST uses)

NUM_CLASSES = 10

_REFETCH = (
    "fetch the four files again (sudo apt-get install --reinstall dataset-fashion-mnist, or "
    "Zalando's fashion-mnist repository)"
)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parses one idx file (optionally gzipped) of unsigned bytes.

    Format: 2 zero bytes, a type byte (0x08 = uint8), a byte with the number of dims D, then D
    big-endian uint32 sizes, then the data in C order.

    Returns:
      uint8 array of the stored shape, e.g. [N, 28, 28] for images or [N] for labels.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic {raw[:4]!r}); {_REFETCH}")
    if raw[2] != _IDX_UBYTE:
        raise ValueError(f"{path}: idx type 0x{raw[2]:02x} is not unsigned byte (0x08); {_REFETCH}")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - offset != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes) but {len(raw) - offset} "
            f"bytes follow; the file is truncated or corrupt: {_REFETCH}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _candidate_roots(data_dir: str | os.PathLike | None) -> list[Path]:
    """Where to look; an explicit data_dir is the only one (told where, look nowhere else)."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    roots = [Path(os.environ[DATA_DIR_ENV]).expanduser()] if os.environ.get(DATA_DIR_ENV) else []
    return roots + [Path(d).expanduser() for d in DEFAULT_DIRS]


def find_files(data_dir: str | os.PathLike | None = None) -> dict[str, tuple[Path, Path]]:
    """Locates the four idx files.

    Returns:
      {"train": (images, labels), "test": (images, labels)} paths from the first directory that
      holds all four.

    Raises:
      DatasetUnavailableError: no searched directory holds all four files.
    """
    searched = []
    for root in _candidate_roots(data_dir):
        for sub in _SUBDIRS:
            directory = root / sub if sub else root
            searched.append(str(directory))
            found = {
                split: (_find_file(directory, img), _find_file(directory, lab))
                for split, (img, lab) in _FILES.items()
            }
            if all(p is not None for pair in found.values() for p in pair):
                return found  # type: ignore[return-value]
    raise DatasetUnavailableError(_missing_message(searched))


def _missing_message(searched: list[str]) -> str:
    names = ", ".join(f"{stem}[.gz]" for pair in _FILES.values() for stem in pair)
    return (
        "Fashion-MNIST idx files not found. Looked in:\n  "
        + "\n  ".join(searched)
        + f"\nNeeded: {names}.\n"
        "To get them:\n"
        "  * Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist "
        "(installs them in /usr/share/datasets/fashion-mnist), or\n"
        "  * put the four files in a directory and pass data_dir=DIR (CLI: --data_dir DIR) or set "
        f"{DATA_DIR_ENV}=DIR.\n"
        "The embedded default dataset 'digits' needs no files at all."
    )


def resize_grey(images: np.ndarray, image_size: int) -> np.ndarray:
    """Maps grey uint8 [N, 28, 28] to uint8 [N, S, S], S = image_size (see the module doc)."""
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    h, w = images.shape[1:]
    if image_size == 32 and (h, w) == (28, 28):
        return np.pad(images, ((0, 0), (2, 2), (2, 2)))
    if (h, w) == (image_size, image_size):
        return images
    return resize_nearest(images[..., None], image_size)[..., 0]


def grey_to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S] -> uint8 [N, S, S, 3] (channel replicated)."""
    return np.repeat(images[..., None], 3, axis=-1)


def _grey_stats(images: np.ndarray, chunk: int = 4096) -> tuple[float, float]:
    """Mean and std of uint8 images scaled to [0, 1], accumulated in chunks.

    base.channel_stats would make a float64 copy of all 60,000 images (~1.5 GB at 32x32x3); the
    chunked sums keep peak memory at a few MB.
    """
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].astype(np.float64) / 255.0
        total += float(block.sum())
        total_sq += float(np.square(block).sum())
        count += block.size
    mean = total / count
    return mean, float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))


def load_fashion_mnist(image_size: int = 32, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Loads Fashion-MNIST from local idx files.

    Args:
      image_size: output side S (32 pads, 28 keeps, others resize nearest-neighbour).
      data_dir: directory with the four idx files (or a parent of `fashion-mnist/`). When None,
        $ABD_JAX_DATA_DIR and then DEFAULT_DIRS are searched.

    Returns:
      A Dataset with 60,000 train and 10,000 test uint8 [N, S, S, 3] images, 10 classes, and
      mean/std computed from the training images (the same value for the 3 channels).

    Raises:
      DatasetUnavailableError: the files are not found (the message says how to get them).
    """
    paths = find_files(data_dir)
    arrays = {}
    for split, (img_path, lab_path) in paths.items():
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} from "
                f"{img_path.parent} do not form [N, H, W] / [N]; {_REFETCH}"
            )
        arrays[split] = (images, labels.astype(np.int32))
    x_train = resize_grey(arrays["train"][0], image_size)
    x_test = resize_grey(arrays["test"][0], image_size)
    # Stats of the padded/resized grey images: the 3 replicated channels share them.
    mean, std = _grey_stats(x_train)
    return Dataset(
        name="fashion_mnist",
        x_train=grey_to_rgb(x_train),
        y_train=arrays["train"][1],
        x_test=grey_to_rgb(x_test),
        y_test=arrays["test"][1],
        num_classes=NUM_CLASSES,
        mean=(mean, mean, mean),
        std=(std, std, std),
    )
