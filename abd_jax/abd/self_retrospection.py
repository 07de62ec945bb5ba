"""Self-Retrospection (SR), spec 4: the student unlearns its reaction to a synthesized trigger.

Per student step (spec 4.1):
  1. `synthesize_trigger`: a universal perturbation delta [1, H, W, C], from zero, R Adam steps
     maximizing KL_tau(M(x) || M(x + delta)) - l2 ||delta||^2 (M: the teacher in the released
     sweeps, or the student).
  2-4. `sr_grads`: the implicit hypergradient (abd_jax.hypergrad) of the outer loss
     L_out = KL_tau(S(x) || S(x')), x' = x with delta added to floor(portion * B) random samples,
     through the inner fixed point delta = Phi(delta) = delta - inner_lr * grad_delta L_in,
     L_in = -KL_tau(S(x) || S(x + delta)) + l2 ||delta||^2.
  5. `self_retrospection`: an optax transform, chained before the student optimizer, that adds
     the SR gradient to the KD gradient, unweighted (coef = 1), in the manner of
     `optax.contrib.sam`:

        tx = optax.chain(self_retrospection(), optax.adam(lr))
        updates, opt_state = tx.update(kd_grads, opt_state, params, sr_grad_fn=fn)   # or sr_grads=g

  With `sr_grad_fn` the SR work (trigger synthesis included) sits under a `lax.cond` on the
  state's `coef`, so a run can carry SR switched off (coef = 0: exactly the plain optimizer's
  update, no SR compute) and switch it on near the end (spec 4.2) without recompiling.

BatchNorm (decided here, see docs/ABD_SR.md): every student forward inside SR runs in train mode,
normalizing with the batch statistics of its own input batch (S(x), S(x + delta), S(x') each
their own), with gradients through those statistics, as the reference's train-mode student.
`sr_grads` itself never touches the running statistics (it is a pure gradient function). The
reference's train-mode forwards also move them: 4 extra updates per SR step, in the order x, x',
x, x + delta. `sr_running_stats` replays exactly those 4 updates for callers that want the
reference's behaviour (our default for reproduction runs); a caller that skips it keeps
perturbed-batch statistics out of the running averages that evaluation uses, and only its own
KD forward on the clean batch updates them.

Tensor layout: images NHWC, normalized, as the rest of abd_jax; delta broadcasts over the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from abd_jax.hypergrad import fixed_point_hypergrad
from abd_jax.losses import kl_elementwise
from abd_jax.models.conv_op import loop_friendly_convs
from abd_jax.optim import make_optimizer

PyTree = Any
Metrics = dict[str, jax.Array]
# (x [B, ...]) -> logits [B, C] (or a tuple whose first entry is the logits)
LogitsFn = Callable[[jax.Array], Any]
# (variables {"params": ..., "batch_stats": ...}, x) -> logits (or (logits, ...)), train-mode BN,
# no running-statistics update; see `train_mode_apply`.
StudentApply = Callable[[PyTree, jax.Array], Any]


def _logits(out: Any) -> jax.Array:
    return out[0] if isinstance(out, (tuple, list)) else out


def kl_divergence(
    target_logits: jax.Array,
    logits: jax.Array,
    temperature: float = 1.0,
    *,
    reduction: str = "mean",
    kl_scale: float = 1.0,
) -> jax.Array:
    """kl_scale * KL_tau(target || logits), reduced as the reference code bases do (spec 12.4).

    reduction "mean": over B*C (PyTorch reduction='mean', ZSKT); "batchmean": sum over C, mean over
    B (CMI uses it with kl_scale = T^2 = 400, OOD's SR with T^2 = 64).
    """
    el = kl_elementwise(target_logits, logits, temperature)
    if reduction == "mean":
        value = jnp.mean(el)
    elif reduction == "batchmean":
        value = jnp.sum(el) / el.shape[0]
    else:
        raise ValueError(f"reduction must be 'mean' or 'batchmean', got {reduction!r}")
    return kl_scale * value


def train_mode_apply(model: nn.Module) -> StudentApply:
    """`student_apply` for a flax classifier: train-mode BN (batch statistics), running stats untouched.

    The batch-statistics update flax returns is discarded here; `sr_running_stats` applies the
    reference's updates separately when wanted (module docstring).
    """

    def apply(variables: PyTree, x: jax.Array) -> jax.Array:
        out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return _logits(out)

    return apply


def adam_rounds(objective: Callable[[jax.Array], jax.Array], delta: jax.Array, rounds: int, lr: float,
                project: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """`delta` after `rounds` optax.adam(lr) steps on `objective` (a lax.fori_loop), each step
    followed by `project` when given: the trigger searches' descent (`synthesize_trigger`,
    `targeted_trigger`)."""
    opt = optax.adam(lr)

    def body(_, carry):
        d, opt_state = carry
        updates, opt_state = opt.update(jax.grad(objective)(d), opt_state, d)
        d = optax.apply_updates(d, updates)
        return (project(d) if project is not None else d), opt_state

    # The rounds are a loop; convolution gradients in loops need the loop-friendly VJP on
    # XLA:CPU (abd_jax/models/conv_op.py: ~10x on this machine), a no-op elsewhere in value.
    with loop_friendly_convs():
        delta, _ = jax.lax.fori_loop(0, rounds, body, (delta, opt.init(delta)))
    return delta


def synthesize_trigger(
    logits_fn: LogitsFn,
    x: jax.Array,
    *,
    rounds: int = 10,
    lr: float = 0.1,
    l2: float = 1e-3,
    temperature: float = 1.0,
    reduction: str = "mean",
    kl_scale: float = 1.0,
    init_scale: float = 0.0,
    init_key: jax.Array | None = None,
    restarts: int = 1,
    max_norm: float = 0.0,
) -> jax.Array:
    """A universal perturbation delta [1, *x.shape[1:]] that moves M = `logits_fn` the most (spec 4.1.1).

    Starts at zero (the spec; or, with `init_scale` > 0, at init_scale * N(0, 1) drawn from
    `init_key`) and takes `rounds` optax.adam(lr) steps on
    -KL_tau(M(x) || M(x + delta)) + l2 * ||delta||_2^2, the clean side stopped. No projection or
    clipping (spec 12.2) unless `max_norm` > 0: then every step is followed by a projection onto
    the L2 ball ||delta|| <= max_norm (projected gradient ascent). Deterministic for a given key.
    With `restarts` = n > 1 (needs
    init_scale > 0) it searches from n random starts (keys split from `init_key`) and returns the
    delta whose objective ended lowest, i.e. the one that moves M the most.

    Why a random start: at delta = 0 the KL is at its minimum, so its gradient is zero and what the
    computer returns is rounding noise (max |g| ~2e-10 on the quickstart's generator batches); Adam divides by the
    gradient's own size, so the first step is a full-size step in a direction set by float
    summation order, and the run goes wherever that leads. Why restarts: on the quickstart's
    teacher the search has (at least) two basins, the backdoor (every clean image to the target
    class) and a weaker one (an arbitrary class), and the backdoor's objective is the larger; the
    zero start and some random starts end in the weaker one. docs/ABD_SR.md "Where the trigger
    search starts".

    Args:
      logits_fn: x -> logits; the teacher in eval mode (released sweeps) or the student
        (`functools.partial(train_mode_apply(model), variables)`; the ZSKT CLI default).
      x: [B, ...] normalized inputs (not differentiated).
      rounds: R, the number of Adam steps (static; sweeps: 10 or 20).
      lr: Adam learning rate (spec: pert_lr 0.1).
      l2: weight of ||delta||^2 (ZSKT: 1e-3; CMI/OOD synthesis: 0).
      temperature, reduction, kl_scale: the KL as in `kl_divergence`.
      init_scale: standard deviation of the start (0: the spec's zero start).
      init_key: the start's key (default `jax.random.key(0)`, a fixed start) when init_scale > 0.
      restarts: number of random starts (static); the best one is returned.
      max_norm: radius of the L2 ball the search is kept in (0: unbounded, the spec). The
        reference's alternative SR path rescales its trigger to norm <= 10 and has the same
        rescale commented out in the hypergradient path; docs/ABD_SR.md "Bounding the trigger".

    Returns:
      delta, [1, *x.shape[1:]], gradient-stopped.
    """
    x = jax.lax.stop_gradient(x)
    clean = jax.lax.stop_gradient(_logits(logits_fn(x)))  # same every round: compute once

    def objective(delta):
        kl = kl_divergence(
            clean,
            _logits(logits_fn(x + delta)),
            temperature,
            reduction=reduction,
            kl_scale=kl_scale,
        )
        return -kl + l2 * jnp.sum(jnp.square(delta))

    if max_norm < 0:
        raise ValueError(f"max_norm must be >= 0 (0: no bound), got {max_norm}")
    if restarts < 1 or (restarts > 1 and not init_scale):
        raise ValueError(f"restarts must be >= 1, and > 1 only with init_scale > 0 (the zero start is one "
                         f"point); got restarts={restarts}, init_scale={init_scale}")
    shape = (1, *x.shape[1:])
    key = jax.random.key(0) if init_key is None else init_key
    keys = [key] if restarts == 1 else list(jax.random.split(key, restarts))

    def search(k: jax.Array) -> jax.Array:
        delta = init_scale * jax.random.normal(k, shape, x.dtype) if init_scale else jnp.zeros(shape, x.dtype)
        return adam_rounds(objective, delta, rounds, lr, project=lambda d: project_l2(d, max_norm))

    # A Python loop over the (few, static) starts: each is its own small search, as a single call.
    deltas = [search(k) for k in keys]
    if len(deltas) == 1:
        return jax.lax.stop_gradient(deltas[0])
    scores = jnp.stack([objective(d) for d in deltas])
    return jax.lax.stop_gradient(jnp.stack(deltas)[jnp.argmin(scores)])


def trigger_target_class(logits_fn: LogitsFn, x: jax.Array, delta: jax.Array) -> jax.Array:
    """The class a universal perturbation sends the batch to: argmax of M(x + delta)'s batch-mean
    softmax (an int32 scalar). For a teacher-made trigger that fires the backdoor, the backdoor's
    target class, found from the synthetic batch alone (no labels, no test data)."""
    probs = jax.nn.softmax(_logits(logits_fn(jax.lax.stop_gradient(x + delta))), axis=-1)
    return jnp.argmax(jnp.mean(probs, axis=0)).astype(jnp.int32)


def targeted_trigger(
    logits_fn: LogitsFn,
    x: jax.Array,
    delta: jax.Array,
    target: jax.Array,
    *,
    rounds: int,
    lr: float = 0.1,
    l2: float = 1e-3,
) -> jax.Array:
    """`delta` moved by `rounds` optax.adam(lr) steps on mean_i CE(M(x_i + delta), target) +
    l2 * ||delta||^2: the universal perturbation, from the given start, that makes M put the batch
    in `target` (an int scalar; traced is fine). Gradient-stopped. rounds = 0 returns `delta`."""
    x = jax.lax.stop_gradient(x)

    def objective(d):
        log_p = jax.nn.log_softmax(_logits(logits_fn(x + d)), axis=-1)
        return -jnp.mean(jnp.take(log_p, target, axis=-1)) + l2 * jnp.sum(jnp.square(d))

    return jax.lax.stop_gradient(adam_rounds(objective, jax.lax.stop_gradient(delta), rounds, lr))


def refine_on_student(options: Any, student: nn.Module, student_vars: PyTree | None, teacher_logits: LogitsFn,
                      x: jax.Array, delta: jax.Array, *, l2: float) -> jax.Array:
    """The trigger SR unlearns, with `options.sr_refine_rounds` > 0 (an `abd.options.ABDOptions`):
    the teacher's `delta` refined on the current student (`targeted_trigger`, eval mode, frozen
    variables) towards the class the teacher's trigger sends the batch to. With 0 rounds (the
    spec), `delta` itself.

    Why: the teacher's trigger fires the backdoor, but once SR has made the student ignore it the
    student can still answer to other perturbations towards the same class, which the teacher's
    search never returns (docs/ABD_SR.md "Refining the trigger on the student"). The refinement
    starts from the teacher's trigger and asks the student, not the teacher, what still sends the
    batch to the backdoor's class, so SR unlearns what the student still does. Eval mode, because
    in train mode the batch statistics absorb much of a perturbation shared by every sample
    (docs/ABD_SR.md "Why seed 0's ASR stops falling")."""
    if not options.sr_refine_rounds:
        return delta
    if student_vars is None:
        raise ValueError("sr_refine_rounds > 0 refines the trigger on the student, but the method passed no "
                         "student variables to student_sr_prepare; pass them (4th argument) or set "
                         "sr_refine_rounds = 0")
    target = trigger_target_class(teacher_logits, x, delta)
    frozen = jax.lax.stop_gradient(student_vars)
    return targeted_trigger(lambda z: student.apply(frozen, z, train=False), x, delta, target,
                            rounds=options.sr_refine_rounds, lr=options.sr_pert_lr, l2=l2)


def project_l2(delta: jax.Array, max_norm: float) -> jax.Array:
    """delta scaled onto the L2 ball of radius `max_norm` when it lies outside (0: unchanged)."""
    if not max_norm:
        return delta
    norm = jnp.sqrt(jnp.sum(jnp.square(delta)))
    # max(norm, max_norm) keeps the division finite at delta = 0 and leaves inner points alone.
    return delta * (max_norm / jnp.maximum(norm, max_norm))


def outer_mask(key: jax.Array, batch_size: int, portion: float) -> jax.Array:
    """[B] float mask with exactly max(1, int(portion * B)) ones at random positions (spec 4.1.3).

    The reference draws int(portion * B) samples, which is 0 for B < 50 at portion 0.02 (SR would
    then do nothing); we keep at least one.
    """
    n = min(batch_size, max(1, int(batch_size * portion)))
    idx = jax.random.permutation(key, batch_size)[:n]
    return jnp.zeros((batch_size,), jnp.float32).at[idx].set(1.0)


def perturb_subset(key: jax.Array, x: jax.Array, delta: jax.Array, portion: float) -> jax.Array:
    """x' = x with delta added to the `outer_mask(key, B, portion)` samples only; static shapes."""
    mask = outer_mask(key, x.shape[0], portion).astype(x.dtype)
    return x + mask.reshape((x.shape[0],) + (1,) * (x.ndim - 1)) * delta


