"""Self-Retrospection (spec 4): trigger synthesis, the SR hypergradient, the optax transform and
the schedule helpers. A tiny conv net with BatchNorm keeps compile times small (the same code on
WRN-16-1 is exercised by benchmarks, not tests)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from abd_jax.abd.self_retrospection import (
    kl_divergence,
    outer_mask,
    perturb_subset,
    project_l2,
    resume_lr_schedule,
    retrospect,
    self_retrospection,
    set_sr_coef,
    sr_active,
    sr_grads,
    sr_is_on,
    sr_resume_optimizer,
    sr_running_stats,
    sr_start_step,
    synthesize_trigger,
    train_mode_apply,
)

B, HW, C = 8, 6, 3


class TinyNet(nn.Module):
    """conv -> BN -> relu -> mean pool -> dense; returns (logits, features) like the zoo models."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(4, (3, 3), use_bias=False)(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
        h = nn.relu(h)
        return nn.Dense(5)(jnp.mean(h, axis=(1, 2))), (h,)


@pytest.fixture(scope="module")
def net():
    model = TinyNet()
    x = jax.random.normal(jax.random.key(0), (B, HW, HW, C))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), x)
    return model, variables, x


def teacher_fn(model, variables):
    return lambda xx: model.apply(variables, xx, train=False)


def test_trigger_increases_kl_and_is_deterministic(net):
    model, variables, x = net

    # A random init's logits are nearly flat; scale them to a trained teacher's confidence, or the
    # l2 term dominates the tiny KL and Adam's unit-size steps overshoot.
    def m(xx):
        return 20.0 * model.apply(variables, xx, train=False)[0]

    synth = jax.jit(functools.partial(synthesize_trigger, m, rounds=5, lr=0.1, l2=1e-3))
    d1, d2 = synth(x), synth(x)
    chex.assert_shape(d1, (1, HW, HW, C))
    np.testing.assert_array_equal(d1, d2)
    clean = m(x)
    kl = float(kl_divergence(clean, m(x + d1)))
    assert kl > 0.0  # delta = 0 gives exactly 0
    d_one = synthesize_trigger(m, x, rounds=1, lr=0.1, l2=1e-3)
    assert kl > float(kl_divergence(clean, m(x + d_one)))  # more rounds, larger divergence
    assert float(kl_divergence(clean, m(x))) == 0.0
    assert -kl + 1e-3 * float(jnp.sum(d1**2)) < 0.0  # the objective went down from 0
    assert float(jnp.max(jnp.abs(synthesize_trigger(m, x, rounds=0)))) == 0.0


