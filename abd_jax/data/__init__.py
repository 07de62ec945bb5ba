"""Dataset registry: every loader returns a `Dataset` of uint8 [N, S, S, 3] images in [0, 255].

  digits         embedded in scikit-learn, always available (the offline default)
  fashion_mnist  raw idx files (Debian package dataset-fashion-mnist, or data_dir)
  cifar10        tensorflow-datasets `cifar10`
  gtsrb          official GTSRB files, else tensorflow-datasets `visual_domain_decathlon/gtsrb`

Only `digits` works with nothing on disk; the others raise DatasetUnavailableError saying how to
get their files. See docs/DATA.md.
"""

from __future__ import annotations

from abd_jax.data.base import Dataset, DatasetUnavailableError
from abd_jax.data.embedded import load_digits

DATASET_NAMES = ("digits", "fashion_mnist", "cifar10", "gtsrb")

DEFAULT_IMAGE_SIZE = 32  # every dataset defaults to CIFAR-10's 32x32x3 so models/triggers fit all


def load_dataset(
    name: str,
    *,
    image_size: int | None = None,
    data_dir: str | None = None,
    download: bool = False,
) -> Dataset:
    """Loads a dataset by registry name.

    Args:
      name: one of DATASET_NAMES.
      image_size: output side S (None -> 32). How each dataset gets there is in docs/DATA.md.
      data_dir: where the files are (ignored by `digits`); None -> $ABD_JAX_DATA_DIR, then each
        loader's defaults.
      download: let tfds download and prepare cifar10 / gtsrb (needs network and TensorFlow).
        Never true by default: nothing is fetched unless asked.

    Returns:
      A Dataset with uint8 [N, S, S, 3] images and int32 labels.

    Raises:
      ValueError: unknown name, or image_size not an integer >= 8.
      DatasetUnavailableError: the dataset's files are not available.
    """
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if isinstance(size, bool) or int(size) != size or size < 8:
        raise ValueError(
            f"image_size must be an integer >= 8 (the smallest size the triggers support), got "
            f"{image_size!r}; set data.image_size (--config.data.image_size), e.g. 16 or 32"
        )
    size = int(size)
    if name == "digits":
        return load_digits(image_size=size)
    if name == "fashion_mnist":
        from abd_jax.data.fashion_mnist import load_fashion_mnist

        return load_fashion_mnist(image_size=size, data_dir=data_dir)
    if name == "cifar10":
        from abd_jax.data.tfds import load_cifar10

        return load_cifar10(image_size=size, data_dir=data_dir, download=download)
    if name == "gtsrb":
        from abd_jax.data.tfds import load_gtsrb

        return load_gtsrb(image_size=size, data_dir=data_dir, download=download)
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")


__all__ = ["DATASET_NAMES", "Dataset", "DatasetUnavailableError", "load_dataset", "load_digits"]
