"""CMI / DeepInversion (spec 6.2) with the ABD hooks: the inversion losses, the fixed-size pool and
memory bank, one synthesis round, end-to-end smoke runs, SV / SR at coefficient 0 against vanilla,
and exact resume between rounds. Tiny sizes (8x8 digits, WRN-16-1, widths 16): compiling a round
dominates the time, so the vanilla round is compiled once and the XLA cache (conftest.py) serves
the identical programs of later runs."""

from __future__ import annotations

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax.abd.self_retrospection import sr_resume_optimizer
from abd_jax.data.embedded import load_digits
from abd_jax.abd.self_retrospection import set_sr_coef
from abd_jax.kd.cmi import CMIConfig, build_cmi, distill_cmi, make_kd_steps, sr_hooks, sv_report
from abd_jax.kd.common import DFKDHooks
from abd_jax.kd.loop import run_steps
from abd_jax.kd.synthesis import (
    apply_with_bn_taps,
    bank_add,
    bank_negatives,
    bn_loss,
    pool_add,
    pool_sample,
)
from abd_jax.losses import bn_statistics_loss, info_nce
from abd_jax.models import get_model, init_model
from abd_jax.models.cmi_generator import CMIGenerator
from abd_jax.models.initializers import batch_norm, conv
from abd_jax.pipeline import EvalSets
from abd_jax.resume import CheckpointPolicy
from experiments.configs.common import SMOKE_MODEL  # the smallest WRN, as the :smoke configs

CFG = CMIConfig(student=SMOKE_MODEL, rounds=3, g_steps=3, synthesis_batch=8, kd_steps=2, batch_size=8, bank_size=16, negatives=8,
                head_dim=16, z_dim=16, generator_width=16, flip=False, crop_pad=2, eval_every=1,
                sr_rounds=1, sr_fp_iterations=1)


