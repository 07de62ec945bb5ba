"""OOD-KD (spec 6.3): the single-image patch source, CutMix, the step, and ABD through the hooks
(with their coefficients at 0 a run equals the plain run; with SV on, flagged samples get a
negative weight)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abd_jax.abd.shuffle_vaccine import init_shuffle_vaccine, make_sample_weights
from abd_jax.attacks import make_trigger
from abd_jax.data.embedded import load_digits
from abd_jax.data.ood import cutmix, cutmix_box, load_source_image, patch_style, prepare_source, sample_patches
from abd_jax.kd.common import DFKDHooks
from abd_jax.kd.ood import OODConfig, build_ood, distill_ood, sr_phase
from abd_jax.models import get_model, init_model
from experiments.configs.common import SMOKE_MODEL  # the smallest WRN, as the :smoke configs
from abd_jax.pipeline import make_eval_sets

CFG = OODConfig(student=SMOKE_MODEL, steps=4, batch_size=8, flip=False, eval_every=2)


@pytest.fixture(scope="module")
def setup():
    ds = load_digits(8)
    teacher = get_model(SMOKE_MODEL, 10)  # the smallest WRN: these tests are mostly XLA compiles
    tvars = init_model(teacher, jax.random.key(1), ds.image_shape)
    eval_sets = make_eval_sets(ds, make_trigger("badnets_grid", 8, 3), 0)
    return ds, teacher, tvars, eval_sets


def test_patches_shape_range_and_styles():
    src = prepare_source(load_source_image("china.jpg"), 8)
    assert src.dtype == np.float32 and min(src.shape[:2]) == 32  # 2 px per patch px over a 0.5 crop
    x = jax.jit(lambda k: sample_patches(k, src, 5, 8))(jax.random.key(0))
    assert x.shape == (5, 8, 8, 3)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(jnp.std(x)) > 0.01  # real image content, not a constant
    for color in ("grey", "edges"):
        y = patch_style(x, color=color, stretch=True)
        np.testing.assert_array_equal(y[..., 0], y[..., 2])  # one channel, replicated
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0 + 1e-6
    np.testing.assert_allclose(patch_style(x, invert=True), 1.0 - x)


def test_identity_view_is_the_resized_image():
    """No rotation / shear, a full crop: a side-8 source comes back unchanged and a side-16 source
    as its 2x2 box average (bilinear sampling at pixel centres)."""
    rng = np.random.default_rng(0)
    kw = dict(init_crop=1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=0.0, shear=0.0, flip=False)
    src8 = rng.random((8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(sample_patches(jax.random.key(3), src8, 2, 8, **kw)[1], src8, atol=1e-5)
    src16 = rng.random((16, 16, 3)).astype(np.float32)
    box = src16.reshape(8, 2, 8, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(sample_patches(jax.random.key(4), src16, 2, 8, **kw)[0], box, atol=1e-5)


def test_bilinear_equals_map_coordinates_reflect_and_letters_page():
    from jax.scipy.ndimage import map_coordinates

    from abd_jax.data.ood import _bilinear, render_letters

    rng = np.random.default_rng(0)
    src = rng.random((9, 13, 3)).astype(np.float32)
    rows = rng.uniform(-12, 20, (50,)).astype(np.float32)
    cols = rng.uniform(-15, 30, (50,)).astype(np.float32)
    ref = np.stack([map_coordinates(src[..., c], [rows, cols], order=1, mode="reflect") for c in range(3)], -1)
    np.testing.assert_allclose(_bilinear(jnp.asarray(src), rows, cols), ref, atol=1e-6)
    page = load_source_image("letters")
    assert page.dtype == np.uint8 and page.shape == (512, 768, 3)
    np.testing.assert_array_equal(page, render_letters())  # deterministic
    assert 0.03 < (page > 127).mean() < 0.5  # strokes on a black background


def test_cutmix_pixels_come_from_one_image_and_box_is_stated():
    x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 3))
    key = jax.random.key(7)
    mixed = cutmix(key, x, 0.25)
    box, perm, lam = cutmix_box(key, 6, 8, 8, 0.25)
    assert 0.0 <= float(lam) <= 1.0 and sorted(np.asarray(perm).tolist()) == list(range(6))
    inside = np.asarray(box)[None, :, :, None]
    np.testing.assert_array_equal(np.where(inside, mixed, 0), np.where(inside, np.asarray(x)[np.asarray(perm)], 0))
    np.testing.assert_array_equal(np.where(inside, 0, mixed), np.where(inside, 0, x))
    # The box is a rectangle: its rows and columns are contiguous ranges.
    rows, cols = np.nonzero(np.asarray(box))
    if rows.size:
        assert rows.size == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    # Across draws some box is non-empty (beta 0.25 puts lam near 0 or 1).
    assert any(bool(cutmix_box(jax.random.key(i), 6, 8, 8)[0].any()) for i in range(20))


def test_missing_or_bad_source_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--config.ood.source"):
        load_source_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="--config.ood.source"):
        load_source_image(bad)
    from PIL import Image

    grey = tmp_path / "g.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(grey)
    img = load_source_image(grey)
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8 and (img[..., 0] == img[..., 2]).all()
    with pytest.raises(ValueError, match="--config.ood.patch_color"):
        OODConfig(patch_color="sepia")
    with pytest.raises(ValueError, match="--config.ood.sv_push_cap"):
        OODConfig(sv_push_cap="hard")


def test_step_runs_finite_once_compiled_and_learns(setup):
    ds, teacher, tvars, _ = setup
    cfg = dataclasses.replace(CFG, batch_size=32, lr=3e-3)
    _, state, step, _ = build_ood(teacher, tvars, ds, cfg, seed=0)
    step = jax.jit(chex.assert_max_traces(step, n=1))
    chex.clear_trace_counter()
    state0 = state
    losses = []
    for _ in range(6):
        state, m = step(state, tvars)
        losses.append(float(m["loss_s"]))
    chex.assert_tree_all_finite(state.student.params)
    assert int(state.step) == 6
    # KD loss on one fixed batch drops after the updates (the random-init student fits the teacher).
    assert np.isfinite(losses).all()
    fixed = state0.replace(step=jnp.zeros((), jnp.int32))
    _, before = step(fixed.replace(student=state0.student), tvars)
    _, after = step(fixed.replace(student=state.student), tvars)
    assert float(after["kl"]) < float(before["kl"])


def test_abd_at_zero_equals_plain_run(setup):
    """distill_ood with sv=True, sv_coef=0 and an SR phase with sr_coef=0 equals the plain run
    (no SV; the last sr_steps take the same optimizer resume without the SR hook), replayed here
    step by step. Compared to float tolerance, not bitwise: the weighted loss mean(1 * l) and the
    SR transform's where(coef != 0, ...) compile to a different XLA program than the plain one,
    whose reductions may round differently."""
    ds, teacher, tvars, es = setup
    cfg = dataclasses.replace(CFG, steps=3, sr_steps=1, sr_rounds=1, sr_fp_iterations=1, eval_every=3)
    abd = distill_ood(teacher, tvars, ds, es, dataclasses.replace(cfg, sv=True, sv_coef=0.0, sr_coef=0.0), seed=0)
    student, state, step, source = build_ood(teacher, tvars, ds, cfg, seed=0)
    step = jax.jit(step)
    for _ in range(cfg.steps - cfg.sr_steps):
        state, _ = step(state, tvars)
    state, resume = sr_phase(teacher, student, state, source, ds, cfg, DFKDHooks(), with_sr=False)
    state, _ = jax.jit(resume)(state, tvars)
    chex.assert_trees_all_close(state.student.params, abd.state.student.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state.student.batch_stats, abd.state.student.batch_stats, rtol=1e-5, atol=1e-6)
    assert [h["step"] for h in abd.history] == [2, 3] and abd.history[-1]["sr"] == 1.0
    assert {"acc", "asr", "clean_target_rate"} <= set(abd.history[-1])
    assert abd.samples.shape == (8, 8, 8, 3) and abd.samples.dtype == np.uint8
    assert set(abd.suspicion) == {"patches", "clean_test", "triggered_test"}


def test_sr_bn_replay_moves_only_the_running_statistics(setup):
    """OOD-KD's SR steps replay the BN running-stat updates of the reference's 4 SR forwards before
    the KD forward (`sr_bn_replay`, the default, as `UnlearnOptimizer.step`): the parameters are
    those without the replay (train-mode BN), the running statistics are not."""
    ds, teacher, tvars, _ = setup
    cfg = dataclasses.replace(CFG, steps=2, sr_steps=2, sr_rounds=1, sr_fp_iterations=1)
    assert cfg.sr_bn_replay
    student, state, _, source = build_ood(teacher, tvars, ds, cfg, seed=0)
    ends = {}
    for replay in (True, False):
        c = dataclasses.replace(cfg, sr_bn_replay=replay)
        s, step = sr_phase(teacher, student, state, source, ds, c, DFKDHooks())
        step = jax.jit(step)
        for _ in range(2):
            s, _ = step(s, tvars)
        ends[replay] = s.student
    chex.assert_trees_all_close(ends[True].params, ends[False].params, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(ends[True].batch_stats),
                                                      jax.tree.leaves(ends[False].batch_stats)))


def test_sv_flagged_sample_gets_negative_weight(setup):
    ds, teacher, tvars, _ = setup
    # With 0 shuffled layers the "shuffled" copies are the teacher itself: every sample's top-1
    # survives the shuffle, so every sample is flagged; mix in kept ones by shuffling the logits.
    sv = init_shuffle_vaccine(jax.random.key(0), tvars, coef=0.1, n_copies=2, n_layers=0)
    weights = make_sample_weights(teacher)
    x = jax.random.normal(jax.random.key(1), (8, *ds.image_shape))
    t = teacher.apply(tvars, x, train=False)[0]
    w_all = weights(t, x, sv)
    assert (np.asarray(w_all) < 0).all()  # all flagged: mean(l) -> -coef * mean(l)
    np.testing.assert_allclose(w_all, -0.1, rtol=1e-6)
    t_mixed = t.at[:4].set(-t[:4])  # top-1 of the first 4 now differs from the copies'
    w = np.asarray(weights(t_mixed, x, sv))
    flagged = np.asarray(jnp.argmax(t_mixed, -1) == jnp.argmax(t, -1))
    assert (w[flagged] < 0).all() and (w[~flagged] > 0).all()
    np.testing.assert_allclose(np.asarray(weights(t_mixed, x, sv.replace(coef=jnp.float32(0.0)))), 1.0)
