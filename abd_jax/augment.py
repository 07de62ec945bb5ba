"""Image pre-processing that runs inside jit: normalization and crop+flip augmentation.

Kept out of the host data pipeline so one jitted step does all the work (no host round-trip per
batch beyond feeding the uint8 batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Maps pixel-space images [B, H, W, C] in [0, 255] to the model's normalized input space."""
    mean_a = jnp.asarray(mean, jnp.float32) * 255.0
    std_a = jnp.asarray(std, jnp.float32) * 255.0
    return (x.astype(jnp.float32) - mean_a) / std_a


def denormalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Inverse of `normalize`: normalized images back to pixel space [0, 255] (not clipped)."""
    mean_a = jnp.asarray(mean, jnp.float32) * 255.0
    std_a = jnp.asarray(std, jnp.float32) * 255.0
    return x * std_a + mean_a


def random_crop_flip(key: jax.Array, x: jax.Array, pad: int = 4, flip: bool = True) -> jax.Array:
    """RandomCrop(S, padding=pad) + RandomHorizontalFlip, per image, as in the spec's recipes.

    Args:
      key: PRNG key.
      x: [B, H, W, C] images (any float or int dtype; zero padding as torchvision does).
      pad: zero padding on each side before the crop.
      flip: whether to flip horizontally with probability 1/2.

    Returns:
      [B, H, W, C] augmented images of the input dtype.
    """
    b, h, w, _ = x.shape
    k_off, k_flip = jax.random.split(key)
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(k_off, (b, 2), 0, 2 * pad + 1)

    def crop_one(img: jax.Array, off: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    out = jax.vmap(crop_one)(padded, offsets)
    if flip:
        do_flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
        out = jnp.where(do_flip, out[:, :, ::-1, :], out)
    return out
