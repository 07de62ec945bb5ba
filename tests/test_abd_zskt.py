"""ABD wired into ZSKT through the hooks: with its coefficients at 0 a run equals vanilla ZSKT,
and with them on it changes what it should. One compiled step per variant (coefficients are
array leaves in the state, so changing them does not recompile)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax.abd.self_retrospection import set_sr_coef
from abd_jax.data.embedded import load_digits
from abd_jax.kd.common import DFKDHooks
from abd_jax.kd.zskt import mix_in_memory
from abd_jax.kd.zskt_train import ZSKTConfig, build_zskt, memory_pool, sr_phase

from abd_jax.models import get_model, init_model
from experiments.configs.common import SMOKE_MODEL  # the smallest WRN, as the :smoke configs

CFG = ZSKTConfig(student=SMOKE_MODEL, pseudo_batches=4, batch_size=8, n_student_steps=2, generator_width=16,
                 sr_pseudo_batches=2, sr_rounds=2, sr_fp_iterations=2)


@pytest.fixture(scope="module")
def setup():
    ds = load_digits(8)
    teacher = get_model(SMOKE_MODEL, 10)  # the smallest WRN: these tests are mostly XLA compiles
    tvars = init_model(teacher, jax.random.key(1), ds.image_shape)
    return ds, teacher, tvars


def _changed(a, b) -> bool:
    return any(not jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sv_zero_coef_equals_vanilla_and_nonzero_moves_generator(setup):
    ds, teacher, tvars = setup
    _, _, vanilla, v_step = build_zskt(teacher, ds, CFG, seed=0, teacher_vars=tvars)
    _, _, sv_state, sv_step = build_zskt(teacher, ds, dataclasses.replace(CFG, sv=True), seed=0, teacher_vars=tvars)
    v_step, sv_step = jax.jit(v_step), jax.jit(chex.assert_max_traces(sv_step, n=1))
    chex.clear_trace_counter()
    v, _ = v_step(vanilla, tvars)
    off = sv_state.replace(hook_state=sv_state.hook_state.replace(coef=jnp.float32(0.0)))
    s0, m0 = sv_step(off, tvars)
    chex.assert_trees_all_equal(v.student.params, s0.student.params)
    chex.assert_trees_all_equal(v.generator.params, s0.generator.params)
    assert float(m0["sv_loss"]) == 0.0
    on = sv_state.replace(hook_state=sv_state.hook_state.replace(coef=jnp.float32(10.0)))
    s1, m1 = sv_step(on, tvars)  # same compiled function: coef is data
    assert float(m1["sv_loss"]) <= 0.0
    if float(m1["sv_flagged"]) > 0:
        assert _changed(v.generator.params, s1.generator.params)


def test_sv_sharing_the_teachers_prefix_gives_the_same_step(setup):
    """sv_share_teacher (the default): the generator step's teacher forward and the shuffled copies
    share one prefix (DFKDHooks.teacher_and_penalty); the step's values are those of the separate
    teacher forward up to rounding, and giving both penalty hooks is refused."""
    from abd_jax.kd.zskt import make_pseudo_batch

    ds, teacher, tvars = setup
    cfg = dataclasses.replace(CFG, sv=True, sv_coef=10.0)
    runs = {}
    for share in (True, False):
        _, _, state, step = build_zskt(teacher, ds, dataclasses.replace(cfg, sv_share_teacher=share), seed=0,
                                       teacher_vars=tvars)
        assert state.hook_state.split_at is not None  # something to share on the smoke WRN
        runs[share] = jax.jit(step)(state, tvars)
    (shared, m_s), (apart, m_a) = runs[True], runs[False]
    assert float(m_s["sv_flagged"]) > 0 and float(m_s["sv_loss"]) < 0  # the penalty is active
    for k in ("loss_g", "sv_loss", "sv_flagged", "loss_s"):
        np.testing.assert_allclose(m_s[k], m_a[k], rtol=1e-5, atol=1e-6)

    def update(new, old):
        return jnp.concatenate([(a - b).ravel() for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old))])

    # Compared as whole updates: Adam's first step divides each gradient by its own size, so a
    # parameter whose gradient is ~1e-8 (sums that nearly cancel) turns rounding into a visible
    # share of its step; over the whole update that stays at the rounding level.
    for part in ("generator", "student"):
        d_s, d_a = (update(getattr(r, part).params, getattr(state, part).params) for r in (shared, apart))
        assert float(jnp.linalg.norm(d_a)) > 0
        assert float(jnp.linalg.norm(d_s - d_a) / jnp.linalg.norm(d_a)) < 1e-2, part

    hooks = DFKDHooks(generator_penalty=lambda *a: (0.0, {}), teacher_and_penalty=lambda *a: None)
    with pytest.raises(ValueError, match="give generator_penalty alone"):
        make_pseudo_batch(teacher, teacher, teacher, None, None, batch_size=8, z_dim=4, n_student_steps=1, hooks=hooks)


def test_sr_init_scale_reaches_the_trigger_search(setup):
    """ZSKTConfig.sr_init_scale is where the teacher-made trigger starts (0: the spec's zero)."""
    from abd_jax.kd.zskt_train import sr_hook

    ds, teacher, tvars = setup
    x = jax.random.normal(jax.random.key(0), (4, *ds.image_shape))
    starts = {}
    for scale in (0.0, 1e-3):
        _, prepare, _ = sr_hook(teacher, teacher, dataclasses.replace(CFG, sr_init_scale=scale, sr_rounds=0))
        starts[scale] = prepare(tvars, x)
    assert float(jnp.max(jnp.abs(starts[0.0]))) == 0.0
    assert 0.0 < float(jnp.std(starts[1e-3])) < 2e-3


def test_sr_fresh_starts_draw_each_batch_its_own_trigger_start(setup):
    """sr_fresh_starts: the trigger search starts from the batch key's random draw (different per
    batch); without it every batch starts from the same fixed draw, whatever the key."""
    from abd_jax.kd.zskt_train import sr_hook

    ds, teacher, tvars = setup
    x = jax.random.normal(jax.random.key(0), (4, *ds.image_shape))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    starts = {}
    for fresh in (False, True):
        cfg = dataclasses.replace(CFG, sr_init_scale=1e-3, sr_rounds=0, sr_fresh_starts=fresh)
        _, prepare, _ = sr_hook(teacher, teacher, cfg)
        a, b, again, keyless = (prepare(tvars, x, k1), prepare(tvars, x, k2), prepare(tvars, x, k1),
                                prepare(tvars, x))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(again))
        assert bool(jnp.any(a != b)) == fresh
        starts[fresh] = (a, keyless)
    # Without fresh starts every batch gets the fixed start that a call without a key gets.
    np.testing.assert_array_equal(np.asarray(starts[False][0]), np.asarray(starts[False][1]))
    np.testing.assert_array_equal(np.asarray(starts[True][1]), np.asarray(starts[False][1]))
    assert bool(jnp.any(starts[True][0] != starts[False][0]))


