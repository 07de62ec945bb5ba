"""Nearest-neighbour x2 upsampling followed by a 3x3 convolution, computed without upsampling.

Why: the ZSKT generator and CMI's upsample by 2 and then convolve with a 3x3 kernel, twice.
After a nearest-neighbour upsampling every 2x2 block of the image repeats one input pixel, so each
of the four output phases (row parity a, column parity b) is a 2x2 convolution of the *small*
input with a kernel made by summing rows/columns of the 3x3 kernel:

    along one axis, output phase 0 reads input rows (i-1, i) with taps (w0, w1 + w2),
                    output phase 1 reads input rows (i, i+1) with taps (w0 + w1, w2);

zero padding of the upsampled image is zero padding of the input by one pixel on the same side.
That is 4 * 4 = 16 multiply-adds per input pixel and channel pair instead of 4 * 9 = 36, and the
upsampled activation is never stored. Measured on this 2-core CPU (`python -m
benchmarks.upsample_conv`, batch 128, ZSKT generator at 32x32, median of 10, 2026-11-27):
128->64 channels at 16->32 pixels, forward 296 -> 146 ms, forward + both gradients 776 -> 279 ms;
128->128 at 8->16, 61 -> 37 and 255 -> 111 ms; the whole generator's forward + backward in train
mode 1,116 -> 690 ms.

The values are those of `conv(upsample(x), w)` up to float rounding (the taps are summed before
the products: relative differences ~1e-6; tests/test_upsample_conv.py). The parameters are the same
arrays as flax's `nn.Conv` ('kernel' [3, 3, C, O], 'bias' [O]), created in the same order with
the same initializers, so the param tree, its initial values and converted PyTorch weights are
unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from abd_jax.models.conv_op import conv_general_dilated

_NHWC = ("NHWC", "HWIO", "NHWC")


def _phase_taps(w: jax.Array, phase: int, axis: int) -> jax.Array:
    """The 2 taps along `axis` (0 rows, 1 columns) of output phase `phase` (module docstring)."""
    w0, w1, w2 = (jnp.take(w, i, axis=axis) for i in range(3))
    pair = (w0, w1 + w2) if phase == 0 else (w0 + w1, w2)
    return jnp.stack(pair, axis=axis)


def upsample2x_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`conv3x3_same(nearest_upsample_2x(x), kernel)` for x [B, H, W, C], kernel [3, 3, C, O]
    (HWIO, padding 1, stride 1, no bias) -> [B, 2H, 2W, O]."""
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"upsample2x_conv3x3 needs a 3x3 kernel, got {kernel.shape}")
    b, h, w, _ = x.shape
    o = kernel.shape[-1]
    phases = []
    for a in (0, 1):
        rows = _phase_taps(kernel, a, axis=0)  # [2, 3, C, O]
        for c in (0, 1):
            taps = _phase_taps(rows, c, axis=1)  # [2, 2, C, O]
            pads = ((1, 0) if a == 0 else (0, 1), (1, 0) if c == 0 else (0, 1))
            phases.append(conv_general_dilated(x, taps, (1, 1), pads, dimension_numbers=_NHWC))
    # phases[2a + c][n, i, j] is the output pixel (2i + a, 2j + c): interleave them.
    y = jnp.stack(phases, axis=3).reshape(b, h, w, 2, 2, o)
    return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, o)


class Upsample2xConv(nn.Module):
    """Drop-in for `x -> nn.Conv(features, (3, 3), padding=1)(upsample2x(x))`, same parameters."""

    features: int
    use_bias: bool = True
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Any] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Same names, shapes, dtype and creation order as nn.Conv: identical initial values.
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32)
        y = upsample2x_conv3x3(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32)
        return y
