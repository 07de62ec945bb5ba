"""The small VGG that the ZSKT reference uses for GTSRB (its `VGG16`, config `small_VGG16`).

Channels 32-32-M-64-64-M-128-128-M, each conv followed by BN and ELU, dropout 0.3 / 0.4 / 0.4 after
each max-pool, then one Linear layer (2048 -> num_classes for 32x32 inputs).

Naming departs from the reference on purpose (spec 3.1, 12): there the convs live in an
`nn.Sequential` and are keyed `features.N.weight`, which lacks the substring "conv", so the
reference's shuffling vaccine silently shuffled nothing for this model. Here the convs are named
`conv1`..`conv6`, so SV does shuffle the last k of them.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from abd_jax.models.conv_op import conv_general_dilated
from abd_jax.models.initializers import batch_norm, torch_default_bias, torch_default_kernel

# (conv widths, dropout rate) per stage; each stage ends with a 2x2 max-pool.
_STAGES: tuple[tuple[tuple[int, int], float], ...] = (
    ((32, 32), 0.3),
    ((64, 64), 0.4),
    ((128, 128), 0.4),
)


class SmallVGG(nn.Module):
    """[B, H, W, 3] normalized NHWC (H, W divisible by 8) -> (logits, (s1, s2, s3)).

    s1..s3 are the stage outputs after pooling and dropout ([B, H/2, W/2, 32], [B, H/4, W/4, 64],
    [B, H/8, W/8, 128]); s3 is what the reference model returns as its single feature.
    Dropout is active only when `train=True` and then needs a 'dropout' rng.
    """

    # Top-level children form a chain (conv1 -> bn1 -> ... -> conv6 -> bn6 -> fc): models/prefix.py.
    SEQUENTIAL_CHILDREN: ClassVar[bool] = True

    num_classes: int = 43

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        features = []
        idx = 0
        for widths, rate in _STAGES:
            for width in widths:
                idx += 1
                fan_in = 9 * x.shape[-1]
                x = nn.Conv(
                    width,
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    kernel_init=torch_default_kernel,  # the reference keeps PyTorch's defaults
                    bias_init=torch_default_bias(fan_in),
                    conv_general_dilated=conv_general_dilated,
                    name=f"conv{idx}",
                )(x)
                x = nn.elu(batch_norm(train, f"bn{idx}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.Dropout(rate, deterministic=not train)(x)
            features.append(x)
        # Flatten in PyTorch's (C, H, W) order so a converted `classifier.weight` needs no
        # permutation of its input axis.
        flat = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        logits = nn.Dense(
            self.num_classes,
            kernel_init=torch_default_kernel,
            bias_init=torch_default_bias(flat.shape[-1]),
            name="fc",
        )(flat)
        return logits, tuple(features)