class TinyTeacher(nn.Module):
    """conv-BN-conv-BN classifier: the smallest teacher CMI needs (BN layers for L_BN and the
    features, convs named "conv" for SV); it keeps the compiles of this file short."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(batch_norm(train, "bn1")(conv(8, 3, 1, "conv1")(x)))
        f = conv(8, 3, 2, "conv2")(h)
        h = nn.relu(batch_norm(train, "bn2")(f))
        return nn.Dense(self.num_classes, name="fc")(jnp.mean(h, axis=(1, 2))), (f,)

# Synthesis-only tests: no contrastive term, so a round's first loss does not depend on the bank.
SYN_CFG = dataclasses.replace(CFG, g_steps=12, lr_g=0.05, cr=0.0)


@pytest.fixture(scope="module")
def setup():
    ds = load_digits(8)
    teacher = TinyTeacher()
    tvars = init_model(teacher, jax.random.key(1), ds.image_shape)
    n = 40
    eval_sets = EvalSets(ds.x_test[:n], ds.y_test[:n], ds.x_test[:n], ds.x_test[:n], target=0)
    return ds, teacher, tvars, eval_sets


class OneBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        return batch_norm(False, "bn")(x)


def _count_taps(model, variables) -> int:
    """How many BatchNorm layers `apply_with_bn_taps` reads (traced abstractly, nothing computed)."""
    count = []

    def f(v):
        count.append(len(apply_with_bn_taps(model, v, jnp.zeros((2, 8, 8, 3)))[1]))
        return jnp.zeros(())

    jax.eval_shape(f, variables)
    return count[0]


def _leaves_equal(a, b) -> None:
    def data(t):
        return jax.tree.map(lambda v: jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v, t)

    for x, y in zip(jax.tree.leaves(data(a)), jax.tree.leaves(data(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- losses -----------------------------------------------------------------------------------------


def test_bn_loss_zero_at_running_stats_positive_otherwise(setup):
    _, teacher, tvars, _ = setup
    rng = np.random.default_rng(0)
    m, v = jnp.asarray(rng.normal(size=5)), jnp.asarray(rng.uniform(0.5, 2, size=5))
    assert float(bn_statistics_loss(m, v, m, v)) == 0.0
    assert float(bn_statistics_loss(m + 0.1, v, m, v)) == pytest.approx(0.1 * np.sqrt(5), rel=1e-5)
    assert float(bn_statistics_loss(m, v * 2, m, v)) > 0
    # Through a BN layer: running statistics equal to the batch's own give 0, others a positive loss.
    bn = OneBN()
    x = jax.random.normal(jax.random.key(0), (16, 4, 4, 3)) * 2 + 1
    v = bn.init(jax.random.key(1), x)
    own = {"bn": {"mean": jnp.mean(x, (0, 1, 2)), "var": jnp.var(x, (0, 1, 2))}}
    _, taps = apply_with_bn_taps(bn, {**v, "batch_stats": own}, x)
    assert len(taps) == 1 and float(bn_loss(taps)) < 1e-5  # float32 rounding of the variance
    _, taps = apply_with_bn_taps(bn, v, x)  # initial running stats: mean 0, var 1
    assert float(bn_loss(taps)) > 1
    assert taps[0].instance_mean.shape == (16, 3)
    # Every BatchNorm of a model is read.
    wrn = get_model("wrn16_1", 10)
    wvars = jax.eval_shape(lambda: init_model(wrn, jax.random.key(0), (8, 8, 3)))
    assert _count_taps(wrn, wvars) == 13


def test_info_nce_lower_for_matched_views_than_shuffled():
    key = jax.random.key(0)
    f = jax.random.normal(key, (32, 16))
    f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
    noisy = f + 0.1 * jax.random.normal(jax.random.fold_in(key, 1), f.shape)
    noisy = noisy / jnp.linalg.norm(noisy, axis=-1, keepdims=True)
    matched = float(jnp.mean(info_nce(f, noisy, 0.1)))
    shuffled = float(jnp.mean(info_nce(f, noisy[jax.random.permutation(key, 32)], 0.1)))
    assert matched < 0.5 < shuffled
    # Invalid (unfilled bank) rows give 0 and invalid columns are not negatives.
    valid = jnp.arange(32) < 20
    masked = info_nce(f, noisy, 0.1, valid)
    np.testing.assert_array_equal(np.asarray(masked[20:]), 0.0)
    np.testing.assert_allclose(np.asarray(masked[:20]), np.asarray(info_nce(f[:20], noisy[:20], 0.1)), rtol=1e-5)


def test_pool_and_bank_fill_in_order_and_kd_draws_only_filled_slots():
    pool, count = jnp.zeros((12, 2, 2, 3), jnp.uint8), jnp.zeros((), jnp.int32)
    for i in range(2):
        pool, count = pool_add(pool, count, jnp.full((4, 2, 2, 3), i + 1, jnp.uint8))
    assert int(count) == 8
    np.testing.assert_array_equal(np.asarray(pool[:, 0, 0, 0]), [1] * 4 + [2] * 4 + [0] * 4)
    drawn = pool_sample(jax.random.key(0), pool, count, 500)
    assert set(np.unique(np.asarray(drawn))) == {1, 2}  # never an empty (0) slot
    # The bank: circular writes, negatives only from filled slots, without replacement.
    bank, bc = jnp.zeros((8, 2)), jnp.zeros((), jnp.int32)
    bank, bc = bank_add(bank, bc, jnp.ones((4, 2)))
    neg, valid = bank_negatives(jax.random.key(1), bank, bc, 6)
    assert int(valid.sum()) == 4 and bool(jnp.all(neg[valid] == 1))
    for v in (2, 3):
        bank, bc = bank_add(bank, bc, jnp.full((4, 2), v))
    np.testing.assert_array_equal(np.asarray(bank[:, 0]), [3] * 4 + [2] * 4)  # wrapped around
    neg, valid = bank_negatives(jax.random.key(1), bank, bc, 6)
    assert bool(valid.all())


def test_generator_reset_distribution():
    g = CMIGenerator(z_dim=32, image_size=8, width=64)
    v = jax.jit(g.init)(jax.random.key(0), jnp.zeros((2, 32)))
    p = v["params"]
    assert abs(float(jnp.std(p["fc"]["kernel"])) - 0.02) < 0.002
    assert abs(float(jnp.std(p["bn1"]["scale"])) - 0.02) < 0.01
    assert abs(float(jnp.mean(p["bn1"]["scale"])) - 1.0) < 0.01
    assert float(jnp.max(jnp.abs(p["conv3"]["bias"]))) == 0.0 and "bias" not in p["conv1"]
    x = jax.jit(lambda v, z: g.apply(v, z, train=True, mutable=["batch_stats"])[0])(
        v, jax.random.normal(jax.random.key(1), (4, 32)))
    assert x.shape == (4, 8, 8, 3) and float(x.min()) >= 0 and float(x.max()) <= 1


# ---- one synthesis round ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthesis(setup):
    ds, teacher, tvars, _ = setup
    _, state, _, round_fn = build_cmi(teacher, ds, SYN_CFG, 0, tvars)  # fuse="host": compiles its pieces

    def fn(synth, sv, key):
        return round_fn(synth, tvars, sv, key)

    return state, fn


def test_synthesis_round_reduces_its_loss_and_fills_the_pool(synthesis):
    state, fn = synthesis
    synth, m = fn(state.synth, state.student.variables, jax.random.key(0))
    assert float(m["loss_syn_last"]) < float(m["loss_syn_first"])
    assert float(m["loss_syn"]) <= float(m["loss_syn_last"])  # the stored batch is the round's best
    assert int(synth.pool_count) == 8 and int(synth.bank_count) == 8
    assert np.asarray(synth.pool[:8]).std() > 0 and not np.asarray(synth.pool[8:]).any()


def test_generator_is_reinitialized_each_round(synthesis):
    """With the same round key, a round's first loss is the same whatever rounds came before (cr = 0,
    so the bank does not enter): the generator and z start fresh every round."""
    state, fn = synthesis
    key = jax.random.key(7)
    _, first = fn(state.synth, state.student.variables, key)
    synth = state.synth
    for i in range(2):
        synth, _ = fn(synth, state.student.variables, jax.random.key(i))
    synth, again = fn(synth, state.student.variables, key)
    assert float(again["loss_syn_first"]) == float(first["loss_syn_first"])
    assert int(synth.pool_count) == 24


# ---- end to end -------------------------------------------------------------------------------------


def _run(setup, cfg, checkpoint=None, desc="cmi"):
    ds, teacher, tvars, eval_sets = setup
    return distill_cmi(teacher, tvars, ds, eval_sets, cfg, seed=0, desc=desc, checkpoint=checkpoint)


@pytest.fixture(scope="module")
def vanilla(setup):
    return _run(setup, CFG)


@pytest.mark.parametrize("synthesizer", ["cmi", "deepinversion"])
def test_smoke_end_to_end(setup, synthesizer, vanilla):
    """CMI with fuse="loop" (one jitted round, traced once) against the default "host" run; and
    DeepInversion (host) end to end."""
    ds, teacher, tvars, eval_sets = setup
    if synthesizer == "cmi":
        cfg = dataclasses.replace(CFG, fuse="loop")
    else:
        fields = ("rounds", "g_steps", "synthesis_batch", "kd_steps", "batch_size", "bank_size", "flip", "crop_pad")
        cfg = CMIConfig.deepinversion(**{f: getattr(CFG, f) for f in fields})
    student, state, step, _ = build_cmi(teacher, ds, cfg, 0, tvars)
    chex.clear_trace_counter()
    if cfg.fuse == "loop":
        step = chex.assert_max_traces(step, n=1)
    state, history = run_steps(step, state, tvars, num_steps=cfg.rounds, evaluate=lambda s: {"acc": 0.0},
                               eval_every=1, desc=synthesizer, jit_step=cfg.fuse == "loop")
    assert len(history) == cfg.rounds and int(state.round) == cfg.rounds
    chex.assert_tree_all_finite(state.student.params)
    assert all(np.isfinite(v) for h in history for k, v in h.items() if k.startswith("loss"))
    assert int(state.synth.pool_count) == cfg.rounds * cfg.synthesis_batch
    if synthesizer == "cmi":
        # Round 1 (student at init) synthesizes the same images either way, up to float order.
        diff = np.abs(np.asarray(state.synth.pool[:8], int) - np.asarray(vanilla.state.synth.pool[:8], int))
        assert diff.max() <= 2 and diff.mean() < 0.05
        # distill_cmi's result object.
        assert vanilla.samples.dtype == np.uint8 and vanilla.samples.shape == (24, 8, 8, 3)
        assert {"acc", "asr", "clean_target_rate"} <= set(vanilla.history[-1])
        assert vanilla.suspicion is None and int(vanilla.state.student.step) == CFG.rounds * CFG.kd_steps


def test_sv_at_coef_zero_equals_vanilla_synthesis(setup, synthesis):
    """SV only enters the inversion loss (spec 3.3), so a round with SV at coefficient 0 must store the
    same pool, bank and head as the vanilla round; the KD steps then see the same data."""
    ds, teacher, tvars, eval_sets = setup
    state, fn = synthesis
    cfg = dataclasses.replace(SYN_CFG, sv=True, sv_coef=0.0, sv_layers=2, sv_copies=2)
    _, sv_state, _, sv_round = build_cmi(teacher, ds, cfg, 0, tvars)

    def sv_fn(synth, sv, key, hs):
        return sv_round(synth, tvars, sv, key, hs)

    key = jax.random.key(5)
    ref, ref_m = fn(state.synth, state.student.variables, key)
    out, m = sv_fn(sv_state.synth, sv_state.student.variables, key, sv_state.hook_state)
    # The penalty is computed and multiplied by 0, so every gradient is unchanged; XLA may fuse the
    # extra work differently, hence a float tolerance rather than bitwise equality.
    chex.assert_trees_all_close(out.head.params, ref.head.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(m["loss_syn"], ref_m["loss_syn"], rtol=1e-5)
    assert float(m["sv_coef"]) == 0.0 and "sv_flagged" in m
    assert np.mean(np.asarray(out.pool[:8]) != np.asarray(ref.pool[:8])) < 0.01  # uint8 rounding at most
    report = sv_report(teacher, tvars, sv_state.replace(synth=out), ds, eval_sets)
    assert set(report) == {"synthetic", "clean_test", "triggered_test"}


def test_deepinversion_sv_at_coef_zero_equals_vanilla_synthesis(setup):
    """DeepInversion optimizes the images themselves through the same inversion loss: with SV at
    coefficient 0 its round stores the same images as without SV (SR is the KD phase's, shared with
    CMI and tested above)."""
    ds, teacher, tvars, _ = setup
    fields = ("g_steps", "synthesis_batch", "kd_steps", "batch_size", "bank_size", "flip", "crop_pad", "student")
    cfg = CMIConfig.deepinversion(**{f: getattr(CFG, f) for f in fields})
    _, state, _, di_round = build_cmi(teacher, ds, cfg, 0, tvars)
    sv_cfg = dataclasses.replace(cfg, sv=True, sv_coef=0.0, sv_layers=2, sv_copies=2)
    _, sv_state, _, sv_round = build_cmi(teacher, ds, sv_cfg, 0, tvars)
    key = jax.random.key(7)
    ref, ref_m = di_round(state.synth, tvars, state.student.variables, key)
    out, m = sv_round(sv_state.synth, tvars, sv_state.student.variables, key, sv_state.hook_state)
    chex.assert_trees_all_close(m["loss_syn"], ref_m["loss_syn"], rtol=1e-5)
    assert float(m["sv_coef"]) == 0.0 and "sv_flagged" in m
    assert int(out.pool_count) == int(ref.pool_count) == cfg.synthesis_batch
    assert np.mean(np.asarray(out.pool[:8]) != np.asarray(ref.pool[:8])) < 0.01  # uint8 rounding at most


def test_sr_at_coef_zero_equals_plain_resume(setup, vanilla):
    """SR's KD steps with coef 0 equal the same fresh resume optimizer without SR (spec 4.2), running
    statistics included, and with coef 1 they differ. With coef 1 the BN replay of the SR forwards
    (`sr_bn_replay`, the default) moves only the running statistics: the parameters are those
    without the replay (train-mode BN normalizes with each batch's own statistics)."""
    ds, teacher, tvars, _ = setup
    student = vanilla.student
    state = vanilla.state  # a filled pool

    def kd_fn(hooks):
        return (make_kd_steps(teacher, student, tx, kd_steps=CFG.kd_steps, batch_size=CFG.batch_size,
                                     temperature=CFG.kd_temperature, mean=ds.mean, std=ds.std,
                                     crop_pad=CFG.crop_pad, flip=False, hooks=hooks))

    tx = sr_resume_optimizer(CFG.sr_resume_lr, 1, updates_per_step=CFG.kd_steps, coef=0.0, optimizer="sgd",
                             momentum=0.9, weight_decay=1e-4)
    assert CFG.sr_bn_replay and sr_hooks(teacher, student, CFG).student_sr_stats is not None
    plain, with_sr = kd_fn(DFKDHooks()), kd_fn(sr_hooks(teacher, student, CFG))
    no_replay = kd_fn(sr_hooks(teacher, student, dataclasses.replace(CFG, sr_bn_replay=False)))
    s0 = state.student.replace(opt_state=tx.init(state.student.params))
    ends = {}
    for name, fn, coef in (("plain", plain, 0.0), ("sr0", with_sr, 0.0), ("sr1", with_sr, 1.0),
                           ("sr1_no_replay", no_replay, 1.0)):
        # The SR weight is a leaf of the optimizer state: coef 0 and 1 share one compiled program.
        # Fresh buffers: the host-driven steps donate the student state.
        s = jax.tree.map(jnp.copy, s0.replace(opt_state=set_sr_coef(s0.opt_state, coef)))
        out, m = fn(s, state.synth, tvars, jax.random.key(3))
        chex.assert_tree_all_finite((out.params, m))
        ends[name] = out
    _leaves_equal(ends["sr0"].params, ends["plain"].params)
    _leaves_equal(ends["sr0"].batch_stats, ends["plain"].batch_stats)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ends["sr1"].params),
                                                         jax.tree.leaves(ends["plain"].params)))
    chex.assert_trees_all_close(ends["sr1"].params, ends["sr1_no_replay"].params, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(ends["sr1"].batch_stats),
                                                      jax.tree.leaves(ends["sr1_no_replay"].batch_stats)))
    # A student-made trigger is synthesized inside the SR gradient: nothing to replay with.
    assert sr_hooks(teacher, student, dataclasses.replace(CFG, sr_trigger_model="student")).student_sr_stats is None


def test_resume_between_rounds_is_exact(setup, vanilla, tmp_path):
    class Interrupt(Exception):
        pass

    ds, teacher, tvars, eval_sets = setup
    import abd_jax.kd.cmi as cmi_mod

    real = cmi_mod.run_steps

    def dies_after_round_2(*args, **kwargs):
        def on_step(i, s):
            if i == 1:  # round 2 done; checkpoint at 1 (every=1), the one at 2 not yet written
                raise Interrupt
        return real(*args, on_step=on_step, **kwargs)

    policy = CheckpointPolicy(tmp_path / "ck", every=1)
    cmi_mod.run_steps = dies_after_round_2
    try:
        with pytest.raises(Interrupt):
            _run(setup, CFG, checkpoint=policy)
    finally:
        cmi_mod.run_steps = real
    resumed = _run(setup, CFG, checkpoint=CheckpointPolicy(tmp_path / "ck", every=1, resume=True))
    _leaves_equal(resumed.state.student, vanilla.state.student)
    _leaves_equal(resumed.state.synth, vanilla.state.synth)  # pool, bank and head come back exactly
    assert resumed.history == vanilla.history
