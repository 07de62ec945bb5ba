"""The ZSKT generator (spec 6.1), 32x32 variant generalised to any image size divisible by 4.

z [B, z_dim] -> Dense -> [B, S/4, S/4, width] -> BN
  -> up x2 -> Conv3x3 width->width -> BN -> LeakyReLU(0.2)
  -> up x2 -> Conv3x3 width->width/2 -> BN -> LeakyReLU(0.2)
  -> Conv3x3 width/2->channels -> BN(affine)
The images live in normalized-input space: the final BN, not a tanh, sets their range.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from abd_jax.models.conv_op import conv_general_dilated
from abd_jax.models.initializers import batch_norm, torch_default_bias, torch_default_kernel
from abd_jax.models.upsample_conv import Upsample2xConv

_OUT_ACTIVATIONS = {"none": lambda x: x, "tanh": jnp.tanh}


def _upsample2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 upsampling of [B, H, W, C] (nn.Upsample(scale_factor=2))."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _conv(features: int, in_channels: int, name: str) -> nn.Conv:
    # The reference leaves every generator layer at PyTorch's default init.
    return nn.Conv(
        features,
        (3, 3),
        padding=((1, 1), (1, 1)),
        kernel_init=torch_default_kernel,
        bias_init=torch_default_bias(9 * in_channels),
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


def _up_conv(features: int, in_channels: int, name: str, fused: bool) -> Callable[[jax.Array], jax.Array]:
    """x2 nearest upsampling then the 3x3 conv `name`; fused: one module computing both without
    the upsampled image (models/upsample_conv.py), with _conv's parameters and initializers."""
    if fused:
        return Upsample2xConv(features, kernel_init=torch_default_kernel,
                              bias_init=torch_default_bias(9 * in_channels), name=name)
    conv = _conv(features, in_channels, name)
    return lambda x: conv(_upsample2x(x))


class Generator(nn.Module):
    """z [B, z_dim] -> images [B, image_size, image_size, channels].

    Attributes:
      final_bn: keep the reference's last BN(affine); off gives the raw conv output.
      out_activation: "none" (reference) or "tanh", applied last.
      fused_upsample: compute each "upsample x2, conv 3x3" pair without the upsampled image
        (same parameters and values up to rounding, ~2.5x less work; models/upsample_conv.py);
        False: the two ops in turn, as before 2026-11-27.
    """

    z_dim: int = 100
    image_size: int = 32
    channels: int = 3
    width: int = 128
    final_bn: bool = True
    out_activation: str = "none"
    fused_upsample: bool = True

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = True) -> jax.Array:
        if self.image_size % 4 != 0:
            raise ValueError(
                f"Generator image_size must be divisible by 4, got {self.image_size}; load the "
                "data at a multiple of 4 (config data.image_size, e.g. 16 or 32)"
            )
        if self.out_activation not in _OUT_ACTIVATIONS:
            raise ValueError(
                f"out_activation must be one of {sorted(_OUT_ACTIVATIONS)}, "
                f"got {self.out_activation!r} (ZSKT config field: generator_out)"
            )
        if z.shape[-1] != self.z_dim:
            raise ValueError(f"expected z of shape [B, {self.z_dim}], got {z.shape}")
        s = self.image_size // 4
        half = self.width // 2
        x = nn.Dense(
            self.width * s * s,
            kernel_init=torch_default_kernel,
            bias_init=torch_default_bias(z.shape[-1]),
            name="fc",
        )(z)
        # The reference views the Linear output as (C, H, W); keep that order, then go to NHWC,
        # so a converted Linear weight needs no permutation.
        x = x.reshape(z.shape[0], self.width, s, s).transpose(0, 2, 3, 1)
        x = batch_norm(train, "bn0")(x)
        x = nn.leaky_relu(batch_norm(train, "bn1")(_up_conv(self.width, self.width, "conv1", self.fused_upsample)(x)), 0.2)
        x = nn.leaky_relu(batch_norm(train, "bn2")(_up_conv(half, self.width, "conv2", self.fused_upsample)(x)), 0.2)
        x = _conv(self.channels, half, "conv3")(x)
        if self.final_bn:
            x = batch_norm(train, "bn3")(x)
        return _OUT_ACTIVATIONS[self.out_activation](x)
