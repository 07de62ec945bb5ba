"""A single-image OOD patch source, generated on the fly inside jit (spec 6.3).

OOD-KD distills on patches cut from ONE natural image (Asano & Saeed, "extrapolating from a single
image"). The upstream tool writes a folder of 50,000 32x32 patches once (random crops from an
initial 0.5 crop of the image, a scale range, rotation and shear +-30 degrees, flips); here a fresh
batch of patches is drawn inside the jitted KD step instead, so nothing is written to disk and
every step sees new patches (departure: an infinite patch stream instead of a fixed 50,000-image
folder; docs/OOD_KD.md).

  load_source_image(name_or_path) -> uint8 [H, W, 3]   (host; shipped photos or a file)
  prepare_source(image, size, ...) -> float32 [h, w, 3] in [0, 1], antialiased to the patch scale
  sample_patches(key, source, n, size, ...) -> [n, size, size, 3] in [0, 1]   (pure, jittable)
  patch_style(x, color=..., invert=..., stretch=...) -> the digits-oriented variants of section 4
  cutmix(key, x, beta) -> CutMix of a batch (spec 6.3: every batch, images only)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# Photos shipped inside scikit-learn (a dependency already), so the default source needs no file.
SHIPPED_IMAGES = ("china.jpg", "flower.jpg", "letters")
# Letters only, without the ones that look like digits (O/o 0, I/l 1, Z/z 2, S/s 5, b/G 6, B 8,
# g/q 9, ...): the "letters" page stays out of distribution for digit tasks.
_LETTERS = "ACEFHKLMNPRTUVWXYacdefhkmnprtuvwxy"
PATCH_COLORS = ("rgb", "grey", "edges")

_FIX = (
    "set ood.source (--config.ood.source=...) to one of the images shipped with scikit-learn "
    f"({', '.join(SHIPPED_IMAGES)}) or to the path of a readable image file (PNG, JPEG, ...)"
)


def load_source_image(name_or_path: str | os.PathLike) -> np.ndarray:
    """The OOD source photo as uint8 [H, W, 3].

    Args:
      name_or_path: "china.jpg" / "flower.jpg" (scikit-learn's `load_sample_image`), "letters"
        (`render_letters`: a page of handwriting-free printed letters), or a path to
        any image Pillow can read; greyscale and palette images become 3 equal channels, an alpha
        channel is dropped.
    Raises:
      FileNotFoundError: no such shipped name and no such file (the message says how to fix it).
      ValueError: the file exists but is not a readable image, or is smaller than 2x2.
    """
    name = str(name_or_path)
    if name == "letters":
        return render_letters()
    if name in SHIPPED_IMAGES:
        from sklearn.datasets import load_sample_image

        return np.ascontiguousarray(load_sample_image(name), dtype=np.uint8)
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"OOD source image {name!r} not found (not a shipped name, no such file); {_FIX}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mode = img.mode
            img = img.convert("L") if mode in ("L", "LA", "I", "I;16", "F", "1") else img.convert("RGB")
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"OOD source {str(path)!r} is not a readable image ({e}); {_FIX}") from e
    if arr.ndim == 2:  # greyscale -> 3 equal channels, the layout every model here expects
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.dtype != np.uint8:  # 16-bit / float greyscale: rescale to 0..255
        a = arr.astype(np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12) * 255.0
        arr = np.round(a).astype(np.uint8)
    if min(arr.shape[:2]) < 2:
        raise ValueError(f"OOD source {str(path)!r} is {arr.shape[1]}x{arr.shape[0]} pixels; {_FIX}")
    return np.ascontiguousarray(arr)


def render_letters(rows: int = 8, cols: int = 12, cell: int = 64, seed: int = 0) -> np.ndarray:
    """A page of random printed letters, white on black, uint8 [rows * cell, cols * cell, 3].

    Not in the reference: a single image made of strokes, for digit tasks where photo patches
    carry little of the clean task (docs/OOD_KD.md). Drawn with the font shipped inside Pillow
    (`ImageFont.load_default`), at a random size, offset and stroke width per cell; letters that
    look like digits are left out (`_LETTERS`), so the page contains no digit glyphs.
    """
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    img = Image.new("L", (cols * cell, rows * cell), 0)
    draw = ImageDraw.Draw(img)
    fonts = {sz: ImageFont.load_default(size=sz) for sz in (int(cell * 0.6), int(cell * 0.75), int(cell * 0.9))}
    for r in range(rows):
        for c in range(cols):
            font = fonts[list(fonts)[rng.integers(len(fonts))]]
            ch = _LETTERS[rng.integers(len(_LETTERS))]
            x = c * cell + int(rng.integers(0, cell // 4))
            y = r * cell + int(rng.integers(-cell // 8, cell // 8))
            draw.text((x, y), ch, fill=255, font=font, stroke_width=int(rng.integers(1, 4)), stroke_fill=255)
    arr = np.asarray(img)
    return np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=-1))


def prepare_source(image: np.ndarray, size: int, *, init_crop: float = 0.5, resolution: float = 2.0) -> np.ndarray:
    """The source as float32 [h, w, 3] in [0, 1], downscaled (Pillow, antialiased) so that an
    initial crop (`init_crop` of the shorter side) spans `resolution * size` source pixels.

    Why: bilinear sampling of a 213-pixel crop (half of china.jpg) onto 16 pixels skips most source
    pixels and aliases; the upstream tool resizes crops with an antialiasing filter. Shrinking the
    photo once to the patch scale gives the same smoothing at no per-step cost, and keeps the
    source small enough to live inside the jitted step. Never upscales.
    """
    from PIL import Image

    h, w = image.shape[:2]
    target_short = max(int(round(resolution * size / init_crop)), 2)
    scale = min(target_short / min(h, w), 1.0)
    if scale < 1.0:
        new = (max(int(round(w * scale)), 2), max(int(round(h * scale)), 2))
        image = np.asarray(Image.fromarray(image).resize(new, Image.Resampling.LANCZOS))
    return image.astype(np.float32) / 255.0


def _affine(key: jax.Array, hw: tuple[int, int], init_crop: float, scale: tuple[float, float],
            ratio: tuple[float, float], degrees: float, shear: float):
    """One patch's inverse map: centre (row, col) in source pixels and the 2x2 matrix taking a
    patch coordinate in [-0.5, 0.5]^2 (x right, y down) to a source offset (col, row)."""
    h, w = hw
    k_s, k_r, k_rot, k_sh, k_cy, k_cx = jax.random.split(key, 6)
    area = jax.random.uniform(k_s, (), minval=scale[0], maxval=scale[1])
    log_r = jax.random.uniform(k_r, (), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
    aspect = jnp.exp(log_r)
    side = init_crop * min(h, w) * jnp.sqrt(area)  # RandomResizedCrop's scale is an area fraction
    sw, sh = side * jnp.sqrt(aspect), side / jnp.sqrt(aspect)
    theta = jnp.deg2rad(jax.random.uniform(k_rot, (), minval=-degrees, maxval=degrees))
    phi = jnp.deg2rad(jax.random.uniform(k_sh, (), minval=-shear, maxval=shear))
    rot = jnp.array([[jnp.cos(theta), -jnp.sin(theta)], [jnp.sin(theta), jnp.cos(theta)]])
    shr = jnp.array([[1.0, jnp.tan(phi)], [0.0, 1.0]])
    mat = rot @ shr @ jnp.diag(jnp.stack([sw, sh]))

    def centre(k, extent, half):  # keep the unrotated crop inside the image where it fits
        lo, hi = half - 0.5, extent - 0.5 - half
        mid = (extent - 1) / 2.0
        u = jax.random.uniform(k, ())
        return jnp.where(hi > lo, lo + u * (hi - lo), mid)

    return centre(k_cy, h, sh / 2.0), centre(k_cx, w, sw / 2.0), mat


def _reflect(i: jax.Array, n: int) -> jax.Array:
    """Integer indices reflected into [0, n) (edge pixel repeated: ... 1 0 | 0 1 ... n-1 | n-1 ...),
    scipy's "reflect" mode."""
    period = 2 * n
    i = jnp.mod(i, period)
    return jnp.where(i < n, i, period - 1 - i)


def _bilinear(src: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """Bilinear samples of src [H, W, C] at float (rows, cols) of any shape -> [..., C], reflected
    at the border. The same values as `jax.scipy.ndimage.map_coordinates(order=1, mode="reflect")`
    per channel (tests/test_ood.py), written as one 4-corner gather over all channels instead of one
    map_coordinates call per channel (the per-channel version took 8.6 s to compile for a batch of
    8 on the loaded 2-core CPU, this one 5.7 s for a batch of 512)."""
    h, w, _ = src.shape
    r0, c0 = jnp.floor(rows), jnp.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)
    ra, rb = _reflect(r0, h), _reflect(r0 + 1, h)
    ca, cb = _reflect(c0, w), _reflect(c0 + 1, w)
    top = src[ra, ca] * (1 - fc) + src[ra, cb] * fc
    bottom = src[rb, ca] * (1 - fc) + src[rb, cb] * fc
    return top * (1 - fr) + bottom * fr


def sample_patches(
    key: jax.Array,
    source: jax.Array,
    n: int,
    size: int,
    *,
    init_crop: float = 0.5,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    degrees: float = 30.0,
    shear: float = 30.0,
    flip: bool = True,
) -> jax.Array:
    """n random patches of `source`, each [size, size, 3] in [0, 1] (pure; static shapes).

    Each patch is an affine view of the source: a crop whose side is `init_crop` * the shorter
    image side * sqrt(area), area ~ U(scale), aspect ratio log-uniform in `ratio`, rotated by
    U(-degrees, degrees) and sheared by U(-shear, shear) degrees, sampled bilinearly on an
    inverse-mapped grid at pixel centres (`_bilinear`, reflected at the border, so
    rotated corners show mirrored image content rather than black); then flipped left-right with
    probability 1/2 when `flip`.

    With init_crop = 1, scale = ratio = (1, 1), degrees = shear = 0 on a square source of side
    k * size, patch pixel j samples source coordinate k * j + (k - 1) / 2: the source itself for
    k = 1 and its 2x2 box average for k = 2 (tests/test_ood.py).

    Args:
      key: PRNG key.
      source: float [H, W, 3] in [0, 1] (`prepare_source`), or uint8 (scaled by 1/255).
      n, size: static batch size and patch side.
    """
    src = jnp.asarray(source)
    src = src.astype(jnp.float32) / 255.0 if src.dtype == jnp.uint8 else src.astype(jnp.float32)
    h, w, c = src.shape
    k_aff, k_flip = jax.random.split(key)
    cy, cx, mats = jax.vmap(lambda k: _affine(k, (h, w), init_crop, scale, ratio, degrees, shear))(
        jax.random.split(k_aff, n))
    grid = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size - 0.5  # pixel centres in [-0.5, 0.5]
    gy, gx = jnp.meshgrid(grid, grid, indexing="ij")
    pts = jnp.stack([gx.ravel(), gy.ravel()])  # [2, size*size], (x, y)
    off = jnp.einsum("nij,jp->nip", mats, pts)  # [n, 2, P], (col, row) offsets
    cols = cx[:, None] + off[:, 0]
    rows = cy[:, None] + off[:, 1]

    out = _bilinear(src, rows, cols).reshape(n, size, size, c)
    if flip:
        do = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
        out = jnp.where(do, out[:, :, ::-1, :], out)
    return jnp.clip(out, 0.0, 1.0)


def _grey(x: jax.Array) -> jax.Array:
    lum = x[..., 0:1] * 0.299 + x[..., 1:2] * 0.587 + x[..., 2:3] * 0.114  # ITU-R 601, as PIL's "L"
    return jnp.broadcast_to(lum, x.shape)


def _edges(x: jax.Array) -> jax.Array:
    """Sobel gradient magnitude of the grey patch, scaled so each patch's maximum is 1."""
    g = _grey(x)[..., 0]
    p = jnp.pad(g, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2])
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:])
    mag = jnp.sqrt(gx * gx + gy * gy + 1e-12)
    mag = mag / jnp.maximum(jnp.max(mag, axis=(1, 2), keepdims=True), 1e-6)
    return jnp.broadcast_to(mag[..., None], x.shape)