def test_trigger_search_from_zero_starts_on_rounding_noise_and_a_random_start_does_not(net):
    """At delta = 0 the KL is at its minimum: its gradient is zero up to rounding, so the spec's zero
    start hands Adam noise. `init_scale` starts from a seeded random delta instead: deterministic
    for a key, different across keys, and rounds = 0 returns the start itself."""
    model, variables, x = net

    def m(xx):
        return 20.0 * model.apply(variables, xx, train=False)[0]

    clean = jax.lax.stop_gradient(m(x))
    g0 = jax.grad(lambda d: kl_divergence(clean, m(x + d)))(jnp.zeros((1, HW, HW, C)))
    g1 = jax.grad(lambda d: kl_divergence(clean, m(x + d)))(1e-2 * jax.random.normal(jax.random.key(0), (1, HW, HW, C)))
    assert float(jnp.max(jnp.abs(g0))) < 1e-4 * float(jnp.max(jnp.abs(g1)))

    synth = jax.jit(functools.partial(synthesize_trigger, m, rounds=5, lr=0.1, l2=1e-3, init_scale=1e-3))
    a, b = synth(x, init_key=jax.random.key(1)), synth(x, init_key=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, synth(x, init_key=jax.random.key(2)))
    assert float(kl_divergence(clean, m(x + a))) > 0.0
    start = synthesize_trigger(m, x, rounds=0, init_scale=1e-3, init_key=jax.random.key(1))
    np.testing.assert_allclose(start, 1e-3 * jax.random.normal(jax.random.key(1), (1, HW, HW, C)), rtol=1e-6)
    # The default (no key) is a fixed start; init_scale = 0 is the spec's zero start.
    np.testing.assert_array_equal(synthesize_trigger(m, x, rounds=0, init_scale=1e-3),
                                  synthesize_trigger(m, x, rounds=0, init_scale=1e-3, init_key=jax.random.key(0)))
    assert float(jnp.max(jnp.abs(synthesize_trigger(m, x, rounds=0, init_scale=0.0)))) == 0.0
    # Restarts: the search from each start, and the one whose objective ended lowest is returned.
    key = jax.random.key(3)
    best = synthesize_trigger(m, x, rounds=3, lr=0.1, l2=1e-3, init_scale=1e-2, init_key=key, restarts=3)

    def objective(d):
        return -float(kl_divergence(clean, m(x + d))) + 1e-3 * float(jnp.sum(d**2))

    singles = [synthesize_trigger(m, x, rounds=3, lr=0.1, l2=1e-3, init_scale=1e-2, init_key=k)
               for k in jax.random.split(key, 3)]
    assert len({round(objective(d), 6) for d in singles}) == 3  # three different searches
    np.testing.assert_allclose(best, min(singles, key=objective), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="restarts"):
        synthesize_trigger(m, x, rounds=1, restarts=2)  # the zero start is a single point


def test_bounded_trigger_search_stays_in_the_ball_and_a_loose_bound_changes_nothing(net):
    """`max_norm` projects every step onto the L2 ball: the result never leaves it, and it still
    moves M (the search ascends inside the ball); a bound the unbounded search never reaches gives
    the unbounded result bit for bit; a negative bound is refused."""
    model, variables, x = net

    def m(xx):
        return 20.0 * model.apply(variables, xx, train=False)[0]

    free = synthesize_trigger(m, x, rounds=5, lr=0.1, l2=1e-3, init_scale=1e-3)
    free_norm = float(jnp.linalg.norm(free))
    assert free_norm > 0.5  # the bound below binds
    bound = 0.25 * free_norm
    capped = synthesize_trigger(m, x, rounds=5, lr=0.1, l2=1e-3, init_scale=1e-3, max_norm=bound)
    assert float(jnp.linalg.norm(capped)) <= bound * (1 + 1e-5)
    assert float(jnp.linalg.norm(capped)) > 0.9 * bound  # pressed against the boundary, not shrunk to 0
    clean = m(x)
    assert float(kl_divergence(clean, m(x + capped))) > 0.0
    loose = synthesize_trigger(m, x, rounds=5, lr=0.1, l2=1e-3, init_scale=1e-3, max_norm=10 * free_norm)
    np.testing.assert_array_equal(loose, free)
    # The projection itself: points inside are unchanged (zero included), outside are scaled to the radius.
    d = jnp.full((1, 2, 2, 1), 3.0)  # norm 6
    np.testing.assert_array_equal(project_l2(d, 0.0), d)
    np.testing.assert_array_equal(project_l2(d, 7.0), d)
    np.testing.assert_allclose(project_l2(d, 3.0), d / 2, rtol=1e-6)
    np.testing.assert_array_equal(project_l2(jnp.zeros((1, 2)), 1.0), jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="max_norm"):
        synthesize_trigger(m, x, rounds=1, max_norm=-1.0)


