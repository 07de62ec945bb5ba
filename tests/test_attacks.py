"""Tests for abd_jax.attacks: triggers (spec 7), poisoning, the ASR set and PGD."""

from __future__ import annotations

import contextlib
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from abd_jax.attacks import (
    TRIGGER_NAMES,
    apply_trigger,
    apply_trigger_np,
    apply_trigger_unclipped,
    is_clean_label,
    make_asr_set,
    make_trigger,
    pgd_perturb,
    poison_training_set,
)

FAST = settings(deadline=None, max_examples=10, derandomize=True)
LOCAL = ("badnets_grid", "badnets_sq", "trojan_3x3", "trojan_8x8", "l0_inv", "cl")
SIZES = (16, 32)


@functools.cache
def _trigger(name: str, size: int, seed: int = 0):
    return make_trigger(name, size, seed=seed)


def _images(seed: int, size: int, n: int = 3, kind: str = "random") -> np.ndarray:
    if kind == "zeros":
        return np.zeros((n, size, size, 3), np.uint8)
    if kind == "full":
        return np.full((n, size, size, 3), 255, np.uint8)
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------ triggers


@FAST
@given(name=st.sampled_from(LOCAL), size=st.sampled_from(SIZES), seed=st.integers(0, 2**16))
def test_local_triggers_leave_pixels_outside_the_mask_untouched(name, size, seed):
    t = _trigger(name, size)
    x = _images(seed, size)
    outside = t.mask[..., 0] == 0
    assert 0 < (~outside).sum() < size * size
    np.testing.assert_array_equal(apply_trigger_np(x, t)[:, outside], x[:, outside])
    out = np.asarray(apply_trigger(x.astype(np.float32), t))
    np.testing.assert_array_equal(out[:, outside], x[:, outside].astype(np.float32))


@FAST
@given(
    name=st.sampled_from(TRIGGER_NAMES),
    size=st.sampled_from(SIZES),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["random", "zeros", "full"]),
)
def test_every_trigger_stays_in_range(name, size, seed, kind):
    t = _trigger(name, size)
    x = _images(seed, size, kind=kind)
    out = apply_trigger(x, t)
    chex.assert_shape(out, x.shape)
    assert out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0
    out_np = apply_trigger_np(x, t)
    assert out_np.dtype == np.uint8 and out_np.shape == x.shape


@pytest.mark.parametrize("name", TRIGGER_NAMES)
def test_triggers_are_deterministic_and_sized(name):
    for size in (8, *SIZES):
        a, b = make_trigger(name, size, seed=3), make_trigger(name, size, seed=3)
        chex.assert_trees_all_equal(a, b)
        chex.assert_shape([a.mask, a.pattern], [(size, size, 1), (size, size, 3)])
        x = _images(1, size)
        np.testing.assert_array_equal(apply_trigger_np(x, a), apply_trigger_np(x, b))
        assert not np.array_equal(apply_trigger_np(x, a), x), "trigger changes nothing"


def test_seed_changes_procedural_triggers_only():
    assert not np.array_equal(
        make_trigger("l2_inv", seed=0).pattern, make_trigger("l2_inv", seed=1).pattern
    )
    chex.assert_trees_all_equal(
        make_trigger("badnets_grid", seed=0), make_trigger("badnets_grid", seed=1)
    )


def _jitted_once():
    # chex counts traces per function across tests, so reset it for each new jitted wrapper.
    chex.clear_trace_counter()
    return jax.jit(chex.assert_max_traces(apply_trigger, n=1))


@pytest.mark.parametrize("name", TRIGGER_NAMES)
def test_jit_matches_host_path_and_traces_once(name):
    t = _trigger(name, 16)
    fn = _jitted_once()
    x = _images(0, 16, n=2)
    out = fn(jnp.asarray(x, jnp.float32), t)
    fn(jnp.asarray(_images(1, 16, n=2), jnp.float32), t)  # same shapes: no retrace
    np.testing.assert_allclose(np.rint(np.asarray(out)), apply_trigger_np(x, t), atol=1)


def test_changing_alpha_does_not_retrace():
    fn = _jitted_once()
    x = jnp.asarray(_images(0, 16), jnp.float32)
    a = fn(x, make_trigger("blend", 16, alpha=0.2))
    b = fn(x, make_trigger("blend", 16, alpha=0.3))
    assert not np.allclose(a, b)


