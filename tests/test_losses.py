import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from abd_jax.losses import attention_map, attention_transfer, cross_entropy, kl_elementwise, kl_per_example

logits = st.lists(st.floats(-20, 20, allow_nan=False), min_size=6, max_size=6).map(
    lambda v: jnp.asarray(v, jnp.float32).reshape(2, 3)
)


@given(logits, logits, st.sampled_from([0.5, 1.0, 4.0]))
def test_kl_nonnegative_and_zero_on_equal(t, s, tau):
    assert np.all(np.asarray(kl_per_example(t, s, tau)) >= -1e-5)
    np.testing.assert_allclose(kl_per_example(t, t, tau), 0.0, atol=1e-6)


def test_kl_matches_definition():
    t = jnp.array([[1.0, 2.0, 0.5]])
    s = jnp.array([[0.0, 1.0, 3.0]])
    p, q = jax.nn.softmax(t), jax.nn.softmax(s)
    np.testing.assert_allclose(kl_per_example(t, s), jnp.sum(p * jnp.log(p / q), -1), rtol=1e-5)
    chex.assert_shape(kl_elementwise(t, s), (1, 3))


def test_attention_transfer_zero_for_same_and_positive_otherwise():
    k1, k2 = jax.random.split(jax.random.key(0))
    f = [jax.random.normal(k1, (2, 4, 4, 8)), jax.random.normal(k2, (2, 2, 2, 16))]
    g = [x * 3.0 for x in f]  # same attention after normalization
    np.testing.assert_allclose(attention_transfer(f, g), 0.0, atol=1e-6)
    h = [jax.random.normal(k2, x.shape) for x in f]
    assert np.all(np.asarray(attention_transfer(f, h)) > 0)
    np.testing.assert_allclose(jnp.linalg.norm(attention_map(f[0]), axis=-1), 1.0, rtol=1e-5)


def test_cross_entropy():
    lg = jnp.log(jnp.array([[0.7, 0.2, 0.1]]))
    np.testing.assert_allclose(cross_entropy(lg, jnp.array([0])), -np.log(0.7), rtol=1e-5)
