"""CIFAR-10 and GTSRB, read into host memory as uint8 [N, S, S, 3] (S = 32 by default).

Where the data come from:
  * CIFAR-10: tensorflow-datasets builder `cifar10` (50,000 train / 10,000 test, 32x32).
  * GTSRB: tfds has no stand-alone GTSRB builder. Two sources, first match wins:
      1. the official GTSRB files (what the paper's code reads, same 39,209 / 12,630 splits):
         DIR/GTSRB/Final_Training/Images/000NN/*.ppm, DIR/GTSRB/Final_Test/Images/*.ppm and
         GT-final_test.csv (in DIR, DIR/GTSRB or the test image folder), DIR = data_dir or
         $ABD_JAX_DATA_DIR. Read with Pillow: no TensorFlow, no tfds.
      2. the tfds builder `visual_domain_decathlon/gtsrb` (GTSRB as preprocessed for the Visual
         Domain Decathlon: shorter side 72 px, its own train/validation split of the official
         training images; its test labels are hidden, so its `validation` split is our test set).
    Either way every image is resized to S x S with bicubic interpolation (Pillow's default, as in
    the paper's code), and the training set is shuffled with a fixed seed because both sources
    store it class-ordered or in an order the holdout split (spec 7) must not depend on.

Reading a tfds dataset prepared in the array_record format needs no TensorFlow (tfds'
`as_data_source` decodes the images with Pillow). Preparing it (download_and_prepare) does need
TensorFlow, because tfds' CIFAR-10 and Decathlon generators read their files with tf.io.gfile and
encode images with tf.image; so TensorFlow is the optional extra `abd-jax[tfds]`, needed once on a
machine with network. A dataset prepared in tfds' default tfrecord format is read through
TensorFlow when it is installed.

Nothing here downloads unless the caller passes download=True; tensorflow_datasets is imported
only inside the loaders.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from abd_jax.data.base import Dataset, DatasetUnavailableError, resize_nearest
from abd_jax.data.fashion_mnist import DATA_DIR_ENV

# Spec 8 normalization constants (per channel, images scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
GTSRB_MEAN = (0.3403, 0.3121, 0.3214)
GTSRB_STD = (0.2724, 0.2608, 0.2669)

# Fixed seed of the GTSRB training-set shuffle: the poisoned/holdout split must not change between
# runs or machines.
GTSRB_SHUFFLE_SEED = 0


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """How one of our datasets maps onto a tfds builder."""

    name: str  # registry name
    builder: str  # tfds builder name, with config
    train_split: str
    test_split: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = TfdsSource("cifar10", "cifar10", "train", "test", 10, CIFAR10_MEAN, CIFAR10_STD)
# Decathlon's test labels are -1 (withheld), so its validation split serves as the test set.
GTSRB_DECATHLON = TfdsSource(
    "gtsrb", "visual_domain_decathlon/gtsrb", "train", "validation", 43, GTSRB_MEAN, GTSRB_STD
)


def resolve_root(data_dir: str | os.PathLike | None) -> Path | None:
    """data_dir, else $ABD_JAX_DATA_DIR, else None (tfds then uses $TFDS_DATA_DIR or
    ~/tensorflow_datasets)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else None


def tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


# ------------------------------------------------------------------------------------------------
# tfds path


def _prepare_hint(source: TfdsSource, root: Path | None) -> str:
    where = str(root) if root is not None else "DIR"
    return (
        "Prepare it once on a machine with network access (TensorFlow is needed for this step "
        "only):\n"
        "  pip install 'abd-jax[tfds]'   # adds tensorflow-cpu\n"
        '  python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{source.builder}', data_dir='{where}')"
        ".download_and_prepare(file_format='array_record')\"\n"
        f"then copy {where} to this machine and pass data_dir={where} (or set "
        f"{DATA_DIR_ENV}={where}); reading array_record files needs no TensorFlow. Or, with "
        f"network and TensorFlow here, call load_dataset('{source.name}', download=True).\n"
        "The embedded default dataset 'digits' needs nothing."
    )


def _prepared_builder(source: TfdsSource, root: Path | None, download: bool) -> Any:
    """Returns a tfds builder whose data are on disk, preparing them only when download=True.

    Raises:
      DatasetUnavailableError: not prepared and download=False, or preparing is impossible here
        (no TensorFlow, no network).
    """
    import tensorflow_datasets as tfds  # lazy: importing abd_jax.data must stay cheap and offline

    builder = tfds.builder(source.builder, data_dir=None if root is None else os.fspath(root))
    if builder.is_prepared():
        return builder
    if not download:
        raise DatasetUnavailableError(
            f"{source.name}: tfds dataset '{source.builder}' is not prepared in {builder.data_dir} "
            f"and download=False.\n" + _prepare_hint(source, root)
        )
    if not tensorflow_available():
        raise DatasetUnavailableError(
            f"{source.name}: download=True, but preparing '{source.builder}' with tfds needs "
            "TensorFlow, which is not installed.\n" + _prepare_hint(source, root)
        )
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception as e:  # network, disk, TF errors: all mean "not available here"
        raise DatasetUnavailableError(
            f"{source.name}: preparing tfds dataset '{source.builder}' failed ({e!r}).\n"
            + _prepare_hint(source, root)
        ) from e
    return builder


