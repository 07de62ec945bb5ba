"""Results a person can read: JSON, markdown tables and PNG plots. Writes are atomic, so an
interrupted run never leaves a half-written results file over a good one."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Writes `obj` as indented JSON (numpy values converted, NaN/Inf as null)."""
    _atomic_write(Path(path), (json.dumps(_jsonable(obj), indent=2) + "\n").encode())


def append_jsonl(path: str | Path, rows: Sequence[Any]) -> None:
    """Appends one JSON line per row (numpy values converted): the experiment logs that several
    runs add to (sr_sweep.jsonl, sv_probe.jsonl, ...)."""
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(_jsonable(row)) + "\n")


def percent(mask: np.ndarray) -> float | None:
    """Percent of True in a boolean array, one decimal; None for an empty one (no samples)."""
    mask = np.asarray(mask)
    return round(100.0 * float(np.mean(mask)), 1) if mask.size else None


def write_text(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), text.encode())


def fmt(v: Any, digits: int = 1) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats with one decimal."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_curves(
    path: str | Path,
    curves: Mapping[str, Sequence[tuple[float, float]]],
    *,
    xlabel: str,
    ylabel: str = "%",
    title: str = "",
) -> None:
    """Line plot of named (x, y) series into a PNG."""
    fig, ax = _new_axes()
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=name, marker="." if len(xs) < 40 else None)
    _finish(fig, ax, path, xlabel=xlabel, ylabel=ylabel, title=title)


def _new_axes():
    import matplotlib

    matplotlib.use("Agg")  # no display needed (headless runs)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 3.6), dpi=110)


def _finish(fig, ax, path: str | Path, *, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, grid, legend; writes the PNG and closes the figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_histograms(
    path: str | Path,
    series: Mapping[str, np.ndarray],
    *,
    xlabel: str,
    title: str = "",
    bins: int = 40,
) -> None:
    """Overlaid histograms (density) of named 1-D arrays into a PNG; empty arrays are skipped."""
    fig, ax = _new_axes()
    finite = [np.asarray(v)[np.isfinite(v)] for v in series.values()]
    values = np.concatenate([v for v in finite if v.size]) if any(v.size for v in finite) else np.zeros(1)
    edges = np.histogram_bin_edges(values, bins=bins)
    for name, v in zip(series, finite):
        if v.size:
            ax.hist(v, bins=edges, alpha=0.5, density=True, label=f"{name} (n={v.size})")
    _finish(fig, ax, path, xlabel=xlabel, ylabel="density", title=title)


def save_image_grid(path: str | Path, images: np.ndarray, ncol: int = 8, scale: int = 3) -> None:
    """Saves uint8 images [N, H, W, C] as one PNG grid (nearest-neighbour upscaled)."""
    from PIL import Image

    n, h, w, c = images.shape
    nrow = int(math.ceil(n / ncol))
    grid = np.full((nrow * (h + 1) + 1, ncol * (w + 1) + 1, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = img
    pil = Image.fromarray(grid.squeeze(-1) if c == 1 else grid)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
