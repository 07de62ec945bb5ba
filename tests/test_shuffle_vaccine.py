"""Shuffling Vaccine (spec 3): the shuffle is a per-kernel input-channel permutation of the last n
convs, the ensemble is the mean of its copies, the penalty and OOD weights are the spec's masked
means, verification re-draws and gives up as the reference does, and coef changes never retrace."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hypothesis import given, settings
from hypothesis import strategies as st

from abd_jax.abd import shuffle_vaccine as sv_lib
from abd_jax.abd.shuffle_vaccine import (
    ShuffleVaccine,
    cap_pushed_losses,
    ensemble_logits,
    init_shuffle_vaccine,
    make_generator_penalty,
    make_sample_weights,
    make_shuffled_ensemble,
    make_teacher_and_penalty,
    ood_sample_weights,
    shuffle_conv_inputs,
    shuffled_kernel_paths,
    suspicion,
    suspicion_report,
    sv_penalty,
    tail_ratio,
    tail_statistics,
    teacher_and_ensemble,
    verify_vaccine,
)
from abd_jax.losses import kl_elementwise
from abd_jax.models import conv_kernel_paths, get_model, init_model

B, C = 16, 10
BLOCK3 = [
    ("block3", "layer_0", "conv1", "kernel"),
    ("block3", "layer_0", "conv2", "kernel"),
    ("block3", "layer_0", "conv_shortcut", "kernel"),
    ("block3", "layer_1", "conv1", "kernel"),
    ("block3", "layer_1", "conv2", "kernel"),
]


def random_variables(model, seed=0):
    """Teacher-like variables without running `model.init` (slow op by op on a busy 2-core CPU):
    the tree from `eval_shape`, He-normal kernels (distinct floats), identity BN statistics."""
    shapes = jax.eval_shape(lambda k: init_model(model, k, (8, 8, 3)), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name in ("mean", "bias"):
            return jnp.zeros(s.shape, s.dtype)
        if name in ("var", "scale"):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(
            rng.standard_normal(s.shape) * np.sqrt(2 / np.prod(s.shape[:-1])), s.dtype
        )

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def teacher():
    model = get_model("wrn16_1", C)
    variables = random_variables(model)
    x = jax.random.normal(jax.random.key(3), (B, 8, 8, 3))
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    return model, variables, x, apply


@pytest.fixture(scope="module")
def vaccine(teacher):
    """The default SV state (3 copies, last 5 convs, lambda 0.1) and a jitted T~."""
    _, variables, _, _ = teacher
    return init_shuffle_vaccine(jax.random.key(5), variables), jax.jit(
        ensemble_logits, static_argnums=0
    )


def flat(tree):
    return traverse_util.flatten_dict(tree)


def assert_input_permutation(new, old):
    """new == old[..., pi, :] for one permutation pi of axis -2 (the same for every h, w, out)."""
    np.testing.assert_array_equal(np.sort(new, axis=-2), np.sort(old, axis=-2))
    # Recover pi from one slice (random float values are distinct) and check it everywhere.
    a, b = np.asarray(new)[0, 0, :, 0], np.asarray(old)[0, 0, :, 0]
    pi = np.array([int(np.flatnonzero(b == v)[0]) for v in a])
    assert sorted(pi) == list(range(old.shape[-2]))
    np.testing.assert_array_equal(new, np.asarray(old)[..., pi, :])


# ---------------------------------------------------------------------------------- shuffle


def test_shuffle_changes_exactly_block3_of_wrn16_1(teacher):
    _, variables, _, _ = teacher
    params = variables["params"]
    assert shuffled_kernel_paths(params, 5) == BLOCK3  # spec 3.1 ordering
    new = shuffle_conv_inputs(jax.random.key(0), params, 5)
    f_old, f_new = flat(params), flat(new)
    assert f_old.keys() == f_new.keys()
    for path, old in f_old.items():
        if path in BLOCK3:
            assert not np.array_equal(f_new[path], old), path  # C_in >= 32: never the identity
            assert_input_permutation(f_new[path], old)
        else:
            np.testing.assert_array_equal(f_new[path], old, err_msg=str(path))


@settings(max_examples=5, deadline=None)
@given(n=st.integers(-17, 17), seed=st.integers(0, 2**16))
def test_shuffle_is_a_permutation_of_the_selected_kernels(teacher, n, seed):
    params = teacher[1]["params"]
    paths = conv_kernel_paths(params)
    expected = paths[-n:] if n > 0 else paths[:-n] if n < 0 else []
    assert shuffled_kernel_paths(params, n) == expected
    new = flat(shuffle_conv_inputs(jax.random.key(seed), params, n))
    for path, old in flat(params).items():
        if path in expected:
            assert_input_permutation(new[path], old)
        else:
            np.testing.assert_array_equal(new[path], old)


def test_shuffle_identity_deterministic_and_jittable(teacher):
    params = teacher[1]["params"]
    assert shuffle_conv_inputs(jax.random.key(0), params, 0) is params
    a = shuffle_conv_inputs(jax.random.key(7), params, 5)
    b = shuffle_conv_inputs(jax.random.key(7), params, 5)
    c = shuffle_conv_inputs(jax.random.key(8), params, 5)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(flat(a)[BLOCK3[1]], flat(c)[BLOCK3[1]])
    # Under jit the dict keys are sorted, so only name-based ordering can give the same result.
    jitted = jax.jit(shuffle_conv_inputs, static_argnums=2)(jax.random.key(7), params, 5)
    chex.assert_trees_all_equal(a, jitted)


# --------------------------------------------------------------------------------- ensemble


def test_ensemble_is_mean_of_copies_and_teacher_unchanged(teacher, vaccine):
    model, variables, x, apply = teacher
    sv, ens = vaccine
    stacked = sv.params
    chex.assert_trees_all_equal(
        stacked, make_shuffled_ensemble(jax.random.key(5), variables["params"], 3, 5)
    )
    chex.assert_trees_all_equal(sv.batch_stats, variables["batch_stats"])
    chex.assert_tree_shape_prefix(stacked, (3,))
    copies = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(3)]
    for c in copies:  # each copy is an independent shuffle of the teacher
        for path, old in flat(variables["params"]).items():
            (assert_input_permutation if path in BLOCK3 else np.testing.assert_array_equal)(
                flat(c)[path], old
            )
    assert not np.array_equal(flat(copies[0])[BLOCK3[0]], flat(copies[1])[BLOCK3[0]])
    want = np.mean(
        [apply({"params": c, "batch_stats": variables["batch_stats"]}, x) for c in copies], 0
    )
    for vectorize in (True, False):  # vmap over the copies, or the CPU default's Python loop
        got = ensemble_logits(model, stacked, variables["batch_stats"], x, vectorize=vectorize)
        chex.assert_shape(got, (B, C))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- mask and penalty

logits_st = st.integers(0, 2**16).map(
    lambda s: tuple(
        np.asarray(jax.random.normal(k, (B, C)) * 3) for k in jax.random.split(jax.random.key(s))
    )
)


@settings(max_examples=6, deadline=None)
@given(pair=logits_st, coef=st.floats(0.0, 2.0))
def test_penalty_matches_spec_formula_and_is_nonpositive(pair, coef):
    t, s = pair
    s = np.where(np.arange(B)[:, None] % 2 == 0, t, s)  # make half of the rows agree
    loss, m = sv_penalty(t, s, jnp.float32(coef))
    pt = np.exp(t - t.max(1, keepdims=True))
    pt /= pt.sum(1, keepdims=True)
    ps = np.exp(s - s.max(1, keepdims=True))
    ps /= ps.sum(1, keepdims=True)
    d = (pt * (np.log(pt) - np.log(ps))).mean(1)  # KL(p_T || p_T~) / C
    mask = (t.argmax(1) == s.argmax(1)).astype(np.float64)
    np.testing.assert_allclose(m["sv_flagged"], mask.sum())
    np.testing.assert_allclose(loss, -coef * (mask * d).sum() / mask.sum(), rtol=1e-4, atol=1e-8)
    assert float(loss) <= 0.0


def test_penalty_zero_when_nothing_flagged_or_coef_zero():
    t = jax.random.normal(jax.random.key(0), (B, C))
    loss, m = sv_penalty(t, -t, jnp.float32(0.1))  # argmax(-t) = argmin(t) != argmax(t)
    assert float(loss) == 0.0 and float(m["sv_flagged"]) == 0.0
    loss, _ = sv_penalty(
        t, t + 0.1 * jax.random.normal(jax.random.key(1), (B, C)), jnp.float32(0.0)
    )
    assert float(loss) == 0.0
    mask, d = suspicion(t, t)
    np.testing.assert_array_equal(mask, np.ones(B))
    np.testing.assert_allclose(d, 0.0, atol=1e-7)


@settings(max_examples=10, deadline=None)
@given(
    flags=st.lists(st.booleans(), min_size=8, max_size=8),
    coef=st.one_of(st.just(0.0), st.floats(1e-3, 1.0)),
    seed=st.integers(0, 2**16),
)
def test_ood_weights_give_the_masked_formula(flags, coef, seed):
    # Fixed B = 8 so the eager ops compile once; all-kept and all-flagged are both reachable.
    coef = float(np.float32(coef))
    mask = np.asarray(flags, np.float32)
    loss = np.random.default_rng(seed).uniform(0, 5, mask.shape)
    w = np.asarray(ood_sample_weights(jnp.asarray(mask), jnp.float32(coef)), np.float64)
    got = np.mean(w * loss)
    k, u = loss[mask == 0], loss[mask == 1]
    if coef == 0 or u.size == 0:
        want = loss.mean()  # plain mean, all weights 1
        np.testing.assert_allclose(w, 1.0)
    elif k.size == 0:
        want = -coef * u.mean()  # the reference would give NaN here (mean of an empty tensor)
    else:
        want = k.mean() - coef * u.mean()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_push_cap_stops_the_ascent_at_a_uniform_prediction():
    t = jnp.asarray([[4.0, 0.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    w = jnp.asarray([-0.5, -0.5, -0.5, 2.0])  # three flagged, one kept
    temp = 2.0
    p = np.asarray(jax.nn.softmax(t / temp, axis=-1), np.float64)
    bound = (np.log(3) + np.sum(p * np.log(p), -1)) / 3  # KL(p_T || uniform) / C = (log C - H(p_T)) / C

    def losses(s_logits, cap):
        per_sample = jnp.mean(kl_elementwise(t, s_logits, temp), -1)
        return cap_pushed_losses(per_sample, w, t, temp, cap)

    far = jnp.asarray([[-9.0, 9.0, 0.0], [5.0, -5.0, 0.0], [0.0, 0.0, 9.0], [-9.0, 9.0, 0.0]])
    raw = np.asarray(losses(far, "none"))
    assert raw[0] > bound[0] and raw[1] > bound[1] and raw[3] > bound[3]
    got = np.asarray(losses(far, "uniform"))
    np.testing.assert_allclose(got[:2], bound[:2], rtol=1e-5)  # flagged and past the cap: clipped
    assert got[3] == raw[3]  # kept samples are never clipped
    near = t + 0.1  # a student close to the teacher: below the cap, nothing changes
    np.testing.assert_allclose(np.asarray(losses(near, "uniform")), np.asarray(losses(near, "none")))
    # Past the cap a flagged sample stops pushing: its gradient is 0, the kept sample's is not.
    g = jax.grad(lambda s: jnp.sum(w * losses(s, "uniform")))(far)
    assert np.all(np.asarray(g[:2]) == 0) and np.any(np.asarray(g[3]) != 0)
    with pytest.raises(ValueError, match="unknown push cap 'x'"):
        cap_pushed_losses(raw, w, t, temp, "x")


# ------------------------------------------------------------------------------ tail ratio


def test_tail_ratio_on_synthetic_distributions():
    rng = np.random.default_rng(0)
    clean = 10 ** rng.normal(-2, 0.3, 4000)
    assert tail_ratio(clean) < 0.005  # Gaussian in log10: P(z < -3) = 0.00135
    pool = np.concatenate([clean, 10 ** rng.normal(-6, 0.1, 200)])  # 4.8% shuffle-resistant
    st_ = tail_statistics(pool)
    assert st_["n_tail"] == 200 and abs(st_["tail_ratio"] - 200 / 4200) < 1e-12
    with_zero = np.concatenate([pool, [0.0, -1e-9]])  # exact 0 / rounding negatives: floored
    assert np.isfinite(tail_statistics(with_zero)["mean_log10_kl"])
    assert tail_statistics(with_zero)["n_tail"] == 202


# ---------------------------------------------------------------------------- verification


@pytest.fixture(scope="module")
def tiny_sv():
    """A ShuffleVaccine over a 2-conv toy net: cheap to re-shuffle."""
    params = {
        "conv1": {"kernel": jnp.arange(2 * 2 * 8 * 4.0).reshape(2, 2, 8, 4)},
        "conv2": {"kernel": jnp.arange(1 * 1 * 4 * 3.0).reshape(1, 1, 4, 3)},
        "fc": {"kernel": jnp.ones((3, 2))},
    }
    return params, init_shuffle_vaccine(
        jax.random.key(0), {"params": params}, coef=0.1, n_copies=2, n_layers=1, verify=True
    )


def fake_divergence(pass_at_trial):
    """Divergences with a 5% low tail from trial `pass_at_trial` on, else log-normal only."""
    calls = []

    def fn(sv, x, t):
        calls.append(sv)
        rng = np.random.default_rng(len(calls))
        d = 10 ** rng.normal(-2, 0.3, x.shape[0])
        if pass_at_trial is not None and len(calls) - 1 >= pass_at_trial:
            d[: x.shape[0] // 20] = 1e-8
        return d

    return fn, calls


def test_verification_gives_up_after_max_trials(tiny_sv):
    params, sv = tiny_sv
    assert float(sv.coef) == 0.0 and not bool(sv.tested)  # warm-up: SV off
    fn, calls = fake_divergence(None)
    pool_x, pool_t = np.zeros((400, 1)), np.zeros((400, 2))
    new, log = verify_vaccine(
        jax.random.key(1), fn, pool_x, pool_t, sv, n_layers=1, max_trials=8, batch_size=400
    )
    assert len(log) == 8 and len(calls) == 8 and not any(r["passed"] for r in log)
    assert float(new.coef) == 0.0 and bool(new.tested) and int(new.trials) == 8
    # Each re-draw composes a fresh permutation with the current one, in place: the copies
    # stay input permutations of the teacher's last conv, and they did change.
    for i in range(2):
        k_new = new.params["conv2"]["kernel"][i]
        assert_input_permutation(k_new, params["conv2"]["kernel"])
        np.testing.assert_array_equal(new.params["conv1"]["kernel"][i], params["conv1"]["kernel"])
    assert any(
        not np.array_equal(calls[0].params["conv2"]["kernel"], c.params["conv2"]["kernel"])
        for c in calls[1:]
    )
    # Tested states are never re-tested (spec 3.4 step 4).
    again, log2 = verify_vaccine(jax.random.key(2), fn, pool_x, pool_t, new)
    assert log2 == [] and again is new


def test_verification_stops_at_the_first_pass(tiny_sv):
    _, sv = tiny_sv
    fn, calls = fake_divergence(2)
    new, log = verify_vaccine(
        jax.random.key(1),
        fn,
        np.zeros((400, 1)),
        np.zeros((400, 2)),
        sv,
        n_layers=1,
        batch_size=400,
    )
    assert [r["passed"] for r in log] == [False, False, True] and len(calls) == 3
    assert float(new.coef) == pytest.approx(0.1) and bool(new.tested) and int(new.trials) == 3


def test_pool_divergences_pads_the_last_batch(vaccine):
    sv, _ = vaccine
    shapes = []

    def fn(s, xb, tb):
        shapes.append(xb.shape)
        return np.asarray(tb).sum(1)

    t = np.arange(2 * 11.0).reshape(11, 2)
    d = sv_lib.pool_divergences(fn, sv, np.zeros((11, 8, 8, 3)), t, batch_size=4)
    np.testing.assert_allclose(d, t.sum(1))
    assert set(shapes) == {(4, 8, 8, 3)}


# -------------------------------------------------------------------------------- the hooks


def test_penalty_hook_compiles_once_across_coef_values(teacher, vaccine):
    model, variables, x, apply = teacher
    sv, ens = vaccine
    t_logits = apply(variables, x)
    pen = make_generator_penalty(model)

    def loss_and_grad(state, t, xx):
        (loss, metrics), g = jax.value_and_grad(lambda xi: pen(t, xi, None, state), has_aux=True)(
            xx
        )
        return loss, metrics, g

    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(loss_and_grad, n=1))
    loss, metrics, grad = step(sv, t_logits, x)
    want, _ = sv_penalty(t_logits, ens(model, sv.params, sv.batch_stats, x), sv.coef)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert float(metrics["sv_flagged"]) > 0 and float(loss) < 0
    assert float(jnp.abs(grad).sum()) > 0  # gradients reach the images through T~
    # Switching SV off / changing lambda / re-drawing the copies: same compiled function.
    loss0, m0, g0 = step(sv.replace(coef=jnp.float32(0.0)), t_logits, x)
    assert (
        float(loss0) == 0.0 and float(m0["sv_flagged"]) == 0.0 and float(jnp.abs(g0).sum()) == 0.0
    )
    loss2, _, _ = step(sv.replace(coef=jnp.float32(0.3)), t_logits, x)
    np.testing.assert_allclose(loss2, 3 * want, rtol=1e-5)
    step(sv.replace(params=jax.tree.map(lambda a: a[::-1], sv.params)), t_logits, x)  # other copies

    # The bound form (factory called inside jit, today's 3-argument hook) is retrace-free too.
    chex.clear_trace_counter()
    bound = jax.jit(
        chex.assert_max_traces(
            lambda state, t, xx: make_generator_penalty(model, state, skip_when_off=False)(
                t, xx, None
            )[0],
            n=1,
        )
    )
    np.testing.assert_allclose(bound(sv, t_logits, x), want, rtol=1e-5)
    assert float(bound(sv.replace(coef=jnp.float32(0.0)), t_logits, x)) == 0.0


def test_sample_weights_hook(teacher, vaccine):
    model, variables, x, apply = teacher
    sv, ens = vaccine
    t_logits = apply(variables, x)
    weights = jax.jit(lambda s, t, xx: make_sample_weights(model)(t, xx, s))
    w = weights(sv, t_logits, x)
    mask, _ = suspicion(t_logits, ens(model, sv.params, sv.batch_stats, x))
    np.testing.assert_allclose(w, ood_sample_weights(mask, sv.coef), rtol=1e-6)
    np.testing.assert_array_equal(
        weights(sv.replace(coef=jnp.float32(0.0)), t_logits, x), np.ones(B)
    )


def test_unshuffled_ensemble_flags_everything_with_zero_penalty(teacher, vaccine):
    """n_layers = 0: every copy is the teacher, so all samples agree and d = 0."""
    model, variables, x, apply = teacher
    _, ens = vaccine
    stacked = make_shuffled_ensemble(jax.random.key(2), variables["params"], 3, n_layers=0)
    t_logits = apply(variables, x)
    report = suspicion_report(t_logits, ens(model, stacked, variables["batch_stats"], x))
    assert report["mask"].all() and report["mask"].dtype == bool
    np.testing.assert_array_equal(report["teacher_pred"], report["shuffled_pred"])
    np.testing.assert_allclose(report["divergence"], 0.0, atol=1e-6)
    assert report["teacher_pred"].shape == (B,) and report["divergence"].dtype == np.float32


def test_state_is_a_pytree_of_arrays(vaccine):
    sv, _ = vaccine
    assert isinstance(sv, ShuffleVaccine) and sv.n_copies == 3
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(sv))
    assert bool(sv.tested) and float(sv.coef) == pytest.approx(0.1)


def test_divergence_fn_matches_the_mask_divergence(teacher, vaccine):
    model, variables, x, apply = teacher
    sv, ens = vaccine
    t_logits = apply(variables, x)
    d = sv_lib.pool_divergences(
        jax.jit(sv_lib.make_divergence_fn(model)), sv, x, t_logits, batch_size=B
    )
    _, want = suspicion(t_logits, ens(model, sv.params, sv.batch_stats, x))
    np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------ shared prefix


def test_shared_prefix_child_is_where_the_shuffled_kernels_start(teacher):
    _, variables, _, _ = teacher
    params = variables["params"]
    assert sv_lib.shared_prefix_child(params, 5) == "block3"  # the default: all of block3
    assert sv_lib.shared_prefix_child(params, 6) == "block2"  # block2's last conv joins in
    assert sv_lib.shared_prefix_child(params, 0) is None  # nothing shuffled
    assert sv_lib.shared_prefix_child(params, 100) is None  # the stem too: nothing to share
    vgg = random_variables(get_model("vgg_small", C))["params"]
    assert sv_lib.shared_prefix_child(vgg, 5) == "conv2"


def test_shared_prefix_gives_the_values_and_gradients_of_whole_forwards(teacher, vaccine):
    model, variables, x, _ = teacher
    sv, _ = vaccine
    assert sv.split_at == "block3"

    def ens(x, split_at, vectorize):
        return ensemble_logits(model, sv.params, sv.batch_stats, x, vectorize=vectorize, split_at=split_at)

    for vectorize in (False, True):
        whole, shared = (jax.jit(lambda x, s=s: ens(x, s, vectorize)) for s in (None, "block3"))
        if vectorize:
            np.testing.assert_allclose(shared(x), whole(x), rtol=1e-6, atol=1e-6)
        else:  # the same operations on the same values, summed in the same order
            np.testing.assert_array_equal(shared(x), whole(x))
        g_whole, g_shared = (
            jax.jit(jax.grad(lambda x, s=s: jnp.sum(jnp.sin(ens(x, s, vectorize))))) for s in (None, "block3")
        )
        # The copies' cotangents are summed before the prefix instead of after it: rounding only.
        np.testing.assert_allclose(g_shared(x), g_whole(x), rtol=1e-4, atol=1e-6)


def test_shared_prefix_needs_equal_prefixes_and_runs_the_prefix_once(teacher, vaccine):
    """Copies that differ before the split are not what a vaccine makes: the shared form then
    gives copy 0's prefix to every copy, so its logits differ from whole forwards (the test can
    fail), and the prefix's convolutions appear once in the compiled computation, not 3 times."""
    model, variables, x, _ = teacher
    sv, _ = vaccine
    broken = make_shuffled_ensemble(jax.random.key(9), variables["params"], 3, 6)  # block2's last conv too
    whole = ensemble_logits(model, broken, sv.batch_stats, x, vectorize=False)
    shared = ensemble_logits(model, broken, sv.batch_stats, x, vectorize=False, split_at="block3")
    assert not np.allclose(whole, shared, atol=1e-4)

    def n_convs(split_at):
        # The state is an argument, as in the runs (as a closure constant XLA would merge the
        # copies' identical prefixes itself).
        fn = jax.jit(lambda s, x: ensemble_logits(model, s.params, s.batch_stats, x, vectorize=False, split_at=split_at))
        return fn.lower(sv, x).compile().as_text().count("convolution(")

    n_per_forward = len(conv_kernel_paths(variables["params"]))  # 15 for WRN-16-1
    assert n_convs(None) == 3 * n_per_forward
    assert n_convs("block3") == n_per_forward + 2 * len(BLOCK3)