def test_sr_zero_coef_equals_plain_resume_and_nonzero_differs(setup):
    ds, teacher, tvars = setup
    student, generator, state, _ = build_zskt(teacher, ds, CFG, seed=0, teacher_vars=tvars)
    sr_state, sr_step = sr_phase(teacher, student, generator, state, CFG, DFKDHooks())
    sr_step = jax.jit(sr_step)
    off = sr_state.replace(student=sr_state.student.replace(opt_state=set_sr_coef(sr_state.student.opt_state, 0.0)))
    s_off, _ = sr_step(off, tvars)
    s_on, _ = sr_step(sr_state, tvars)
    chex.assert_tree_all_finite(s_on.student.params)
    # The same resumed optimizer with no SR hook at all: the plain (vanilla) resumed run.
    plain_state, _ = sr_phase(teacher, student, generator, state, CFG, DFKDHooks())
    import abd_jax.kd.zskt_train as zt

    s_tx = zt.sr_resume_optimizer(CFG.sr_resume_lr, CFG.sr_pseudo_batches, updates_per_step=CFG.n_student_steps)
    g_tx = zt._generator_tx(CFG)
    plain = jax.jit(zt._pseudo_batch_fn(teacher, student, generator, s_tx, g_tx, CFG, DFKDHooks()))
    s_plain, _ = plain(plain_state, tvars)
    chex.assert_trees_all_close(s_off.student.params, s_plain.student.params, rtol=1e-6, atol=1e-7)
    # SR off: no BN replay either, so the running statistics are the plain run's too.
    chex.assert_trees_all_close(s_off.student.batch_stats, s_plain.student.batch_stats, rtol=1e-6, atol=1e-7)
    assert _changed(s_off.student.params, s_on.student.params)


