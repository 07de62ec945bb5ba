"""Backdoor triggers of spec 7, generated procedurally, plus WaNet; pure and jittable to apply.

Every trigger is a `Trigger` pytree: arrays (mask, pattern, alpha, optional warp coordinates) plus
static fields (name, mode). `apply_trigger` turns a batch of pixel-space images [B, S, S, C] in
[0, 255] into triggered images with one formula per mode, then clips to [0, 255] (spec 7: "the
trigger is applied in pixel space, then the image is clipped").

The paper's trigger image files are not all public, so each pattern is rebuilt from its description
in spec 7 (docs/ATTACKS.md lists how each one differs). Patterns are deterministic: the same
(name, image_size, channels, seed) always gives the same arrays.

Scaling rule for image sizes S != 32 (the paper's triggers are defined on 32x32):
  * Local patches (badnets_grid, badnets_sq, trojan_3x3, trojan_8x8, l0_inv, cl) keep their shape
    in "cells" of c = max(1, S // 32) pixels (so the 3x3 grid stays a 3x3 grid at S = 16 and becomes
    6x6 pixels at S = 64) and stay anchored to the bottom-right corner (cl: every corner). Their
    margin from the corner scales with the image: round(margin_at_32 * S / 32) pixels, shrunk if the
    patch would not fit; a patch larger than the image (trojan_8x8, l0_inv at S = 8) is cropped to
    the part nearest the corner.
  * Global patterns (blend, sig, trojan_wm, smooth, wanet) are functions of continuous coordinates
    sampled at S, so they scale proportionally (sig keeps 4 stripes per 32 px, i.e. period 8 * S / 32).
  * l2_inv is i.i.d. noise drawn at S directly (it has no spatial structure to preserve).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from PIL import Image

# Public names, exactly as in spec 7 (plus WaNet, which is beyond the paper).
TRIGGER_NAMES: tuple[str, ...] = (
    "badnets_grid",
    "badnets_sq",
    "blend",
    "trojan_3x3",
    "trojan_8x8",
    "trojan_wm",
    "sig",
    "l0_inv",
    "l2_inv",
    "smooth",
    "cl",
    "wanet",
)
MODES: tuple[str, ...] = ("stamp", "blend", "additive", "smooth", "warp")
_FILE_MODES = ("stamp", "blend", "additive", "smooth")  # modes a pattern image can define

_BASE = 32  # the image size at which spec 7 defines every trigger
_MIN_SIZE = 8


@struct.dataclass
class Trigger:
    """Everything `apply_trigger` needs; a pytree whose array leaves may be numpy or jax arrays.

    Attributes:
      mask: float32 [S, S, 1] in [0, 1]: where the trigger acts (stamp/blend: the replacement
        weight; additive/smooth: the support of `pattern`; warp: all ones).
      pattern: float32 [S, S, C] in pixel units (stamp/blend: the image pasted or blended in;
        additive/smooth: the offset added; warp: zeros).
      alpha: float32 scalar: blend weight (stamp: 1, blend/sig: 0.2). An array leaf, so changing it
        does not recompile a jitted step.
      warp: float32 [S, S, 2] (row, col) pixel coordinates to sample from, or None (warp mode only).
      name: the trigger's name (static).
      mode: one of MODES (static): selects the formula in `apply_trigger`.
    """

    mask: Any
    pattern: Any
    alpha: Any
    warp: Any = None
    name: str = struct.field(pytree_node=False, default="custom")
    mode: str = struct.field(pytree_node=False, default="stamp")

    @property
    def image_size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def channels(self) -> int:
        return int(self.pattern.shape[-1])


# --------------------------------------------------------------------------------------------
# Applying a trigger: one shared implementation over numpy or jax.numpy (`xp`), so the jittable
# `apply_trigger` and the host-side `apply_trigger_np` cannot drift apart.


def _check_shapes(shape: tuple[int, ...], trigger: Trigger) -> None:
    """Raises a ValueError naming the fix when images [B, S, S, C] do not fit the trigger."""
    if len(shape) != 4:
        raise ValueError(f"images must be a batch [B, S, S, C], got shape {tuple(shape)}")
    s, c = trigger.image_size, trigger.channels
    if tuple(shape[1:]) != (s, s, c):
        h, w, ch = shape[1:]
        raise ValueError(
            f"trigger {trigger.name!r} was built for {s}x{s}x{c} images but the images are "
            f"{h}x{w}x{ch}; rebuild it with make_trigger({trigger.name!r}, image_size={h}, "
            f"channels={ch})"
        )


def _bilinear(xp: Any, x: Any, coords: Any) -> Any:
    """Samples x [B, S, S, C] at float pixel coords [S, S, 2] (already inside the image)."""
    s = x.shape[1]
    r, c = coords[..., 0], coords[..., 1]
    r0 = xp.clip(xp.floor(r), 0, s - 1).astype(xp.int32)
    c0 = xp.clip(xp.floor(c), 0, s - 1).astype(xp.int32)
    r1, c1 = xp.minimum(r0 + 1, s - 1), xp.minimum(c0 + 1, s - 1)
    wr, wc = (r - r0)[..., None], (c - c0)[..., None]
    top = x[:, r0, c0] * (1 - wc) + x[:, r0, c1] * wc
    bottom = x[:, r1, c0] * (1 - wc) + x[:, r1, c1] * wc
    return top * (1 - wr) + bottom * wr


def _apply(xp: Any, x: Any, t: Trigger) -> Any:
    """The trigger formulas of spec 7, on float32 pixel-space x [B, S, S, C]; returns unclipped."""
    if t.mode in ("stamp", "blend"):
        # stamp = blend with alpha 1; outside the mask the weight is exactly 0, so x is untouched.
        return x + (t.alpha * t.mask) * (t.pattern - x)
    if t.mode == "additive":
        return x + t.mask * t.pattern
    if t.mode == "smooth":
        # spec 7 Smooth: add, then min-max renormalize each image (over H, W and C) to [0, 255].
        y = x + t.mask * t.pattern
        lo = y.min(axis=(1, 2, 3), keepdims=True)
        span = y.max(axis=(1, 2, 3), keepdims=True) - lo
        return xp.where(span > 0, (y - lo) / xp.maximum(span, 1e-6) * 255.0, y)
    if t.mode == "warp":
        return _bilinear(xp, x, t.warp)
    raise ValueError(f"unknown trigger mode {t.mode!r}; expected one of {MODES}")


def apply_trigger(images: jax.Array, trigger: Trigger) -> jax.Array:
    """Applies `trigger` to a batch; pure and jittable.

    Args:
      images: float (or uint8) [B, S, S, C] in pixel units [0, 255].
      trigger: from `make_trigger`, built for the same S and C.
    Returns:
      float32 [B, S, S, C] clipped to [0, 255].
    """
    _check_shapes(tuple(images.shape), trigger)
    x = jnp.asarray(images, jnp.float32)
    return jnp.clip(_apply(jnp, x, trigger), 0.0, 255.0)


def apply_trigger_unclipped(x: jax.Array, trigger: Trigger) -> jax.Array:
    """The trigger's formula on `x` without the clip to [0, 255]: for images that are not in pixel
    units (normalized generator samples), with `trigger.pattern` given in the same units as `x`
    (e.g. normalized too). For stamp and blend triggers this is affine in `x`; pure and jittable."""
    _check_shapes(tuple(x.shape), trigger)
    return _apply(jnp, jnp.asarray(x, jnp.float32), trigger)


def apply_trigger_np(images: np.ndarray, trigger: Trigger, *, chunk: int = 4096) -> np.ndarray:
    """Host-side `apply_trigger` for dataset preparation: uint8 in, uint8 out (rounded).

    Args:
      images: uint8 [B, S, S, C].
      trigger: from `make_trigger`, built for the same S and C.
      chunk: images per float32 chunk (bounds the host memory used).
    Returns:
      uint8 [B, S, S, C]: the triggered images, clipped to [0, 255] and rounded to nearest.
    """
    _check_shapes(tuple(images.shape), trigger)
    dtype = np.asarray(images).dtype
    if dtype != np.uint8:
        raise ValueError(
            f"apply_trigger_np takes uint8 pixel images in [0, 255], got {dtype}; convert images "
            "in [0, 1] with np.rint(x * 255).astype(np.uint8), or use apply_trigger for float "
            "images in [0, 255]"
        )
    t = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), trigger)
    out = np.empty(images.shape, np.uint8)
    for i in range(0, len(images), chunk):
        y = _apply(np, images[i : i + chunk].astype(np.float32), t)
        out[i : i + chunk] = np.rint(np.clip(y, 0.0, 255.0)).astype(np.uint8)
    return out


# --------------------------------------------------------------------------------------------
# Building the patterns (host side, numpy, float32).


def _rng(name: str, seed: int) -> np.random.Generator:
    # Mixing in the name gives every trigger its own stream for the same seed.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _cell(s: int) -> int:
    return max(1, s // _BASE)


def _grid32(s: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in 32x32-canvas units, [S, 1] rows and [1, S] cols (for global patterns)."""
    t = (np.arange(s, dtype=np.float64) + 0.5) * _BASE / s - 0.5
    return t[:, None], t[None, :]


