"""Dataset loaders: the embedded digits, Fashion-MNIST idx parsing, the tfds and GTSRB paths.

Nothing here touches the network or real dataset files: Fashion-MNIST and GTSRB read tiny fake
files written to tmp_path; CIFAR-10 / GTSRB-through-tfds run twice, once under
`tfds.testing.mock_data` (which works without TensorFlow in tfds 4.9.10) and once on tiny datasets
really prepared in the array_record format, read back through tfds' TensorFlow-free data source.
"""

from __future__ import annotations

import csv
import gzip
import io
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from abd_jax.data import (
    DATASET_NAMES,
    Dataset,
    DatasetUnavailableError,
    load_dataset,
    load_digits,
)
from abd_jax.data import fashion_mnist as fm
from abd_jax.data import tfds as tfds_data

# ------------------------------------------------------------------------------------------------
# registry


def test_registry_names_and_unknown_name():
    assert DATASET_NAMES == ("digits", "fashion_mnist", "cifar10", "gtsrb")
    with pytest.raises(ValueError) as e:
        load_dataset("imagenet")
    for name in DATASET_NAMES:
        assert name in str(e.value)


def test_importing_the_package_does_not_import_tfds():
    # Import must stay cheap and offline: tfds (and any download) only inside the loaders.
    code = "import sys, abd_jax.data; print('tensorflow_datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------
# digits (embedded)


@pytest.fixture(scope="module")
def digits32() -> Dataset:
    return load_dataset("digits")


def test_digits_shapes_splits_and_range(digits32):
    d = digits32
    assert d.name == "digits" and d.num_classes == 10
    assert d.x_train.shape == (1347, 32, 32, 3) and d.x_test.shape == (450, 32, 32, 3)
    assert d.x_train.dtype == np.uint8 and d.y_train.dtype == np.int32
    assert d.x_train.min() == 0 and d.x_train.max() == 255
    assert set(np.unique(d.y_train)) == set(range(10)) == set(np.unique(d.y_test))
    assert len(d.mean) == 3 and all(0 < m < 1 for m in d.mean) and all(0 < s < 1 for s in d.std)


def test_digits_deterministic(digits32):
    again = load_digits(32)
    np.testing.assert_array_equal(again.x_train, digits32.x_train)
    np.testing.assert_array_equal(again.y_test, digits32.y_test)


def test_digits_image_size_16(digits32):
    d16 = load_dataset("digits", image_size=16)
    assert d16.x_train.shape == (1347, 16, 16, 3)
    # Same images and order at every size: 16 and 32 are both exact replications of the 8x8 grid.
    np.testing.assert_array_equal(d16.x_train, digits32.x_train[:, ::2, ::2])
    np.testing.assert_array_equal(d16.y_train, digits32.y_train)


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST (fake idx files)