def _examples_random_access(builder: Any, split: str) -> Iterator[dict[str, Any]]:
    """Decoded examples through tfds' array_record data source (no TensorFlow).

    Raises NotImplementedError at once (not lazily) when the data were prepared as tfrecord.
    """
    source: Sequence[Any] = builder.as_data_source(split=split)
    # Plain indexing: image decoding dominates the cost, and tfds.testing.mock_data's fake source
    # supports __getitem__ but not the batched __getitems__ (tfds 4.9.10).
    return (source[i] for i in range(len(source)))


def _examples_tensorflow(builder: Any, split: str, name: str) -> Iterator[dict[str, Any]]:
    """Numpy examples of a tfrecord-prepared dataset; this reader needs TensorFlow."""
    if not tensorflow_available():
        raise DatasetUnavailableError(
            f"{name}: '{builder.name}' is prepared in {builder.data_dir} in the tfrecord format, "
            "which only TensorFlow can read. Either pip install 'abd-jax[tfds]', or re-prepare it "
            "with download_and_prepare(file_format='array_record') (readable without "
            "TensorFlow).\nThe embedded default dataset 'digits' needs nothing."
        )
    import tensorflow_datasets as tfds

    return iter(tfds.as_numpy(builder.as_dataset(split=split)))


def read_tfds_split(
    builder: Any, split: str, name: str, image_size: int, *, smooth: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole split into memory.

    smooth=True resizes each image bicubically as it is read (GTSRB: photos of every size; doing it
    on the fly keeps the larger originals out of memory); smooth=False keeps pixel values exact and
    resizes the stacked batch nearest-neighbour only where S differs (CIFAR-10).

    Returns:
      (x, y): uint8 [N, S, S, 3] images and int32 [N] labels, S = image_size.
    """
    try:
        examples = _examples_random_access(builder, split)
    except NotImplementedError:  # prepared as tfrecord: no random access without TensorFlow
        examples = _examples_tensorflow(builder, split, name)
    images, labels = [], []
    for ex in examples:
        image = np.asarray(ex["image"], dtype=np.uint8)
        images.append(resize_bicubic(image, image_size) if smooth else image)
        labels.append(int(ex["label"]))
    x = np.stack(images).astype(np.uint8)
    if x.shape[1:3] != (image_size, image_size):
        x = resize_nearest(x, image_size)
    return x, np.asarray(labels, dtype=np.int32)


# ------------------------------------------------------------------------------------------------
# image helpers


def resize_bicubic(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [size, size, 3], Pillow bicubic (the paper code's resize)."""
    from PIL import Image

    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), dtype=np.uint8)


