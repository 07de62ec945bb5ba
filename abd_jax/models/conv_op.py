"""A 2-D convolution whose gradients stay fast inside XLA:CPU loops (`lax.fori_loop`, `lax.scan`).

Why this exists: the gradient of a convolution w.r.t. its input is a convolution with the kernel
flipped and its in/out feature axes swapped. JAX expresses the swap as dimension numbers
(`01oi`); outside loops XLA:CPU materializes the transposed kernel and hands the convolution to
its fast YNNPACK kernels. Inside a while loop (jax 0.10.2) it keeps the `01oi` form, which YNNPACK
does not take, and the fallback ran 6-10x slower on this 2-core machine (a 2-conv gradient loop:
9.4 ms/iteration unrolled vs 97 ms in `fori_loop`). Self-Retrospection runs its trigger rounds and
fixed-point iterations in loops, so it paid that price on every student step.

Inside `with loop_friendly_convs():` (checked while tracing, like jax's own config contexts),
`conv_general_dilated` below is `lax.conv_general_dilated` with a custom VJP whose input gradient
uses an explicitly flipped-and-transposed kernel in the ordinary HWIO layout (computed once per
call, behind an optimization barrier so that XLA cannot fold it back into `01oi`). The input
gradient is itself this convolution, so second-order gradients (SR's hypergradient) keep the
fast form too. Values are those of `lax.conv_general_dilated` up to float summation order
(tests/test_models.py checks first and second derivatives). Configurations other than plain
NHWC/HWIO, no kernel dilation and one feature group fall back to `lax.conv_general_dilated`.

Outside the context the models use `lax.conv_general_dilated` unchanged: in straight-line code
(the unrolled ZSKT pseudo-batch) the custom VJP measured about 15% slower (1.69 s vs 1.46 s per
pseudo-batch, benchmarks/zskt_fuse.py), so only the loop-heavy code (Self-Retrospection) opts in.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Pads = tuple[tuple[int, int], ...]
_NHWC = ("NHWC", "HWIO", "NHWC")
_LOOP_FRIENDLY = contextvars.ContextVar("abd_jax_loop_friendly_convs", default=False)


@contextlib.contextmanager
def loop_friendly_convs(enabled: bool = True) -> Iterator[None]:
    """Models traced inside this context use the loop-friendly convolution VJP (module docstring)."""
    token = _LOOP_FRIENDLY.set(enabled)
    try:
        yield
    finally:
        _LOOP_FRIENDLY.reset(token)


def _dilate(shape: Sequence[int], dilation: Sequence[int]) -> np.ndarray:
    return np.array([0 if s == 0 else 1 + d * (s - 1) for s, d in zip(shape, dilation)])


def _input_grad_pads(in_hw, k_hw, strides, out_hw, pads: Pads, lhs_dilation) -> Pads:
    """Padding of the transposed convolution that maps the output gradient to the input's."""
    before = np.array(k_hw) - np.array([lo for lo, _ in pads]) - 1
    after = _dilate(in_hw, lhs_dilation) + np.array(k_hw) - 1 - _dilate(out_hw, strides) - before
    return tuple((int(b), int(a)) for b, a in zip(before, after))


def _plain(x, w, strides, pads, lhs_dilation):
    return lax.conv_general_dilated(
        x, w, strides, pads, lhs_dilation=lhs_dilation, dimension_numbers=_NHWC
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, lhs_dilation):
    return _plain(x, w, strides, pads, lhs_dilation)


def _conv_fwd(x, w, strides, pads, lhs_dilation):
    return _plain(x, w, strides, pads, lhs_dilation), (x, w)


def _conv_bwd(strides, pads, lhs_dilation, res, g):
    x, w = res
    k_hw = w.shape[:2]
    t_pads = _input_grad_pads(x.shape[1:3], k_hw, strides, g.shape[1:3], pads, lhs_dilation)
    # Flip spatially and swap in/out features into a real HWIO array; the barrier keeps XLA from
    # turning the swap back into `01oi` dimension numbers (module docstring).
    w_t = lax.optimization_barrier(jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3))
    dx = _conv(g, w_t, tuple(lhs_dilation), t_pads, tuple(strides))
    _, vjp_w = jax.vjp(lambda w_: _plain(x, w_, strides, pads, lhs_dilation), w)
    (dw,) = vjp_w(g)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """Drop-in for `lax.conv_general_dilated` (the `conv_general_dilated` field of flax's nn.Conv)."""
    nd = lhs.ndim - 2
    lhs_dilation = tuple(lhs_dilation or (1,) * nd)
    rhs_dilation = tuple(rhs_dilation or (1,) * nd)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    supported = (
        _LOOP_FRIENDLY.get()
        and nd == 2
        and dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        and rhs_dilation == (1, 1)
        and feature_group_count == 1
        and batch_group_count == 1
        and precision is None
        and preferred_element_type is None
    )
    if not supported:  # outside the context, or a configuration _conv does not cover
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type,
        )
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        in_hw = _dilate(lhs.shape[1:3], lhs_dilation)
        pads = tuple(lax.padtype_to_pads(in_hw, rhs.shape[:2], strides, padding))
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, strides, pads, lhs_dilation)