def test_mix_in_memory_replaces_the_batch_tail_by_distinct_memory_rows():
    x = jnp.arange(8.0)[:, None, None, None] * jnp.ones((8, 2, 2, 1))
    memory = 100.0 + jnp.arange(12.0)[:, None, None, None] * jnp.ones((12, 2, 2, 1))
    key = jax.random.key(0)
    chex.assert_trees_all_equal(mix_in_memory(x, memory, key, 0.0), x)
    for share, n in ((0.5, 4), (0.3, 2), (1.0, 8)):
        mixed = mix_in_memory(x, memory, key, share)
        chex.assert_shape(mixed, x.shape)
        chex.assert_trees_all_equal(mixed[: 8 - n], x[: 8 - n])  # the generator's rows, in order
        rows = mixed[8 - n:, 0, 0, 0]
        assert bool(jnp.all(rows >= 100.0)) and len(set(rows.tolist())) == n  # from the memory, no repeats


def test_memory_pool_spreads_fresh_generator_samples_over_the_run(setup):
    ds, teacher, tvars = setup
    cfg = dataclasses.replace(CFG, sr_memory=10)
    _, generator, state, _ = build_zskt(teacher, ds, cfg, seed=0, teacher_vars=tvars)
    assert memory_pool(generator, dataclasses.replace(cfg, sr_memory=0), 0, 0, 2, state.generator) == (None, None)
    pool, collect = memory_pool(generator, cfg, 0, 1, 5, state.generator)
    assert pool["x"].shape == (10, *ds.image_shape)
    collect(0, state)  # before `start`: nothing pooled
    assert not pool["x"].any()
    filled = []
    for i in range(1, 5):  # after pseudo-batch i, rows [10 (i-1) / 4, 10 i / 4) = 2 or 3 rows
        collect(i, state)
        filled.append(int(np.abs(pool["x"]).reshape(10, -1).sum(1).astype(bool).sum()))
    assert filled == [2, 5, 7, 10]
    # Fresh samples, each pseudo-batch from its own key: no two rows repeat.
    assert len({r.tobytes() for r in pool["x"]}) == 10


def test_sr_memory_changes_only_the_student_batches(setup):
    """An SR pseudo-batch with a memory: the generator step (first, on G(z) alone) is the one
    without; the student steps then see memory rows, so the student differs. Share 0 (or no
    memory) is the run without one, bit for bit."""
    ds, teacher, tvars = setup
    cfg = dataclasses.replace(CFG, sr_memory=8, sr_memory_share=0.5)
    student, generator, state, _ = build_zskt(teacher, ds, cfg, seed=0, teacher_vars=tvars)
    memory = np.asarray(jax.random.normal(jax.random.key(7), (8, *ds.image_shape)))
    runs = {}
    for name, c, mem in (("none", cfg, None), ("share0", dataclasses.replace(cfg, sr_memory_share=0.0), memory),
                         ("memory", cfg, memory)):
        s, step = sr_phase(teacher, student, generator, state, c, DFKDHooks(), memory=mem)
        runs[name], _ = jax.jit(step)(s, tvars)
    chex.assert_trees_all_equal(runs["share0"].student.params, runs["none"].student.params)
    chex.assert_trees_all_equal(runs["memory"].generator.params, runs["none"].generator.params)
    assert _changed(runs["memory"].student.params, runs["none"].student.params)
    chex.assert_trees_all_equal(runs["memory"].memory, jnp.asarray(memory))  # carried in the state


