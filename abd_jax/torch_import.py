"""Import the paper's released PyTorch WideResNet teachers without unpickling arbitrary objects.

    python -m abd_jax.torch_import best_clean_acc.pth teachers/wrn16_2_badnet \\
        --model wrn16_2 --num-classes 10 --image-size 32 --dataset cifar10

The released teachers are state_dicts of the ZSKT WideResNet (`models/wresnet.py` of the
reference), whose keys are `conv1.weight`, `block1.layer.0.bn1.weight`, ...,
`block2.layer.0.convShortcut.weight`, `bn1.*` (the final BN) and `fc.*`. Our flax WideResNet
(`abd_jax/models/wrn.py`) has the same modules under the names `block1/layer_0/conv_shortcut`,
`bn`, so the import is a renaming plus layout changes (conv OIHW -> HWIO, linear (out, in) ->
(in, out), BN weight/running_mean -> scale/mean).

Safety (the teacher is untrusted, spec 1.1): a `.pth`/`.pt` file is a pickle, so it is read only
with `torch.load(..., weights_only=True)`, which refuses every object other than tensors and
plain containers; `.safetensors` and `.npz` files hold arrays only and need no torch at all.
The result is saved in our own safe format (`abd_jax.checkpoint.save_teacher`: Orbax arrays +
JSON), so PyTorch is needed once, for the import, and never to run ABD.

The conversion itself (`torch_state_dict_to_flax`) is pure numpy and checks that every weight of
the target model is filled exactly once with the right shape; anything else is a ValueError that
names the key and the fix.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

WRN_MODELS: tuple[str, ...] = ("wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2")
# Training scripts save either a bare state_dict or a dict holding it next to optimizer state,
# epoch counters, ... ('model' in the Trap-and-Replace scripts the teachers came from,
# 'state_dict' in others, 'net' in some CIFAR repos). Checked in this order.
WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model", "net")
DATAPARALLEL_PREFIX = "module."
_SKIPPED_SUFFIXES = (".num_batches_tracked",)  # a BN step counter; flax's BN has no equivalent

# flax leaf (collection, name) -> PyTorch parameter/buffer suffix.
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_MAX_LISTED = 6  # keys quoted in one error message


def _torch_module_name(path: Sequence[str]) -> str:
    """Flax module path -> PyTorch module path, e.g. ('block2', 'layer_0', 'conv_shortcut')
    -> 'block2.layer.0.convShortcut'; the top-level final BN `bn` is the reference's `bn1`."""
    if tuple(path) == ("bn",):
        return "bn1"
    parts: list[str] = []
    for name in path:
        m = re.fullmatch(r"layer_(\d+)", name)
        if m:  # NetworkBlock.layer is an nn.Sequential: children are numbered
            parts += ["layer", m.group(1)]
        elif name == "conv_shortcut":
            parts.append("convShortcut")
        else:
            parts.append(name)
    return ".".join(parts)


def _to_torch_layout(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """The PyTorch shape of a flax leaf of `shape`."""
    if leaf == "kernel" and len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:  # (in, out) -> (out, in)
        return (shape[1], shape[0])
    return tuple(shape)


def _from_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:  # OIHW -> HWIO
        return np.transpose(array, (2, 3, 1, 0))
    if leaf == "kernel" and array.ndim == 2:  # (out, in) -> (in, out)
        return array.T
    return array


def expected_torch_keys(
    model_name: str, num_classes: int, image_shape: Sequence[int]
) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """The state_dict the reference would save for our `model_name`.

    Returns:
      {torch key: (flax collection, flax path inside it, PyTorch shape)}; derived from the flax
      model itself (shapes only, nothing is computed), so it cannot drift from wrn.py.
    """
    import jax
    from flax import traverse_util

    from abd_jax.models import get_model, init_model

    if model_name not in WRN_MODELS:
        raise ValueError(
            f"only the paper's WideResNet teachers can be imported ({', '.join(WRN_MODELS)}); "
            f"got model {model_name!r}"
        )
    model = get_model(model_name, num_classes=num_classes)
    abstract = jax.eval_shape(lambda: init_model(model, jax.random.key(0), tuple(image_shape)))
    out: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]] = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in traverse_util.flatten_dict(abstract[collection]).items():
            suffix = _LEAF_TO_TORCH[(collection, path[-1])]
            key = f"{_torch_module_name(path[:-1])}.{suffix}"
            out[key] = (collection, tuple(path), _to_torch_layout(tuple(leaf.shape), path[-1]))
    return out