def sr_grads(
    student_apply: StudentApply,
    student_variables: PyTree,
    x: jax.Array,
    delta: jax.Array,
    key: jax.Array,
    *,
    portion: float = 0.02,
    fp_iterations: int = 5,
    inner_lr: float = 0.1,
    l2: float = 1e-3,
    temperature: float = 1.0,
    detach_clean: bool = True,
    reduction: str = "mean",
    kl_scale: float = 1.0,
    tol: float | None = None,
) -> tuple[PyTree, Metrics]:
    """The SR hypergradient w.r.t. the student's params (spec 4.1 steps 2-4); not jitted.

    Inner:  L_in(d, p) = -KL(S_p(x) || S_p(x + d)) + l2 ||d||^2, S_p(x) stopped;
            Phi(d, p) = d - inner_lr * grad_d L_in(d, p), with `delta` taken as its fixed point.
    Outer:  L_out(d, p) = KL(S_p(x) || S_p(x')), x' = x + mask * d with `outer_mask(key, B,
            portion)`; S_p(x) stopped when `detach_clean` (ZSKT) or not (CMI/OOD).
    The gradient is the fixed-point hypergradient with K = `fp_iterations` (abd_jax.hypergrad).

    Args:
      student_apply: (variables, x) -> logits, train-mode BN without running-stat updates
        (`train_mode_apply(model)`), or any function for a model without BN.
      student_variables: {"params": ..., other collections}; only "params" is differentiated.
      x: [B, ...] normalized inputs; delta: [1, ...] from `synthesize_trigger`; key: PRNG key
        for the perturbed subset.
      portion, fp_iterations, inner_lr, l2, temperature: spec defaults 0.02, 5, 0.1, 1e-3, tau.
      reduction, kl_scale: the KL scaling of the code base (`kl_divergence`).
      tol: early stop of the fixed-point iteration (`fixed_point_hypergrad`).

    Returns:
      (grads shaped like student_variables["params"], metrics: sr_outer_loss, sr_delta_norm,
      sr_v_norm, sr_v_step).
    """
    params = student_variables["params"]
    x = jax.lax.stop_gradient(x)
    delta = jax.lax.stop_gradient(delta)

    def logits(p, inputs):
        return _logits(student_apply({**student_variables, "params": p}, inputs))

    def kl(target, out):
        return kl_divergence(target, out, temperature, reduction=reduction, kl_scale=kl_scale)

    def inner_loss(d, p):
        clean = jax.lax.stop_gradient(logits(p, x))
        return -kl(clean, logits(p, x + d)) + l2 * jnp.sum(jnp.square(d))

    def fixed_point_map(d, p):
        return d - inner_lr * jax.grad(inner_loss)(d, p)

    def outer_loss(d, p):
        clean = logits(p, x)
        if detach_clean:
            clean = jax.lax.stop_gradient(clean)
        return kl(clean, logits(p, perturb_subset(key, x, d, portion)))

    with loop_friendly_convs():  # the fixed-point iterations are a loop (see synthesize_trigger)
        grads, info = fixed_point_hypergrad(
            outer_loss,
            fixed_point_map,
            delta,
            params,
            iterations=fp_iterations,
            tol=tol,
            return_info=True,
        )
    metrics = {
        "sr_outer_loss": info["outer_loss"],
        "sr_delta_norm": jnp.sqrt(jnp.sum(jnp.square(delta))),
        "sr_v_norm": info["v_norm"],
        "sr_v_step": info["v_step"],
    }
    return grads, metrics


