"""WideResNet as used by ZSKT and ABD (pre-activation BasicBlocks, no dropout).

Naming is part of the API (spec 3.1): every conv module, and nothing else, has "conv" in its name,
and the modules are created in forward order, so the shuffling vaccine can find "the last k conv
kernels" by path (see `registry.conv_kernel_paths`). The layout mirrors the PyTorch keys
`block3.layer.0.convShortcut` -> `block3/layer_0/conv_shortcut`.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from abd_jax.models.initializers import batch_norm, conv, torch_default_kernel


class WRNBlock(nn.Module):
    """Pre-activation BasicBlock: [B, H, W, C_in] -> [B, H/stride, W/stride, out_channels]."""

    out_channels: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_channels = x.shape[-1]
        # The reference tests only in != out; the stride is part of the condition here so a
        # stride-2 block can never fall back to an identity of the wrong size. Both agree for
        # every WRN depth/width.
        needs_projection = in_channels != self.out_channels or self.stride != 1
        act = nn.relu(batch_norm(train, "bn1")(x))
        out = conv(self.out_channels, 3, self.stride, "conv1")(act)
        out = nn.relu(batch_norm(train, "bn2")(out))
        out = conv(self.out_channels, 3, 1, "conv2")(out)
        if needs_projection:
            # Projected from the *activated* input, as in the reference. Created after conv2 so
            # the param order is conv1, conv2, conv_shortcut, like the PyTorch state_dict.
            shortcut = conv(self.out_channels, 1, self.stride, "conv_shortcut")(act)
        else:
            shortcut = x
        return shortcut + out


class WRNStage(nn.Module):
    """`num_layers` blocks; only the first changes width and resolution."""

    num_layers: int
    out_channels: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i in range(self.num_layers):
            stride = self.stride if i == 0 else 1
            x = WRNBlock(self.out_channels, stride, name=f"layer_{i}")(x, train)
        return x


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for inputs [B, H, W, 3] (normalized, NHWC), any H, W >= 8.

    Returns `(logits [B, num_classes], (f1, f2, f3))` where f1..f3 are the outputs of the three
    stages ([B, H, W, 16k], [B, H/2, W/2, 32k], [B, H/4, W/4, 64k]), taken before the final
    BN-ReLU, for attention transfer.
    """

    # Top-level children form a chain (conv1 -> block1..3 -> bn -> fc): models/prefix.py.
    SEQUENTIAL_CHILDREN: ClassVar[bool] = True

    depth: int
    widen_factor: int
    num_classes: int

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        if (self.depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4, got {self.depth}")
        n = (self.depth - 4) // 6
        k = self.widen_factor
        out = conv(16, 3, 1, "conv1")(x)
        features = []
        for i, (width, stride) in enumerate(((16 * k, 1), (32 * k, 2), (64 * k, 2)), start=1):
            out = WRNStage(n, width, stride, name=f"block{i}")(out, train)
            features.append(out)
        out = nn.relu(batch_norm(train, "bn")(out))
        out = jnp.mean(out, axis=(1, 2))  # adaptive average pool to 1x1
        # Reference: default Linear weight init, bias zeroed.
        logits = nn.Dense(
            self.num_classes,
            kernel_init=torch_default_kernel,
            bias_init=nn.initializers.zeros,
            name="fc",
        )(out)
        return logits, tuple(features)