def test_perturb_subset_touches_exactly_k_samples():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(16, 4, 4, 3)), jnp.float32)
    delta = jnp.ones((1, 4, 4, 3))
    for portion, k in ((0.02, 1), (0.25, 4)):  # int(0.02 * 16) = 0 -> at least 1
        mask = outer_mask(jax.random.key(4), 16, portion)
        assert int(mask.sum()) == k and set(np.unique(mask)) <= {0.0, 1.0}
        xp = perturb_subset(jax.random.key(4), x, delta, portion)
        changed = np.asarray(jnp.any(xp != x, axis=(1, 2, 3)))
        np.testing.assert_array_equal(changed, np.asarray(mask, bool))
        np.testing.assert_allclose(xp[changed], (x + delta)[changed])
        np.testing.assert_array_equal(xp[~changed], x[~changed])
    assert int(outer_mask(jax.random.key(0), 128, 0.02).sum()) == 2  # the reference's B = 128


def test_sr_grads_finite_with_param_structure(net):
    model, variables, x = net
    apply = train_mode_apply(model)
    delta = synthesize_trigger(teacher_fn(model, variables), x, rounds=3)
    fn = jax.jit(
        lambda v, x, d, k: (
            sr_grads(apply, v, x, d, k, portion=0.25),
            sr_grads(apply, v, x, d, k, portion=0.25, detach_clean=False),
            retrospect(apply, v, x, k, trigger_logits_fn="student", rounds=1, portion=0.25),
        )
    )
    (g, metrics), (g_cmi, _), (g_self, _) = fn(variables, x, delta, jax.random.key(5))
    chex.assert_trees_all_equal_shapes_and_dtypes(g, variables["params"])
    chex.assert_trees_all_equal_shapes_and_dtypes(g_self, variables["params"])
    chex.assert_tree_all_finite((g, metrics, g_cmi, g_self))
    with pytest.raises(ValueError):
        retrospect(apply, variables, x, jax.random.key(5), trigger_logits_fn="teacher")
    assert float(metrics["sr_outer_loss"]) > 0.0 and float(metrics["sr_v_norm"]) > 0.0
    assert sum(float(jnp.sum(jnp.abs(a))) for a in jax.tree.leaves(g)) > 0.0
    # Not detaching the clean side adds a gradient path (CMI/OOD), so the results differ.
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_cmi)))


def test_sr_grads_with_zero_iterations_is_the_plain_outer_gradient(net):
    """K = 0 leaves v = 0, so the hypergradient reduces to dL_out/dtheta at fixed delta."""
    model, variables, x = net
    apply = train_mode_apply(model)
    delta = 0.5 * jnp.ones((1, HW, HW, C))
    key = jax.random.key(6)

    def outer(p):
        v = {**variables, "params": p}
        return kl_divergence(
            jax.lax.stop_gradient(apply(v, x)), apply(v, perturb_subset(key, x, delta, 0.25))
        )

    g, want = jax.jit(
        lambda v: (
            sr_grads(apply, v, x, delta, key, portion=0.25, fp_iterations=0)[0],
            jax.grad(outer)(v["params"]),
        )
    )(variables)
    chex.assert_trees_all_close(g, want, rtol=1e-5, atol=1e-7)


def test_sr_running_stats_replays_four_updates(net):
    """delta = 0: four train-mode forwards on the same batch give r4 = m^4 r0 + (1 - m^4) b(x)."""
    model, variables, x = net
    r0 = variables["batch_stats"]["BatchNorm_0"]["mean"] + 0.5  # away from the batch mean
    v = {
        **variables,
        "batch_stats": {"BatchNorm_0": {**variables["batch_stats"]["BatchNorm_0"], "mean": r0}},
    }
    fn = jax.jit(lambda d: sr_running_stats(model, v, x, d, jax.random.key(0), portion=0.25))
    zero = fn(jnp.zeros((1, HW, HW, C)))
    _, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
    b = (upd["batch_stats"]["BatchNorm_0"]["mean"] - 0.9 * r0) / 0.1  # the batch mean (m = 0.9)
    want = 0.9**4 * r0 + (1 - 0.9**4) * b
    np.testing.assert_allclose(zero["BatchNorm_0"]["mean"], want, rtol=1e-5, atol=1e-6)
    moved = fn(jnp.ones((1, HW, HW, C)))
    assert not np.allclose(moved["BatchNorm_0"]["mean"], zero["BatchNorm_0"]["mean"])