def shuffle_train(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(len(y))
    return x[perm], y[perm]


# ------------------------------------------------------------------------------------------------
# official GTSRB files


@dataclasses.dataclass(frozen=True)
class GtsrbFiles:
    train_dir: Path  # .../GTSRB/Final_Training/Images (one folder per class, 00000..00042)
    test_dir: Path  # .../GTSRB/Final_Test/Images
    test_csv: Path  # GT-final_test.csv (Filename;...;ClassId)


def find_gtsrb_files(root: Path | None) -> GtsrbFiles | None:
    """The official GTSRB layout under root (as the zips unpack), or None."""
    if root is None:
        return None
    train_dir = root / "GTSRB" / "Final_Training" / "Images"
    test_dir = root / "GTSRB" / "Final_Test" / "Images"
    csvs = [
        root / "GT-final_test.csv",
        root / "GTSRB" / "GT-final_test.csv",
        test_dir / "GT-final_test.csv",
    ]
    test_csv = next((c for c in csvs if c.is_file()), None)
    if not (train_dir.is_dir() and test_dir.is_dir() and test_csv is not None):
        return None
    return GtsrbFiles(train_dir, test_dir, test_csv)


def _read_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return resize_bicubic(np.asarray(im.convert("RGB"), dtype=np.uint8), size)


def read_gtsrb_files(
    files: GtsrbFiles, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reads the official files: (x_train, y_train, x_test, y_test), uint8 [N, S, S, 3] / int32.

    Training images come class by class (folder 000NN = label NN), sorted by file name, like
    torchvision's ImageFolder in the paper's code; the caller shuffles them.
    """
    train_paths, train_labels = [], []
    for class_dir in sorted(p for p in files.train_dir.iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.ppm")):
            train_paths.append(path)
            train_labels.append(int(class_dir.name))
    with open(files.test_csv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    test_paths = [files.test_dir / row["Filename"] for row in rows]
    test_labels = [int(row["ClassId"]) for row in rows]
    x_train = np.stack([_read_image(p, size) for p in train_paths])
    x_test = np.stack([_read_image(p, size) for p in test_paths])
    return (x_train, np.asarray(train_labels, np.int32), x_test, np.asarray(test_labels, np.int32))


# ------------------------------------------------------------------------------------------------
# loaders


def load_cifar10(
    image_size: int = 32, data_dir: str | os.PathLike | None = None, download: bool = False
) -> Dataset:
    """CIFAR-10 through tfds (`cifar10`).

    Args:
      image_size: output side S; 32 is native, other sizes resize nearest-neighbour.
      data_dir: tfds data dir (holding cifar10/<version>/); default $ABD_JAX_DATA_DIR, then tfds'
        own default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
      download: prepare the dataset if it is missing (needs network and TensorFlow).

    Returns:
      Dataset with 50,000 train / 10,000 test uint8 [N, S, S, 3] images, 10 classes, spec-8
      mean/std. Training order is tfds' (fixed) order.

    Raises:
      DatasetUnavailableError: not prepared (message says how to prepare it).
    """
    root = resolve_root(data_dir)
    builder = _prepared_builder(CIFAR10, root, download)
    splits = {}
    for split in (CIFAR10.train_split, CIFAR10.test_split):
        splits[split] = read_tfds_split(builder, split, CIFAR10.name, image_size, smooth=False)
    return _dataset(CIFAR10, splits[CIFAR10.train_split], splits[CIFAR10.test_split])


def load_gtsrb(
    image_size: int = 32, data_dir: str | os.PathLike | None = None, download: bool = False
) -> Dataset:
    """GTSRB (43 classes) from the official files if present, else tfds' Decathlon variant.

    Args:
      image_size: output side S (every image is resized bicubically to S x S).
      data_dir: directory holding GTSRB/Final_Training/... (official files) or a tfds data dir;
        default $ABD_JAX_DATA_DIR, then tfds' default.
      download: prepare the tfds Decathlon variant if missing (needs network and TensorFlow; the
        official files are never downloaded here).

    Returns:
      Dataset with uint8 [N, S, S, 3] images, the training set shuffled with GTSRB_SHUFFLE_SEED,
      spec-8 mean/std. Official files: 39,209 train / 12,630 test.

    Raises:
      DatasetUnavailableError: neither source is available (message says how to get one).
    """
    root = resolve_root(data_dir)
    files = find_gtsrb_files(root)
    if files is not None:
        x_train, y_train, x_test, y_test = read_gtsrb_files(files, image_size)
    else:
        try:
            builder = _prepared_builder(GTSRB_DECATHLON, root, download)
        except DatasetUnavailableError as e:
            raise DatasetUnavailableError(_gtsrb_hint(root) + str(e)) from e
        x_train, y_train = read_tfds_split(
            builder, GTSRB_DECATHLON.train_split, "gtsrb", image_size, smooth=True
        )
        x_test, y_test = read_tfds_split(
            builder, GTSRB_DECATHLON.test_split, "gtsrb", image_size, smooth=True
        )
    x_train, y_train = shuffle_train(x_train, y_train, GTSRB_SHUFFLE_SEED)
    # Name, class count and spec-8 constants are the same whichever source the images came from.
    return _dataset(GTSRB_DECATHLON, (x_train, y_train), (x_test, y_test))


def _gtsrb_hint(root: Path | None) -> str:
    where = str(root) if root is not None else f"DIR (data_dir or ${DATA_DIR_ENV})"
    return (
        "gtsrb is not available. Two ways to get it:\n"
        "(1) Preferred (the paper's splits, no TensorFlow): unzip GTSRB_Final_Training_Images.zip,"
        " GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip from the GTSRB benchmark site "
        f"into {where}, giving GTSRB/Final_Training/Images/000NN/*.ppm, "
        "GTSRB/Final_Test/Images/*.ppm and GT-final_test.csv.\n"
        "(2) tfds' Visual Domain Decathlon variant:\n"
    )


def _dataset(
    source: TfdsSource, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
) -> Dataset:
    return Dataset(
        name=source.name,
        x_train=train[0],
        y_train=train[1],
        x_test=test[0],
        y_test=test[1],
        num_classes=source.num_classes,
        mean=source.mean,
        std=source.std,
    )
