"""CIFAR-style ResNet-18/34 (3x3 stem, no max-pool, post-activation BasicBlocks, widths 64..512).

This is the "kuangliu" CIFAR ResNet that the CMI registry uses for resnet18/34 (spec 8). Note that
ZSKT's own `cifar_resnet18` is a different, 16-32-64 three-stage network; it is not reproduced.
Naming follows the package rule: every conv module, and nothing else, contains "conv"
(`layer2/block_0/conv_shortcut`), created in forward order. Convs use kaiming-normal fan_out, as
torchvision's ResNet does; no reported result uses these models (spec 8), so nothing depends on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from abd_jax.models.initializers import (
    batch_norm,
    conv,
    torch_default_bias,
    torch_default_kernel,
)



class BasicBlock(nn.Module):
    """Post-activation block: [B, H, W, C_in] -> [B, H/stride, W/stride, channels]."""

    channels: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = nn.relu(batch_norm(train, "bn1")(conv(self.channels, 3, self.stride, "conv1")(x)))
        out = batch_norm(train, "bn2")(conv(self.channels, 3, 1, "conv2")(out))
        if x.shape[-1] != self.channels or self.stride != 1:
            # After conv2 so the flattened param order is conv1, conv2, conv_shortcut.
            x = conv(self.channels, 1, self.stride, "conv_shortcut")(x)
            x = batch_norm(train, "bn_shortcut")(x)
        return nn.relu(out + x)


class ResNetStage(nn.Module):
    """`num_blocks` BasicBlocks; only the first changes width and resolution."""

    num_blocks: int
    channels: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for j in range(self.num_blocks):
            x = BasicBlock(self.channels, self.stride if j == 0 else 1, name=f"block_{j}")(x, train)
        return x


class ResNet(nn.Module):
    """ResNet on [B, H, W, 3] normalized NHWC inputs (H, W >= 8).

    Returns `(logits [B, num_classes], (f1, f2, f3, f4))`, the four stage outputs with
    64, 128, 256, 512 channels at strides 1, 2, 4, 8.
    """

    # Top-level children form a chain (conv1 -> bn1 -> layer1..4 -> fc): models/prefix.py.
    SEQUENTIAL_CHILDREN: ClassVar[bool] = True

    stage_sizes: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        out = nn.relu(batch_norm(train, "bn1")(conv(64, 3, 1, "conv1")(x)))
        features = []
        for i, num_blocks in enumerate(self.stage_sizes):
            stride = 1 if i == 0 else 2
            out = ResNetStage(num_blocks, 64 * 2**i, stride, name=f"layer{i + 1}")(out, train)
            features.append(out)
        out = jnp.mean(out, axis=(1, 2))  # global average pool
        logits = nn.Dense(
            self.num_classes,
            kernel_init=torch_default_kernel,
            bias_init=torch_default_bias(out.shape[-1]),
            name="fc",
        )(out)
        return logits, tuple(features)


def resnet18(num_classes: int) -> ResNet:
    """CIFAR ResNet-18, BasicBlocks [2, 2, 2, 2]."""
    return ResNet((2, 2, 2, 2), num_classes)


def resnet34(num_classes: int) -> ResNet:
    """CIFAR ResNet-34, BasicBlocks [3, 4, 6, 3]."""
    return ResNet((3, 4, 6, 3), num_classes)