def _stamp_into(
    mask: np.ndarray, pattern: np.ndarray, patch: np.ndarray, margin32: int, corner: str = "br"
) -> None:
    """Writes a patch (in cells, [h, w, C]) into [S, S, *] arrays near a corner, in place.

    The patch is enlarged by the cell size c = max(1, S // 32); its distance from the corner is
    round(margin32 * S / 32) pixels, shrunk to fit; a patch larger than the image is cropped to the
    part nearest the corner (module docstring: scaling rule).
    """
    s = mask.shape[0]
    c = _cell(s)
    big = np.repeat(np.repeat(patch, c, axis=0), c, axis=1)
    h, w = big.shape[:2]
    m = int(np.floor(margin32 * s / _BASE + 0.5))
    mr, mc = max(0, min(m, s - h)), max(0, min(m, s - w))
    bottom, right = "b" in corner, "r" in corner
    # The patch's far edge (the one facing the corner) sits `m` pixels from that corner.
    r1 = s - mr if bottom else mr + h
    c1 = s - mc if right else mc + w
    r0, c0 = r1 - h, c1 - w
    sr, sc = slice(max(r0, 0), min(r1, s)), slice(max(c0, 0), min(c1, s))
    pr = slice(sr.start - r0, sr.stop - r0)
    pc = slice(sc.start - c0, sc.stop - c0)
    pattern[sr, sc] = big[pr, pc]
    mask[sr, sc] = 1.0


