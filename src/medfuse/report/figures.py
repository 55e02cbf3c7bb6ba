"""Figures 3-6 of the paper, regenerated: qualitative grids, per-pair curves and a radar plot.

Written with matplotlib's object API (no pyplot state), saved as PNG and PDF, atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from scipy import ndimage

from medfuse.io import atomic_path


def save_figure(fig: Figure, out_stem: Path) -> list[Path]:
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in ("png", "pdf"):
        path = out_stem.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        written.append(path)
    return written


def region_of_interest(image: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the `size` x `size` window with the most edge energy (Sobel)."""
    grey = image if image.ndim == 2 else image.mean(axis=2)
    grey = grey.astype(float)
    energy = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1))
    window = ndimage.uniform_filter(energy, size=size, mode="constant")
    half = size // 2
    h, w = grey.shape
    inner = window[half : h - half + 1, half : w - half + 1] if h > size and w > size else window
    y, x = np.unravel_index(np.argmax(inner), inner.shape)
    return (int(y), int(x)) if h > size and w > size else (0, 0)


def _show_with_inset(ax, image: np.ndarray, roi: tuple[int, int], size: int) -> None:
    cmap = "gray" if image.ndim == 2 else None
    ax.imshow(image, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    y, x = roi
    ax.add_patch(Rectangle((x - 0.5, y - 0.5), size, size, fill=False, color="red", lw=1.2))
    # The enlarged inset goes in the corner farthest from the box, so it never hides it.
    h, w = image.shape[:2]
    left = 0.0 if x + size / 2 > w / 2 else 0.6
    bottom = 0.6 if y + size / 2 > h / 2 else 0.0  # axes y runs upwards, image rows down
    inset = ax.inset_axes([left, bottom, 0.4, 0.4])
    inset.imshow(
        image[y : y + size, x : x + size], cmap=cmap, vmin=0, vmax=255, interpolation="nearest"
    )
    for spine in inset.spines.values():
        spine.set_edgecolor("red")
    inset.set_xticks([])
    inset.set_yticks([])
    ax.set_xticks([])
    ax.set_yticks([])


def qualitative_grid(
    rows: Sequence[dict[str, np.ndarray]], columns: Sequence[str], title: str, roi_fraction: float
) -> Figure:
    """One row per test pair, one column per image (sources, then each method's fusion)."""
    fig = Figure(figsize=(1.9 * len(columns), 2.0 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, images in enumerate(rows):
        reference = images[columns[1]]  # the MRI: the structure the boxes point at
        size = max(4, round(reference.shape[0] * roi_fraction))
        roi = region_of_interest(reference, size)
        for c, column in enumerate(columns):
            _show_with_inset(axes[r, c], images[column], roi, size)
            if r == 0:
                axes[r, c].set_title(column, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def per_pair_curves(per_pair: pd.DataFrame, metrics: Sequence[str], title: str) -> Figure:
    """Figure 6 (left): each metric over the test pairs, one line per method."""
    fig = Figure(figsize=(4.0 * len(metrics), 3.2))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        for method, group in per_pair.groupby("method"):
            ordered = group.sort_values("name")
            ax.plot(
                range(1, len(ordered) + 1),
                ordered[metric].to_numpy(),
                marker=".",
                lw=1,
                label=method,
            )
        ax.set_title(metric)
        ax.set_xlabel("test pair")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, y=1.04)  # above the panel titles
    return fig


def normalised_means(per_pair: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per-metric min-max normalisation of the methods' means (1 = best of the methods shown)."""
    means = per_pair.groupby("method")[list(metrics)].mean()
    finite = means.replace([np.inf, -np.inf], np.nan)
    span = (finite.max() - finite.min()).replace(0, np.nan)
    return ((finite - finite.min()) / span).fillna(1.0)


def radar(per_pair: pd.DataFrame, metrics: Sequence[str], title: str) -> Figure:
    """Figure 6 (right): a radar plot of the normalised mean metrics per method."""
    scores = normalised_means(per_pair, metrics)
    angles = np.linspace(0, 2 * np.pi, len(metrics), endpoint=False).tolist()
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot(projection="polar")
    for method, row in scores.iterrows():
        values = row.to_list()
        ax.plot([*angles, angles[0]], [*values, values[0]], lw=1.2, label=method)
        ax.fill([*angles, angles[0]], [*values, values[0]], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels(metrics)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.3, 1.1))
    ax.set_title(title)
    return fig
