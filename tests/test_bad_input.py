"""Bad input (issue 6, item 4): every error says what to change, and nothing is damaged on the way.

One test per kind of bad input: unknown names (in a config or a call), a teacher that does not fit
the data (class count, image shape), user images of the wrong dtype / range / shape, corrupt
checkpoint files, a dataset missing while offline, NaN/Inf in a loss. Each asserts the exception
type AND that the message names the fix (the known names, the config field, the conversion).

Already covered elsewhere, with their messages, and not repeated here:
  * direct calls with an unknown name: tests/test_models.py::test_unknown_name_lists_known_names,
    tests/test_attacks.py::test_errors_name_the_fix (also a trigger built for another image size
    and images that are not a batch), tests/test_data.py::test_registry_names_and_unknown_name;
    the same through the command line (stderr): tests/test_cli.py::test_bad_input_names_the_fix;
  * pattern files with the wrong mode, or one given to wanet: tests/test_attacks.py::test_pattern_files;
  * Fashion-MNIST files missing or truncated: tests/test_data.py::test_fashion_mnist_missing_files_error,
    test_read_idx_rejects_truncated_file; tfds data in the tfrecord format without TensorFlow:
    test_tfrecord_prepared_without_tensorflow_says_how_to_fix.

Fast by construction: the saved teacher's arrays come from `jax.eval_shape` (nothing compiled),
and every call fails before any training step.

"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from abd_jax.attacks import (
    TRIGGER_NAMES,
    apply_trigger_np,
    make_asr_set,
    make_trigger,
    poison_training_set,
)
from abd_jax.checkpoint import CheckpointError, load_teacher, save_teacher
from abd_jax.data import DATASET_NAMES, Dataset, DatasetUnavailableError, load_dataset
from abd_jax.data import tfds as tfds_data
from abd_jax.jobs import run_job, zskt_config_from
from abd_jax.kd.clean import distill_clean
from abd_jax.kd.loop import run_steps
from abd_jax.kd.zskt_train import ZSKTConfig, build_zskt
from abd_jax.models import MODEL_NAMES, Generator, get_model, init_model
from abd_jax.optim import make_optimizer
from abd_jax.pipeline import train_classifier
from abd_jax.teacher import fit
from experiments.configs import teacher as teacher_configs
from experiments.configs import zskt as zskt_configs

TEACHER_META = {"model": "vgg_small", "num_classes": 10, "image_shape": [8, 8, 3]}


def _assert_names_all(message: str, names) -> None:
    missing = [n for n in names if n not in message]
    assert not missing, f"{missing} not listed in: {message}"


# ------------------------------------------------------------------------------------------------
# unknown names


@pytest.mark.parametrize(
    "field, value, known",
    [
        ("data.name", "imagenet", DATASET_NAMES),
        ("attack.trigger", "badnet", TRIGGER_NAMES),
        ("teacher.model", "wrn99_9", MODEL_NAMES),
        ("job", "distill", ("teacher", "zskt", "clean_kd")),
    ],
)
def test_unknown_name_in_a_config_lists_the_known_names(tmp_path, field, value, known):
    # The config path of `python -m abd_jax.cli`, in process: each fails before any training step.
    cfg = teacher_configs.get_config("smoke")
    section, _, key = field.rpartition(".")
    (cfg[section] if section else cfg)[key] = value
    with pytest.raises(ValueError) as e:
        run_job(cfg, tmp_path / "run")
    assert repr(value) in str(e.value)
    _assert_names_all(str(e.value), known)
    if field == "job":
        assert "--config.job" in str(e.value)


def test_quickstart_config_through_the_generic_cli_names_its_own_command(tmp_path):
    cfg = teacher_configs.get_config("smoke")
    cfg.job = "quickstart"
    with pytest.raises(ValueError, match="python -m experiments.quickstart"):
        run_job(cfg, tmp_path / "run")


@pytest.mark.parametrize(
    "field, known",
    [
        ("student", MODEL_NAMES),
        ("schedule", ("cosine", "constant")),
        ("generator_out", ("none", "tanh")),
        ("generator_upsample", ("fused", "separate")),
        ("fuse", ("unroll", "scan", "host")),
        ("sr_fuse", ("unroll", "scan", "host")),
        ("sr_trigger_model", ("teacher", "student")),
    ],
)
def test_unknown_zskt_option_fails_when_the_config_is_read(field, known):
    # sr_fuse and sr_trigger_model used to be read only when the SR phase started, after the
    # whole main run; now the config itself refuses them, naming the field to set.
    cfg = zskt_configs.get_config("smoke")
    cfg.zskt[field] = "nope"
    with pytest.raises(ValueError) as e:
        zskt_config_from(cfg.zskt)
    assert f"--config.zskt.{field}=" in str(e.value)
    _assert_names_all(str(e.value), known)


def test_trigger_restarts_without_random_starts_fail_in_every_method_config():
    """sr_restarts > 1 from the zero start would repeat one search: refused when the config is
    made (not at the SR phase, after the whole run), in each method's config."""
    from abd_jax.kd.cmi import CMIConfig
    from abd_jax.kd.ood import OODConfig

    for config in (ZSKTConfig, CMIConfig, OODConfig):
        with pytest.raises(ValueError, match="set sr_init_scale > 0"):
            config(sr_restarts=4)
        with pytest.raises(ValueError, match="restarts must be >= 1"):
            config(sr_restarts=0, sr_init_scale=1e-3)
        assert config(sr_restarts=4, sr_init_scale=1e-3).sr_restarts == 4
        with pytest.raises(ValueError, match="sr_max_norm = -1.0"):
            config(sr_max_norm=-1.0)  # a negative trigger bound, refused before the run


