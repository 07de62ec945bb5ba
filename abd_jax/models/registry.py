"""Model registry and small helpers over parameter trees."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from abd_jax.models.resnet import resnet18, resnet34
from abd_jax.models.vgg import SmallVGG
from abd_jax.models.wrn import WideResNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    # WRN-10-1 (one block per stage) is the smallest WideResNet: the smoke configs and most tests
    # use it because XLA compile time grows with depth (README: the test suite's time).
    "wrn10_1": lambda num_classes, **kw: WideResNet(10, 1, num_classes, **kw),
    "wrn16_1": lambda num_classes, **kw: WideResNet(16, 1, num_classes, **kw),
    "wrn16_2": lambda num_classes, **kw: WideResNet(16, 2, num_classes, **kw),
    "wrn40_1": lambda num_classes, **kw: WideResNet(40, 1, num_classes, **kw),
    "wrn40_2": lambda num_classes, **kw: WideResNet(40, 2, num_classes, **kw),
    "resnet18": lambda num_classes, **kw: resnet18(num_classes, **kw),
    "resnet34": lambda num_classes, **kw: resnet34(num_classes, **kw),
    "vgg_small": lambda num_classes, **kw: SmallVGG(num_classes, **kw),
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The classifier called `name` (one of MODEL_NAMES); kwargs go to its constructor.

    Every model maps `x [B, H, W, 3]` to `(logits [B, num_classes], stage_features)`.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return _REGISTRY[name](num_classes, **kwargs)


def init_model(model: nn.Module, key: jax.Array, image_shape: Sequence[int]) -> dict[str, Any]:
    """Initialise `model` on a dummy batch of one `image_shape` = (H, W, C) image, eval mode.

    Returns the variables {'params': ..., 'batch_stats': ...}. Not jitted, so the dicts keep the
    modules' creation (forward) order; see `conv_kernel_paths` for why nothing relies on it.
    """
    x = jnp.zeros((1, *image_shape), jnp.float32)
    return model.init({"params": key}, x, train=False)


def check_classifier_fits(
    model: nn.Module,
    variables: Any,
    image_shape: Sequence[int],
    num_classes: int,
    *,
    what: str = "teacher",
) -> None:
    """Raises a ValueError naming the fix unless `model` with `variables` maps images of
    `image_shape` = (H, W, C) to `num_classes` logits.

    Abstract (jax.eval_shape): traces the forward pass once, computes nothing. A teacher handed in
    directly (not through `abd_jax.checkpoint.load_teacher`, which checks its metadata) otherwise
    fails deep inside a jitted step with a broadcasting error, or not at all.
    """
    x = jax.ShapeDtypeStruct((1, *tuple(image_shape)), jnp.float32)
    try:
        out = jax.eval_shape(lambda v, xb: model.apply(v, xb, train=False), variables, x)
    except Exception as e:  # flax shape errors, dot_general mismatches, wrong collections
        raise ValueError(
            f"the {what} does not accept images of shape {tuple(image_shape)} ({type(e).__name__}: "
            f"{str(e)[:200]}); use a {what} trained on data of this image size, or load the data "
            "at the size it was trained on (config data.image_size)"
        ) from e
    logits = out[0] if isinstance(out, tuple) else out
    if logits.shape[-1] != num_classes:
        raise ValueError(
            f"the {what} has {logits.shape[-1]} classes but the dataset has {num_classes}; use a "
            f"{what} trained on this dataset (or the dataset it was trained on)"
        )


def count_params(params: Any) -> int:
    """Number of scalars in a pytree (pass variables['params']); works on jax.eval_shape output."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def _natural(name: str) -> tuple[Any, ...]:
    # "layer_10" after "layer_9": compare digit runs as numbers.
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _forward_key(path: tuple[str, ...]) -> tuple[Any, ...]:
    # At each level a conv sitting directly at that level (the stem) precedes sub-containers
    # (the stages); siblings compare in natural order (conv1 < conv2 < conv_shortcut).
    depth = len(path) - 1  # module names, without the trailing "kernel"
    return tuple((i < depth - 1, _natural(name)) for i, name in enumerate(path[:-1]))


def conv_kernel_paths(params: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Paths of the 4-D conv kernels (module name contains "conv"), in forward order.

    The order is recovered from the names rather than from dict order, because JAX sorts dict
    keys whenever a tree passes through jit, tree_map, optax or Orbax: after that the stem
    `conv1` would sort after `block3`. The rule (stem before stages, natural order among
    siblings) gives the forward order for every model in this package; this is what the
    shuffling vaccine's "last k conv layers" (spec 3.1) counts on.

    Args:
      params: the 'params' collection (arrays or jax.ShapeDtypeStruct leaves).
    Returns:
      e.g. [("conv1", "kernel"), ("block1", "layer_0", "conv1", "kernel"), ...].
    """
    flat = traverse_util.flatten_dict(params)
    paths = [
        path
        for path, leaf in flat.items()
        if path[-1] == "kernel"
        and len(leaf.shape) == 4
        and any("conv" in part for part in path[:-1])
    ]
    return sorted(paths, key=_forward_key)