def test_a_run_with_an_sr_memory_pools_it_over_the_main_run_and_hands_it_to_the_sr_phase(setup):
    from abd_jax.attacks import make_trigger
    from abd_jax.kd.zskt_train import distill_zskt_branches
    from abd_jax.pipeline import make_eval_sets

    ds, teacher, tvars = setup
    eval_sets = make_eval_sets(ds, make_trigger("badnets_grid", ds.image_shape[0]), 0)
    cfg = dataclasses.replace(CFG, sr_memory=8, sr_memory_share=0.5)
    res = distill_zskt_branches(teacher, tvars, ds, eval_sets, cfg, endings=("plain", "sr"))
    assert res["plain"].state.memory is None  # the plain ending never sees it
    memory = np.asarray(res["sr"].state.memory)
    assert memory.shape == (8, *ds.image_shape) and len({r.tobytes() for r in memory}) == 8
    assert np.isfinite(memory).all() and np.abs(memory).reshape(8, -1).sum(1).all()  # every row filled
    assert [h["step"] for h in res["sr"].history][-1] == cfg.pseudo_batches


def test_sr_bn_replay_moves_only_the_running_statistics(setup):
    """sr_bn_replay (the default): the reference's SR forwards move the BN running averages before the KD forward
    (spec 4.1). Train-mode BN normalizes with each batch's own statistics, so the parameters are those
    of the run without the replay (up to rounding); only the running statistics differ."""
    from abd_jax.kd.zskt_train import sr_hook

    ds, teacher, tvars = setup
    student, generator, state, _ = build_zskt(teacher, ds, CFG, seed=0, teacher_vars=tvars)
    assert CFG.sr_bn_replay and sr_hook(teacher, student, CFG)[2] is not None
    ends = {}
    for replay in (False, True):
        cfg = dataclasses.replace(CFG, sr_bn_replay=replay)
        sr_state, sr_step = sr_phase(teacher, student, generator, state, cfg, DFKDHooks())
        ends[replay], _ = jax.jit(sr_step)(sr_state, tvars)
    chex.assert_trees_all_close(ends[True].student.params, ends[False].student.params, rtol=1e-5, atol=1e-6)
    assert _changed(ends[True].student.batch_stats, ends[False].student.batch_stats)
    # No replay with a student-made trigger (it is synthesized inside the SR gradient).
    assert sr_hook(teacher, student, dataclasses.replace(CFG, sr_trigger_model="student"))[2] is None


def test_sr_prepared_teacher_trigger_equals_one_call_retrospect(setup):
    """ZSKT synthesizes the teacher's trigger once per pseudo-batch (`student_sr_prepare`) and
    reuses it for the 10 student steps; that must equal `retrospect` synthesizing it per step."""
    from abd_jax.abd.self_retrospection import retrospect, train_mode_apply
    from abd_jax.kd.zskt_train import sr_hook

    ds, teacher, tvars = setup
    student, _, state, _ = build_zskt(teacher, ds, CFG, seed=0, teacher_vars=tvars)
    student_sr, prepare, _ = sr_hook(teacher, student, CFG)
    assert prepare is not None
    x = jax.random.normal(jax.random.key(5), (CFG.batch_size, *ds.image_shape))
    key = jax.random.key(6)
    s_vars = state.student.variables
    split = jax.jit(lambda v, t, x: student_sr(v, t, x, key, prepare(t, x)))(s_vars, tvars, x)

    def one_call(v, t, x):
        return retrospect(train_mode_apply(student), v, x, key,
                          trigger_logits_fn=lambda i: teacher.apply(t, i, train=False)[0],
                          rounds=CFG.sr_rounds, pert_lr=CFG.sr_pert_lr, trigger_l2=CFG.sr_l2,
                          portion=CFG.sr_portion, fp_iterations=CFG.sr_fp_iterations, l2=CFG.sr_l2,
                          temperature=CFG.temperature)[0]

    whole = jax.jit(one_call)(s_vars, tvars, x)
    chex.assert_trees_all_close(split, whole, rtol=1e-5, atol=1e-7)
    # With the student as trigger model there is nothing to prepare.
    assert sr_hook(teacher, student, dataclasses.replace(CFG, sr_trigger_model="student"))[1] is None