def sr_running_stats(
    model: nn.Module,
    student_variables: PyTree,
    x: jax.Array,
    delta: jax.Array,
    key: jax.Array,
    *,
    portion: float = 0.02,
) -> PyTree:
    """The BN running statistics after the reference's 4 SR forwards, in its order (spec 4.1).

    The reference's hypertorch call runs the train-mode student on x and x' (outer loss), then on
    x and x + delta (the fixed-point map's inner loss); each forward moves the running averages.
    This replays them (forward only, same `key` and so the same x' as `sr_grads`) and returns the
    new `batch_stats`. Call it with the same variables as `sr_grads`, before the KD forward, and
    feed the result to the KD forward. Not replayed: the reference's 2 logging forwards after
    the optimizer step, and the 2R forwards of a student-synthesized trigger.
    """
    x = jax.lax.stop_gradient(x)
    delta = jax.lax.stop_gradient(delta)
    variables = jax.lax.stop_gradient(student_variables)
    stats = variables.get("batch_stats", {})
    for inputs in (x, perturb_subset(key, x, delta, portion), x, x + delta):
        _, upd = model.apply(
            {**variables, "batch_stats": stats}, inputs, train=True, mutable=["batch_stats"]
        )
        stats = upd.get("batch_stats", stats)
    return stats


