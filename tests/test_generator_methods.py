"""DFAD and DAFL as options of ZSKT's pseudo-batch (abd_jax/kd/generator_losses.py): each loss is
its formula on hand-made logits, DAFL's generator ignores the student while DFAD's is the negated
student loss, ABD at coefficient 0 leaves each method's run unchanged, and a whole run with SV and
SR works for each method."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax.abd.self_retrospection import set_sr_coef
from abd_jax.data.embedded import load_digits
from abd_jax.kd import generator_losses as gl
from abd_jax.kd.common import DFKDHooks
from abd_jax.kd.zskt_train import ZSKTConfig, build_zskt, sr_phase
from abd_jax.models import get_model, init_model
from experiments.configs.common import SMOKE_MODEL  # the smallest WRN, as the :smoke configs

T_LOGITS = jnp.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
S_LOGITS = jnp.array([[1.0, 0.5, -1.0], [0.5, -0.5, 1.0]])

# Tiny sizes as tests/test_abd_zskt.py; SGD at lr 0.1 as the methods' own defaults.
BASE = ZSKTConfig(student=SMOKE_MODEL, pseudo_batches=4, batch_size=8, n_student_steps=2, generator_width=16,
                  sr_pseudo_batches=2, sr_rounds=2, sr_fp_iterations=2)


def method_cfg(method: str) -> ZSKTConfig:
    return dataclasses.replace(BASE, **{**gl.method_defaults(method), "n_student_steps": 2})


# --- the losses ---------------------------------------------------------------------------------

def test_dfad_losses_are_the_l1_and_its_negation():
    l1 = np.mean(np.abs(np.asarray(T_LOGITS) - np.asarray(S_LOGITS)))  # (1+.5+0+0+2+1)/6
    np.testing.assert_allclose(l1, 4.5 / 6)
    s_loss, _ = gl.dfad_student_loss(T_LOGITS, (), S_LOGITS, ())
    g_loss, _ = gl.dfad_generator_loss(T_LOGITS, S_LOGITS, None)
    np.testing.assert_allclose(s_loss, l1, rtol=1e-6)
    assert float(g_loss) == -float(s_loss)
    # The generator's gradient wrt the student's logits is minus the student's.
    g_s = jax.grad(lambda s: gl.dfad_generator_loss(T_LOGITS, s, None)[0])(S_LOGITS)
    s_s = jax.grad(lambda s: gl.dfad_student_loss(T_LOGITS, (), s, ())[0])(S_LOGITS)
    chex.assert_trees_all_equal(g_s, -s_s)


def test_dafl_terms_equal_their_formulas():
    t = np.asarray(T_LOGITS, np.float64)
    p = np.exp(t) / np.exp(t).sum(1, keepdims=True)
    ce = -np.mean(np.log(p[np.arange(2), t.argmax(1)]))
    np.testing.assert_allclose(gl.one_hot_loss(T_LOGITS), ce, rtol=1e-6)
    pbar = p.mean(0)
    np.testing.assert_allclose(gl.balance_loss(T_LOGITS), np.sum(pbar * np.log(pbar)), rtol=1e-6)
    # Even batch: the negative entropy is at its minimum -log C; one-class batch: 0.
    np.testing.assert_allclose(gl.balance_loss(jnp.zeros((4, 5))), -np.log(5), rtol=1e-6)
    np.testing.assert_allclose(gl.balance_loss(jnp.array([[50.0, 0.0, 0.0]] * 3)), 0.0, atol=1e-6)
    feats = jnp.array([[1.0, -2.0], [0.0, 3.0]])
    np.testing.assert_allclose(gl.activation_loss(feats), -1.5)
    loss, m = gl.make_dafl_generator_loss(oh=1.0, act=0.1, balance=5.0)(T_LOGITS, S_LOGITS, feats)
    np.testing.assert_allclose(loss, ce - 0.1 * 1.5 + 5.0 * np.sum(pbar * np.log(pbar)), rtol=1e-5)
    assert set(m) == {"oh", "act", "balance"}


def test_dafl_generator_loss_has_no_student_dependence():
    fn = gl.make_dafl_generator_loss()
    feats = jnp.ones((2, 4))
    g = jax.grad(lambda s: fn(T_LOGITS, s, feats)[0])(S_LOGITS)
    chex.assert_trees_all_equal(g, jnp.zeros_like(S_LOGITS))
    objective, _ = gl.method_losses("dafl")
    assert not objective.uses_student and objective.uses_penultimate


def test_dafl_student_loss_is_batchmean_kl():
    t, s = np.asarray(T_LOGITS, np.float64), np.asarray(S_LOGITS, np.float64)
    pt = np.exp(t) / np.exp(t).sum(1, keepdims=True)
    ps = np.exp(s) / np.exp(s).sum(1, keepdims=True)
    kl = np.mean(np.sum(pt * np.log(pt / ps), axis=1))
    loss, _ = gl.make_kl_student_loss(1.0)(T_LOGITS, (), S_LOGITS, ())
    np.testing.assert_allclose(loss, kl, rtol=1e-5)


def test_penultimate_features_feed_the_classifier_head():
    model = get_model("wrn16_1", 10)
    variables = init_model(model, jax.random.key(0), (8, 8, 3))
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
    (logits, feats), pen = jax.jit(lambda v, x: gl.penultimate_apply(model)(v, x, train=False))(variables, x)
    assert pen.shape == (3, 64)  # WRN-16-1: the pooled last stage, 64 * k channels with k = 1
    fc = variables["params"]["fc"]
    chex.assert_trees_all_close(pen @ fc["kernel"] + fc["bias"], logits, rtol=1e-5, atol=1e-5)
    ref_logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    chex.assert_trees_all_close(logits, ref_logits, rtol=1e-6, atol=1e-6)


def test_config_validates_method_and_zskt_has_no_defaults_to_change():
    with pytest.raises(ValueError, match="method"):
        ZSKTConfig(method="dfq")
    with pytest.raises(ValueError, match="student_optimizer"):
        ZSKTConfig(student_optimizer="rmsprop")
    assert gl.method_defaults("zskt") == {} and gl.method_losses("zskt") == (None, None)
    for m in ("dfad", "dafl"):
        cfg = method_cfg(m)
        assert cfg.method == m and cfg.beta == 0.0 and cfg.student_optimizer == "sgd"


# --- in the pseudo-batch ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup():
    ds = load_digits(8)
    teacher = get_model(SMOKE_MODEL, 10)  # the smallest WRN: these tests are mostly XLA compiles
    tvars = init_model(teacher, jax.random.key(1), ds.image_shape)
    return ds, teacher, tvars


@pytest.mark.parametrize("method", ["dfad", "dafl"])
def test_sv_at_zero_coef_equals_the_vanilla_method(setup, method):
    """DFAD: one whole pseudo-batch with SV at coefficient 0 is bitwise the vanilla one (as ZSKT,
    tests/test_abd_zskt.py). DAFL: its generator gradient reaches the images only through the
    teacher, the SV penalty's zero-weighted gradient joins that sum and XLA orders it differently;
    Adam's normalized step then turns float32 rounding on near-zero gradient entries into
    lr-sized parameter differences (measured up to 7e-4 on the student after one pseudo-batch),
    so for DAFL the check is on the generator's gradient itself: one generator step with plain
    SGD at lr 1 (parameters minus gradient) and no student steps."""
    import optax

    import abd_jax.kd.zskt_train as zt
    from abd_jax.kd.zskt import make_pseudo_batch

    ds, teacher, tvars = setup
    cfg = method_cfg(method)
    student, generator, vanilla, v_step = build_zskt(teacher, ds, cfg, seed=0, teacher_vars=tvars)
    _, _, sv_state, sv_step = build_zskt(teacher, ds, dataclasses.replace(cfg, sv=True), seed=0, teacher_vars=tvars)
    off = sv_state.replace(hook_state=sv_state.hook_state.replace(coef=jnp.float32(0.0)))
    if method == "dafl":
        sgd = optax.sgd(1.0)
        objective, student_loss = gl.method_losses(method)

        def step(hooks):
            return jax.jit(make_pseudo_batch(teacher, student, generator, zt._student_tx(cfg), sgd,
                                             batch_size=cfg.batch_size, n_student_steps=0, hooks=hooks,
                                             generator_objective=objective, student_loss=student_loss))

        def with_sgd(state):
            return state.replace(generator=state.generator.replace(opt_state=sgd.init(state.generator.params)))

        v_step = step(DFKDHooks())
        sv_step = step(DFKDHooks(generator_penalty=zt.sv_penalty_hook(teacher)))
        vanilla, off = with_sgd(vanilla), with_sgd(off)
    v, vm = jax.jit(v_step)(vanilla, tvars) if method == "dfad" else v_step(vanilla, tvars)
    s0, m0 = jax.jit(sv_step)(off, tvars) if method == "dfad" else sv_step(off, tvars)
    assert float(m0["sv_loss"]) == 0.0
    if method == "dfad":
        chex.assert_trees_all_equal(v.student.params, s0.student.params)
        chex.assert_trees_all_equal(v.generator.params, s0.generator.params)
    else:
        chex.assert_trees_all_close(v.generator.params, s0.generator.params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(v.generator.batch_stats, s0.generator.batch_stats, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(vm["loss_g"], m0["loss_g"], rtol=1e-6)
        assert not all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(v.generator.params),
                                                              jax.tree.leaves(vanilla.generator.params)))
    # The method's own generator metrics survive next to the SV ones.
    expected = {"dfad": {"l1_g", "l1"}, "dafl": {"oh", "act", "balance"}}[method]
    assert expected <= set(vm) and expected <= set(m0)


@pytest.mark.parametrize("method", ["dfad", "dafl"])
def test_generator_step_runs_the_student_only_when_adversarial(setup, method):
    """With no student steps, only the generator step can touch the student: DFAD runs it in
    train mode (its BN statistics move, as in the reference); DAFL's generator never reads it."""
    from abd_jax.kd.zskt import make_pseudo_batch
    import abd_jax.kd.zskt_train as zt

    ds, teacher, tvars = setup
    cfg = method_cfg(method)
    student, generator, state, _ = build_zskt(teacher, ds, cfg, seed=0, teacher_vars=tvars)
    objective, student_loss = gl.method_losses(method)
    step = make_pseudo_batch(teacher, student, generator, zt._student_tx(cfg), zt._generator_tx(cfg),
                             batch_size=cfg.batch_size, n_student_steps=0, generator_objective=objective,
                             student_loss=student_loss)
    new, _ = jax.jit(step)(state, tvars)
    same = all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.student.batch_stats),
                                                     jax.tree.leaves(new.student.batch_stats)))
    assert same == (method == "dafl")
    chex.assert_trees_all_equal(new.student.params, state.student.params)


