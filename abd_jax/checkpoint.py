"""Orbax checkpoints for runs, and a safe on-disk format for teachers.

The teacher is untrusted by the threat model (spec 1.1), so a model file is never unpickled:
a teacher is an Orbax array checkpoint (tensorstore/OCDBT: arrays only) plus a JSON file that says
which architecture it is. Loading validates both and turns any failure into a `CheckpointError`
that names the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
TEACHER_META = "teacher.json"
TEACHER_ARRAYS = "variables"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match what the caller expects."""


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save_teacher(path: str | Path, variables: PyTree, meta: dict[str, Any]) -> Path:
    """Writes a teacher as `path/variables` (arrays) + `path/teacher.json` (architecture, data).

    `meta` must name at least `model`, `num_classes` and `image_shape`.
    """
    for k in ("model", "num_classes", "image_shape"):
        if k not in meta:
            raise ValueError(f"teacher metadata needs {k!r}")
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    arrays = path / TEACHER_ARRAYS
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(arrays, jax.device_get(variables), force=True)
    ckptr.wait_until_finished()
    (path / TEACHER_META).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_teacher_meta(path: str | Path) -> dict[str, Any]:
    meta_file = Path(path) / TEACHER_META
    if not meta_file.is_file():
        raise CheckpointError(
            f"no teacher at {path}: {TEACHER_META} is missing. Train one with "
            "`python -m abd_jax.cli --config experiments/configs/teacher.py --workdir DIR`, "
            "or import a PyTorch checkpoint first"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{meta_file} is corrupt ({e}); re-save or re-train the teacher") from e
    missing = [k for k in ("model", "num_classes", "image_shape") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"{meta_file} is corrupt (missing {', '.join(missing)}); re-save or re-train the teacher")
    return meta


def load_teacher(
    path: str | Path, *, expected_num_classes: int | None = None, expected_image_shape: tuple | None = None
) -> tuple[Any, PyTree, dict[str, Any]]:
    """Loads a teacher saved by `save_teacher`.

    Returns:
      (flax module, variables {"params", "batch_stats"}, metadata).

    Raises:
      CheckpointError: missing/corrupt files, or class count / image shape not as expected.
    """
    from abd_jax.models import get_model, init_model

    path = Path(path).absolute()
    meta = read_teacher_meta(path)
    if expected_num_classes is not None and meta["num_classes"] != expected_num_classes:
        raise CheckpointError(
            f"teacher at {path} has {meta['num_classes']} classes but the dataset has "
            f"{expected_num_classes}; use a teacher trained on this dataset"
        )
    if expected_image_shape is not None and tuple(meta["image_shape"]) != tuple(expected_image_shape):
        raise CheckpointError(
            f"teacher at {path} expects images {tuple(meta['image_shape'])} but the data is "
            f"{tuple(expected_image_shape)}; set the dataset's image_size to match"
        )
    try:
        model = get_model(meta["model"], num_classes=meta["num_classes"])
    except ValueError as e:
        raise CheckpointError(f"{path / TEACHER_META} names an {e}; re-save or re-train the teacher") from e
    abstract = jax.eval_shape(
        lambda: init_model(model, jax.random.key(0), tuple(meta["image_shape"]))
    )
    try:
        variables = ocp.StandardCheckpointer().restore(path / TEACHER_ARRAYS, _abstract(abstract))
    except Exception as e:  # orbax raises many types for truncated/corrupt/mismatched files
        raise CheckpointError(
            f"could not read the teacher's arrays at {path / TEACHER_ARRAYS} ({type(e).__name__}: "
            f"{str(e)[:200]}); the checkpoint is corrupt or was saved for another architecture: "
            "re-train or re-import it"
        ) from e
    for leaf in jax.tree.leaves(variables):
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise CheckpointError(f"teacher at {path} holds NaN/Inf weights; re-train it")
    return model, variables, meta


class Restored(NamedTuple):
    """What `RunCheckpointer.restore` returns: the device state, the JSON-able metadata (step
    counters, evaluation history) and the host-side numpy arrays (sample pools)."""

    state: PyTree
    meta: dict[str, Any]
    host: dict[str, np.ndarray]


class RunCheckpointer:
    """Periodic, keep-last-N, asynchronous checkpoints of a whole run state.

    Each checkpoint holds one pytree `{"state": ..., "host": ...}` (device state and host numpy
    arrays, restored to the shapes and dtypes of `like`) and one JSON item `meta`. Orbax writes a
    checkpoint into a temporary directory and renames it when complete, so a process killed while
    saving leaves the previous checkpoints readable.
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, asynchronous: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous
        )
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: PyTree, *, meta: dict[str, Any] | None = None,
             host: dict[str, np.ndarray] | None = None, wait: bool = False) -> None:
        """Saves `state` (and `meta`, `host`) as checkpoint `step`; `wait` blocks until it is on disk."""
        # Snapshots: an asynchronous save serializes later, while the caller keeps appending to
        # its history and refilling its pools.
        tree = {"state": state, "host": {k: np.array(v) for k, v in (host or {}).items()}}
        meta = json.loads(json.dumps(meta or {}))
        self.manager.save(int(step), args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
        if wait:
            self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, like: PyTree, step: int | None = None, *,
                host_like: dict[str, np.ndarray] | None = None) -> Restored:
        """Checkpoint `step` (default: the latest) shaped like `like` / `host_like`."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        tree = {"state": like, "host": dict(host_like or {})}
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(_abstract(tree)), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} is corrupt or does not match this config "
                f"({type(e).__name__}: {str(e)[:200]}); run with the config that wrote it, or delete "
                f"{self.directory} (or run without --resume) to start this part over"
            ) from e
        host = {k: np.asarray(v) for k, v in out.arrays["host"].items()}
        return Restored(out.arrays["state"], dict(out.meta), host)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