def trigger_start_key(options: Any, key: jax.Array | None) -> jax.Array | None:
    """The `init_key` of a batch's trigger search under an `abd.options.ABDOptions`: with
    `sr_fresh_starts`, a key derived from the batch's `key`, so each batch searches from its own
    random starts; otherwise None, the same fixed key (`jax.random.key(0)`) on every batch.
    Derived by split, not fold_in, so it never equals the per-step keys a method folds its step
    counter into."""
    if not options.sr_fresh_starts or key is None:
        return None
    return jax.random.split(key)[1]


def sr_stats_hook(model: nn.Module, options: Any):
    """The `student_sr_stats` hook (kd.common.DFKDHooks) of an `abd.options.ABDOptions`:
    `(student_variables, x, key, delta) -> batch_stats` replaying the reference's 4 SR forwards
    (`sr_running_stats`, the subset drawn with `options.sr_portion`), or None when there is
    nothing to replay (`sr_bn_replay` off, or a student-made trigger, which is synthesized inside
    the SR gradient and never reaches the hook)."""
    if not options.sr_bn_replay or options.sr_trigger_model != "teacher":
        return None

    def student_sr_stats(student_vars: PyTree, x: jax.Array, key: jax.Array, delta: jax.Array) -> PyTree:
        return sr_running_stats(model, student_vars, x, delta, key, portion=options.sr_portion)

    return student_sr_stats


