"""Optimizers as the spec's recipes use them (PyTorch semantics, spelled in optax).

PyTorch's `weight_decay` in SGD and Adam is an L2 term added to the gradient before the update
(coupled), so it is `add_decayed_weights` placed *before* the optimizer, not AdamW.
"""

from __future__ import annotations

import optax


def cosine_schedule(lr: float, total_steps: int) -> optax.Schedule:
    """CosineAnnealingLR(T_max=total_steps, eta_min=0), stepped once per update."""
    return optax.cosine_decay_schedule(lr, decay_steps=max(int(total_steps), 1))


def make_optimizer(
    name: str,
    lr: float | optax.Schedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
) -> optax.GradientTransformation:
    """An optax chain: [clip] -> [L2 decay] -> SGD(momentum) or Adam.

    Args:
      name: "sgd" or "adam".
      lr: constant learning rate or schedule.
      momentum: SGD momentum (PyTorch style, no dampening, not Nesterov).
      weight_decay: coupled L2 coefficient, as PyTorch's `weight_decay`.
      clip_norm: global-norm clipping threshold applied to the raw gradient, as
        `torch.nn.utils.clip_grad_norm_` before `optimizer.step()`.
      b1, b2: Adam betas.
    """
    parts: list[optax.GradientTransformation] = []
    if clip_norm is not None and clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    if name == "sgd":
        parts.append(optax.sgd(lr, momentum=momentum if momentum else None))
    elif name == "adam":
        parts.append(optax.adam(lr, b1=b1, b2=b2))
    else:
        raise ValueError(f"unknown optimizer {name!r}; use 'sgd' or 'adam'")
    return optax.chain(*parts)
