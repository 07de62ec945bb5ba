"""Model-inversion machinery shared by CMI and DeepInversion (spec 6.2): reading the teacher's BN
inputs, the two augmented views, the contrastive head and memory bank, the synthetic image pool,
and one jitted synthesis round.

Everything that persists across rounds (the pool, the memory bank, the head and its optimizer) is
a fixed-size array in `SynthesisState`, so a run checkpoints and resumes exactly (abd_jax/resume.py)
and every round compiles once: "filled so far" is a count, never a shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from abd_jax.augment import normalize, random_crop_flip
from abd_jax.kd.common import DFKDHooks, Metrics, with_hook_state
from abd_jax.losses import bn_statistics_loss, cross_entropy, info_nce, js_divergence, kl_elementwise
from abd_jax.losses import total_variation_l2
from abd_jax.models.conv_op import loop_friendly_convs
from abd_jax.models.initializers import torch_default_bias, torch_default_kernel
from abd_jax.state import TrainState

PyTree = Any


# ---- the teacher's BN inputs ----------------------------------------------------------------------


class BNTap(NamedTuple):
    """What one BatchNorm layer saw: its input's batch statistics (biased variance), its running
    statistics, and the per-sample channel means of its input (CMI's contrastive features)."""

    mean: jax.Array  # [C]
    var: jax.Array  # [C]
    running_mean: jax.Array  # [C]
    running_var: jax.Array  # [C]
    instance_mean: jax.Array  # [B, C]


def apply_with_bn_taps(model: nn.Module, variables: PyTree, x: jax.Array, **kwargs) -> tuple[Any, list[BNTap]]:
    """`model.apply(variables, x, **kwargs)` plus one `BNTap` per BatchNorm call, in call order.

    The reference registers forward hooks on every BatchNorm2d (DeepInversionHook,
    InstanceMeanHook); here `nn.intercept_methods` reads each BatchNorm's input while tracing, so the
    models need no change and their outputs and parameter paths are untouched. The taps are traced
    values of this call: use them in the same traced function.
    """
    taps: list[BNTap] = []

    def interceptor(next_fun, args, kw, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            h = args[0].astype(jnp.float32)
            axes = tuple(range(h.ndim - 1))
            mean = jnp.mean(h, axis=axes)
            var = jnp.mean(jnp.square(h - mean), axis=axes)
            taps.append(BNTap(mean, var, context.module.get_variable("batch_stats", "mean"),
                              context.module.get_variable("batch_stats", "var"),
                              jnp.mean(h, axis=tuple(range(1, h.ndim - 1)))))
        return next_fun(*args, **kw)

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, x, **kwargs)
    return out, taps


def bn_loss(taps: list[BNTap]) -> jax.Array:
    """L_BN = sum over BN layers of `bn_statistics_loss` (spec 6.2)."""
    if not taps:
        raise ValueError("the teacher has no BatchNorm layer: CMI / DeepInversion need one (L_BN, features)")
    return sum(bn_statistics_loss(t.mean, t.var, t.running_mean, t.running_var) for t in taps)


def tap_features(taps: list[BNTap]) -> jax.Array:
    """CMI's per-sample feature: the concatenated channel means of every BN input, [B, D]."""
    return jnp.concatenate([t.instance_mean for t in taps], axis=-1)


# ---- augmentation inside jit ----------------------------------------------------------------------


def random_resized_crop(key: jax.Array, x: jax.Array, scale: tuple[float, float] = (0.25, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> jax.Array:
    """RandomResizedCrop(S, scale, ratio) + optional horizontal flip, per image, differentiable in x.

    A box of area fraction U(scale) and log-uniform aspect ratio is placed uniformly and resized
    (bilinear) back to [H, W]. Departure: torchvision/kornia retry boxes that do not fit; here the
    side lengths are clipped to the image, which only changes the rare too-elongated draw.
    """
    b, h, w, c = x.shape
    k_area, k_ratio, k_y, k_x, k_flip = jax.random.split(key, 5)
    area = jax.random.uniform(k_area, (b,), minval=scale[0], maxval=scale[1]) * h * w
    log_r = jax.random.uniform(k_ratio, (b,), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
    r = jnp.exp(log_r)
    cw = jnp.clip(jnp.sqrt(area * r), 1.0, w)
    ch = jnp.clip(jnp.sqrt(area / r), 1.0, h)
    top = jax.random.uniform(k_y, (b,)) * (h - ch)
    left = jax.random.uniform(k_x, (b,)) * (w - cw)

    def one(img, ch_i, cw_i, top_i, left_i):
        sy, sx = h / ch_i, w / cw_i
        return jax.image.scale_and_translate(img, (h, w, c), (0, 1), jnp.stack([sy, sx]),
                                             jnp.stack([-top_i * sy, -left_i * sx]), method="linear",
                                             antialias=False)

    out = jax.vmap(one)(x, ch, cw, top, left)
    if flip:
        do_flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
        out = jnp.where(do_flip, out[:, :, ::-1, :], out)
    return out


def jitter_flip(key: jax.Array, x: jax.Array, lim: float = 1 / 8, flip: bool = True) -> jax.Array:
    """DeepInversion's augmentation: one random roll of the whole batch by up to lim*S pixels on
    each axis, and one coin for a horizontal flip of the whole batch (as the reference)."""
    _, h, w, _ = x.shape
    k_y, k_x, k_f = jax.random.split(key, 3)
    ly, lx = int(h * lim), int(w * lim)
    dy = jax.random.randint(k_y, (), -ly, ly + 1)
    dx = jax.random.randint(k_x, (), -lx, lx + 1)
    out = jnp.roll(x, (dy, dx), axis=(1, 2))
    if flip:
        out = jnp.where(jax.random.bernoulli(k_f), out[:, :, ::-1, :], out)
    return out


# ---- contrastive head, memory bank, pool -------------------------------------------------------


class MLPHead(nn.Module):
    """CMI's projection head: Linear(d, d) -> ReLU -> Linear(d, out), L2-normalized rows."""

    out_dim: int = 256

    @nn.compact
    def __call__(self, f: jax.Array) -> jax.Array:
        d = f.shape[-1]
        h = nn.relu(nn.Dense(d, kernel_init=torch_default_kernel, bias_init=torch_default_bias(d))(f))
        h = nn.Dense(self.out_dim, kernel_init=torch_default_kernel, bias_init=torch_default_bias(d))(h)
        return h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)


class SynthesisState(struct.PyTreeNode):
    """What synthesis carries across rounds, all fixed-size.

    pool: uint8 [capacity, H, W, C], the best batch of each round in pixel space, filled in order.
    pool_count: int32 [], images stored so far.
    bank: float32 [bank_size, 2D], (local, global) BN-input features of stored batches (circular).
    bank_count: int32 [], features ever written (the reference's `n_updates`).
    head: the contrastive head's TrainState (Adam at lr_g, persistent as the reference's).
    """

    pool: jax.Array
    pool_count: jax.Array
    bank: jax.Array
    bank_count: jax.Array
    head: TrainState


def pool_add(pool: jax.Array, count: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Writes `images` [n, ...] at slots count..count+n-1 (the caller sizes the pool for the run)."""
    return jax.lax.dynamic_update_slice(pool, images.astype(pool.dtype), (count,) + (0,) * (pool.ndim - 1)), \
        count + images.shape[0]


def pool_sample(key: jax.Array, pool: jax.Array, count: jax.Array, n: int) -> jax.Array:
    """n images drawn uniformly (with replacement) from the filled slots [0, count) only.
    Departure: the reference shuffles the whole pool into epochs; i.i.d. draws keep shapes static."""
    idx = jax.random.randint(key, (n,), 0, jnp.maximum(count, 1))
    return pool[idx]


def bank_add(bank: jax.Array, count: jax.Array, feats: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Circular write of feats [n, 2D] at `count % size` (size a multiple of n, as the reference
    asserts)."""
    ptr = count % bank.shape[0]
    return jax.lax.dynamic_update_slice(bank, feats.astype(bank.dtype), (ptr, 0)), count + feats.shape[0]


def bank_negatives(key: jax.Array, bank: jax.Array, count: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """n cached features drawn without replacement from the filled slots, and a [n] validity mask
    (fewer than n are valid while the bank holds fewer than n): the reference's `get_data(n_neg)`."""
    size = bank.shape[0]
    filled = jnp.minimum(count, size)
    u = jax.random.uniform(key, (size,))
    u = jnp.where(jnp.arange(size) < filled, u, 2.0)  # unfilled slots sort last
    idx = jnp.argsort(u)[:n]
    return bank[idx], jnp.arange(n) < jnp.minimum(filled, n)


def init_synthesis_state(key: jax.Array, *, capacity: int, image_shape: tuple[int, ...], feature_dim: int,
                         bank_size: int, head_dim: int, head_tx: optax.GradientTransformation) -> SynthesisState:
    head = MLPHead(head_dim)
    head_vars = head.init(key, jnp.zeros((1, feature_dim)))
    return SynthesisState(
        pool=jnp.zeros((capacity, *image_shape), jnp.uint8),
        pool_count=jnp.zeros((), jnp.int32),
        bank=jnp.zeros((bank_size, 2 * feature_dim), jnp.float32),
        bank_count=jnp.zeros((), jnp.int32),
        head=TrainState(params=head_vars["params"], batch_stats={}, opt_state=head_tx.init(head_vars["params"]),
                        step=jnp.zeros((), jnp.int32), key=jax.random.fold_in(key, 1)),
    )


def to_pixels(x01: jax.Array) -> jax.Array:
    """[0, 1] images -> uint8 (the reference saves PNGs; rounded here)."""
    return jnp.clip(jnp.round(x01 * 255.0), 0, 255).astype(jnp.uint8)


# ---- one synthesis round ---------------------------------------------------------------------------


def _trace0() -> tuple[jax.Array, jax.Array]:
    return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)


def _trace(trace: tuple[jax.Array, jax.Array], i: jax.Array, loss: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(loss of the first iteration, loss of the latest one): how much a round reduced its loss."""
    return jnp.where(i == 0, loss, trace[0]), loss


def _trace_metrics(trace: tuple[jax.Array, jax.Array]) -> Metrics:
    return {"loss_syn_first": trace[0], "loss_syn_last": trace[1]}


class InversionWeights(NamedTuple):
    """Loss weights (spec 6.2: CMI bn 1, oh 1, adv 0.5, cr 0.8; DeepInversion bn 10, oh 1, adv 0 or
    1 (adaptive), tv 1e-3, cr 0)."""

    bn: float = 1.0
    oh: float = 1.0
    adv: float = 0.5
    cr: float = 0.8
    tv: float = 0.0
    l2: float = 0.0


def make_synthesis_round(
    teacher: nn.Module,
    student: nn.Module,
    *,
    synthesizer: str,
    num_classes: int,
    image_shape: tuple[int, int, int],
    mean,
    std,
    g_steps: int,
    batch_size: int,
    lr_g: float,
    weights: InversionWeights,
    generator: nn.Module | None = None,
    z_dim: int = 256,
    cr_temperature: float = 0.1,
    negatives: int = 4096,
    head_dim: int = 256,
    crop_pad: int = 4,
    flip: bool = True,
    hooks: DFKDHooks = DFKDHooks(),
    fuse: str = "host",
) -> Callable[..., tuple[SynthesisState, Metrics]]:
    """Returns `round(synth, teacher_vars, student_vars, key, hook_state=None) -> (synth, metrics)`;
    not jitted.

    "cmi" (spec 6.2): a freshly initialized `generator` (the reset) and z ~ N(0, I) are optimized
    jointly by Adam(lr_g, betas (0.5, 0.999)) for `g_steps` iterations on
      bn * L_BN(T, global view) + oh * CE(T(global), y) + adv * L_adv + cr * L_cr (+ SV penalty),
    with the contrastive head updated by its own Adam(lr_g) on the same loss. The lowest-loss batch
    of the round (loss measured before that iteration's update, as the reference) is appended to the
    pool and its (local, global) features to the memory bank.
    "deepinversion": the normalized image batch itself, from N(0, I), is optimized by
    Adam(lr_g, betas (0.5, 0.99)) on bn * L_BN + oh * CE + adv * (-JS_3(S, T)) + tv * TV + l2 * ||x||
    (+ SV), on a jittered/flipped view, and clipped to the valid pixel range after each step.
    Targets: random labels, sorted. The student (eval mode) only enters through L_adv.

    fuse: "loop" runs the iterations in one `lax.fori_loop` (the returned function is then pure:
      jit it, e.g. through run_steps); "host" jits one iteration (and the round's start and finish)
      and loops in Python (the returned function compiles its own pieces: do not jit it). On XLA:CPU
      the loop ran 3 s per iteration against 0.17 s straight-line (a 64-image 16x16 batch,
      docs/CMI.md), as the ZSKT scan did; same values up to float summation order.
    """
    if fuse not in ("loop", "host"):
        raise ValueError(f"fuse must be 'loop' or 'host', got {fuse!r}")
    if synthesizer not in ("cmi", "deepinversion"):
        raise ValueError(f"synthesizer must be 'cmi' or 'deepinversion', got {synthesizer!r}")
    if synthesizer == "cmi" and generator is None:
        raise ValueError("the cmi synthesizer needs a generator module")
    head = MLPHead(head_dim)
    head_tx = optax.adam(lr_g)
    lo = normalize(jnp.zeros(image_shape[-1:]), mean, std)
    hi = normalize(jnp.full(image_shape[-1:], 255.0), mean, std)

    def norm01(x01):  # [0, 1] images -> the teacher's normalized input space
        return normalize(x01 * 255.0, mean, std)

    def teacher_taps(tv, x):
        (logits, _), taps = apply_with_bn_taps(teacher, tv, x, train=False)
        return logits, taps

    def adv_cmi(s_vars, x, t_logits):
        # L_adv = -mean_i(1[argmax S = argmax T] * KL_i(T || S)): adversarial only where S and T
        # agree, averaged over the whole batch (the reference's `.mean()` over B).
        s_logits, _ = student.apply(s_vars, x, train=False)
        agree = (jnp.argmax(s_logits, -1) == jnp.argmax(t_logits, -1)).astype(jnp.float32)
        kl = jnp.sum(kl_elementwise(t_logits, s_logits), axis=-1)
        return -jnp.mean(jax.lax.stop_gradient(agree) * kl)

    def inversion_terms(x_view, t_logits, taps, targets, s_vars, key, hook_state):
        loss_bn = bn_loss(taps)
        loss_oh = jnp.mean(cross_entropy(t_logits, targets))
        loss = weights.bn * loss_bn + weights.oh * loss_oh
        metrics = {"loss_bn": loss_bn, "loss_oh": loss_oh}
        if weights.adv:
            if synthesizer == "cmi":
                loss_adv = adv_cmi(s_vars, x_view, t_logits)
            else:  # adaptive DeepInversion: -JS(S, T) at T = 3 (upstream `jsdiv`)
                s_logits, _ = student.apply(s_vars, x_view, train=False)
                loss_adv = -js_divergence(s_logits, t_logits, 3.0)
            loss = loss + weights.adv * loss_adv
            metrics["loss_adv"] = loss_adv
        if hooks.generator_penalty is not None:  # Shuffling Vaccine, spec 3.3 (CMI form)
            penalty, sv_metrics = hooks.generator_penalty(t_logits, x_view, key, *with_hook_state(hook_state))
            loss = loss + penalty
            metrics.update(sv_metrics)
        return loss, metrics

    # A round is start -> g_steps x iterate -> finish; `fuse` picks how they are driven (below).
    # The carry holds what changes within the round; what does not (teacher, student, the vaccine
    # state, the bank) is passed to `iterate` as arguments.

    def cmi_loss(params, head_params, k, synth, teacher_vars, student_vars, targets, g_stats, hook_state):
        k_g, k_l, k_neg, k_pen = jax.random.split(k, 4)
        x01, _ = generator.apply({"params": params["g"], "batch_stats": g_stats}, params["z"], train=True,
                                 mutable=["batch_stats"])
        x_global = norm01(random_crop_flip(k_g, x01, pad=crop_pad, flip=flip))
        x_local = norm01(random_resized_crop(k_l, x01, flip=flip))
        t_logits, taps = teacher_taps(teacher_vars, x_global)
        loss, metrics = inversion_terms(x_global, t_logits, taps, targets, student_vars, k_pen, hook_state)
        f_global = tap_features(taps)
        _, local_taps = teacher_taps(teacher_vars, x_local)
        f_local = tap_features(local_taps)
        if weights.cr:
            cached, valid_cached = bank_negatives(k_neg, synth.bank, synth.bank_count, negatives)
            c_local, c_global = jnp.split(cached, 2, axis=-1)
            proj_l = head.apply({"params": head_params}, jnp.concatenate([f_local, c_local]))
            proj_g = head.apply({"params": head_params}, jnp.concatenate([f_global, c_global]))
            valid = jnp.concatenate([jnp.ones((batch_size,), bool), valid_cached])
            rows = info_nce(proj_l, jax.lax.stop_gradient(proj_g), cr_temperature, valid)
            # (current-batch mean) + (cached mean), the reference's split; current only while the
            # bank is empty.
            n_cached = jnp.sum(valid_cached)
            cached_mean = jnp.sum(rows[batch_size:]) / jnp.maximum(n_cached, 1)
            loss_cr = jnp.mean(rows[:batch_size]) + jnp.where(n_cached > 0, cached_mean, 0.0)
            loss = loss + weights.cr * loss_cr
            metrics["loss_cr"] = loss_cr
        feats = jnp.concatenate([f_local, f_global], axis=-1)
        return loss, (x01, feats, metrics)

    g_tx = optax.adam(lr_g, b1=0.5, b2=0.999)

    def cmi_start(synth: SynthesisState, teacher_vars, student_vars, key, hook_state=None):
        k_init, k_z, k_y, k_loop = jax.random.split(key, 4)
        g_vars = generator.init(k_init, jnp.zeros((2, z_dim)), train=True)  # the reset, every round
        z = jax.random.normal(k_z, (batch_size, z_dim), jnp.float32)
        targets = jnp.sort(jax.random.randint(k_y, (batch_size,), 0, num_classes))
        params = {"g": g_vars["params"], "z": z}
        g_stats = g_vars.get("batch_stats", {})
        _, (x_s, f_s, m_s) = jax.eval_shape(
            lambda p, h: cmi_loss(p, h, k_loop, synth, teacher_vars, student_vars, targets, g_stats, hook_state),
            params, synth.head.params)
        best = (jnp.asarray(jnp.inf, jnp.float32), jnp.zeros(x_s.shape, x_s.dtype), jnp.zeros(f_s.shape, f_s.dtype),
                {k: jnp.zeros(v.shape, v.dtype) for k, v in m_s.items()})
        # A copy: `host` donates the carry, and synth.head is still the caller's.
        return dict(params=params, opt_state=g_tx.init(params), head=jax.tree.map(jnp.copy, synth.head), best=best,
                    trace=_trace0(),
                    targets=targets, g_stats=g_stats, key=k_loop)

    def cmi_iterate(carry, i, synth: SynthesisState, teacher_vars, student_vars, hook_state=None):
        (loss, (x01, feats, metrics)), (g_grads, h_grads) = jax.value_and_grad(cmi_loss, argnums=(0, 1), has_aux=True)(
            carry["params"], carry["head"].params, jax.random.fold_in(carry["key"], i), synth, teacher_vars,
            student_vars, carry["targets"], carry["g_stats"], hook_state)
        best = carry["best"]
        better = loss < best[0]  # the loss before this iteration's update, as the reference
        best = (jnp.where(better, loss, best[0]), jnp.where(better, x01, best[1]), jnp.where(better, feats, best[2]),
                {k: jnp.where(better, v, best[3][k]) for k, v in metrics.items()})
        updates, opt_state = g_tx.update(g_grads, carry["opt_state"], carry["params"])
        head_state = carry["head"]
        if weights.cr:
            h_upd, h_opt = head_tx.update(h_grads, head_state.opt_state, head_state.params)
            head_state = head_state.replace(params=optax.apply_updates(head_state.params, h_upd), opt_state=h_opt,
                                            step=head_state.step + 1)
        return {**carry, "params": optax.apply_updates(carry["params"], updates), "opt_state": opt_state,
                "head": head_state, "best": best, "trace": _trace(carry["trace"], i, loss)}

    def cmi_finish(synth: SynthesisState, carry):
        best = carry["best"]
        pool, pool_count = pool_add(synth.pool, synth.pool_count, to_pixels(best[1]))
        bank, bank_count = bank_add(synth.bank, synth.bank_count, best[2])
        synth = synth.replace(pool=pool, pool_count=pool_count, bank=bank, bank_count=bank_count, head=carry["head"])
        return synth, {"loss_syn": best[0], **best[3], **_trace_metrics(carry["trace"])}

    di_tx = optax.adam(lr_g, b1=0.5, b2=0.99)

    def di_loss(x_norm, k, teacher_vars, student_vars, targets, hook_state):
        k_aug, k_pen = jax.random.split(k)
        x_view = jitter_flip(k_aug, x_norm, flip=flip)
        t_logits, taps = teacher_taps(teacher_vars, x_view)
        loss, metrics = inversion_terms(x_view, t_logits, taps, targets, student_vars, k_pen, hook_state)
        if weights.tv:
            loss = loss + weights.tv * total_variation_l2(x_norm)
        if weights.l2:
            loss = loss + weights.l2 * jnp.sqrt(jnp.sum(jnp.square(x_norm)))
        return loss, metrics

    def di_start(synth: SynthesisState, teacher_vars, student_vars, key, hook_state=None):
        k_x, k_y, k_loop = jax.random.split(key, 3)
        x = jax.random.normal(k_x, (batch_size, *image_shape), jnp.float32)  # normalized space
        targets = jnp.sort(jax.random.randint(k_y, (batch_size,), 0, num_classes))
        _, m_s = jax.eval_shape(lambda v: di_loss(v, k_loop, teacher_vars, student_vars, targets, hook_state), x)
        best = (jnp.asarray(jnp.inf, jnp.float32), jnp.zeros_like(x),  # replaced at iteration 0
                {k: jnp.zeros(v.shape, v.dtype) for k, v in m_s.items()})
        return dict(x=x, opt_state=di_tx.init(x), best=best, trace=_trace0(), targets=targets, key=k_loop)

    def di_iterate(carry, i, synth: SynthesisState, teacher_vars, student_vars, hook_state=None):
        del synth
        x_norm = carry["x"]
        (loss, metrics), g = jax.value_and_grad(di_loss, has_aux=True)(
            x_norm, jax.random.fold_in(carry["key"], i), teacher_vars, student_vars, carry["targets"], hook_state)
        best = carry["best"]
        better = loss < best[0]
        best = (jnp.where(better, loss, best[0]), jnp.where(better, x_norm, best[1]),
                {k: jnp.where(better, v, best[2][k]) for k, v in metrics.items()})
        updates, opt_state = di_tx.update(g, carry["opt_state"], x_norm)
        x_norm = jnp.clip(optax.apply_updates(x_norm, updates), lo, hi)  # upstream `clip_images`
        return {**carry, "x": x_norm, "opt_state": opt_state, "best": best, "trace": _trace(carry["trace"], i, loss)}

    def di_finish(synth: SynthesisState, carry):
        best = carry["best"]
        x01 = (best[1] * (jnp.asarray(std) * 255.0) + jnp.asarray(mean) * 255.0) / 255.0
        pool, pool_count = pool_add(synth.pool, synth.pool_count, to_pixels(x01))
        return synth.replace(pool=pool, pool_count=pool_count), {"loss_syn": best[0], **best[2],
                                                                 **_trace_metrics(carry["trace"])}

    start, iterate, finish = (cmi_start, cmi_iterate, cmi_finish) if synthesizer == "cmi" else \
        (di_start, di_iterate, di_finish)

    if fuse == "loop":
        def fused_round(synth: SynthesisState, teacher_vars, student_vars, key, hook_state=None):
            carry = start(synth, teacher_vars, student_vars, key, hook_state)
            with loop_friendly_convs():  # conv gradients inside fori_loop (abd_jax/models/conv_op.py)
                carry = jax.lax.fori_loop(
                    0, g_steps, lambda i, c: iterate(c, i, synth, teacher_vars, student_vars, hook_state), carry)
            return finish(synth, carry)

        return fused_round

    j_start, j_finish = jax.jit(start), jax.jit(finish)
    j_iterate = jax.jit(iterate, donate_argnums=(0,))

    def host_round(synth: SynthesisState, teacher_vars, student_vars, key, hook_state=None):
        carry = j_start(synth, teacher_vars, student_vars, key, hook_state)
        for i in range(g_steps):
            carry = j_iterate(carry, jnp.asarray(i, jnp.int32), synth, teacher_vars, student_vars, hook_state)
        return j_finish(synth, carry)

    return host_round


def feature_dim(teacher: nn.Module, teacher_vars: PyTree, image_shape: tuple[int, ...]) -> int:
    """D, the length of CMI's concatenated BN-input feature for this teacher."""
    def f(tv):
        _, taps = apply_with_bn_taps(teacher, tv, jnp.zeros((1, *image_shape)), train=False)
        if not taps:
            raise ValueError("the teacher has no BatchNorm layer: CMI / DeepInversion need one")
        return tap_features(taps)

    return int(jax.eval_shape(f, teacher_vars).shape[-1])