def retrospect(
    student_apply: StudentApply,
    student_variables: PyTree,
    x: jax.Array,
    key: jax.Array,
    *,
    trigger_logits_fn: LogitsFn | str,
    rounds: int = 10,
    pert_lr: float = 0.1,
    trigger_l2: float = 1e-3,
    portion: float = 0.02,
    fp_iterations: int = 5,
    inner_lr: float = 0.1,
    l2: float = 1e-3,
    temperature: float = 1.0,
    detach_clean: bool = True,
    reduction: str = "mean",
    kl_scale: float = 1.0,
    trigger_init_scale: float = 0.0,
    trigger_restarts: int = 1,
    trigger_max_norm: float = 0.0,
) -> tuple[PyTree, Metrics]:
    """Steps 1-4 of spec 4.1 in one call: `synthesize_trigger` then `sr_grads`.

    `trigger_logits_fn` is the model M that synthesizes delta, required: the teacher's x -> logits
    (eval mode), as the released sweeps and CMI/OOD do, or "student" for the student itself
    (train-mode BN; the ZSKT CLI default and the poster's story) (spec 12.1).
    `trigger_l2` is the synthesis penalty (ZSKT 1e-3, CMI/OOD 0); `l2` the inner-problem one.
    `trigger_init_scale` > 0 starts the synthesis at a random delta drawn from `key`, from
    `trigger_restarts` starts, and `trigger_max_norm` > 0 bounds its L2 norm (see `synthesize_trigger`).
    Use it as the body of `sr_grad_fn` for the `self_retrospection` transform.
    """
    if isinstance(trigger_logits_fn, str):
        if trigger_logits_fn != "student":
            raise ValueError(
                f"trigger_logits_fn: a callable or 'student', got {trigger_logits_fn!r}"
            )
        frozen = jax.lax.stop_gradient(student_variables)

        def trigger_logits_fn(inputs):
            return student_apply(frozen, inputs)

    delta = synthesize_trigger(
        trigger_logits_fn,
        x,
        rounds=rounds,
        lr=pert_lr,
        l2=trigger_l2,
        temperature=temperature,
        reduction=reduction,
        kl_scale=kl_scale,
        init_scale=trigger_init_scale,
        init_key=jax.random.fold_in(key, 1),
        restarts=trigger_restarts,
        max_norm=trigger_max_norm,
    )
    return sr_grads(
        student_apply,
        student_variables,
        x,
        delta,
        key,
        portion=portion,
        fp_iterations=fp_iterations,
        inner_lr=inner_lr,
        l2=l2,
        temperature=temperature,
        detach_clean=detach_clean,
        reduction=reduction,
        kl_scale=kl_scale,
    )


