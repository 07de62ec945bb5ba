"""Generator and student losses of the generator-based data-free KD methods that share ZSKT's
pseudo-batch (spec 6.1's shape: one generator step on a fresh z, then n student steps on G(z)).

- "zskt" (Micaelli & Storkey 2019): G maximizes KL_tau(T||S); S minimizes KL + beta * AT. Its
  losses stay inline in `abd_jax.kd.zskt.make_pseudo_batch` (the default, unchanged).
- "dfad" (Fang et al. 2019, "Data-Free Adversarial Distillation"): G maximizes the mean absolute
  difference of the teacher's and the student's logits; S minimizes the same L1.
- "dafl" (Chen et al. 2019, "Data-Free Learning of Student Networks"): G is NOT adversarial: it
  minimizes oh * CE(T(x), argmax T(x)) - act * mean|teacher penultimate features| + balance *
  sum_c p_c log p_c (p = batch-mean teacher softmax, i.e. the negative entropy); S minimizes
  KL(T||S).

Every function is pure; `method_losses` picks a method's pair and `method_defaults` holds the
hyper-parameters that differ from ZSKT's, each with its source (docs/DFAD_DAFL.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from abd_jax.losses import cross_entropy, kl_per_example
from abd_jax.models.prefix import capture_call_inputs

Metrics = dict[str, jax.Array]
METHODS = ("zskt", "dfad", "dafl")

# (teacher_logits, student_logits or None, teacher penultimate features or None) -> (loss, metrics)
GeneratorLossFn = Callable[[jax.Array, jax.Array | None, jax.Array | None], tuple[jax.Array, Metrics]]
# (teacher_logits, teacher_feats, student_logits, student_feats) -> (loss, metrics)
StudentLossFn = Callable[[jax.Array, Sequence[jax.Array], jax.Array, Sequence[jax.Array]], tuple[jax.Array, Metrics]]


class GeneratorObjective(NamedTuple):
    """A generator loss and what it needs computed on G(z).

    uses_student: the loss reads the student's logits, so the generator step runs the student
      (in train mode, moving its BN statistics, as the DFAD and ZSKT references do). DAFL's
      generator ignores the student, so its step skips the student forward altogether.
    uses_penultimate: the loss reads the teacher's penultimate features (`penultimate_apply`).
    """

    loss: GeneratorLossFn
    uses_student: bool
    uses_penultimate: bool


# --- DFAD ---------------------------------------------------------------------------------------

def l1_logits(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
    """Mean absolute logit difference over B*C (PyTorch's `F.l1_loss`, reduction='mean')."""
    return jnp.mean(jnp.abs(student_logits - teacher_logits))


def dfad_student_loss(teacher_logits: jax.Array, teacher_feats: Sequence[jax.Array], student_logits: jax.Array,
                      student_feats: Sequence[jax.Array]) -> tuple[jax.Array, Metrics]:
    """DFAD's student loss: the L1 between logits (no attention transfer, no temperature)."""
    del teacher_feats, student_feats
    loss = l1_logits(teacher_logits, student_logits)
    return loss, {"l1": loss}


def dfad_generator_loss(teacher_logits: jax.Array, student_logits: jax.Array | None,
                        teacher_penultimate: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
    """DFAD's generator loss: the negated student loss (G maximizes the discrepancy)."""
    del teacher_penultimate
    l1 = l1_logits(teacher_logits, student_logits)
    return -l1, {"l1_g": l1}


# --- DAFL ---------------------------------------------------------------------------------------

def one_hot_loss(teacher_logits: jax.Array) -> jax.Array:
    """Mean cross-entropy of the teacher's logits against its own argmax (a constant label, so
    no gradient flows through the argmax, as with PyTorch's `.max(1)[1]`)."""
    labels = jax.lax.stop_gradient(jnp.argmax(teacher_logits, axis=-1))
    return jnp.mean(cross_entropy(teacher_logits, labels))


def activation_loss(features: jax.Array) -> jax.Array:
    """Minus the mean absolute activation of the teacher's penultimate features [B, D]."""
    return -jnp.mean(jnp.abs(features))


def balance_loss(teacher_logits: jax.Array) -> jax.Array:
    """sum_c p_c log p_c of the batch-mean teacher softmax p: the negative entropy of the class
    histogram, minimal (-log C) when the batch covers the classes evenly.

    Natural log, as the ABD reference's generative synthesizer (cmi/datafree/synthesis/
    generative.py); the original DAFL code uses log10, i.e. the same loss divided by ln 10.
    `xlogy` takes 0 log 0 = 0 where a class probability underflows to 0."""
    p = jnp.mean(jax.nn.softmax(teacher_logits, axis=-1), axis=0)
    return jnp.sum(jax.scipy.special.xlogy(p, p))


def make_dafl_generator_loss(oh: float = 1.0, act: float = 0.1, balance: float = 5.0) -> GeneratorLossFn:
    """DAFL's generator loss with weights (oh, act, balance); it never reads the student."""

    def loss_fn(teacher_logits: jax.Array, student_logits: jax.Array | None = None,
                teacher_penultimate: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
        del student_logits  # not adversarial
        l_oh = one_hot_loss(teacher_logits)
        l_act = activation_loss(teacher_penultimate) if act else jnp.zeros((), teacher_logits.dtype)
        l_bal = balance_loss(teacher_logits)
        loss = oh * l_oh + act * l_act + balance * l_bal
        return loss, {"oh": l_oh, "act": l_act, "balance": l_bal}

    return loss_fn


def make_kl_student_loss(temperature: float = 1.0) -> StudentLossFn:
    """DAFL's student loss: KL_tau(T||S) summed over classes, averaged over the batch, times tau^2
    (PyTorch's `kl_div(..., reduction='batchmean') * T*T`, the DataFree/ABD `KLDiv`; DAFL's own
    `kdloss` is the same at tau = 1). ZSKT's KL instead averages over B*C (spec 6.1)."""

    def loss_fn(teacher_logits: jax.Array, teacher_feats: Sequence[jax.Array], student_logits: jax.Array,
                student_feats: Sequence[jax.Array]) -> tuple[jax.Array, Metrics]:
        del teacher_feats, student_feats
        kl = jnp.mean(kl_per_example(teacher_logits, student_logits, temperature)) * temperature ** 2
        return kl, {"kl": kl}

    return loss_fn


# --- teacher penultimate features --------------------------------------------------------------

def penultimate_apply(model: nn.Module, head: str = "fc") -> Callable[..., tuple[Any, jax.Array]]:
    """`apply(variables, x, **kw) -> (model output, penultimate features [B, D])`.

    The penultimate features are the input of the classifier head (the Dense named `head`; every
    classifier in abd_jax.models names it "fc"): for a WRN the pooled relu(bn(last stage)), the
    `features` DAFL's teacher returns. Captured with `nn.intercept_methods`, so the models stay
    as they are and the call is an ordinary pure `apply` (jit/grad see one trace).
    """

    def is_head(context: Any) -> bool:
        return context.method_name == "__call__" and isinstance(context.module, nn.Dense) and context.module.name == head

    def apply(variables: Any, x: jax.Array, **kwargs: Any) -> tuple[Any, jax.Array]:
        out, captured = capture_call_inputs(model, variables, x, is_head, **kwargs)
        if len(captured) != 1:
            raise ValueError(f"{type(model).__name__} has {len(captured)} Dense layers named {head!r}; "
                             "the penultimate features need exactly one classifier head")
        return out, captured[0]

    return apply


# --- per-method choices -------------------------------------------------------------------------

def method_losses(method: str, *, temperature: float = 1.0, dafl_oh: float = 1.0, dafl_act: float = 0.1,
                  dafl_balance: float = 5.0) -> tuple[GeneratorObjective | None, StudentLossFn | None]:
    """(generator objective, student loss) of `method`; (None, None) for "zskt", whose losses are
    `make_pseudo_batch`'s defaults (KL_tau adversarial generator, KL + beta * AT student)."""
    if method == "zskt":
        return None, None
    if method == "dfad":
        return GeneratorObjective(dfad_generator_loss, uses_student=True, uses_penultimate=False), dfad_student_loss
    if method == "dafl":
        objective = GeneratorObjective(make_dafl_generator_loss(dafl_oh, dafl_act, dafl_balance),
                                       uses_student=False, uses_penultimate=bool(dafl_act))
        return objective, make_kl_student_loss(temperature)
    raise ValueError(f"unknown method {method!r}; use one of: {', '.join(METHODS)}")


def method_defaults(method: str) -> dict[str, Any]:
    """The `ZSKTConfig` fields whose upstream value for `method` differs from ZSKT's (spec 6.1),
    to apply with `dataclasses.replace(cfg, **method_defaults(m))` or onto a ConfigDict.

    Sources (docs/DFAD_DAFL.md has the details):
    - dfad: VainF/Data-Free-Adversarial-Distillation DFAD_cifar.py: 5 student steps per generator
      step, student SGD lr 0.1 momentum 0.9 weight decay 5e-4, generator Adam lr 1e-3, no
      gradient clipping, no attention transfer (the L1 loss replaces KL + AT).
    - dafl: the generator loss weights of DAFL's official code (huawei-noah, DAFL-train.py
      defaults oh 1, ie 5, a 0.1); student SGD lr 0.1 momentum 0.9 weight decay 5e-4 (its CIFAR
      recipe), generator Adam lr 1e-3 and 5 student steps per generator step as zju-vipa/
      DataFree's dafl scripts (the code base ABD's CMI/OOD reference forks); no clipping, no AT.
    Run length, batch size, z_dim and the generator stay as the caller's ZSKT settings.
    """
    if method == "zskt":
        return {}
    common = dict(beta=0.0, n_student_steps=5, lr_student=0.1, lr_generator=1e-3, student_optimizer="sgd",
                  student_momentum=0.9, student_weight_decay=5e-4, clip_norm=0.0)
    if method == "dfad":
        return {"method": "dfad", **common}
    if method == "dafl":
        return {"method": "dafl", **common, "dafl_oh": 1.0, "dafl_act": 0.1, "dafl_balance": 5.0}
    raise ValueError(f"unknown method {method!r}; use one of: {', '.join(METHODS)}")