def patch_style(x: jax.Array, *, color: str = "rgb", invert: bool = False, stretch: bool = False) -> jax.Array:
    """Optional re-styling of [n, H, W, 3] patches in [0, 1] (not in the reference; probes for
    sources closer to a target domain such as white-on-black digits, docs/OOD_KD.md).

    color: "rgb" (unchanged), "grey" (luminance in 3 channels) or "edges" (Sobel magnitude, per
      patch scaled to max 1: thin bright strokes on a dark background).
    invert: x -> 1 - x (after `color`).
    stretch: per-patch min-max contrast stretch to [0, 1] (last).
    """
    if color not in PATCH_COLORS:
        raise ValueError(f"unknown patch color {color!r}; set ood.patch_color to one of {', '.join(PATCH_COLORS)}")
    if color == "grey":
        x = _grey(x)
    elif color == "edges":
        x = _edges(x)
    if invert:
        x = 1.0 - x
    if stretch:
        lo = jnp.min(x, axis=(1, 2, 3), keepdims=True)
        hi = jnp.max(x, axis=(1, 2, 3), keepdims=True)
        x = (x - lo) / jnp.maximum(hi - lo, 1e-6)
    return x


def cutmix_box(key: jax.Array, batch: int, height: int, width: int, beta: float = 0.25):
    """The CutMix draw for one batch: (box mask [H, W] bool, partner permutation [B], lam).

    lam ~ Beta(beta, beta); the box has sides int(S * sqrt(1 - lam)) around a uniform centre,
    clipped at the border (so it may be smaller), one box for the whole batch, as the CutMix code
    the reference uses.
    """
    k_lam, k_perm, k_y, k_x = jax.random.split(key, 4)
    lam = jax.random.beta(k_lam, beta, beta)
    cut = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * cut).astype(jnp.int32)
    cut_w = jnp.floor(width * cut).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    return box, jax.random.permutation(k_perm, batch), lam


def cutmix(key: jax.Array, x: jax.Array, beta: float = 0.25) -> jax.Array:
    """CutMix with probability 1 (spec 6.3): inside one random box every image takes the pixels of
    a random partner from the same batch. Only the images are mixed; the caller labels the mixed
    image with the teacher (no label mixing). Static shapes (a mask, no slicing)."""
    box, perm, _ = cutmix_box(key, x.shape[0], x.shape[1], x.shape[2], beta)
    return jnp.where(box[None, :, :, None], x[perm], x)