def test_spec7_geometry_at_32():
    zeros = _images(0, 32, n=1, kind="zeros")
    grid = apply_trigger_np(zeros, make_trigger("badnets_grid"))[0, ..., 0]
    np.testing.assert_array_equal(grid[29:, 29:], [[0, 0, 255], [0, 255, 0], [255, 0, 255]])
    assert grid.sum() == 4 * 255
    sq = make_trigger("badnets_sq").mask[..., 0]
    assert sq[27:31, 27:31].all() and sq.sum() == 16
    for name, lo, hi in (("trojan_3x3", 25, 27), ("trojan_8x8", 21, 29)):
        m = make_trigger(name).mask[..., 0]
        assert m[lo : hi + 1, lo : hi + 1].all() and m.sum() == (hi - lo + 1) ** 2
    l0 = make_trigger("l0_inv")
    assert l0.mask[31, 23:, 0].all() and l0.mask.sum() == 9
    assert (l0.pattern[31, 24:].max(-1) > 0).all() and (l0.pattern[31, 23] == 0).all()
    wm = np.argwhere(make_trigger("trojan_wm").pattern.max(-1) > 0)
    assert 300 <= len(wm) <= 340 and wm.min() == 0 and wm.max() == 29
    sig = make_trigger("sig").pattern[0, :, 0]
    np.testing.assert_array_equal(sig[:16], [0] * 4 + [255] * 4 + [0] * 4 + [255] * 4)
    assert make_trigger("l2_inv").pattern.max() == pytest.approx(68.0)
    assert make_trigger("smooth").pattern.max() == pytest.approx(51.0)
    cl = make_trigger("cl").mask[..., 0]
    assert cl.sum() == 36 and cl[:3, :3].all() and cl[-3:, -3:].all()


def test_smooth_renormalizes_each_image():
    x = _images(0, 16, n=2)
    x[1] //= 4  # a dark image still spans [0, 255] after the trigger
    out = np.asarray(apply_trigger(x, _trigger("smooth", 16)))
    np.testing.assert_allclose(out.reshape(2, -1).min(1), 0.0, atol=1e-3)
    np.testing.assert_allclose(out.reshape(2, -1).max(1), 255.0, atol=1e-3)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="known: badnets_grid"):
        make_trigger("badnet")
    with pytest.raises(ValueError, match="image_size=16"):
        apply_trigger(jnp.zeros((1, 16, 16, 3)), _trigger("badnets_grid", 32))
    with pytest.raises(ValueError, match=r"\[B, S, S, C\]"):
        apply_trigger_np(np.zeros((32, 32, 3), np.uint8), _trigger("badnets_grid", 32))
    with pytest.raises(ValueError, match=">= 8"):
        make_trigger("blend", 4)