def strip_dataparallel_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drops the `module.` that nn.DataParallel / DistributedDataParallel put before every key."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        short = key.removeprefix(DATAPARALLEL_PREFIX)
        if short in out:
            raise ValueError(
                f"the state_dict holds both {short!r} and {DATAPARALLEL_PREFIX + short!r}; "
                "it mixes two models: export the teacher's state_dict alone"
            )
        out[short] = value
    return out


def unwrap_state_dict(obj: Any) -> Mapping[str, Any]:
    """The state_dict inside a loaded checkpoint: the object itself, or its 'state_dict' /
    'model' / 'net' entry (training scripts save optimizer state and counters beside it)."""
    for _ in range(3):  # e.g. {'model': {'state_dict': ...}}; never deeper in practice
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"the checkpoint is a {type(obj).__name__}, not a state_dict (a dict of tensors): "
            f"save `model.state_dict()`, or a dict holding it under one of {WRAPPER_KEYS}"
        )
    non_arrays = [k for k, v in obj.items() if not hasattr(v, "shape")]
    if non_arrays:
        raise ValueError(
            f"the checkpoint's dict has non-tensor entries {non_arrays[:_MAX_LISTED]} and none of "
            f"the keys {WRAPPER_KEYS} that would hold the state_dict; save "
            "`model.state_dict()` itself"
        )
    return obj


def infer_wrn_architecture(state_dict: Mapping[str, Any]) -> tuple[str, int] | None:
    """(model name, number of classes) of a ZSKT-WideResNet state_dict, or None if it is not one.

    depth = 6 n + 4 with n the blocks per stage; widen factor = block1's width / 16.
    """
    sd = strip_dataparallel_prefix(state_dict)
    layers = {
        int(m.group(1)) for k in sd if (m := re.match(r"block1\.layer\.(\d+)\.", k)) is not None
    }
    try:
        width = int(np.shape(sd["block1.layer.0.conv1.weight"])[0])
        classes = int(np.shape(sd["fc.weight"])[0])
    except (KeyError, IndexError):
        return None
    if not layers or width % 16:
        return None
    return f"wrn{6 * (max(layers) + 1) + 4}_{width // 16}", classes


def _foreign_layout_hint(keys: Sequence[str]) -> str | None:
    """A message for state_dicts of WideResNets that are not the reference's ZSKT one."""
    if any(re.match(r"block\d\.\d+\.", k) for k in keys) or "conv1.bias" in keys:
        # Trap-and-Replace's / FixMatch's WideResNet: blocks without `.layer`, biased convs and
        # LeakyReLU(0.1). Same key names elsewhere, different function: refuse, do not guess.
        return (
            "this looks like a FixMatch-style WideResNet (keys `block1.0.*`, conv biases, "
            "LeakyReLU), e.g. Trap-and-Replace's models/wideresnet.py; only the ZSKT/ABD "
            "WideResNet (keys `block1.layer.0.*`, bias-free convs, ReLU) can be imported"
        )
    return None


