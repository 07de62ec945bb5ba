"""Run a sequential classifier from one top-level child's input onward (a shared prefix).

Why this exists: the Shuffling Vaccine evaluates n copies of the teacher that differ only in their
last k conv kernels (spec 3.1). Everything before the first shuffled conv computes the same
values in every copy, so it can run once: capture the activation entering the top-level child
that holds the first shuffled kernel in one copy, and run the other copies from there. Under
autodiff the copies' cotangents then meet at that activation and go back through the prefix once.
With the default k = 5 on a WRN this is block3 (about a third of the network's work).

The values are those of whole forwards whenever the copies' parameters agree up to that child
(they then compute the same activation). The saving, though, needs more of the model: the child
must be called once, with the activation as its first positional argument, and the top-level
children must form a chain (a child's output reaches the logits only through the next child), so
that nothing else in an injected run uses the prefix. A model says so with the class attribute
`SEQUENTIAL_CHILDREN = True` (WideResNet, ResNet and SmallVGG here); any other model, e.g. a
user's own teacher, is run whole, as before.

The mechanism is flax's method interception: the child's `__call__` is handed the injected
activation instead of its own input. The prefix is still traced in the injected run, but nothing
uses its output, so jit's dead-code elimination removes it and no gradient flows through it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

Variables = Mapping[str, Any]


def is_sequential(model: nn.Module) -> bool:
    """Does `model` declare that its top-level children form a chain (module docstring)?"""
    return bool(getattr(type(model), "SEQUENTIAL_CHILDREN", False))


def _is_child_call(context: Any, child: str) -> bool:
    return context.method_name == "__call__" and tuple(context.module.path) == (child,)


def capture_call_inputs(
    model: nn.Module, variables: Variables, x: jax.Array, matches: Callable[[Any], bool], **kwargs: Any
) -> tuple[Any, list[jax.Array]]:
    """`model.apply(variables, x, **kwargs)` and the first positional argument of every module
    method call whose interception context satisfies `matches` (flax `nn.intercept_methods`), in
    call order. The models stay as they are, and jit/grad see one ordinary trace."""
    captured: list[jax.Array] = []

    def interceptor(next_fun, args, kw, context):
        if matches(context):
            captured.append(args[0])
        return next_fun(*args, **kw)

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, x, **kwargs)
    return out, captured


def apply_capturing_input(
    model: nn.Module, variables: Variables, x: jax.Array, child: str, **kwargs: Any
) -> tuple[Any, jax.Array]:
    """`model.apply(variables, x, **kwargs)` and the activation entering top-level `child`."""
    out, captured = capture_call_inputs(model, variables, x, lambda c: _is_child_call(c, child), **kwargs)
    if len(captured) != 1:
        raise ValueError(f"top-level child {child!r} was called {len(captured)} times in one forward pass; "
                         "a shared prefix needs it called exactly once")
    return out, captured[0]


def apply_from_input(
    model: nn.Module, variables: Variables, x: jax.Array, child: str, child_input: jax.Array, **kwargs: Any
) -> Any:
    """`model.apply(variables, x, **kwargs)` with `child_input` fed to top-level `child` in place
    of what the prefix computes from `x`. The prefix becomes dead code, and so saves work, only
    where `is_sequential(model)`; `x` is still needed to trace the model."""

    def interceptor(next_fun, args, kw, context):
        if _is_child_call(context, child):
            args = (child_input, *args[1:])
        return next_fun(*args, **kw)

    with nn.intercept_methods(interceptor):
        return model.apply(variables, x, **kwargs)
