"""The CMI generator (spec 6.2), a variant of `generator.Generator` with the CMI/DataFree layout:

z [B, z_dim] -> Dense -> [B, S/4, S/4, width] -> BN
  -> up x2 -> Conv3x3 width->width (no bias) -> BN -> LeakyReLU(0.2)
  -> up x2 -> Conv3x3 width->width/2 (no bias) -> BN -> LeakyReLU(0.2)
  (each "up x2 -> Conv3x3" computed fused by default, `fused_upsample`)
  -> Conv3x3 width/2->channels -> Sigmoid

Its images live in [0, 1] pixel space (the sigmoid), not in normalized space: CMI augments, then
normalizes them. CMI re-initializes it every synthesis round with weights N(0, 0.02), zero biases
and BN gamma N(1, 0.02) (the reference's `reset_model`); those are this module's initializers, so
`CMIGenerator.init(fresh_key, ...)` IS the reset.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from abd_jax.models.conv_op import conv_general_dilated
from abd_jax.models.generator import _upsample2x
from abd_jax.models.initializers import BN_EPSILON, BN_MOMENTUM
from abd_jax.models.upsample_conv import Upsample2xConv

_W_INIT = nn.initializers.normal(0.02)


def _gamma_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _bn(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        scale_init=_gamma_init, name=name)


def _conv(features: int, name: str, bias: bool) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=bias, kernel_init=_W_INIT,
                   bias_init=nn.initializers.zeros, conv_general_dilated=conv_general_dilated, name=name)


def _up_conv(features: int, name: str, fused: bool):
    """x2 nearest upsampling then the 3x3 conv `name` (no bias); fused: one module computing both
    without the upsampled image (models/upsample_conv.py), with _conv's parameters and initializer."""
    if fused:
        return Upsample2xConv(features, use_bias=False, kernel_init=_W_INIT, name=name)
    conv = _conv(features, name, False)
    return lambda x: conv(_upsample2x(x))


class CMIGenerator(nn.Module):
    """z [B, z_dim] -> images [B, image_size, image_size, channels] in [0, 1].

    fused_upsample: each "upsample x2, conv 3x3" pair computed without the upsampled image (same
      parameters, values up to rounding; models/upsample_conv.py); False upsamples then convolves,
      as before 2026-11-28 (bitwise reproduction of earlier runs).
    """

    z_dim: int = 256
    image_size: int = 32
    channels: int = 3
    width: int = 128  # ngf * 2 in the reference (ngf = 64)
    fused_upsample: bool = True

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = True) -> jax.Array:
        if self.image_size % 4 != 0:
            raise ValueError(f"CMIGenerator image_size must be divisible by 4, got {self.image_size}")
        if z.shape[-1] != self.z_dim:
            raise ValueError(f"expected z of shape [B, {self.z_dim}], got {z.shape}")
        s = self.image_size // 4
        x = nn.Dense(self.width * s * s, kernel_init=_W_INIT, bias_init=nn.initializers.zeros, name="fc")(z)
        # (C, H, W) view as the reference, then NHWC.
        x = x.reshape(z.shape[0], self.width, s, s).transpose(0, 2, 3, 1)
        x = _bn(train, "bn0")(x)
        x = nn.leaky_relu(_bn(train, "bn1")(_up_conv(self.width, "conv1", self.fused_upsample)(x)), 0.2)
        x = nn.leaky_relu(_bn(train, "bn2")(_up_conv(self.width // 2, "conv2", self.fused_upsample)(x)), 0.2)
        return nn.sigmoid(_conv(self.channels, "conv3", True)(x))