def _kd_grads(model, variables, x):
    t = jax.random.normal(jax.random.key(7), (x.shape[0], 5))
    return jax.grad(
        lambda p: kl_divergence(t, train_mode_apply(model)({**variables, "params": p}, x))
    )(variables["params"])


def test_coef_zero_is_exactly_plain_adam_and_skips_sr(net):
    model, variables, x = net
    params = variables["params"]
    kd = jax.jit(_kd_grads, static_argnums=0)(model, variables, x)
    sr = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    plain = optax.adam(1e-2)
    chained = optax.chain(self_retrospection(coef=0.0), optax.adam(1e-2))
    off = chained.init(params)
    # Eagerly (op by op) the chained update is bit-identical to plain Adam's.
    ref_u, _ = plain.update(kd, plain.init(params), params)
    chex.assert_trees_all_equal(chained.update(kd, off, params, sr_grads=sr)[0], ref_u)
    chex.assert_trees_all_equal(chained.update(kd, off, params)[0], ref_u)

    calls = []

    def sr_fn(p):
        jax.debug.callback(lambda: calls.append(1))
        return sr

    @jax.jit
    def step(state, kd):
        u1, _ = chained.update(kd, state, params, sr_grads=sr)
        u2, _ = chained.update(kd, state, params, sr_grad_fn=sr_fn)
        return u1, u2, plain.update(kd, plain.init(params), params)[0]

    u1, u2, ref_jit = step(off, kd)
    jax.effects_barrier()
    assert calls == []  # lax.cond skipped the SR work
    # Under jit XLA may fuse the two graphs differently: allow float32 rounding, nothing more.
    chex.assert_trees_all_close(u1, ref_jit, rtol=1e-6, atol=0)
    chex.assert_trees_all_close(u2, ref_jit, rtol=1e-6, atol=0)

    # coef = 1 (same compiled step): adam sees kd + sr, the unweighted sum (spec 4.1 step 5).
    want, _ = plain.update(jax.tree.map(jnp.add, kd, sr), plain.init(params), params)
    u1, u2, _ = step(set_sr_coef(off, 1.0), kd)
    jax.effects_barrier()
    assert calls == [1]
    chex.assert_trees_all_close(u1, want, rtol=1e-6, atol=1e-8)
    chex.assert_trees_all_close(u2, want, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError):
        chained.update(kd, off, params, sr_grads=sr, sr_grad_fn=sr_fn)


def test_sr_step_compiles_once(net):
    """A full SR student step (teacher trigger, hypergradient, KD, chained Adam): one trace across
    steps and across switching SR off and on (coef is an array leaf)."""
    model, variables, x0 = net
    t_vars = jax.jit(functools.partial(model.init, train=False))(jax.random.key(2), x0)
    apply = train_mode_apply(model)
    tx = optax.chain(self_retrospection(coef=0.0), optax.adam(1e-3))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, opt_state, x, key):
        kd = _kd_grads(model, {**variables, "params": params}, x)

        def sr_fn(p):
            g, _ = retrospect(
                apply,
                {**variables, "params": p},
                x,
                key,
                rounds=2,
                portion=0.25,
                trigger_logits_fn=lambda xx: model.apply(t_vars, xx, train=False),
            )
            return g

        updates, opt_state = tx.update(kd, opt_state, params, sr_grad_fn=sr_fn)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = variables["params"], tx.init(variables["params"])
    for i, coef in enumerate((0.0, 1.0, 1.0)):
        opt_state = set_sr_coef(opt_state, coef)
        params, opt_state = step(params, opt_state, x0 + 0.1 * i, jax.random.key(i))
    chex.assert_tree_all_finite(params)
    chex.clear_trace_counter()