def batchmean_sr_hooks(teacher: nn.Module, student: nn.Module, options: Any, temperature: float):
    """`(student_sr, student_sr_prepare, student_sr_stats)` hooks (kd.common.DFKDHooks) for SR as
    the CMI / OOD-KD code base runs it (spec 4.1, 12.4): every KL at the method's KD `temperature`,
    reduced as batchmean x T^2; the trigger synthesized without an L2 term; the clean side of the
    outer loss not detached. `options`: an `abd.options.ABDOptions` (sr_rounds, sr_pert_lr, sr_l2,
    sr_portion, sr_fp_iterations, sr_trigger_model, sr_bn_replay, sr_max_norm, sr_refine_rounds). With the teacher as trigger
    model (the reference's choice) `student_sr_prepare` synthesizes the trigger from the images
    alone, and with `sr_bn_replay` `student_sr_stats` replays the running-stat updates of the
    reference's 4 SR forwards (`sr_running_stats`; the reference's `UnlearnOptimizer.step` runs
    them before its KD forward, as ZSKT's solver does). With the student as trigger model the
    trigger is synthesized inside `student_sr` on every step, and there is nothing to replay with
    (both None)."""
    student_apply = train_mode_apply(student)
    kl = dict(temperature=temperature, reduction="batchmean", kl_scale=temperature * temperature)
    o = options

    def prepare(teacher_vars: PyTree, x: jax.Array, key: jax.Array | None = None,
                student_vars: PyTree | None = None) -> jax.Array:
        def teacher_logits(z):
            return teacher.apply(teacher_vars, z, train=False)[0]

        delta = synthesize_trigger(teacher_logits, x, rounds=o.sr_rounds, lr=o.sr_pert_lr, l2=0.0,
                                   init_scale=o.sr_init_scale, init_key=trigger_start_key(o, key),
                                   restarts=o.sr_restarts, max_norm=o.sr_max_norm, **kl)
        return refine_on_student(o, student, student_vars, teacher_logits, x, delta, l2=0.0)

    def student_sr(student_vars: PyTree, teacher_vars: PyTree, x: jax.Array, key: jax.Array, delta=None):
        if delta is None:  # the student synthesizes its own trigger (the poster's story)
            delta = synthesize_trigger(lambda z: student_apply(student_vars, z), x, rounds=o.sr_rounds,
                                       lr=o.sr_pert_lr, l2=0.0, init_scale=o.sr_init_scale,
                                       init_key=jax.random.fold_in(key, 1), restarts=o.sr_restarts,
                                       max_norm=o.sr_max_norm, **kl)
        grads, _ = sr_grads(student_apply, student_vars, x, delta, key, portion=o.sr_portion,
                            fp_iterations=o.sr_fp_iterations, l2=o.sr_l2, detach_clean=False, **kl)
        return grads

    return student_sr, (prepare if o.sr_trigger_model == "teacher" else None), sr_stats_hook(student, o)


