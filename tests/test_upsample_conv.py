"""The fused "upsample x2 + 3x3 conv" (models/upsample_conv.py) computes what the two ops compute,
with the same parameters, so the generators can use it without changing what they learn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from abd_jax.models import Generator
from abd_jax.models.cmi_generator import CMIGenerator
from abd_jax.models.generator import _upsample2x
from abd_jax.models.upsample_conv import upsample2x_conv3x3

KEY = jax.random.key(0, impl="unsafe_rbg")


def two_ops(x, w):
    return lax.conv_general_dilated(_upsample2x(x), w, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@settings(max_examples=8, deadline=None)
@given(h=st.integers(1, 5), w=st.integers(1, 5), c=st.integers(1, 4), o=st.integers(1, 4), seed=st.integers(0, 99))
def test_fused_equals_upsample_then_conv_values_and_gradients(h, w, c, o, seed):
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (2, h, w, c))
    k = jax.random.normal(kw, (3, 3, c, o))
    want = two_ops(x, k)
    got = upsample2x_conv3x3(x, k)
    assert got.shape == (2, 2 * h, 2 * w, o)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # taps summed first: rounding only
    g = jax.random.normal(kg, want.shape)
    for a, b in zip(jax.vjp(upsample2x_conv3x3, x, k)[1](g), jax.vjp(two_ops, x, k)[1](g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_fused_rejects_other_kernel_sizes():
    with pytest.raises(ValueError, match="3x3"):
        upsample2x_conv3x3(jnp.ones((1, 2, 2, 1)), jnp.ones((5, 5, 1, 1)))


@pytest.mark.parametrize("generator", [Generator, CMIGenerator])
def test_generator_fused_and_separate_share_parameters_and_outputs(generator):
    z = jax.random.normal(KEY, (16, 32))
    fused = generator(z_dim=32, image_size=16, width=16)
    separate = generator(z_dim=32, image_size=16, width=16, fused_upsample=False)
    assert fused.fused_upsample  # the default
    variables = fused.init(KEY, z, train=False)
    # Same names, shapes, initial values: checkpoints and converted weights serve both.
    jax.tree.map(np.testing.assert_array_equal, variables, separate.init(KEY, z, train=False))
    for train in (False, True):
        a = fused.apply(variables, z, train=train, mutable=["batch_stats"])[0]
        b = separate.apply(variables, z, train=train, mutable=["batch_stats"])[0]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