def test_unknown_optimizer_lists_the_known_ones():
    with pytest.raises(ValueError, match="use 'sgd' or 'adam'"):
        make_optimizer("rmsprop", 0.1)


# ------------------------------------------------------------------------------------------------
# a teacher that does not fit the data


def _teacher_variables(model_name: str = "vgg_small", num_classes: int = 10, shape=(8, 8, 3)):
    """Variables of the right structure without compiling anything (arrays from eval_shape)."""
    model = get_model(model_name, num_classes)
    abstract = jax.eval_shape(lambda: init_model(model, jax.random.key(0), shape))
    rng = np.random.default_rng(0)
    return model, jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    _, variables = _teacher_variables()
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher", variables, TEACHER_META)


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        ({"expected_num_classes": 43}, "use a teacher trained on this dataset"),
        ({"expected_image_shape": (16, 16, 3)}, "image_size"),
    ],
    ids=["class_count", "image_shape"],
)
def test_saved_teacher_that_does_not_fit_the_data(teacher_dir, kwargs, fix):
    # tests/test_checkpoint.py checks that these raise; here: the message says what to change.
    with pytest.raises(CheckpointError) as e:
        load_teacher(teacher_dir, **kwargs)
    assert fix in str(e.value)
    wanted = str(next(iter(kwargs.values())))
    assert wanted in str(e.value) and str(teacher_dir) in str(e.value)