def test_schedule_helpers():
    # ZSKT-CIFAR10: 80,000 pseudo-batches resumed from pb79399 -> 601 SR pseudo-batches.
    assert sr_start_step(80_000, 601 / 80_000) == 79_399
    assert not sr_active(79_398, 80_000, 601 / 80_000) and sr_active(79_399, 80_000, 601 / 80_000)
    assert bool(jax.jit(lambda s: sr_active(s, 80_000, 601 / 80_000))(jnp.int32(79_999)))
    assert sr_start_step(100, 0.0) == 100 and sr_start_step(100, 1.0) == 0
    sched = resume_lr_schedule(5e-4, 601, updates_per_step=10)
    assert float(sched(0)) == pytest.approx(5e-4) and float(sched(9)) == pytest.approx(5e-4)
    assert float(sched(10)) < 5e-4 and float(sched(6010)) == pytest.approx(0.0, abs=1e-12)
    tx = sr_resume_optimizer(5e-4, 601, updates_per_step=10)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    u, _ = tx.update({"w": jnp.ones(3)}, state, params, sr_grads={"w": jnp.ones(3)})
    # Adam's first step is -lr * sign(g): the schedule starts at resume_lr.
    np.testing.assert_allclose(u["w"], -5e-4 * jnp.ones(3), rtol=1e-4)


def test_sr_is_on_reads_the_coef_of_any_chain():
    """sr_is_on: False for an optimizer without the SR transform and for coef 0, True otherwise,
    also under jit (it gates the BN replay of the SR forwards, kd.common.sr_stats_state)."""
    params = {"w": jnp.ones(3)}
    assert not bool(sr_is_on(optax.adam(1e-3).init(params)))
    state = sr_resume_optimizer(1e-3, 4, coef=0.0).init(params)
    assert not bool(sr_is_on(state))
    assert bool(sr_is_on(set_sr_coef(state, 50.0)))
    assert bool(jax.jit(sr_is_on)(set_sr_coef(state, 1.0))) and not bool(jax.jit(sr_is_on)(state))


def test_batchmean_prepare_draws_fresh_starts_only_when_asked(net):
    """CMI / OOD-KD's teacher-trigger hook (`batchmean_sr_hooks`): with `sr_fresh_starts` each
    batch key gives its own start; without it every key gives the fixed start."""
    from abd_jax.abd.options import ABDOptions
    from abd_jax.abd.self_retrospection import batchmean_sr_hooks

    model, variables, x = net  # TinyNet returns (logits, features), as the zoo's teachers
    for fresh in (False, True):
        opts = ABDOptions(sr_init_scale=1e-3, sr_rounds=0, sr_fresh_starts=fresh)
        prepare = batchmean_sr_hooks(model, model, opts, temperature=1.0)[1]
        a, b = prepare(variables, x, jax.random.key(1)), prepare(variables, x, jax.random.key(2))
        assert bool(jnp.any(a != b)) == fresh
        if not fresh:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(prepare(variables, x)))


def test_trigger_target_class_is_where_the_perturbed_batch_goes(net):
    """The class a trigger sends the batch to: the argmax of the batch-mean softmax on x + delta."""
    from abd_jax.abd.self_retrospection import trigger_target_class

    def logits_fn(z):  # class 3 grows with the mean of the input
        return jnp.zeros((z.shape[0], 5)).at[:, 3].set(jnp.mean(z, axis=(1, 2, 3)))

    x = jnp.zeros((B, HW, HW, C))
    assert int(trigger_target_class(logits_fn, x, jnp.full((1, HW, HW, C), 2.0))) == 3
    assert int(trigger_target_class(logits_fn, x, jnp.full((1, HW, HW, C), -2.0))) == 0  # 3 lowest: ties -> 0
    model, variables, xs = net
    d = jax.random.normal(jax.random.key(5), (1, HW, HW, C))
    expected = jnp.argmax(jnp.mean(jax.nn.softmax(model.apply(variables, xs + d)[0]), axis=0))
    assert int(trigger_target_class(teacher_fn(model, variables), xs, d)) == int(expected)