class SelfRetrospectionState(NamedTuple):
    """State of `self_retrospection`: the SR gradient's weight, an array leaf (0 = SR off)."""

    coef: jax.Array


def self_retrospection(coef: float = 1.0) -> optax.GradientTransformationExtraArgs:
    """Adds the SR hypergradient to the incoming (KD) gradient: g <- g_KD + coef * g_SR (spec 4.1.5).

    Place it first in a chain, before the student optimizer, so the optimizer sees the sum, as the
    reference's accumulated `.grad` (no clipping in the reference's SR branch):
    `optax.chain(self_retrospection(), optax.adam(lr))`.

    `update(updates, state, params=None, *, sr_grads=None, sr_grad_fn=None)`:
      sr_grads: a precomputed SR gradient (pytree like `updates`); or
      sr_grad_fn: params -> SR gradient, evaluated under `lax.cond(coef != 0)`, so no SR work is
        done while SR is off (both branches run under vmap, where cond becomes select).
      Neither: the updates pass through unchanged (a vanilla caller needs no change).
    With coef == 0 the output is exactly the incoming updates.

    Args:
      coef: initial weight (reference: 1, unweighted). Change it in a live state with `set_sr_coef`.
    """

    def init_fn(params):
        del params
        return SelfRetrospectionState(coef=jnp.asarray(coef, jnp.float32))

    def update_fn(updates, state, params=None, *, sr_grads=None, sr_grad_fn=None, **extra_args):
        del extra_args
        if sr_grads is not None and sr_grad_fn is not None:
            raise ValueError("pass either sr_grads or sr_grad_fn, not both")
        on = state.coef != 0
        if sr_grad_fn is not None:
            if params is None:
                raise ValueError("self_retrospection needs params when sr_grad_fn is given")
            sr_grads = jax.lax.cond(
                on, sr_grad_fn, lambda _: jax.tree.map(jnp.zeros_like, updates), params
            )
        if sr_grads is None:
            return updates, state
        new = jax.tree.map(
            lambda u, g: jnp.where(on, u + state.coef.astype(u.dtype) * g.astype(u.dtype), u),
            updates,
            sr_grads,
        )
        return new, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def set_sr_coef(opt_state: PyTree, coef: float | jax.Array) -> PyTree:
    """Returns `opt_state` with every SelfRetrospectionState's coef set to `coef` (jittable)."""

    def visit(node):
        if isinstance(node, SelfRetrospectionState):
            return SelfRetrospectionState(coef=jnp.asarray(coef, jnp.float32))
        return node

    return jax.tree.map(visit, opt_state, is_leaf=lambda n: isinstance(n, SelfRetrospectionState))