def _idx_bytes(a: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
    return header + a.astype(np.uint8).tobytes()


def _write_fake_fashion(directory: Path, n_train: int = 20, n_test: int = 10, gz: bool = True):
    """Writes the 4 idx files; returns {split: (images [N,28,28], labels [N])}."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        data[split] = (images, labels)
        img_stem, lab_stem = fm._FILES[split]
        for stem, arr in ((img_stem, images), (lab_stem, labels)):
            raw = _idx_bytes(arr)
            if gz:
                (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
            else:
                (directory / stem).write_bytes(raw)
    return data


def test_fashion_mnist_from_idx_pads_to_32(tmp_path):
    raw = _write_fake_fashion(tmp_path)
    d = load_dataset("fashion_mnist", data_dir=str(tmp_path))
    assert d.name == "fashion_mnist" and d.num_classes == 10
    assert d.x_train.shape == (20, 32, 32, 3) and d.x_test.shape == (10, 32, 32, 3)
    assert d.x_train.dtype == np.uint8 and d.y_train.dtype == np.int32
    # 2 px zero border, untouched 28x28 centre, identical channels.
    np.testing.assert_array_equal(d.x_train[:, 2:30, 2:30, 0], raw["train"][0])
    assert d.x_train[:, :2].max() == 0 and d.x_train[:, :, 30:].max() == 0
    np.testing.assert_array_equal(d.x_train[..., 0], d.x_train[..., 2])
    np.testing.assert_array_equal(d.y_test, raw["test"][1])
    # Stats are those of the padded grey training images.
    grey = d.x_train[..., 0].astype(np.float64) / 255
    np.testing.assert_allclose(d.mean, [grey.mean()] * 3, rtol=1e-9)
    np.testing.assert_allclose(d.std, [grey.std()] * 3, rtol=1e-9)


def test_fashion_mnist_other_sizes_and_plain_files(tmp_path):
    raw = _write_fake_fashion(tmp_path / "fashion-mnist", gz=False)
    d28 = load_dataset("fashion_mnist", image_size=28, data_dir=str(tmp_path))  # finds the subdir
    np.testing.assert_array_equal(d28.x_train[..., 1], raw["train"][0])
    d16 = load_dataset("fashion_mnist", image_size=16, data_dir=str(tmp_path))
    assert d16.x_train.shape == (20, 16, 16, 3)
    assert set(np.unique(d16.x_train)) <= set(np.unique(raw["train"][0]))  # nearest: exact values


def test_fashion_mnist_env_var_and_default_dirs(tmp_path, monkeypatch):
    _write_fake_fashion(tmp_path / "env")
    _write_fake_fashion(tmp_path / "default", n_train=30)
    monkeypatch.setattr(fm, "DEFAULT_DIRS", (str(tmp_path / "default"),))
    monkeypatch.setenv(fm.DATA_DIR_ENV, str(tmp_path / "env"))
    assert len(load_dataset("fashion_mnist").y_train) == 20  # env var first
    monkeypatch.delenv(fm.DATA_DIR_ENV)
    assert len(load_dataset("fashion_mnist").y_train) == 30  # then the default dirs


def test_fashion_mnist_missing_files_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEFAULT_DIRS", ())
    monkeypatch.delenv(fm.DATA_DIR_ENV, raising=False)
    for kwargs in ({"data_dir": str(tmp_path)}, {}):
        with pytest.raises(DatasetUnavailableError) as e:
            load_dataset("fashion_mnist", **kwargs)
        msg = str(e.value)
        assert "apt-get install dataset-fashion-mnist" in msg
        assert "data_dir" in msg and fm.DATA_DIR_ENV in msg and "'digits'" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_read_idx_rejects_truncated_file(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(_idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-5])
    with pytest.raises(ValueError, match="truncated"):
        fm.read_idx(path)


# ------------------------------------------------------------------------------------------------
# CIFAR-10 / GTSRB through tfds


def _assert_tfds_dataset(d: Dataset, name: str, num_classes: int, mean, std, n: int):
    assert d.name == name and d.num_classes == num_classes
    assert d.x_train.shape == (n, 32, 32, 3) and d.x_test.shape[1:] == (32, 32, 3)
    assert d.x_train.dtype == np.uint8 and d.x_test.dtype == np.uint8
    assert d.y_train.dtype == np.int32 and 0 <= d.y_train.min() and d.y_train.max() < num_classes
    assert d.mean == mean and d.std == std


@pytest.fixture
def tfds_mock():
    """tfds.testing.mock_data fakes the examples without TensorFlow, but its builders report
    is_prepared() == False (their data_dir does not exist), so that check is patched too."""
    import tensorflow_datasets as tfds

    with (
        tfds.testing.mock_data(num_examples=12),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
    ):
        yield


def test_cifar10_and_gtsrb_with_tfds_mock_data(tfds_mock, tmp_path):
    c = load_dataset("cifar10", data_dir=str(tmp_path))
    _assert_tfds_dataset(c, "cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), 12)
    g = load_dataset("gtsrb", data_dir=str(tmp_path))  # mock images have random sizes: resized
    _assert_tfds_dataset(g, "gtsrb", 43, (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669), 12)
    np.testing.assert_array_equal(load_dataset("gtsrb", data_dir=str(tmp_path)).y_train, g.y_train)
    assert load_dataset("cifar10", image_size=16, data_dir=str(tmp_path)).x_test.shape[1] == 16


@pytest.mark.skipif(tfds_data.tensorflow_available(), reason="checks the no-TensorFlow message")
def test_tfrecord_prepared_without_tensorflow_says_how_to_fix(tfds_mock, tmp_path):
    import tensorflow_datasets as tfds

    # What tfds raises for data prepared in its default (tfrecord) format: no random access.
    not_random_access = mock.Mock(side_effect=NotImplementedError("tfrecord"))
    with (
        mock.patch.object(tfds.core.DatasetBuilder, "as_data_source", not_random_access),
        pytest.raises(DatasetUnavailableError, match="file_format='array_record'"),
    ):
        load_dataset("cifar10", data_dir=str(tmp_path))


def _encode(a: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def _fake_images(split: str, n: int, size_fn) -> list[np.ndarray]:
    rng = np.random.default_rng(len(split))
    return [rng.integers(0, 256, (*size_fn(i), 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def prepared_tfds_dir(tmp_path_factory) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """Really prepares tiny `cifar10` and `visual_domain_decathlon/gtsrb` in array_record format.

    tfds' own generators need TensorFlow (tf.io.gfile, tf.image.encode_png), so subclasses yield
    images already encoded with Pillow; everything else (writer, dataset_info.json, the reader
    behind as_data_source) is tfds' real code.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification.cifar import Cifar10
    from tensorflow_datasets.image_classification.visual_domain_decathlon import (
        VisualDomainDecathlon,
    )

    tfds.disable_progress_bar()
    root = tmp_path_factory.mktemp("tfds")
    cifar = {s: _fake_images(s, n, lambda i: (32, 32)) for s, n in (("train", 30), ("test", 10))}
    gtsrb = {s: _fake_images(s, 8, lambda i: (72, 72 + 3 * i)) for s in ("train", "validation")}

    class FakeCifar10(Cifar10, skip_registration=True):
        name = "cifar10"

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in cifar}

        def _generate_examples(self, split):
            for i, im in enumerate(cifar[split]):
                yield i, {"id": f"{split}_{i}", "image": _encode(im, "PNG"), "label": i % 10}

    class FakeDecathlon(VisualDomainDecathlon, skip_registration=True):
        name = "visual_domain_decathlon"

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in gtsrb}

        def _generate_examples(self, split):
            for i, im in enumerate(gtsrb[split]):
                yield i, {"name": f"{split}_{i}", "image": _encode(im, "JPEG"), "label": 40 + i % 3}

    FakeCifar10(data_dir=str(root)).download_and_prepare(file_format="array_record")
    FakeDecathlon(config="gtsrb", data_dir=str(root)).download_and_prepare(
        file_format="array_record"
    )
    return root, cifar