def test_targeted_trigger_moves_the_batch_to_the_target_and_zero_rounds_is_the_start(net):
    from abd_jax.abd.self_retrospection import targeted_trigger

    model, variables, x = net
    fn = teacher_fn(model, variables)
    start = 0.01 * jax.random.normal(jax.random.key(3), (1, HW, HW, C))
    scores = model.apply(variables, x + start)[0]
    target = jnp.argmin(jnp.mean(scores, axis=0))  # the class the batch is least in

    def target_prob(d):
        return float(jnp.mean(jax.nn.softmax(model.apply(variables, x + d)[0])[:, target]))

    np.testing.assert_array_equal(np.asarray(targeted_trigger(fn, x, start, target, rounds=0)), np.asarray(start))
    moved = targeted_trigger(fn, x, start, target, rounds=30, lr=0.1, l2=0.0)
    assert moved.shape == start.shape
    assert target_prob(moved) > target_prob(start) + 0.1, (target_prob(start), target_prob(moved))
    # jit-able with a traced target, same values
    jitted = jax.jit(lambda t: targeted_trigger(fn, x, start, t, rounds=30, lr=0.1, l2=0.0))(target)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(moved), atol=1e-5)


def test_refine_on_student_is_off_at_zero_rounds_and_needs_the_student_otherwise(net):
    from abd_jax.abd.options import ABDOptions
    from abd_jax.abd.self_retrospection import refine_on_student, trigger_target_class

    model, variables, x = net
    teacher = teacher_fn(model, variables)
    delta = 0.5 * jax.random.normal(jax.random.key(4), (1, HW, HW, C))
    off = refine_on_student(ABDOptions(), model, None, teacher, x, delta, l2=1e-3)
    assert off is delta  # the spec: the teacher's trigger as it is, student not needed
    opts = ABDOptions(sr_refine_rounds=30)
    with pytest.raises(ValueError, match="student variables"):
        refine_on_student(opts, model, None, teacher, x, delta, l2=1e-3)
    # A student that differs from the teacher: the refined trigger sends more of the batch to the
    # class the teacher's trigger points at, as the student (eval mode) sees it.
    student_vars = jax.tree.map(lambda v: v * 0.5, variables)
    target = trigger_target_class(teacher, x, delta)
    refined = refine_on_student(opts, model, student_vars, teacher, x, delta, l2=1e-3)

    def student_target_prob(d):
        return float(jnp.mean(jax.nn.softmax(model.apply(student_vars, x + d)[0])[:, target]))

    assert student_target_prob(refined) > student_target_prob(delta), (student_target_prob(delta),
                                                                       student_target_prob(refined))


def test_refine_rounds_are_checked_with_the_config():
    from abd_jax.abd.options import ABDOptions

    with pytest.raises(ValueError, match="sr_refine_rounds"):
        ABDOptions(sr_refine_rounds=-1)
    with pytest.raises(ValueError, match="sr_trigger_model = 'teacher'"):
        ABDOptions(sr_refine_rounds=5, sr_trigger_model="student")
    assert ABDOptions(sr_refine_rounds=5).sr_refine_rounds == 5


def test_batchmean_prepare_refines_on_the_student_it_is_given(net):
    """CMI / OOD-KD's hook: with sr_refine_rounds the prepared trigger depends on the student
    variables passed in; at 0 it does not."""
    from abd_jax.abd.options import ABDOptions
    from abd_jax.abd.self_retrospection import batchmean_sr_hooks

    model, variables, x = net
    other = jax.tree.map(lambda v: v * 0.5, variables)
    for rounds in (0, 5):
        prepare = batchmean_sr_hooks(model, model, ABDOptions(sr_rounds=3, sr_refine_rounds=rounds), 1.0)[1]
        a, b = prepare(variables, x, None, variables), prepare(variables, x, None, other)
        assert bool(jnp.any(a != b)) == bool(rounds)