def _empty(s: int, ch: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((s, s, 1), np.float32), np.zeros((s, s, ch), np.float32)


def _colours(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Saturated, strictly non-zero colours, so the support of an additive patch is its full extent.
    return rng.integers(64, 256, size=shape).astype(np.float32)


# spec 7 BadNets-grid: rows 29-31 x cols 29-31, one value on every channel.
_GRID = np.array([[0, 0, 255], [0, 255, 0], [255, 0, 255]], np.float32)


def _badnets_grid(s: int, ch: int, rng: np.random.Generator) -> tuple:
    mask, pat = _empty(s, ch)
    _stamp_into(mask, pat, np.repeat(_GRID[..., None], ch, -1), 0)
    return "stamp", mask, pat, 1.0, None


def _badnets_sq(s: int, ch: int, rng: np.random.Generator) -> tuple:
    # spec 7: white 4x4 square at rows/cols 27-30, i.e. a 1-pixel margin from the corner.
    mask, pat = _empty(s, ch)
    _stamp_into(mask, pat, np.full((4, 4, ch), 255.0, np.float32), 1)
    return "stamp", mask, pat, 1.0, None


def _cl(s: int, ch: int, rng: np.random.Generator) -> tuple:
    # spec 7 CL: the BadNets grid in all four corners. The reference code writes the same
    # (translated, not reflected) 3x3 pattern in each corner; we follow the code (docs/ATTACKS.md).
    mask, pat = _empty(s, ch)
    patch = np.repeat(_GRID[..., None], ch, -1)
    for corner in ("br", "bl", "tl", "tr"):
        _stamp_into(mask, pat, patch, 0, corner)
    return "stamp", mask, pat, 1.0, None


def _trojan(extent: int, margin32: int) -> Callable[..., tuple]:
    """spec 7 Trojan 3x3 (rows/cols 25-27) and 8x8 (rows/cols 21-29): additive colour patches."""

    def build(s: int, ch: int, rng: np.random.Generator) -> tuple:
        mask, pat = _empty(s, ch)
        _stamp_into(mask, pat, _colours(rng, (extent, extent, ch)), margin32)
        return "additive", mask, pat, 1.0, None

    return build


def _trojan_wm(s: int, ch: int, rng: np.random.Generator) -> tuple:
    """spec 7 Trojan WM: a noisy additive ring, bbox rows/cols 0-29, brighter to the bottom-right.

    An annulus of radii [11.1, 15) around (14.5, 14.5) in 32-canvas units covers 324 pixels at
    32x32 (spec: 321), bbox rows/cols 0-29; its brightness ramps from 35% at the top-left to 100% at
    the bottom-right, times per-pixel noise in [0.5, 1], up to 200 (the file's scale is unknown).
    """
    r, c = _grid32(s)
    d = np.hypot(r - 14.5, c - 14.5)
    ring = ((d >= 11.1) & (d < 15.0)).astype(np.float32)
    ramp = 0.35 + 0.65 * np.clip((r + c) / 58.0, 0.0, 1.0)
    noise = rng.uniform(0.5, 1.0, size=(s, s, ch))
    pat = (200.0 * ramp[..., None] * noise * ring[..., None]).astype(np.float32)
    return "additive", ring[..., None], pat, 1.0, None


def _blend(s: int, ch: int, rng: np.random.Generator) -> tuple:
    """spec 7 Blend: 0.8 x + 0.2 image. Ours: a colourful sum of three plane waves per channel."""
    u, v = _grid32(s)
    u, v = u / _BASE, v / _BASE  # continuous coordinates in [0, 1): the pattern scales with S
    acc = np.zeros((s, s, ch))
    for k in range(ch):
        for _ in range(3):
            fr, fc = rng.integers(1, 5, size=2)
            acc[..., k] += np.sin(2 * np.pi * (fr * u + fc * v) + rng.uniform(0, 2 * np.pi))
    pat = (acc / 3.0 + 1.0) * 127.5
    return "blend", np.ones((s, s, 1), np.float32), pat.astype(np.float32), 0.2, None


def _sig(s: int, ch: int, rng: np.random.Generator) -> tuple:
    # spec 7 SIG: grey vertical stripes, 4 px dark (0) then 4 px bright (255) at 32x32, blend 0.2.
    col = np.arange(s) * _BASE // s  # the 32-canvas column each pixel falls in
    stripe = ((col // 4) % 2 == 1).astype(np.float32) * 255.0
    pat = np.broadcast_to(stripe[None, :, None], (s, s, ch)).astype(np.float32)
    return "blend", np.ones((s, s, 1), np.float32), pat, 0.2, None


def _l0_inv(s: int, ch: int, rng: np.random.Generator) -> tuple:
    # spec 7 l0_inv: x * (1 - mask) + trigger; mask = 9 px of the bottom row (cols 23-31), the
    # trigger colours the last 8 (cols 24-31), so col 23 becomes black.
    mask, pat = _empty(s, ch)
    row = np.concatenate([np.zeros((1, 1, ch), np.float32), _colours(rng, (1, 8, ch))], axis=1)
    _stamp_into(mask, pat, row, 0)
    return "stamp", mask, pat, 1.0, None


def _l2_inv(s: int, ch: int, rng: np.random.Generator) -> tuple:
    # spec 7 l2_inv: additive full-image noise with max 68; i.i.d. uniform, rescaled so max == 68.
    u = rng.uniform(0.0, 1.0, size=(s, s, ch))
    pat = (u * 68.0 / u.max()).astype(np.float32)
    return "additive", np.ones((s, s, 1), np.float32), pat, 1.0, None


def _smooth(s: int, ch: int, rng: np.random.Generator) -> tuple:
    """spec 7 Smooth: add a low-frequency pattern (max 51), then renormalize each image.

    Ours: per channel, four cosines with under 2 periods across the image on each axis, scaled to
    [0, 51].
    """
    u, v = _grid32(s)
    u, v = u / _BASE, v / _BASE
    pat = np.zeros((s, s, ch))
    for k in range(ch):
        for _ in range(4):
            fr, fc = rng.uniform(0.0, 2.0, size=2)
            pat[..., k] += np.cos(2 * np.pi * (fr * u + fc * v) + rng.uniform(0, 2 * np.pi))
    pat = (pat - pat.min()) / max(float(np.ptp(pat)), 1e-12) * 51.0
    return "smooth", np.ones((s, s, 1), np.float32), pat.astype(np.float32), 1.0, None


def _cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """[n_out, n_in] bicubic (Keys, a = -0.75) interpolation with aligned corners, edges clamped."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    base = np.floor(pos).astype(int)
    w = np.zeros((n_out, n_in))
    for off in (-1, 0, 1, 2):
        d = np.abs(pos - (base + off))
        k = np.where(
            d <= 1,
            (a + 2) * d**3 - (a + 3) * d**2 + 1,
            np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0),
        )
        np.add.at(w, (np.arange(n_out), np.clip(base + off, 0, n_in - 1)), k)
    return w


def _wanet(s: int, ch: int, rng: np.random.Generator, k: int = 4, strength: float = 0.5) -> tuple:
    """WaNet (Nguyen & Tran, ICLR 2021): a fixed smooth warping field, k = 4, s = 0.5.

    A k x k field of random offsets in [-1, 1], normalized by its mean |.|, is upsampled bicubically
    to S x S, scaled by s / S in normalized [-1, 1] coordinates, added to the identity grid and
    clamped to the image; we store it as pixel coordinates for bilinear sampling.
    """
    ctrl = rng.uniform(-1.0, 1.0, size=(2, k, k))
    ctrl /= np.mean(np.abs(ctrl))
    w = _cubic_matrix(k, s)
    flow = np.stack([w @ ctrl[i] @ w.T for i in range(2)], axis=-1)  # [S, S, 2]
    ident = np.linspace(-1.0, 1.0, s)
    grid = np.stack(np.meshgrid(ident, ident, indexing="ij"), axis=-1)
    grid = np.clip(grid + strength * flow / s, -1.0, 1.0)
    coords = ((grid + 1.0) / 2.0 * (s - 1)).astype(np.float32)
    mask, pat = np.ones((s, s, 1), np.float32), np.zeros((s, s, ch), np.float32)
    return "warp", mask, pat, 1.0, coords


_BUILDERS: dict[str, Callable[..., tuple]] = {
    "badnets_grid": _badnets_grid,
    "badnets_sq": _badnets_sq,
    "blend": _blend,
    "trojan_3x3": _trojan(3, 4),
    "trojan_8x8": _trojan(9, 2),
    "trojan_wm": _trojan_wm,
    "sig": _sig,
    "l0_inv": _l0_inv,
    "l2_inv": _l2_inv,
    "smooth": _smooth,
    "cl": _cl,
    "wanet": _wanet,
}
assert tuple(_BUILDERS) == TRIGGER_NAMES


# --------------------------------------------------------------------------------------------
# A user's own trigger image.


def _resize_channels(a: np.ndarray, s: int, resample: int) -> np.ndarray:
    """Resizes float [h, w, K] to [S, S, K] channel by channel with Pillow (mode "F")."""
    if a.shape[:2] == (s, s):
        return a.astype(np.float32)
    chans = [
        np.asarray(Image.fromarray(a[..., i]).resize((s, s), resample)) for i in range(a.shape[-1])
    ]
    return np.stack(chans, axis=-1).astype(np.float32)


def load_pattern_file(
    path: str, image_size: int, channels: int, *, mode: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads a user's trigger image and resizes it to the image size.

    PNG (any format Pillow reads): converted to RGB (channels=3) or L (channels=1), keeping an
    alpha channel if it has one. .npy: float or int [h, w], [h, w, C] or [h, w, C + 1] (last =
    alpha in [0, 255]) in pixel units; values may be negative (additive triggers).
    Both are resized to [S, S] with Pillow: NEAREST for stamps (so the mask stays exact), BILINEAR
    otherwise (antialiased, no overshoot).

    Returns:
      (pattern float32 [S, S, C], alpha float32 [S, S, 1] in [0, 1] or None if there is none).
    """
    if channels not in (1, 3) and not path.endswith(".npy"):
        raise ValueError(f"image pattern files support channels 1 or 3, got {channels}; use .npy")
    if path.endswith(".npy"):
        try:
            a = np.load(path, allow_pickle=False).astype(np.float32)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(
                f"{path}: not a readable numeric .npy array ({e}); save it with "
                "np.save(path, array)"
            ) from e
        a = a[..., None] if a.ndim == 2 else a
        if a.ndim != 3 or a.shape[-1] not in (1, channels, channels + 1):
            raise ValueError(
                f"{path}: expected [h, w], [h, w, {channels}] or [h, w, {channels + 1}] "
                f"(last = alpha), got {a.shape}"
            )
        _check_pattern_values(path, a, channels, mode)
    else:
        try:
            with Image.open(path) as im:
                has_alpha = "A" in im.getbands() or "transparency" in im.info
                target = ("RGB" if channels == 3 else "L") + ("A" if has_alpha else "")
                a = np.asarray(im.convert(target), np.float32)
        except (OSError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(
                f"{path}: Pillow cannot read this image ({e}); save the trigger as PNG, or as a "
                ".npy array in pixel units"
            ) from e
        a = a[..., None] if a.ndim == 2 else a
    resample = Image.NEAREST if mode == "stamp" else Image.BILINEAR
    a = _resize_channels(a, image_size, resample)
    alpha = None
    if a.shape[-1] == channels + 1:
        a, alpha = a[..., :channels], np.clip(a[..., channels:] / 255.0, 0.0, 1.0)
    if a.shape[-1] != channels:  # a single grey channel for a colour trigger
        a = np.repeat(a, channels, axis=-1)
    return a, alpha


def _check_pattern_values(path: str, a: np.ndarray, channels: int, mode: str) -> None:
    """Rejects .npy patterns whose values cannot be pixel units (the fix is in the message)."""
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{path}: the pattern holds NaN or Inf; replace them with pixel values")
    if a.shape[-1] == channels + 1:
        alpha = a[..., channels:]
        if alpha.min() < 0 or alpha.max() > 255:
            raise ValueError(
                f"{path}: the alpha channel spans [{alpha.min():g}, {alpha.max():g}] but must "
                "be in [0, 255] (255 = opaque)"
            )
        if 0 < alpha.max() <= 1:
            raise ValueError(
                f"{path}: the alpha channel looks like [0, 1]; alpha is in [0, 255] "
                "(255 = opaque): multiply it by 255"
            )
    if mode in ("stamp", "blend"):  # an image pasted or blended in: pixel values in [0, 255]
        pat = a[..., :channels] if a.shape[-1] == channels + 1 else a
        lo, hi = float(pat.min()), float(pat.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"{path}: a {mode} pattern is an image in pixel units [0, 255], got values in "
                f"[{lo:g}, {hi:g}]; rescale it (signed offsets need an additive trigger)"
            )
        if 0 < hi <= 1:
            raise ValueError(
                f"{path}: the {mode} pattern's values lie in [{lo:g}, {hi:g}], which looks like "
                "[0, 1]; triggers are in pixel units [0, 255]: multiply the array by 255"
            )


def _from_file(path: str, s: int, ch: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(mask, pattern) from a pattern file: the alpha channel if present, else a default per mode
    (stamp/additive: the non-zero pixels; blend/smooth: everywhere)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"pattern_file {path!r} does not exist")
    pat, alpha = load_pattern_file(path, s, ch, mode=mode)
    if alpha is not None:
        return alpha.astype(np.float32), pat
    if mode in ("stamp", "additive"):
        return np.any(pat != 0, axis=-1, keepdims=True).astype(np.float32), pat
    return np.ones((s, s, 1), np.float32), pat


# --------------------------------------------------------------------------------------------


def make_trigger(
    name: str,
    image_size: int = 32,
    channels: int = 3,
    *,
    seed: int = 0,
    pattern_file: str | None = None,
    mode: str | None = None,
    alpha: float | None = None,
) -> Trigger:
    """Builds a trigger for S x S x C images.

    Args:
      name: one of TRIGGER_NAMES, or "custom" (then `pattern_file` and `mode` are required).
      image_size: S >= 8 (module docstring: how the 32x32 definitions scale).
      channels: C.
      seed: seeds the procedural parts (colours, noise, waves, the WaNet field); triggers fully
        fixed by spec 7 (badnets_grid, badnets_sq, sig, cl) do not depend on it.
      pattern_file: a PNG (or any image Pillow reads) or .npy replacing the procedural pattern of a
        stamp, blend, additive or smooth trigger (see `load_pattern_file`); the mode and alpha of
        the named trigger are kept. Not available for wanet.
      mode: for "custom" only: one of "stamp", "blend", "additive", "smooth".
      alpha: blend weight override for blend-mode triggers (default 0.2, spec 7).
    Returns:
      A `Trigger` with numpy float32 leaves: mask [S, S, 1], pattern [S, S, C], alpha [], and warp
      [S, S, 2] for wanet.
    """
    if name != "custom" and name not in _BUILDERS:
        raise ValueError(f"unknown trigger {name!r}; known: {', '.join(TRIGGER_NAMES)}, custom")
    if int(image_size) != image_size or image_size < _MIN_SIZE:
        raise ValueError(f"image_size must be an integer >= {_MIN_SIZE}, got {image_size}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    s, ch = int(image_size), int(channels)
    if name == "custom":
        if pattern_file is None or mode not in _FILE_MODES:
            raise ValueError(
                f"make_trigger('custom', ...) needs pattern_file and mode in {_FILE_MODES}, got "
                f"pattern_file={pattern_file!r}, mode={mode!r}"
            )
        warp, a = None, (0.2 if mode == "blend" else 1.0)
        mask, pat = _from_file(pattern_file, s, ch, mode)
    else:
        if mode is not None:
            raise ValueError(f"mode= is only for make_trigger('custom', ...); {name!r} has its own")
        mode, mask, pat, a, warp = _BUILDERS[name](s, ch, _rng(name, seed))
        if pattern_file is not None:
            if mode == "warp":
                raise ValueError("wanet is a warping field; it takes no pattern_file")
            mask, pat = _from_file(pattern_file, s, ch, mode)
    if alpha is not None:
        if mode != "blend":
            raise ValueError(f"alpha= only applies to blend-mode triggers; {name!r} is {mode}")
        a = alpha
    return Trigger(
        mask=np.asarray(mask, np.float32),
        pattern=np.asarray(pat, np.float32),
        alpha=np.asarray(a, np.float32),
        warp=None if warp is None else np.asarray(warp, np.float32),
        name=name,
        mode=mode,
    )