def test_pattern_files(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[-8:, -8:] = (255, 0, 0, 255)  # an opaque red patch, transparent elsewhere
    png = tmp_path / "patch.png"
    Image.fromarray(rgba, "RGBA").save(png)
    t = make_trigger("badnets_sq", 32, pattern_file=str(png))
    assert t.mode == "stamp" and t.mask.sum() == 16 and t.mask[-4:, -4:].all()
    out = apply_trigger_np(_images(0, 32, n=1, kind="zeros"), t)
    np.testing.assert_array_equal(out[0, -1, -1], [255, 0, 0])

    npy = tmp_path / "blend.npy"
    np.save(npy, np.full((8, 8), 200.0, np.float32))
    t = make_trigger("custom", 16, pattern_file=str(npy), mode="blend", alpha=0.5)
    out = apply_trigger_np(_images(0, 16, n=1, kind="zeros"), t)
    assert (out == 100).all()
    with pytest.raises(ValueError, match="mode"):
        make_trigger("custom", 16, pattern_file=str(npy))
    with pytest.raises(ValueError, match="pattern_file"):
        make_trigger("wanet", 16, pattern_file=str(npy))


# ----------------------------------------------------------------------------------- poisoning


def _dataset(n: int = 200, size: int = 16, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    return _images(seed, size, n=n), rng.integers(0, classes, n).astype(np.int32)


@FAST
@given(
    ratio=st.sampled_from([0.0, 0.05, 0.1, 0.3]),
    holdout=st.sampled_from([0.0, 0.05, 0.2]),
    target=st.integers(0, 9),
)
def test_dirty_label_poisoning_counts_and_relabels(ratio, holdout, target):
    x, y = _dataset()
    t = _trigger("badnets_grid", 16)
    ps = poison_training_set(x, y, t, target=target, num_classes=10, ratio=ratio, holdout=holdout)
    n_hold, n_p = int(np.floor(holdout * 200 + 1e-9)), int(np.floor(ratio * 200 + 1e-9))
    expect = n_hold + np.flatnonzero(y[n_hold:] != target)[:n_p]
    np.testing.assert_array_equal(np.flatnonzero(ps.poisoned), expect)
    assert ps.holdout[:n_hold].all() and not ps.holdout[n_hold:].any()
    np.testing.assert_array_equal(ps.y_train[expect], target)
    np.testing.assert_array_equal(ps.x_train[expect], apply_trigger_np(x[expect], t))
    clean = ~ps.poisoned
    np.testing.assert_array_equal(ps.x_train[clean], x[clean])
    np.testing.assert_array_equal(ps.y_train[clean], y[clean])
    assert len(ps.x_holdout) == n_hold and len(ps.x_split) == 200 - n_hold


@pytest.mark.parametrize("name", ["sig", "cl"])
def test_clean_label_only_touches_target_images(name):
    x, y = _dataset()
    target = 3
    t = _trigger(name, 16)
    assert is_clean_label(name)
    expect_warning = pytest.warns(UserWarning, match="perturb_fn")
    with expect_warning if name == "cl" else contextlib.nullcontext():
        ps = poison_training_set(x, y, t, target=target, num_classes=10, ratio=0.1)
    np.testing.assert_array_equal(ps.y_train, y)
    n_target = int((y[10:] == target).sum())
    assert ps.num_poisoned == min(20, n_target) > 0
    assert (y[ps.poisoned] == target).all() and not ps.poisoned[:10].any()
    np.testing.assert_array_equal(ps.x_train[~ps.poisoned], x[~ps.poisoned])


def _linear_logits(size: int, classes: int = 10):
    w = jax.random.normal(jax.random.key(0), (size * size * 3, classes)) / 100.0
    return lambda x: (x / 255.0).reshape(x.shape[0], -1) @ w


def test_pgd_stays_in_eps_ball_and_range():
    x = jnp.asarray(_images(0, 8, n=4, kind="random"), jnp.float32)
    x = x.at[0].set(0.0).at[1].set(255.0)  # the [0, 255] clip must bind on these
    labels = jnp.array([0, 1, 2, 3])
    logits_fn = _linear_logits(8)
    adv = pgd_perturb(x, labels, logits_fn, eps=16.0, steps=5, key=jax.random.key(1))
    chex.assert_shape(adv, x.shape)
    assert float(jnp.abs(adv - x).max()) <= 16.0 + 1e-4
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 255.0

    def ce(z):
        return -jax.nn.log_softmax(logits_fn(z))[jnp.arange(4), labels].sum()

    assert float(ce(adv)) > float(ce(x))  # it ascends the true-label loss


def test_cl_with_perturb_fn_perturbs_then_stamps():
    x, y = _dataset(size=16)
    t = _trigger("cl", 16)
    fn = functools.partial(
        pgd_perturb, logits_fn=_linear_logits(16), steps=3, key=jax.random.key(0)
    )
    ps = poison_training_set(x, y, t, target=3, num_classes=10, perturb_fn=fn)
    idx = np.flatnonzero(ps.poisoned)
    diff = ps.x_train[idx].astype(int) - x[idx].astype(int)
    inside = t.mask[..., 0] > 0
    assert np.abs(diff[:, ~inside]).max() <= 16 and np.abs(diff[:, ~inside]).max() > 0
    np.testing.assert_array_equal(
        ps.x_train[idx][:, inside], apply_trigger_np(x[idx], t)[:, inside]
    )
    with pytest.raises(ValueError, match="perturb_fn"):
        poison_training_set(
            x, y, _trigger("badnets_grid", 16), target=3, num_classes=10, perturb_fn=fn
        )


def test_target_is_validated():
    x, y = _dataset()
    for bad in (-1, 10):
        with pytest.raises(ValueError, match=r"target must be .* \[0, 10\)"):
            poison_training_set(x, y, _trigger("blend", 16), target=bad, num_classes=10)


def test_asr_set_excludes_target_class():
    x, y = _dataset(n=50)
    t = _trigger("trojan_3x3", 16)
    trig, clean = make_asr_set(x, y, t, target=2)
    keep = y != 2
    assert len(trig) == len(clean) == keep.sum()
    np.testing.assert_array_equal(clean, x[keep])
    np.testing.assert_array_equal(trig, apply_trigger_np(x[keep], t))


@pytest.mark.parametrize("name", ["badnets_grid", "blend", "trojan_wm"])
def test_unclipped_trigger_is_the_formula_without_the_clip(name):
    """apply_trigger_unclipped (for normalized images, experiments.sr_trigger_probe): apply_trigger
    is it clipped to [0, 255], and it is not clipped itself (an additive trigger goes above 255)."""
    t = _trigger(name, 16)
    x = jnp.asarray(_images(0, 16), jnp.float32)
    chex.assert_trees_all_close(jnp.clip(apply_trigger_unclipped(x, t), 0, 255), apply_trigger(x, t), rtol=0, atol=1e-4)
    low = apply_trigger_unclipped(x - 1000.0, t)
    assert float(jnp.min(low)) < -500.0  # untouched pixels keep their out-of-range values
    with pytest.raises(ValueError, match="rebuild it with make_trigger"):
        apply_trigger_unclipped(jnp.zeros((1, 8, 8, 3)), t)