def sr_is_on(opt_state: PyTree) -> jax.Array:
    """Whether any SelfRetrospectionState in `opt_state` has a nonzero coef (jittable): False for
    an optimizer without the transform, which ignores `sr_grads`."""
    coefs = [node.coef for node in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, SelfRetrospectionState))
             if isinstance(node, SelfRetrospectionState)]
    return jnp.any(jnp.stack(coefs) != 0) if coefs else jnp.asarray(False)


# ---- schedule (spec 4.2) -------------------------------------------------------------------------


def sr_start_step(total_steps: int, start_fraction: float) -> int:
    """First step on which SR runs: total_steps - round(start_fraction * total_steps).

    The reference resumes ZSKT-CIFAR10 from pb79399 or pb79599 of 80,000 pseudo-batches, i.e.
    start_fraction = 601/80000 or 401/80000 (spec 4.2); CMI/OOD: the last 1 or 2 epochs.
    """
    if not 0.0 <= start_fraction <= 1.0:
        raise ValueError(f"start_fraction must be in [0, 1], got {start_fraction}")
    return int(total_steps) - round(start_fraction * total_steps)


def sr_active(step: int | jax.Array, total_steps: int, start_fraction: float) -> bool | jax.Array:
    """Whether SR is on at `step` (counted in the caller's unit: pseudo-batches, epochs, steps).

    Works on Python ints and traced arrays; `set_sr_coef(opt_state, sr_active(...))` switches the
    transform on in a single continuous run.
    """
    start = sr_start_step(total_steps, start_fraction)
    if isinstance(step, int):
        return step >= start
    return jnp.asarray(step) >= start


def resume_lr_schedule(
    resume_lr: float, remaining_steps: int, *, updates_per_step: int = 1
) -> optax.Schedule:
    """The student's learning rate after the SR resume (spec 4.2): cosine from `resume_lr` to 0.

    CosineAnnealingLR(T_max = remaining_steps) on a fresh optimizer, counted from the resume; the
    schedule unit is the caller's step (ZSKT: pseudo-batches, so `updates_per_step` = the student
    updates per pseudo-batch, 10). Sweeps: resume_lr 1e-4 or 5e-4 (ZSKT), 5e-4 (CMI, OOD).
    """
    cosine = optax.cosine_decay_schedule(resume_lr, decay_steps=max(int(remaining_steps), 1))
    return lambda count: cosine(count // updates_per_step)


def sr_resume_optimizer(
    resume_lr: float,
    remaining_steps: int,
    *,
    updates_per_step: int = 1,
    coef: float = 1.0,
    optimizer: str = "adam",
    **optimizer_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """The reference's student optimizer for the SR phase: SR transform, then a fresh optimizer.

    `optax.chain(self_retrospection(coef), make_optimizer(optimizer, resume_lr_schedule(...)))`,
    without gradient clipping (the reference's SR branch does not clip). Initialize its state
    fresh at the resume step (the reference builds a new Adam): moments and count start at 0.
    CMI resumes SGD instead: optimizer="sgd" with its momentum / weight_decay kwargs.
    """
    schedule = resume_lr_schedule(resume_lr, remaining_steps, updates_per_step=updates_per_step)
    return optax.chain(
        self_retrospection(coef), make_optimizer(optimizer, schedule, **optimizer_kwargs)
    )