def _tiny_dataset(size: int, num_classes: int) -> Dataset:
    x = np.zeros((4, size, size, 3), np.uint8)
    y = np.arange(4, dtype=np.int32) % num_classes
    return Dataset("tiny", x, y, x, y, num_classes, (0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize("method", ["zskt", "clean_kd"])
@pytest.mark.parametrize(
    "size, num_classes, fix",
    [
        (8, 43, "has 10 classes but the dataset has 43; use a teacher trained on this dataset"),
        (16, 10, "use a teacher trained on data of this image size"),
    ],
    ids=["class_count", "image_shape"],
)
def test_teacher_handed_in_directly_must_fit_the_data(method, size, num_classes, fix):
    # A teacher handed in as (module, variables) skips load_teacher's metadata check; these used
    # to fail only inside the first jitted step (a broadcasting error between teacher and student
    # logits, a flax ScopeParamShapeError). A fully convolutional teacher (WRN, ResNet) takes any
    # image size, so only its class count can be checked this way.
    teacher, tvars = _teacher_variables()
    ds = _tiny_dataset(size, num_classes)
    with pytest.raises(ValueError) as e:
        if method == "zskt":
            build_zskt(
                teacher, ds, ZSKTConfig(pseudo_batches=1, batch_size=2), seed=0, teacher_vars=tvars
            )
        else:
            distill_clean(teacher, tvars, ds, None, epochs=1, batch_size=2)
    assert fix in str(e.value)


# ------------------------------------------------------------------------------------------------
# user images of the wrong dtype, value range or shape


def _float01(n: int = 2, size: int = 8) -> np.ndarray:
    return np.random.default_rng(0).random((n, size, size, 3)).astype(np.float32)


CONVERT = "np.rint(x * 255).astype(np.uint8)"
U8 = np.zeros((2, 8, 8, 3), np.uint8)
LABELS = np.ones(2, np.int32)


def _dataset(x: np.ndarray, y: np.ndarray) -> Dataset:
    return Dataset("mine", x, y, U8, LABELS, 10, (0.5,) * 3, (0.25,) * 3)


def _train(x: np.ndarray, y: np.ndarray):
    return train_classifier(
        x,
        y,
        model_name="wrn16_1",
        num_classes=10,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        eval_sets=None,
        epochs=1,
    )


BADNETS8 = make_trigger("badnets_grid", 8)
WRONG_IMAGES = {
    "dataset_float_images": (lambda: _dataset(_float01(), LABELS), "convert images with np.uint8"),
    "dataset_labels_beyond_num_classes": (
        lambda: _dataset(U8, np.array([0, 10], np.int32)),
        "set num_classes to the number of classes",
    ),
    "apply_trigger_np_float01": (lambda: apply_trigger_np(_float01(), BADNETS8), CONVERT),
    "asr_set_float01": (lambda: make_asr_set(_float01(), LABELS, BADNETS8, 0), CONVERT),
    "poison_float01": (
        lambda: poison_training_set(_float01(), LABELS, BADNETS8, target=0, num_classes=10),
        CONVERT,
    ),
    "train_classifier_float01": (lambda: _train(_float01(), LABELS), CONVERT),
    "train_classifier_labels_beyond_num_classes": (
        lambda: _train(U8, np.array([0, 12])),
        "pass the dataset's class count",
    ),
    "image_size_below_8": (
        lambda: load_dataset("digits", image_size=4),
        "--config.data.image_size",
    ),
    "generator_image_size_not_multiple_of_4": (
        lambda: Generator(z_dim=4, image_size=18).init(jax.random.key(0), jnp.zeros((1, 4))),
        "config data.image_size",
    ),
}


@pytest.mark.parametrize("call, fix", list(WRONG_IMAGES.values()), ids=list(WRONG_IMAGES))
def test_images_of_the_wrong_dtype_range_or_shape(call, fix):
    with pytest.raises(ValueError) as e:
        call()
    assert fix in str(e.value)


def _write_npy(path: Path, a: np.ndarray) -> str:
    np.save(path, a)
    return str(path)


@pytest.mark.parametrize(
    "make_file, trigger, fix",
    [
        (
            lambda d: _write_npy(d / "p.npy", np.eye(8, dtype=np.float32)),
            "badnets_sq",
            "multiply the array by 255",
        ),
        (
            lambda d: _write_npy(d / "p.npy", np.full((8, 8), 300.0, np.float32)),
            "blend",
            "rescale it",
        ),
        (
            lambda d: _write_npy(d / "p.npy", np.full((8, 8), np.nan, np.float32)),
            "blend",
            "replace them with pixel values",
        ),
        (
            lambda d: _write_npy(
                d / "p.npy", np.concatenate([np.full((8, 8, 3), 200.0), np.ones((8, 8, 1))], -1)
            ),
            "badnets_sq",
            "multiply it by 255",
        ),
        (
            lambda d: (d / "p.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage") and str(d / "p.png"),
            "badnets_sq",
            "save the trigger as PNG",
        ),
        (
            lambda d: (d / "p.npy").write_bytes(b"\x93NUMPY truncated") and str(d / "p.npy"),
            "blend",
            "np.save",
        ),
    ],
    ids=["stamp_in_0_1", "blend_above_255", "nan", "alpha_in_0_1", "garbled_png", "garbled_npy"],
)
def test_bad_trigger_pattern_file(tmp_path, make_file, trigger, fix):
    path = make_file(tmp_path)
    with pytest.raises(ValueError) as e:
        make_trigger(trigger, 16, pattern_file=path)
    assert fix in str(e.value) and path in str(e.value)


def test_a_valid_pattern_file_still_loads(tmp_path):
    # The range checks above must not reject real patterns: an opaque RGBA PNG, a black stamp
    # with an alpha channel, an additive pattern with negative offsets.
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[-4:, -4:] = (255, 255, 255, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "p.png")
    assert make_trigger("badnets_sq", 16, pattern_file=str(tmp_path / "p.png")).mask.sum() == 16
    black = np.zeros((16, 16, 4), np.float32)
    black[-2:, -2:, 3] = 255.0
    assert (
        make_trigger(
            "badnets_sq", 16, pattern_file=_write_npy(tmp_path / "b.npy", black)
        ).mask.sum()
        == 4
    )
    signed = np.full((16, 16), -20.0, np.float32)
    assert (
        make_trigger(
            "trojan_3x3", 16, pattern_file=_write_npy(tmp_path / "s.npy", signed)
        ).pattern.min()
        == -20
    )


# ------------------------------------------------------------------------------------------------
# corrupt or mismatched checkpoint files


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _array_files(root: Path) -> list[Path]:
    # OCDBT data files: variables/d/<hash> (and per-process copies under ocdbt.process_*/d/).
    files = [p for p in (root / "variables").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, "no array data files found: the Orbax layout changed"
    return files


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garble(p: Path) -> None:
    b = bytearray(p.read_bytes())
    for i in range(len(b) // 3, min(len(b), len(b) // 3 + 16)):
        b[i] ^= 0xFF
    p.write_bytes(bytes(b))


def _write_meta(root: Path, meta) -> None:
    (root / "teacher.json").write_text(json.dumps(meta))


CORRUPTIONS = [
    pytest.param(
        lambda r: _truncate(r / "teacher.json"),
        "re-save or re-train the teacher",
        id="meta_truncated",
    ),
    pytest.param(
        lambda r: [_truncate(p) for p in _array_files(r)],
        "re-train or re-import it",
        id="arrays_truncated",
    ),
    pytest.param(
        lambda r: [_garble(p) for p in _array_files(r)],
        "re-train or re-import it",
        id="arrays_garbled",
    ),
    pytest.param(
        lambda r: _write_meta(r, {**TEACHER_META, "model": "wrn16_1"}),
        "re-train or re-import it",
        id="meta_names_another_architecture",
    ),
    pytest.param(
        lambda r: _garble(r / "teacher.json"),
        "re-save or re-train the teacher",
        id="meta_not_utf8",
    ),
    pytest.param(
        lambda r: _write_meta(r, {"model": "vgg_small"}),
        "re-save or re-train the teacher",
        id="meta_missing_keys",
    ),
    pytest.param(
        lambda r: _write_meta(r, {**TEACHER_META, "model": "wrn99_9"}),
        "known models",
        id="meta_unknown_model",
    ),
]


@pytest.mark.parametrize("corrupt, fix", CORRUPTIONS)
def test_corrupt_teacher_raises_checkpoint_error_and_leaves_the_files(
    tmp_path, teacher_dir, corrupt, fix
):
    root = tmp_path / "teacher"
    shutil.copytree(teacher_dir, root)
    corrupt(root)
    before = _snapshot(root)
    with pytest.raises(CheckpointError) as e:
        load_teacher(root)
    assert fix in str(e.value) and str(root) in str(e.value)
    assert _snapshot(root) == before, (
        "loading a corrupt teacher must not change or delete its files"
    )


# ------------------------------------------------------------------------------------------------
# dataset missing while offline


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt (or name lookup) fails and is recorded."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("ABD_JAX_DATA_DIR", raising=False)
    return attempts


@pytest.mark.parametrize("name", ["cifar10", "gtsrb"])
def test_dataset_missing_offline_says_how_to_get_it_without_touching_the_network(
    tmp_path, no_network, name
):
    # tests/test_data.py checks the whole message; here: no connection is even attempted and the
    # data_dir is not created.
    absent = tmp_path / "absent"
    with pytest.raises(DatasetUnavailableError) as e:
        load_dataset(name, data_dir=str(absent))
    msg = str(e.value)
    assert "download_and_prepare(file_format='array_record')" in msg
    assert f"data_dir={absent}" in msg and "'digits'" in msg
    assert no_network == [] and not absent.exists()


def test_download_while_offline_says_to_prepare_elsewhere(tmp_path, no_network):
    # With TensorFlow present, download=True goes to tfds; offline its download fails. Simulated:
    # the builder's download tries to connect (refused by the fixture).
    import tensorflow_datasets as tfds

    def download(*args, **kwargs):
        socket.create_connection(("storage.googleapis.com", 443))

    with (
        mock.patch.object(tfds_data, "tensorflow_available", return_value=True),
        mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", download),
        pytest.raises(DatasetUnavailableError) as e,
    ):
        load_dataset("cifar10", data_dir=str(tmp_path), download=True)
    msg = str(e.value)
    assert "network disabled" in msg and "on a machine with network access" in msg
    assert f"then copy {tmp_path} to this machine" in msg
    assert len(no_network) == 1


# ------------------------------------------------------------------------------------------------
# NaN or Inf in a loss


def _bad_from(step: int, value: float):
    """A step whose loss is 1.0 for its first `step` calls, then `value`."""

    def step_fn(state, const):
        n = state["n"] + 1
        return {"n": n}, {"loss": jnp.where(n > step, value, 1.0), "kl": jnp.float32(0.5)}

    return step_fn


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_nan_or_inf_loss_stops_run_steps_before_the_bad_state_is_used(value):
    evaluated = []
    with pytest.raises(FloatingPointError) as e:
        run_steps(
            _bad_from(1, value),
            {"n": jnp.int32(0)},
            None,
            num_steps=4,
            eval_every=1,
            evaluate=lambda s: {"acc": 0.0, "asr": 0.0},
            on_eval=lambda i, s, rec: evaluated.append(i),
            desc="zskt",
        )
    msg = str(e.value)
    assert "zskt: loss became NaN/Inf at step 2" in msg and "lower the learning rates" in msg
    assert "kl" not in msg  # names only the bad loss
    assert evaluated == [1]  # on_eval (where results/checkpoints are written) never saw step 2


def test_nan_loss_stops_run_steps_without_an_evaluator():
    with pytest.raises(FloatingPointError, match="lower the learning rates"):
        run_steps(_bad_from(0, np.nan), {"n": jnp.int32(0)}, None, num_steps=2)


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_nan_or_inf_loss_stops_teacher_fit(value):
    def step_fn(state, x, y):
        n = state["n"] + 1
        return {"n": n}, {"loss": jnp.where(n > 2, value, jnp.mean(x.astype(jnp.float32)))}

    epochs_done = []
    x, y = np.zeros((8, 8, 8, 3), np.uint8), np.zeros(8, np.int32)
    with pytest.raises(FloatingPointError) as e:  # 2 batches per epoch: epoch 2 goes bad
        fit(
            step_fn,
            {"n": jnp.int32(0)},
            x,
            y,
            epochs=3,
            batch_size=4,
            seed=0,
            desc="teacher",
            on_epoch_end=lambda epoch, s, rec: epochs_done.append(epoch),
        )
    msg = str(e.value)
    assert "teacher: loss became" in msg and "epoch 2" in msg and "lower the learning rate" in msg
    assert epochs_done == [1]


def test_an_sr_memory_that_cannot_fill_its_share_is_refused_with_the_fix():
    """A memory smaller than its share of a batch (or a share outside [0, 1]) would fail only when
    the SR phase starts, after the whole main run: the config refuses it and names the fix."""
    with pytest.raises(ValueError, match="raise sr_memory or lower sr_memory_share"):
        ZSKTConfig(batch_size=256, sr_memory=100, sr_memory_share=0.5)
    with pytest.raises(ValueError, match=r"share of an SR batch is in \[0, 1\]"):
        ZSKTConfig(sr_memory=512, sr_memory_share=1.5)
    with pytest.raises(ValueError, match="sr_memory = -1"):
        ZSKTConfig(sr_memory=-1)
    assert ZSKTConfig(batch_size=256, sr_memory=128, sr_memory_share=0.5).sr_memory == 128