def _listed(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def torch_state_dict_to_flax(
    state_dict: Mapping[str, np.ndarray],
    model_name: str,
    num_classes: int,
    image_shape: Sequence[int],
) -> dict[str, Any]:
    """Converts a reference (ZSKT) WideResNet state_dict into our flax variables.

    Args:
      state_dict: PyTorch key -> numpy array (see `read_torch_checkpoint`); a `module.` prefix is
        dropped and `*.num_batches_tracked` ignored.
      model_name: one of WRN_MODELS; num_classes: classes of the teacher's classifier;
      image_shape: (H, W, C) the teacher was trained on (C must match `conv1.weight`).
    Returns:
      {"params": ..., "batch_stats": ...} of float32 numpy arrays, ready for
      `get_model(model_name, num_classes).apply(variables, x_nhwc, train=False)`.
    Raises:
      ValueError: a missing, unexpected or misshaped key, a class-count or architecture mismatch,
        or non-finite weights; the message names the key and the fix.
    """
    from flax import traverse_util

    if model_name not in WRN_MODELS:  # checked first: no other hint makes sense for these
        raise ValueError(
            f"only the paper's WideResNet teachers can be imported ({', '.join(WRN_MODELS)}); "
            f"got model {model_name!r}"
        )
    sd = {
        k: v
        for k, v in strip_dataparallel_prefix(state_dict).items()
        if not k.endswith(_SKIPPED_SUFFIXES)
    }
    foreign = _foreign_layout_hint(list(sd))
    if foreign:
        raise ValueError(foreign)
    inferred = infer_wrn_architecture(sd)
    hint = ""
    if inferred is not None and inferred != (model_name, num_classes):
        hint = (
            f"; the checkpoint looks like {inferred[0]} with {inferred[1]} classes: pass "
            f"--model {inferred[0]} --num-classes {inferred[1]}"
        )
    if "fc.weight" in sd and np.shape(sd["fc.weight"])[0] != num_classes:
        n = np.shape(sd["fc.weight"])[0]
        fix = hint[2:] if inferred is not None and inferred[0] != model_name else (
            f"pass --num-classes {n}, or use a teacher trained on your dataset"
        )
        raise ValueError(
            f"the checkpoint's classifier has {n} classes (fc.weight "
            f"{tuple(np.shape(sd['fc.weight']))}) but num_classes={num_classes}: {fix}"
        )
    expected = expected_torch_keys(model_name, num_classes, image_shape)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listed(unexpected)}")
        raise ValueError(
            f"the state_dict does not match {model_name} ({num_classes} classes): "
            + "; ".join(parts)
            + (hint or "; is it a ZSKT/ABD WideResNet state_dict of this depth and width?")
        )
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, (collection, path, torch_shape) in expected.items():
        array = np.asarray(sd[key])
        if tuple(array.shape) != torch_shape:
            raise ValueError(
                f"{key} has shape {tuple(array.shape)} but {model_name} with image channels "
                f"{image_shape[-1]} needs {torch_shape}{hint}"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{key} has dtype {array.dtype}; expected floating-point weights")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{key} holds NaN/Inf values; the checkpoint is corrupt")
        # float32 because our models compute in it; ascontiguousarray so the transposed kernels
        # do not stay strided views of the PyTorch buffers.
        flat[(collection, *path)] = np.ascontiguousarray(
            _from_torch_layout(array.astype(np.float32), path[-1])
        )
    return traverse_util.unflatten_dict(flat)


def _tensor_to_numpy(value: Any) -> Any:
    if not hasattr(value, "detach"):
        return value
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
        value = value.float()
    return value.numpy()


