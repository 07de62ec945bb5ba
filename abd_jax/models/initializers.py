"""Initializers and the BatchNorm factory shared by the models.

The reference code is PyTorch; these reproduce its initial distributions so that runs started from
scratch behave like the reference, and so that converted PyTorch checkpoints see the same layer
semantics (BN momentum, epsilon).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from abd_jax.models.conv_op import conv_general_dilated

# PyTorch BatchNorm2d(momentum=0.1) keeps 0.9 of the old running statistic; flax's `momentum` is
# that kept fraction. (One residual difference: PyTorch updates the running variance with the
# unbiased batch variance, flax with the biased one; it only matters for tiny batches.)
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu"): N(0, 2 / (kh * kw * out)).
# "normal" (not "truncated_normal", which jax's kaiming_normal uses) to match PyTorch exactly.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's default Conv2d / Linear weight init, kaiming_uniform_(a=sqrt(5)), is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1 / (3 fan_in).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (flax cannot infer fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape, dtype=jax.numpy.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def batch_norm(train: bool, name: str, **kwargs) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults; batch statistics in train mode, running ones in eval."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        name=name,
        **kwargs,
    )


_PAD3 = ((1, 1), (1, 1))


def conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    """A bias-free conv with PyTorch's padding (1 for 3x3) and kaiming-normal fan_out init.

    PyTorch pads 3x3 convs by 1 on every side. flax's "SAME" pads (0, 1) for stride 2 on even
    inputs, which shifts the sampling grid by one pixel and would break converted checkpoints.
    """
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=_PAD3 if kernel == 3 else "VALID",
        use_bias=False,
        kernel_init=kaiming_normal_fan_out,
        conv_general_dilated=conv_general_dilated,  # fast gradients inside loops (conv_op.py)
        name=name,
    )