@pytest.mark.parametrize("threshold", [2.0, -1.0], ids=["vaccine_rejected", "vaccine_accepted"])
def test_ablation_shares_the_warm_up_and_matches_a_standalone_sv_run(setup, threshold):
    """`distill_zskt_ablation` with verification runs the SV warm-up (coefficient 0) as the vanilla
    run's first P pseudo-batches. A tail ratio is at most 1, so threshold 2 rejects every shuffle
    and -1 accepts the first: either way the SV rows must match a standalone ZSKT+SV run (warm-up
    with SV off, then the tail-ratio test, spec 3.4), which ends with a suspicion report."""
    from abd_jax.attacks import make_trigger
    from abd_jax.kd.zskt_train import distill_zskt_ablation, distill_zskt_branches
    from abd_jax.pipeline import make_eval_sets

    ds, teacher, tvars = setup
    eval_sets = make_eval_sets(ds, make_trigger("badnets_grid", ds.image_shape[0]), 0)
    # No SR phase here (it has its own tests): the SR rows are then left out.
    cfg = dataclasses.replace(CFG, sr_pseudo_batches=0, sv_verify_after=2, sv_verify_threshold=threshold)
    rows = distill_zskt_ablation(teacher, tvars, ds, eval_sets, cfg)
    assert set(rows) == {"zskt", "zskt+sv"}
    accepted = threshold < 0
    log = rows["zskt+sv"].sv_verification
    assert [r["passed"] for r in log] == ([True] if accepted else [False] * 8)
    assert log[0]["n"] == CFG.batch_size  # pooled after pseudo-batch 2 (index >= min(11, P - 1))
    sv = rows["zskt+sv"].state.hook_state
    assert bool(sv.tested) and int(sv.trials) == len(log)
    # Passed: SV on at its preset; failed all 8 shuffles: off for good (spec 3.4 step 3).
    assert float(sv.coef) == np.float32(CFG.sv_coef if accepted else 0.0)
    assert [r["step"] for r in rows["zskt+sv"].history][-1] == cfg.pseudo_batches
    rep = rows["zskt+sv"].suspicion
    assert set(rep) == {"synthetic", "clean_test", "triggered_test"}
    assert rep["synthetic"]["mask"].shape == (256,)
    assert rep["clean_test"]["divergence"].shape == (len(eval_sets.x_test),)
    for r in rep.values():
        assert r["mask"].dtype == bool and np.all(np.isfinite(r["divergence"]))
        np.testing.assert_array_equal(r["mask"], r["teacher_pred"] == r["shuffled_pred"])
    assert rows["zskt"].sv_verification is None and rows["zskt"].state.hook_state is None
    # The shared warm-up: both runs report the same first evaluations.
    assert rows["zskt+sv"].history[0] == rows["zskt"].history[0]
    alone = distill_zskt_branches(teacher, tvars, ds, eval_sets, dataclasses.replace(cfg, sv=True),
                                  endings=("plain",))["plain"]
    chex.assert_trees_all_close(rows["zskt+sv"].state.student.params, alone.state.student.params,
                                rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(rows["zskt+sv"].state.generator.params, alone.state.generator.params,
                                rtol=1e-5, atol=1e-6)
    if not accepted:  # a rejected vaccine: the SV rows are the vanilla rows
        chex.assert_trees_all_equal(rows["zskt+sv"].state.student.params, rows["zskt"].state.student.params)
    else:
        assert _changed(rows["zskt+sv"].state.generator.params, rows["zskt"].state.generator.params)


def test_sv_probe_smoke_reports_each_layer_count(tmp_path):
    """`experiments.sv_probe --smoke`: one row per layer count, appended to DIR/sv_probe.jsonl. With
    0 layers the "shuffled" copies are the teacher, so every sample is flagged; a row passes
    exactly when a trial's tail ratio is above the 2% threshold, and the trials stop there."""
    import json

    from experiments import sv_probe

    rows = sv_probe.main(["--workdir", str(tmp_path), "--smoke", "--seed", "1", "--layers", "0", "1"])
    assert [r["sv_layers"] for r in rows] == [0, 1]
    assert set(rows[0]["flagged_pct"].values()) == {100.0}
    assert all(0.0 <= v <= 100.0 for v in rows[1]["flagged_pct"].values())
    for r in rows:
        tails = r["tail_ratios_pct"]
        assert r["passed"] == (tails[-1] > 2.0) and all(t <= 2.0 for t in tails[:-1])
        assert r["passed"] or len(tails) == 8  # a rejected vaccine used every trial
    saved = [json.loads(line) for line in (tmp_path / "sv_probe.jsonl").read_text().splitlines()]
    assert saved == rows