def read_torch_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a teacher's state_dict from `path` without running code stored in it.

    `.safetensors` (safetensors.numpy) and `.npz` (numpy, allow_pickle=False) hold arrays only.
    Anything else is taken to be a torch.save pickle and read with
    `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers.

    Returns:
      key -> numpy array, unwrapped from {'state_dict'|'model'|'net': ...} if needed.
    Raises:
      FileNotFoundError; ImportError (torch or safetensors missing, with the pip command);
      ValueError (the file holds something other than a state_dict, or objects that a
      weights-only load refuses).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ImportError(
                "reading .safetensors needs the `safetensors` package: "
                "`pip install safetensors` (or `pip install abd-jax[torch]`)"
            ) from e
        return dict(unwrap_state_dict(load_file(str(path))))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:  # refuses object arrays
            return {k: z[k] for k in z.files}
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading the PyTorch checkpoint {path.name} needs PyTorch: "
            "`pip install abd-jax[torch]` (or `pip install -e .[torch]` in a checkout); or supply "
            "the state_dict as a .safetensors file, which needs no PyTorch"
        ) from e
    import pickle

    try:
        # weights_only=True: the unpickler accepts only tensors, numbers, strings and containers,
        # so a malicious file cannot run code here. Never weights_only=False.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds Python objects other than tensors (a weights-only load refused it: "
            f"{str(e).splitlines()[0][:200]}). It is not unpickled here, since that could run "
            "code from the file. If you trust it, export `model.state_dict()` to .safetensors "
            "in an isolated environment (safetensors.torch.save_file) and import that"
        ) from e
    except RuntimeError as e:  # truncated or not a torch file at all
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({str(e)[:200]})") from e
    sd = unwrap_state_dict(obj)
    return {k: _tensor_to_numpy(v) for k, v in sd.items()}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_teacher(
    src: str | Path,
    dst: str | Path,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    image_size: int = 32,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Reads `src`, converts it and saves it with `save_teacher(dst, ...)`; returns the metadata.

    `model_name` / `num_classes` default to what the checkpoint's shapes say (and are checked
    against them when given).
    """
    from abd_jax.checkpoint import save_teacher

    state_dict = read_torch_checkpoint(src)
    if model_name is None or num_classes is None:
        inferred = infer_wrn_architecture(state_dict)
        if inferred is None:
            foreign = _foreign_layout_hint(list(strip_dataparallel_prefix(state_dict)))
            raise ValueError(
                f"{src} is not a ZSKT/ABD WideResNet state_dict (no block1.layer.0.conv1.weight "
                "or fc.weight to infer --model/--num-classes from)"
                + (f"; {foreign}" if foreign else "")
            )
        model_name = model_name or inferred[0]
        num_classes = num_classes or inferred[1]
    channels = 3  # the reference WRN's stem takes RGB; a wrong count fails on conv1.weight
    if "conv1.weight" in (sd := strip_dataparallel_prefix(state_dict)):
        channels = int(np.shape(sd["conv1.weight"])[1])
    image_shape = (image_size, image_size, channels)
    variables = torch_state_dict_to_flax(state_dict, model_name, num_classes, image_shape)
    meta: dict[str, Any] = {
        "model": model_name,
        "num_classes": int(num_classes),
        "image_shape": list(image_shape),
        "source_file": str(Path(src).absolute()),
        "source_sha256": file_sha256(src),
        "imported_by": "abd_jax.torch_import",
    }
    if dataset:
        meta["dataset"] = dataset
    save_teacher(dst, variables, meta)
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m abd_jax.torch_import",
        description="Convert a PyTorch ZSKT/ABD WideResNet teacher (.pth/.pt read weights-only, "
        ".safetensors or .npz) into abd_jax's safe teacher format (Orbax arrays + JSON).",
    )
    parser.add_argument("src", help="the PyTorch checkpoint (e.g. best_clean_acc.pth)")
    parser.add_argument("dst", help="the teacher directory to write (use as --config.teacher.dir)")
    parser.add_argument("--model", choices=WRN_MODELS, default=None,
                        help="architecture (default: inferred from the checkpoint's shapes)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes (default: fc.weight's rows); 10 for CIFAR-10, 43 for GTSRB")
    parser.add_argument("--image-size", type=int, default=32,
                        help="the square input size it was trained on (default 32)")
    parser.add_argument("--dataset", default=None, help="recorded in teacher.json, e.g. cifar10")
    args = parser.parse_args(argv)
    try:
        meta = import_teacher(
            args.src, args.dst, model_name=args.model, num_classes=args.num_classes,
            image_size=args.image_size, dataset=args.dataset,
        )
    except (ValueError, ImportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"imported {meta['model']} ({meta['num_classes']} classes, images "
        f"{tuple(meta['image_shape'])}) from {args.src} (sha256 {meta['source_sha256'][:16]}...) "
        f"into {Path(args.dst).absolute()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
