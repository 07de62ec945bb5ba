"""Distillation losses, per example and unreduced, so ABD can weight or mask them (spec 3.3).

Every function returns one value per sample ([B]) or per sample and class ([B, C]); the callers
choose the reduction that the spec's recipe uses (ZSKT: mean over B*C; CMI: batchmean * T^2).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def kl_elementwise(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Elementwise KL terms p_T (log p_T - log p_S) at temperature tau, shape [B, C].

    Matches PyTorch's `F.kl_div(log_softmax(s/T), softmax(t/T), reduction='none')`. Summing over C
    gives KL(p_T || p_S) >= 0; the ZSKT recipe averages over B*C (reduction='mean').
    """
    log_p_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_p_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    return jnp.exp(log_p_t) * (log_p_t - log_p_s)


def kl_per_example(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """KL(p_T || p_S) per sample, shape [B]."""
    return kl_elementwise(teacher_logits, student_logits, temperature).sum(axis=-1)


def attention_map(feature: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Zagoruyko & Komodakis attention: L2-normalized flattened channel-mean of A^2, [B, H*W]."""
    a = jnp.mean(jnp.square(feature.astype(jnp.float32)), axis=-1).reshape(feature.shape[0], -1)
    return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)


def attention_transfer(teacher_feats: Sequence[jax.Array], student_feats: Sequence[jax.Array]) -> jax.Array:
    """Per-sample AT loss: sum over stages of mean((a_T - a_S)^2), shape [B] (spec 6.1).

    The reference takes `.pow(2).mean()` over the whole batch; the mean of this vector equals it.
    """
    if len(teacher_feats) != len(student_feats):
        raise ValueError(
            f"attention transfer needs as many teacher stages as student stages, got "
            f"{len(teacher_feats)} and {len(student_feats)}; use beta=0 for mismatched families"
        )
    per_stage = [
        jnp.mean(jnp.square(attention_map(t) - attention_map(s)), axis=-1)
        for t, s in zip(teacher_feats, student_feats)
    ]
    return jnp.sum(jnp.stack(per_stage), axis=0)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-sample softmax cross-entropy with integer labels, shape [B]."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