def test_tfds_array_record_read_without_tensorflow(prepared_tfds_dir):
    root, cifar = prepared_tfds_dir
    c = load_dataset("cifar10", data_dir=str(root))
    _assert_tfds_dataset(c, "cifar10", 10, tfds_data.CIFAR10_MEAN, tfds_data.CIFAR10_STD, 30)
    # PNG is lossless: the same pixels come back (tfds stores examples in its own hashed order).
    assert {im.tobytes() for im in c.x_test} == {im.tobytes() for im in cifar["test"]}
    g = load_dataset("gtsrb", data_dir=str(root))
    _assert_tfds_dataset(g, "gtsrb", 43, tfds_data.GTSRB_MEAN, tfds_data.GTSRB_STD, 8)
    assert g.x_test.shape == (8, 32, 32, 3) and set(g.y_train) == {40, 41, 42}


def test_tfds_not_prepared_offline_raises_helpful_error(tmp_path, monkeypatch):
    monkeypatch.delenv(fm.DATA_DIR_ENV, raising=False)
    with pytest.raises(DatasetUnavailableError) as e:
        load_dataset("cifar10", data_dir=str(tmp_path))
    msg = str(e.value)
    assert "tfds.builder('cifar10'" in msg and "download_and_prepare" in msg
    assert "abd-jax[tfds]" in msg and "'digits'" in msg
    with pytest.raises(DatasetUnavailableError) as e:
        load_dataset("gtsrb", data_dir=str(tmp_path))
    msg = str(e.value)
    assert "GTSRB_Final_Training_Images.zip" in msg and "visual_domain_decathlon/gtsrb" in msg


@pytest.mark.skipif(tfds_data.tensorflow_available(), reason="checks the no-TensorFlow message")
def test_download_without_tensorflow_explains_instead_of_failing_later(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="needs TensorFlow"):
        load_dataset("cifar10", data_dir=str(tmp_path), download=True)


# ------------------------------------------------------------------------------------------------
# GTSRB from the official files


def _write_fake_gtsrb(root: Path) -> dict[str, list]:
    train_dir = root / "GTSRB" / "Final_Training" / "Images"
    test_dir = root / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    train_labels = []
    for label in (0, 1, 42):  # class-ordered on disk, like the real archive
        (train_dir / f"{label:05d}").mkdir(parents=True)
        for j in range(3):
            colour = (label * 5, 10 * j, 200)
            im = np.full((30 + 7 * j, 40, 3), colour, np.uint8)  # constant: bicubic keeps it
            Image.fromarray(im).save(train_dir / f"{label:05d}" / f"00000_{j:05d}.ppm")
            train_labels.append(label)
    test_labels = [42, 0, 1, 1]
    rows = []
    for i, label in enumerate(test_labels):
        Image.fromarray(np.full((25, 31, 3), label, np.uint8)).save(test_dir / f"{i:05d}.ppm")
        rows.append({"Filename": f"{i:05d}.ppm", "Width": 31, "Height": 25, "ClassId": label})
    with open(root / "GT-final_test.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=";")
        writer.writeheader()
        writer.writerows(rows)
    return {"train": train_labels, "test": test_labels}


def test_gtsrb_official_files(tmp_path):
    labels = _write_fake_gtsrb(tmp_path)
    g = load_dataset("gtsrb", data_dir=str(tmp_path))
    _assert_tfds_dataset(g, "gtsrb", 43, tfds_data.GTSRB_MEAN, tfds_data.GTSRB_STD, 9)
    assert sorted(g.y_train.tolist()) == sorted(labels["train"])
    assert g.y_train.tolist() != labels["train"]  # shuffled (fixed seed) ...
    np.testing.assert_array_equal(load_dataset("gtsrb", data_dir=str(tmp_path)).y_train, g.y_train)
    # ... with images still matching their labels (constant colours survive the resize).
    np.testing.assert_array_equal(g.x_train[:, 5, 5, 0], g.y_train * 5)
    assert g.y_test.tolist() == labels["test"]  # test set keeps the CSV order
    np.testing.assert_array_equal(g.x_test[:, 0, 0, 0], labels["test"])