def test_teacher_shared_prefix_gives_the_teacher_and_the_ensemble(teacher, vaccine):
    """`teacher_and_ensemble`: the teacher's own output and T~ as two separate forwards give them
    (bitwise on the loop path: the same operations on the same values), gradients equal up to
    rounding, and the prefix's convolutions once for the teacher and all copies together."""
    model, variables, x, _ = teacher
    sv, _ = vaccine

    def apart(x, sv):
        return model.apply(variables, x, train=False), ensemble_logits(model, sv.params, sv.batch_stats, x,
                                                                       vectorize=False, split_at=sv.split_at)

    def shared(x, sv):
        return teacher_and_ensemble(model, variables, sv, x, vectorize=False)

    (t_a, f_a), e_a = jax.jit(apart)(x, sv)
    (t_s, f_s), e_s = jax.jit(shared)(x, sv)
    np.testing.assert_array_equal(t_s, t_a)
    np.testing.assert_array_equal(e_s, e_a)
    chex.assert_trees_all_equal(f_s, f_a)

    def loss(form):
        return lambda x: jnp.sum(jnp.sin(form(x, sv)[0][0]) * jnp.cos(form(x, sv)[1]))

    np.testing.assert_allclose(jax.jit(jax.grad(loss(shared)))(x), jax.jit(jax.grad(loss(apart)))(x),
                               rtol=1e-4, atol=1e-6)

    def n_convs(form):
        return jax.jit(form).lower(x, sv).compile().as_text().count("convolution(")

    n_per_forward = len(conv_kernel_paths(variables["params"]))
    assert n_convs(apart) == 2 * n_per_forward + 2 * len(BLOCK3)  # teacher whole, copy 0 whole
    assert n_convs(shared) == n_per_forward + 3 * len(BLOCK3)  # one prefix, four block3s

    # Without a split (share_prefix=False) it is the two separate forwards. Compiled like `apart`:
    # op-by-op eager execution rounds differently from a jitted forward (on an AVX-512 / AMX CPU
    # by 2e-6 on logits of size 10), which is not what this checks.
    whole_sv = sv.replace(split_at=None)
    (t_w, _), e_w = jax.jit(shared)(x, whole_sv)
    np.testing.assert_allclose(t_w, t_a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(e_w, e_a, rtol=1e-6, atol=1e-6)


def test_teacher_and_penalty_is_the_teacher_forward_plus_the_penalty(teacher, vaccine):
    model, variables, x, _ = teacher
    sv, _ = vaccine
    key = jax.random.key(0)
    pen = make_generator_penalty(model, skip_when_off=False)
    joint = make_teacher_and_penalty(model)

    def apart(x, sv):
        t_logits, _ = model.apply(variables, x, train=False)
        loss, metrics = pen(t_logits, x, key, sv)
        return t_logits, loss, metrics

    for coef in (0.1, 0.0):
        s = sv.replace(coef=jnp.float32(coef))
        t_a, l_a, m_a = jax.jit(apart)(x, s)
        (t_j, _), l_j, m_j = jax.jit(joint)(variables, x, key, s)
        np.testing.assert_array_equal(t_j, t_a)
        np.testing.assert_allclose(l_j, l_a, rtol=1e-6)
        assert set(m_j) == set(m_a)
        for k in m_a:
            np.testing.assert_allclose(m_j[k], m_a[k], rtol=1e-6)
    g_a = jax.grad(lambda x: apart(x, sv)[1])(x)
    g_j = jax.grad(lambda x: joint(variables, x, key, sv)[1])(x)
    assert float(jnp.max(jnp.abs(g_a))) > 0
    np.testing.assert_allclose(g_j, g_a, rtol=1e-4, atol=1e-7)
