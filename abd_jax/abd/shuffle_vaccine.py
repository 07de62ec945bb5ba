"""Shuffling Vaccine (SV), spec section 3, as small pure functions.

The pieces, bottom up:

- `shuffle_conv_inputs`: permute the input-channel axis of the last k conv kernels (spec 3.1).
- `make_shuffled_ensemble` / `ensemble_logits`: k independently shuffled copies stacked on a
  leading axis and evaluated with `jax.vmap`, mean of logits (spec 3.1 "Ensemble").
- `suspicion`, `sv_penalty`, `ood_sample_weights`: the mask, the generator penalty and the OOD-KD
  re-weighting as masked means with static shapes (spec 3.2, 3.3).
- `ShuffleVaccine`: the SV state (data only), and `make_generator_penalty` /
  `make_teacher_and_penalty` / `make_sample_weights`, the DFKDHooks-shaped callables that read it
  (spec 3.3).
- `tail_ratio`, `verify_vaccine`: the host-side vaccine verification (spec 3.4).
- `suspicion_report`: per-sample numpy arrays for saving.

Every place this departs from the reference code is listed in docs/ABD_SV.md.

Passing the SV state through a jitted step. The state's arrays (shuffled params, coef) must be
*arguments* of the jitted function, never constants captured from outside it, or a change of
`coef` (warm-up -> on, or verification failed -> off) would recompile the step. The hooks built
here therefore take the state as an optional trailing argument,
`penalty(teacher_logits, x, key, sv)`, and fall back to the state given to the factory. Both forms
are retrace-free when the state is a traced value:

    # explicit: the method passes its hook state (see the DFKDHooks proposal in docs/ABD_SV.md)
    pen = make_generator_penalty(teacher)
    jax.jit(lambda sv, t, x, k: pen(t, x, k, sv))
    # bound inside jit: works with today's 3-argument DFKDHooks signature
    jax.jit(lambda sv, ...: make_pseudo_batch(..., hooks=DFKDHooks(
        generator_penalty=make_generator_penalty(teacher, sv)))(state, teacher_vars))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util
from flax.core import FrozenDict, freeze

from abd_jax.losses import kl_elementwise
from abd_jax.models.prefix import apply_capturing_input, apply_from_input, is_sequential
from abd_jax.models.registry import conv_kernel_paths

PyTree = Any
Metrics = dict[str, jax.Array]
# (sv, x [b, H, W, C], teacher_logits [b, C]) -> divergences [b]; see `make_divergence_fn`.
DivergenceFn = Callable[["ShuffleVaccine", jax.Array, jax.Array], jax.Array]

# Spec 3.1 / 3.2 / 3.4 defaults (reference code; the paper's values are NOT FOUND, spec 10.3).
DEFAULT_COEF = 0.1  # lambda (`--shuf_teacher`, `--shufl_coef`)
DEFAULT_N_COPIES = 3  # `n_shuf_ens`
DEFAULT_N_LAYERS = 5  # `n_shuf_layer`
DEFAULT_THRESHOLD = 0.02  # tail-ratio threshold
DEFAULT_MAX_TRIALS = 8  # first draw + up to 7 re-draws


# --------------------------------------------------------------------------------------------
# 3.1 Building the shuffled teacher


def shuffled_kernel_paths(params: Mapping[str, Any], n_layers: int) -> list[tuple[str, ...]]:
    """The conv kernels that `shuffle_conv_inputs(key, params, n_layers)` permutes, forward order.

    Spec 3.1: n > 0 marks the last n conv kernels (output side), n < 0 the first |n| (input side),
    0 none; |n| larger than the number of convs marks all of them, as the reference does. The
    order comes from `conv_kernel_paths` (module names), never from dict order.
    """
    paths = conv_kernel_paths(params)
    if n_layers > 0:
        return paths[-n_layers:]
    if n_layers < 0:
        return paths[:-n_layers]
    return []


def shuffle_conv_inputs(key: jax.Array, params: Mapping[str, Any], n_layers: int) -> PyTree:
    """Permutes the input-channel axis of the selected conv kernels (spec 3.1).

    Each selected HWIO kernel W [kh, kw, C_in, C_out] becomes W[:, :, pi, :] with its own random
    permutation pi of C_in (PyTorch's W[:, pi] on OIHW). BN, the classifier and the other convs
    are returned unchanged. Jittable and vmappable with `n_layers` static.

    Args:
      key: PRNG key; the same key gives the same permutations.
      params: the model's 'params' collection (nested dicts).
      n_layers: how many conv kernels to shuffle (see `shuffled_kernel_paths`).
    Returns:
      A params tree with the same structure, shapes and dtypes.
    """
    chosen = shuffled_kernel_paths(params, n_layers)
    if not chosen:
        return params
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(key, len(chosen))
    for k, path in zip(keys, chosen):
        kernel = flat[path]
        perm = jax.random.permutation(k, kernel.shape[-2])
        flat[path] = jnp.take(kernel, perm, axis=-2)
    out = traverse_util.unflatten_dict(flat)
    return freeze(out) if isinstance(params, FrozenDict) else out


def make_shuffled_ensemble(
    key: jax.Array,
    params: Mapping[str, Any],
    n_copies: int = DEFAULT_N_COPIES,
    n_layers: int = DEFAULT_N_LAYERS,
) -> PyTree:
    """`n_copies` independently shuffled copies of `params`, stacked: every leaf gets a leading
    axis of size n_copies (spec 3.1, `n_shuf_ens`). Unshuffled leaves are broadcast copies."""
    keys = jax.random.split(key, n_copies)
    return jax.vmap(lambda k: shuffle_conv_inputs(k, params, n_layers))(keys)


def reshuffle_ensemble(
    key: jax.Array, stacked_params: PyTree, n_layers: int = DEFAULT_N_LAYERS
) -> PyTree:
    """Re-draws every copy in place: a fresh permutation composed with the current one (spec 3.4,
    `remake_shuffle_suspect`). The composition of a uniform permutation with any fixed one is
    uniform again, so this is a fresh draw relative to the teacher."""
    n_copies = jax.tree.leaves(stacked_params)[0].shape[0]
    keys = jax.random.split(key, n_copies)
    return jax.vmap(shuffle_conv_inputs, in_axes=(0, 0, None))(keys, stacked_params, n_layers)


def _logits(out: Any) -> jax.Array:
    # Classifiers here return (logits, stage_features); accept bare logits too.
    return out[0] if isinstance(out, tuple) else out


def shared_prefix_child(params: Mapping[str, Any], n_layers: int) -> str | None:
    """The top-level child holding the first shuffled kernel: every copy computes the same values
    up to its input, so `ensemble_logits` can run that prefix once (models/prefix.py). None when
    nothing is shuffled or the first shuffled kernel sits in the stem's child (nothing to share)."""
    chosen = shuffled_kernel_paths(params, n_layers)
    if not chosen:
        return None
    child = chosen[0][0]
    return None if child == conv_kernel_paths(params)[0][0] else child


def ensemble_logits(
    model: nn.Module, stacked_params: PyTree, batch_stats: PyTree, x: jax.Array,
    vectorize: bool | None = None, split_at: str | None = None, prefix_activation: jax.Array | None = None,
) -> jax.Array:
    """T~(x): the mean of the shuffled copies' logits (spec 3.1, `EnsembleNet`).

    Eval-mode BN with the teacher's running statistics, shared by every copy and never updated
    (the reference's copies are deep copies of the eval-mode teacher).

    Args:
      model: the teacher's flax module.
      stacked_params: params with a leading [n_copies] axis (`make_shuffled_ensemble`).
      batch_stats: the teacher's 'batch_stats' collection (no leading axis); {} for BN-free nets.
      x: normalized images [B, H, W, C].
      vectorize: vmap over the copies (True) or a Python loop (False); None (default) picks the
        loop on the CPU backend and vmap elsewhere.
      split_at: the top-level child where the copies start to differ (`shared_prefix_child`;
        `ShuffleVaccine.split_at`). When given and the model declares a chain of children
        (`models.prefix.is_sequential`), the unshuffled prefix runs once, in the first copy, and
        the other copies start from its activation; the logits are those of whole forwards (the
        same operations on the same values). Needs copies whose unshuffled leaves are equal, as
        `make_shuffled_ensemble` and `reshuffle_ensemble` make them.
      prefix_activation: with `split_at`, the activation entering `split_at` computed elsewhere
        (the teacher's own forward, `teacher_and_ensemble`): every copy then starts from it and
        none runs the prefix. Needs the copies' unshuffled leaves equal to that model's.
    Returns:
      [B, num_classes] mean logits. Differentiable in x (and in `prefix_activation`).
    """

    def variables(p: PyTree) -> dict[str, PyTree]:
        return {"params": p, "batch_stats": batch_stats} if batch_stats else {"params": p}

    def one(p: PyTree) -> jax.Array:
        return _logits(model.apply(variables(p), x, train=False))

    if vectorize is None:
        vectorize = jax.default_backend() != "cpu"
    n = jax.tree.leaves(stacked_params)[0].shape[0]
    copy = lambda i: jax.tree.map(lambda leaf: leaf[i], stacked_params)  # noqa: E731
    if split_at is not None and is_sequential(model) and (n > 1 or prefix_activation is not None):
        if prefix_activation is None:  # the first copy runs the prefix, the others start from it
            out0, h = apply_capturing_input(model, variables(copy(0)), x, split_at, train=False)
            head, first = [_logits(out0)], 1
        else:
            h, head, first = prefix_activation, [], 0

        def tail(p: PyTree) -> jax.Array:
            return _logits(apply_from_input(model, variables(p), x, split_at, h, train=False))

        if vectorize:
            rest = jax.vmap(tail)(jax.tree.map(lambda leaf: leaf[first:], stacked_params))
            return jnp.mean(jnp.concatenate([*(t[None] for t in head), rest]), axis=0)
        terms = head + [tail(copy(i)) for i in range(first, n)]
        total = terms[0]
        for t in terms[1:]:  # left to right, as the loop over whole copies below sums them
            total = total + t
        return total / n
    if vectorize:
        return jnp.mean(jax.vmap(one)(stacked_params), axis=0)
    # A Python loop over the (few, static) copies: vmapping a convolution over stacked kernels
    # makes a grouped convolution, which XLA:CPU ran far slower (the ZSKT+SV pseudo-batch: 2.4 s
    # with vmap, 1.6 s with the loop, vanilla 1.2 s; docs/ABD_SV.md). Same values.
    return sum(one(copy(i)) for i in range(n)) / n


def teacher_and_ensemble(
    model: nn.Module, teacher_variables: Mapping[str, Any], sv: ShuffleVaccine, x: jax.Array,
    vectorize: bool | None = None,
) -> tuple[Any, jax.Array]:
    """(the teacher's output `model.apply(teacher_variables, x)`, T~(x)) with the unshuffled prefix
    run once, in the teacher's own forward, when `sv.split_at` allows it: the copies then start
    from the teacher's activation (the prefix's leaves are the teacher's, since the copies are
    made from it). That saves one prefix forward (and its backward) over `ensemble_logits` after
    a separate teacher forward; the values are the same and gradients are summed in another order.
    Without `split_at` (or a chain of children) this is the two separate forwards."""
    if sv.split_at is not None and is_sequential(model):
        out, h = apply_capturing_input(model, teacher_variables, x, sv.split_at, train=False)
        return out, ensemble_logits(model, sv.params, sv.batch_stats, x, vectorize, sv.split_at, prefix_activation=h)
    out = model.apply(teacher_variables, x, train=False)
    return out, ensemble_logits(model, sv.params, sv.batch_stats, x, vectorize, sv.split_at)


# --------------------------------------------------------------------------------------------
# 3.2 / 3.3 Suspicion mask, SV loss, OOD weights


def suspicion(teacher_logits: jax.Array, shuffled_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Suspicion mask and teacher/shuffled divergence per sample (spec 3.2).

    Args:
      teacher_logits: T(x) [B, C].
      shuffled_logits: T~(x) [B, C].
    Returns:
      mask [B] float32: 1 where argmax T~ == argmax T (suspicious: the prediction survived the
        shuffle), else 0. Not differentiable (constant).
      divergence [B]: d_i = KL(p_T || p_T~) / C at temperature 1, i.e. the reference's
        `kl_div(log_softmax(T~), softmax(T), 'none').mean(1)`. Differentiable in both inputs.
    """
    agree = jnp.argmax(shuffled_logits, axis=-1) == jnp.argmax(teacher_logits, axis=-1)
    mask = jax.lax.stop_gradient(agree.astype(jnp.float32))
    divergence = jnp.mean(kl_elementwise(teacher_logits, shuffled_logits, 1.0), axis=-1)
    return mask, divergence


def sv_penalty(
    teacher_logits: jax.Array, shuffled_logits: jax.Array, coef: jax.Array
) -> tuple[jax.Array, Metrics]:
    """L_SV = -coef * sum_i(m_i d_i) / sum_i(m_i), and 0 when nothing is flagged (spec 3.2).

    Added to a *minimized* generator/inversion loss, so it pushes the synthesizer to increase the
    divergence on flagged samples (spec 12.5, signs). A masked mean with a safe denominator: static
    shapes, no boolean indexing.

    Args:
      teacher_logits, shuffled_logits: [B, C].
      coef: lambda, a scalar (pass an array so a change of value does not retrace).
    Returns:
      (scalar <= 0, metrics): sv_loss, sv_flagged (count of flagged samples), sv_kl (masked mean
      divergence), sv_coef.
    """
    mask, d = suspicion(teacher_logits, shuffled_logits)
    n_flagged = jnp.sum(mask)
    masked_mean = jnp.sum(mask * d) / jnp.maximum(n_flagged, 1.0)  # 0 / 1 when nothing flagged
    coef = jnp.asarray(coef, jnp.float32)
    loss = -coef * masked_mean
    return loss, {"sv_loss": loss, "sv_flagged": n_flagged, "sv_kl": masked_mean, "sv_coef": coef}


def ood_sample_weights(mask: jax.Array, coef: jax.Array) -> jax.Array:
    """Signed per-sample weights for OOD-KD (spec 3.3), for a loss reduced as mean(w * l).

    With K = kept (m = 0) and U = flagged (m = 1) samples, the reference's loss is
    mean(l[K]) - coef * mean(l[U]) when U is non-empty, else mean(l). Writing it as
    (1/B) sum_i w_i l_i gives w_i = B/|K| on K and -coef * B/|U| on U; with U empty every weight
    is B/B = 1 (the plain mean). Departures (docs/ABD_SV.md): with |K| = 0 the kept term is
    dropped (the reference's mean of an empty tensor is NaN), and with coef = 0 the mask is
    ignored (all weights 1), as the reference skips the mask when coef == 0.

    Args:
      mask: [B] suspicion mask (1 = flagged).
      coef: lambda, a scalar.
    Returns:
      [B] float32 weights, constant (no gradient).
    """
    coef = jnp.asarray(coef, jnp.float32)
    m = (mask > 0).astype(jnp.float32) * (coef != 0).astype(jnp.float32)
    batch = m.shape[0]
    n_flagged = jnp.sum(m)
    n_kept = batch - n_flagged
    w_kept = batch / jnp.maximum(n_kept, 1.0)
    w_flagged = -coef * batch / jnp.maximum(n_flagged, 1.0)
    return jax.lax.stop_gradient(jnp.where(m > 0, w_flagged, w_kept))


PUSH_CAPS = ("none", "uniform")


def cap_pushed_losses(per_sample: jax.Array, weights: jax.Array, teacher_logits: jax.Array,
                      temperature: float, cap: str = "none") -> jax.Array:
    """Bounds the push-away of OOD-KD's flagged samples (not in the reference; docs/ABD_SV.md).

    With negative weights the loss is ascended without end on flagged samples, and the student
    can run far from the teacher everywhere (a measured collapse onto one class on the digits).
    cap="uniform" clips each flagged sample's loss at what a uniform prediction would score,
    KL_tau(p_T || uniform) on the same [B] scale (mean over C): the student is pushed until it says
    nothing about that sample, no further (past the cap its gradient is 0). cap="none" returns
    `per_sample` unchanged (the reference).

    Args:
      per_sample: [B] per-sample KD losses, mean over C of `kl_elementwise`.
      weights: [B] `ood_sample_weights` (negative = flagged).
      teacher_logits: [B, C].
    """
    if cap not in PUSH_CAPS:
        raise ValueError(f"unknown push cap {cap!r}; use one of: {', '.join(PUSH_CAPS)}")
    if cap == "none":
        return per_sample
    t = jax.lax.stop_gradient(teacher_logits)
    bound = jnp.mean(kl_elementwise(t, jnp.zeros_like(t), temperature), axis=-1)
    return jnp.where(weights < 0, jnp.minimum(per_sample, bound), per_sample)


# --------------------------------------------------------------------------------------------
# SV state and the DFKDHooks-shaped callables


class ShuffleVaccine(struct.PyTreeNode):
    """SV state, data only (spec 3.4 step 4: coef and the tested flag are checkpointed).

    Attributes:
      params: the shuffled copies' params, every leaf with a leading [n_copies] axis.
      batch_stats: the teacher's BN running statistics (shared by the copies, unchanged).
      coef: float32 [], the lambda in force now (0 = SV off: warm-up or verification failed).
      preset_coef: float32 [], the lambda to switch on when verification passes.
      tested: bool [], True once the coefficient is final (verified, or no verification asked).
      trials: int32 [], how many shuffles verification tried (0 if it has not run).
      split_at: static, the top-level child where the copies start to differ
        (`shared_prefix_child`); `ensemble_logits` runs the prefix before it once. None: whole
        forwards.
    """

    params: PyTree
    batch_stats: PyTree
    coef: jax.Array
    preset_coef: jax.Array
    tested: jax.Array
    trials: jax.Array
    split_at: str | None = struct.field(pytree_node=False, default=None)

    @property
    def n_copies(self) -> int:
        return jax.tree.leaves(self.params)[0].shape[0]


def init_shuffle_vaccine(
    key: jax.Array,
    teacher_variables: Mapping[str, Any],
    *,
    coef: float = DEFAULT_COEF,
    n_copies: int = DEFAULT_N_COPIES,
    n_layers: int = DEFAULT_N_LAYERS,
    verify: bool = False,
    share_prefix: bool = True,
) -> ShuffleVaccine:
    """Builds the SV state from the teacher's variables ({'params', 'batch_stats'}).

    With `verify=True` (the reference's `pseudo_test_batches > 0`) lambda starts at 0 for the
    warm-up and `verify_vaccine` later switches it to `coef` or leaves it at 0 (spec 3.4 step 1).
    Otherwise SV is on from the start with lambda = coef (the released ZSKT-CIFAR10 setting).
    """
    # Fresh buffers throughout: a step that donates its state (ZSKT's fuse="host") must not free
    # the caller's teacher statistics, and XLA refuses one buffer donated twice (coef, preset).
    return ShuffleVaccine(
        params=make_shuffled_ensemble(key, teacher_variables["params"], n_copies, n_layers),
        batch_stats=jax.tree.map(jnp.copy, teacher_variables.get("batch_stats", {})),
        coef=jnp.zeros((), jnp.float32) if verify else jnp.full((), coef, jnp.float32),
        preset_coef=jnp.full((), coef, jnp.float32),
        tested=jnp.asarray(not verify),
        trials=jnp.zeros((), jnp.int32),
        split_at=shared_prefix_child(teacher_variables["params"], n_layers) if share_prefix else None,
    )


def _resolve(bound: ShuffleVaccine | None, given: ShuffleVaccine | None) -> ShuffleVaccine:
    sv = given if given is not None else bound
    if sv is None:
        raise ValueError("no ShuffleVaccine state: pass one to the factory or as the last argument")
    return sv


def make_generator_penalty(
    model: nn.Module,
    sv: ShuffleVaccine | None = None,
    *,
    shuffled_grad: bool = True,
    skip_when_off: bool = True,
) -> Callable[..., tuple[jax.Array, Metrics]]:
    """The SV generator penalty with the DFKDHooks.generator_penalty signature (spec 3.3).

    Returns `penalty(teacher_logits [B, C], x [B, H, W, C], key, sv=None) -> (scalar, metrics)`:
    T~(x) on the same (normalized) images the teacher saw, then `sv_penalty`. The SV state comes
    from the trailing argument when given, else from the factory's `sv`; see the module docstring
    for why it must be a traced value inside jit. `key` is unused (the penalty is deterministic).

    Args:
      model: the teacher's flax module.
      sv: SV state to bind (optional).
      shuffled_grad: let gradients flow into x through T~ (reference default); False is
        `--no_shuf_grad` (T~'s logits are constants; d still depends on T(x)).
      skip_when_off: with coef == 0 skip the ensemble forwards via `lax.cond` (the reference
        returns 0 early); the value is the same either way.
    """
    zero_metrics = {k: jnp.zeros((), jnp.float32) for k in _PENALTY_METRICS}

    def penalty(
        teacher_logits: jax.Array,
        x: jax.Array,
        key: jax.Array | None = None,
        sv_state: ShuffleVaccine | None = None,
    ) -> tuple[jax.Array, Metrics]:
        del key
        s = _resolve(sv, sv_state)
        coef = jnp.asarray(s.coef, jnp.float32)

        def on(operands):
            t_logits, x_in = operands
            sh = ensemble_logits(model, s.params, s.batch_stats, x_in, split_at=s.split_at)
            return _penalty_from(t_logits, sh, coef, shuffled_grad)

        def off(operands):
            return jnp.zeros((), jnp.float32), dict(zero_metrics)

        operands = (teacher_logits, x)
        if skip_when_off:
            loss, metrics = jax.lax.cond(coef != 0, on, off, operands)
        else:
            loss, metrics = on(operands)
        return loss, {**metrics, "sv_coef": coef}

    return penalty


_PENALTY_METRICS = ("sv_loss", "sv_flagged", "sv_kl")


def _penalty_from(teacher_logits: jax.Array, shuffled_logits: jax.Array, coef: jax.Array,
                  shuffled_grad: bool) -> tuple[jax.Array, Metrics]:
    """`sv_penalty` in float32 with the metrics the hooks report."""
    if not shuffled_grad:
        shuffled_logits = jax.lax.stop_gradient(shuffled_logits)
    loss, metrics = sv_penalty(teacher_logits, shuffled_logits, coef)
    return loss.astype(jnp.float32), {k: metrics[k].astype(jnp.float32) for k in _PENALTY_METRICS}


def make_teacher_and_penalty(
    model: nn.Module,
    sv: ShuffleVaccine | None = None,
    *,
    shuffled_grad: bool = True,
) -> Callable[..., tuple[Any, jax.Array, Metrics]]:
    """The teacher's forward and the SV generator penalty together, with the
    DFKDHooks.teacher_and_penalty signature: `fn(teacher_variables, x, key, sv=None) ->
    (teacher output (logits, features), penalty, metrics)`.

    The same values as a teacher forward followed by `make_generator_penalty(model, sv,
    skip_when_off=False)`, but the copies start from the teacher's own prefix activation
    (`teacher_and_ensemble`), so the unshuffled prefix runs once in the generator step instead of
    twice (forward and backward). With coef == 0 the penalty is computed and multiplied by 0.
    """

    def teacher_and_penalty(
        teacher_variables: Mapping[str, Any],
        x: jax.Array,
        key: jax.Array | None = None,
        sv_state: ShuffleVaccine | None = None,
    ) -> tuple[Any, jax.Array, Metrics]:
        del key
        s = _resolve(sv, sv_state)
        coef = jnp.asarray(s.coef, jnp.float32)
        out, sh = teacher_and_ensemble(model, teacher_variables, s, x)
        loss, metrics = _penalty_from(_logits(out), sh, coef, shuffled_grad)
        return out, loss, {**metrics, "sv_coef": coef}

    return teacher_and_penalty


def make_sample_weights(
    model: nn.Module,
    sv: ShuffleVaccine | None = None,
    *,
    skip_when_off: bool = True,
) -> Callable[..., jax.Array]:
    """OOD-KD weights with the DFKDHooks.sample_weights signature (spec 3.3).

    Returns `weights(teacher_logits [B, C], x [B, H, W, C], sv=None) -> [B]`: the suspicion mask
    of T~(x) against T(x), turned into `ood_sample_weights`. All ones when coef == 0 (and then,
    with `skip_when_off`, T~ is not evaluated). No gradient flows through the weights.
    """

    def weights(
        teacher_logits: jax.Array, x: jax.Array, sv_state: ShuffleVaccine | None = None
    ) -> jax.Array:
        s = _resolve(sv, sv_state)
        coef = jnp.asarray(s.coef, jnp.float32)

        def on(operands):
            t_logits, x_in = operands
            sh = ensemble_logits(model, s.params, s.batch_stats, jax.lax.stop_gradient(x_in), split_at=s.split_at)
            mask, _ = suspicion(t_logits, sh)
            return ood_sample_weights(mask, coef)

        def off(operands):
            return jnp.ones(operands[0].shape[:1], jnp.float32)

        operands = (jax.lax.stop_gradient(teacher_logits), x)
        return jax.lax.cond(coef != 0, on, off, operands) if skip_when_off else on(operands)

    return weights


# --------------------------------------------------------------------------------------------
# 3.4 Vaccine verification (host side)


def make_divergence_fn(model: nn.Module) -> DivergenceFn:
    """`divergence(sv, x [b, H, W, C], teacher_logits [b, C]) -> d [b]`, the per-sample
    KL(p_T || p_T~)/C of spec 3.4 step 2 (same formula as the mask's). Not jitted: jit it once
    and hand it to `verify_vaccine`."""

    def divergence(sv: ShuffleVaccine, x: jax.Array, teacher_logits: jax.Array) -> jax.Array:
        sh = ensemble_logits(model, sv.params, sv.batch_stats, x, split_at=sv.split_at)
        return suspicion(teacher_logits, sh)[1]

    return divergence


def tail_statistics(divergences: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Spec 3.4 step 2: s = log10(d), tail = #{s < mean(s) - 3 std(s)} / N (numpy std, ddof 0).

    Divergences <= 0 (float32 rounding of a KL that is ~0) are raised to the smallest positive
    divergence in the pool before the log. The reference takes log10 as is, so one such sample
    makes its mean -inf, its threshold NaN and its tail ratio 0, although that sample is the most
    shuffle-resistant of all; a fixed tiny floor (1e-38) would instead inflate the std and hide
    the real tail (docs/ABD_SV.md).
    """
    d = np.asarray(divergences, np.float64).reshape(-1)
    if d.size == 0:
        raise ValueError("tail ratio of an empty pool")
    positive = d[d > 0]
    floor = positive.min() if positive.size else float(np.finfo(np.float32).tiny)
    s = np.log10(np.maximum(d, floor))
    mean, std = float(np.mean(s)), float(np.std(s))
    n_tail = int(np.sum(s < mean - 3.0 * std))
    return {
        "tail_ratio": n_tail / d.size,
        "n_tail": n_tail,
        "n": int(d.size),
        "mean_log10_kl": mean,
        "std_log10_kl": std,
    }


def tail_ratio(divergences: Sequence[float] | np.ndarray) -> float:
    """Fraction of samples with abnormally low log10 divergence (spec 3.4 step 2)."""
    return tail_statistics(divergences)["tail_ratio"]


def pool_divergences(
    divergence_fn: DivergenceFn,
    sv: ShuffleVaccine,
    pool_x: np.ndarray | jax.Array,
    pool_teacher_logits: np.ndarray | jax.Array,
    batch_size: int = 512,
) -> np.ndarray:
    """d for every pooled sample, in fixed-size batches (the last one zero-padded, so a jitted
    `divergence_fn` compiles once). Returns float64 [N]."""
    n = int(pool_x.shape[0])
    if int(pool_teacher_logits.shape[0]) != n:
        raise ValueError(f"pool has {n} images but {pool_teacher_logits.shape[0]} teacher logits")
    bs = min(batch_size, n)
    out = []
    for start in range(0, n, bs):
        xb = np.asarray(pool_x[start : start + bs])
        tb = np.asarray(pool_teacher_logits[start : start + bs])
        valid = xb.shape[0]
        if valid < bs:
            xb = np.concatenate([xb, np.zeros((bs - valid, *xb.shape[1:]), xb.dtype)])
            tb = np.concatenate([tb, np.zeros((bs - valid, *tb.shape[1:]), tb.dtype)])
        out.append(np.asarray(divergence_fn(sv, xb, tb), np.float64)[:valid])
    return np.concatenate(out)


_reshuffle_jit = jax.jit(reshuffle_ensemble, static_argnames="n_layers")


def verify_vaccine(
    key: jax.Array,
    divergence_fn: DivergenceFn,
    pool_x: np.ndarray | jax.Array,
    pool_teacher_logits: np.ndarray | jax.Array,
    sv: ShuffleVaccine,
    *,
    n_layers: int = DEFAULT_N_LAYERS,
    threshold: float = DEFAULT_THRESHOLD,
    max_trials: int = DEFAULT_MAX_TRIALS,
    batch_size: int = 512,
) -> tuple[ShuffleVaccine, list[dict[str, float]]]:
    """Is this shuffle a proper vaccine? Host-side loop, spec 3.4 steps 2-4.

    Trial t computes the tail ratio of the pooled divergences; above `threshold` SV is switched
    on (coef = preset_coef) and the loop stops. Otherwise every copy is re-drawn in place
    (`reshuffle_ensemble`) and tested again, `max_trials` trials in all. If none passes, coef = 0
    for good. Either way `tested` becomes True and a tested state is returned unchanged (never
    re-tested). Only synthetic data drives the decision (spec 3.4; 12.17).

    Args:
      key: PRNG key for the re-draws.
      divergence_fn: e.g. `jax.jit(make_divergence_fn(teacher))`.
      pool_x: [N, H, W, C] pooled synthetic images (normalized, as the teacher saw them).
      pool_teacher_logits: [N, C] the teacher's logits on them (eval mode, so equal to
        recomputing them as the reference does).
      sv: the SV state (after its warm-up).
      n_layers: static, the number of kernels to re-shuffle (same as at construction).
    Returns:
      (new state, per-trial log of `tail_statistics` plus "trial" and "passed").
    """
    if bool(sv.tested):
        return sv, []
    if max_trials < 1:
        raise ValueError(f"max_trials must be >= 1, got {max_trials}")
    log: list[dict[str, float]] = []
    for trial in range(max_trials):
        if trial > 0:
            key, sub = jax.random.split(key)
            sv = sv.replace(params=_reshuffle_jit(sub, sv.params, n_layers=n_layers))
        stats = tail_statistics(
            pool_divergences(divergence_fn, sv, pool_x, pool_teacher_logits, batch_size)
        )
        passed = stats["tail_ratio"] > threshold
        log.append({"trial": trial, **stats, "passed": passed})
        if passed:
            return sv.replace(
                coef=sv.preset_coef,
                tested=jnp.asarray(True),
                trials=jnp.asarray(trial + 1, jnp.int32),
            ), log
    return sv.replace(
        coef=jnp.zeros_like(sv.coef),
        tested=jnp.asarray(True),
        trials=jnp.asarray(max_trials, jnp.int32),
    ), log


# --------------------------------------------------------------------------------------------
# Reports


def suspicion_report(
    teacher_logits: jax.Array, shuffled_logits: jax.Array
) -> dict[str, np.ndarray]:
    """Per-sample arrays for saving (e.g. `np.savez`): teacher_pred, shuffled_pred (int32 [B]),
    divergence (float32 [B], KL/C as in spec 3.2) and mask (bool [B], True = flagged)."""
    mask, d = suspicion(teacher_logits, shuffled_logits)
    return {
        "teacher_pred": np.asarray(jnp.argmax(teacher_logits, axis=-1), np.int32),
        "shuffled_pred": np.asarray(jnp.argmax(shuffled_logits, axis=-1), np.int32),
        "divergence": np.asarray(d, np.float32),
        "mask": np.asarray(mask > 0),
    }


def suspicion_reports(
    model: nn.Module,
    teacher_variables: Mapping[str, Any],
    sv: ShuffleVaccine,
    batches: Mapping[str, np.ndarray | jax.Array],
    *,
    batch_size: int = 512,
) -> dict[str, dict[str, np.ndarray]]:
    """`suspicion_report` of the teacher vs its shuffled copies on each named batch of normalized
    images (e.g. synthetic samples, clean test images, triggered test images), so a user can see
    what the vaccine flags. Returns {name: {teacher_pred, shuffled_pred, divergence, mask}}."""

    @jax.jit
    def logits(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        t = _logits(model.apply(teacher_variables, x, train=False))
        return t, ensemble_logits(model, sv.params, sv.batch_stats, x, split_at=sv.split_at)

    out = {}
    for name, x in batches.items():
        parts = [logits(jnp.asarray(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
        t = jnp.concatenate([p[0] for p in parts])
        sh = jnp.concatenate([p[1] for p in parts])
        out[name] = suspicion_report(t, sh)
    return out


def summarize_reports(reports: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Per batch: n, flagged fraction (%), and the mean log10 divergence of flagged / unflagged."""

    def mean_log(d: np.ndarray) -> float | None:
        return float(np.mean(np.log10(np.maximum(d, 1e-30)))) if d.size else None

    summary = {}
    for name, r in reports.items():
        m, d = r["mask"], r["divergence"].astype(np.float64)
        summary[name] = {
            "n": int(m.size),
            "flagged_pct": round(100.0 * float(np.mean(m)), 2) if m.size else 0.0,
            "mean_log10_kl_flagged": mean_log(d[m]),
            "mean_log10_kl_unflagged": mean_log(d[~m]),
        }
    return summary