# DAFL only: SR's objective and transform do not depend on the method (both keep SR's own KL,
# docs/DFAD_DAFL.md), so DFAD's case repeats DAFL's at ~60 s of compile time (suite budget).
@pytest.mark.parametrize("method", ["dafl"])
def test_sr_at_zero_coef_equals_the_plain_resume(setup, method):
    """As tests/test_abd_zskt.py for ZSKT: the SR phase with its coefficient at 0 gives the plain
    resumed run; float tolerance because the SR phase compiles its student step on its own
    (sr_fuse='host'), which XLA may fuse differently from the whole pseudo-batch, and the
    resumed Adam normalizes those rounding differences (up to ~3e-6 measured on DAFL)."""
    import abd_jax.kd.zskt_train as zt

    ds, teacher, tvars = setup
    cfg = method_cfg(method)
    student, generator, state, _ = build_zskt(teacher, ds, cfg, seed=0, teacher_vars=tvars)
    sr_state, sr_step = sr_phase(teacher, student, generator, state, cfg, DFKDHooks())
    off = sr_state.replace(student=sr_state.student.replace(opt_state=set_sr_coef(sr_state.student.opt_state, 0.0)))
    off = jax.tree.map(jnp.copy, off)  # the host-fused step donates its input
    s_off, _ = sr_step(off, tvars)
    s_tx = zt.sr_resume_optimizer(cfg.sr_resume_lr, cfg.sr_pseudo_batches, updates_per_step=cfg.n_student_steps)
    plain = jax.jit(zt._pseudo_batch_fn(teacher, student, generator, s_tx, zt._generator_tx(cfg), cfg, DFKDHooks()))
    plain_state = state.replace(student=state.student.replace(opt_state=s_tx.init(state.student.params)))
    s_plain, _ = plain(plain_state, tvars)
    chex.assert_trees_all_close(s_off.student.params, s_plain.student.params, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(s_off.generator.params, s_plain.generator.params, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["dfad", "dafl"])
def test_distill_runs_each_method_with_sv(setup, method):
    """A whole run per method with SV. DAFL's SR phase runs in
    test_sr_at_zero_coef_equals_the_plain_resume (a separate ~40 s compile, not repeated here)."""
    from abd_jax.attacks import make_trigger
    from abd_jax.kd.zskt_train import distill_zskt
    from abd_jax.pipeline import make_eval_sets

    ds, teacher, tvars = setup
    eval_sets = make_eval_sets(ds, make_trigger("badnets_grid", ds.image_shape[0]), 0)
    cfg = dataclasses.replace(method_cfg(method), sv=True, pseudo_batches=3, sr_pseudo_batches=0, eval_every=1)
    res = distill_zskt(teacher, tvars, ds, eval_sets, cfg)
    assert [h["step"] for h in res.history] == [1, 2, 3]
    assert res.history[-1].get("sr", 0.0) == 0.0
    for h in res.history:
        assert {"acc", "asr", "clean_target_rate"} <= set(h)
        assert all(np.isfinite(v) for v in h.values())
    assert res.samples.shape == (64, 8, 8, 3) and res.suspicion is not None
