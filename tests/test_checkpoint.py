"""Safe teacher format: arrays + JSON, validated on load, never unpickled."""

import json

import chex
import jax
import pytest

from abd_jax.checkpoint import CheckpointError, RunCheckpointer, load_teacher, save_teacher
from abd_jax.models import get_model, init_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "teacher"
    model = get_model("wrn16_1", 10)
    variables = init_model(model, jax.random.key(0), (8, 8, 3))
    save_teacher(path, variables, {"model": "wrn16_1", "num_classes": 10, "image_shape": [8, 8, 3]})
    return path, variables


def test_roundtrip(saved):
    path, variables = saved
    model, loaded, meta = load_teacher(path, expected_num_classes=10, expected_image_shape=(8, 8, 3))
    chex.assert_trees_all_equal(jax.device_get(variables), jax.device_get(loaded))
    assert meta["model"] == "wrn16_1"


def test_class_count_mismatch_names_the_fix(saved):
    with pytest.raises(CheckpointError, match="43.*10|10.*43"):
        load_teacher(saved[0], expected_num_classes=43)


def test_image_shape_mismatch(saved):
    with pytest.raises(CheckpointError, match="image_size"):
        load_teacher(saved[0], expected_image_shape=(32, 32, 3))


def test_missing_and_corrupt(tmp_path, saved):
    with pytest.raises(CheckpointError, match="missing"):
        load_teacher(tmp_path / "nothing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "teacher.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_teacher(bad)
    # Valid metadata pointing at another architecture: the arrays do not fit.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    import shutil

    shutil.copytree(saved[0] / "variables", wrong / "variables")
    (wrong / "teacher.json").write_text(json.dumps({"model": "wrn16_2", "num_classes": 10, "image_shape": [8, 8, 3]}))
    with pytest.raises(CheckpointError, match="corrupt or was saved for another architecture"):
        load_teacher(wrong)


def test_run_checkpointer_keeps_last_n(tmp_path):
    ck = RunCheckpointer(tmp_path / "ck", max_to_keep=2)
    state = {"w": jax.numpy.arange(3.0), "step": jax.numpy.int32(0)}
    for s in range(4):
        ck.save(s, {**state, "step": jax.numpy.int32(s)})
    ck.manager.wait_until_finished()
    assert ck.manager.all_steps() == [2, 3]
    restored = ck.restore(state).state
    assert int(restored["step"]) == 3
    ck.close()
