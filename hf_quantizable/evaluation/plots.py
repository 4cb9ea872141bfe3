"""PNG figures of the evaluation (matplotlib, Agg backend): the papers' outlier and attention plots."""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..paths import atomic_path  # noqa: E402


def _save(figure, path: str | os.PathLike) -> Path:
    """Save `figure` as PNG at `path` (temporary file, then rename) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


def _per_layer(summary: Mapping[str, Any], key: str) -> np.ndarray:
    """Per layer, the max of `key` over the layer's hooked tensors (NaN where none has a value)."""
    layers = sorted({e["layer"] for e in summary["per_layer"] if e["layer"] is not None})
    values = np.full(len(layers), np.nan)
    for entry in summary["per_layer"]:
        if entry["layer"] is None or entry[key] is None:
            continue
        index = layers.index(entry["layer"])
        values[index] = np.nanmax([values[index], entry[key]])
    return values


def plot_layer_stats(stats: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Per-layer max inf norm and kurtosis of several variants side by side (grouped bars, log scale).

    Args:
        stats: variant label (e.g. "fp32", "w8a8-sim", "gated fp32") -> `compute_outlier_stats` result.
    """
    if not stats:
        raise ValueError("`stats` is empty: give at least one variant")
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(stats)
    for i, (label, summary) in enumerate(stats.items()):
        for axis, key in zip(axes, ("inf_norm", "kurtosis")):
            values = _per_layer(summary, key)
            axis.bar(np.arange(len(values)) + (i - (len(stats) - 1) / 2) * width, values, width, label=label)
    num_layers = max(len(_per_layer(summary, "inf_norm")) for summary in stats.values())
    for axis, name in zip(axes, ("max inf norm", "kurtosis")):
        axis.set_xticks(range(num_layers))
        axis.set_yscale("log")
        axis.set_xlabel("layer")
        axis.set_ylabel(name)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title or "Outliers per layer")
    return _save(figure, path)


def plot_outlier_dims(
    counts: Mapping[str, torch.Tensor], path: str | os.PathLike, title: str = "", top: int = 5
) -> Path:
    """Outlier counts per hidden dimension, summed over the given hooked tensors; the top dims labelled.

    Args:
        counts: module name -> `[d]` counts (`OutlierStatsCollector.outlier_counts()`).
    """
    if not counts:
        raise ValueError("`counts` is empty")
    total = torch.stack([c.to(torch.float64) for c in counts.values()]).sum(dim=0).numpy()
    figure, axis = plt.subplots(figsize=(10, 3.2))
    axis.bar(np.arange(total.size), total, width=1.0, color="tab:red")
    for dim in np.argsort(total)[::-1][:top]:
        if total[dim] > 0:
            axis.annotate(str(dim), (dim, total[dim]), ha="center", va="bottom", fontsize=8)
    axis.set_xlabel("hidden dimension")
    axis.set_ylabel("outlier count")
    axis.set_title(title or f"Outliers per hidden dimension ({len(counts)} tensors)")
    return _save(figure, path)


def plot_attention_heatmap(
    probs: torch.Tensor, path: str | os.PathLike, tokens: Sequence[str] | None = None, title: str = ""
) -> Path:
    """Attention probabilities `[T_q, T_k]` of one head as a heatmap (queries down, keys across)."""
    probs = probs.detach().float().cpu().numpy()
    size = max(4.0, min(12.0, 0.3 * probs.shape[0]))
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(probs, cmap="viridis", vmin=0.0, vmax=max(float(probs.max()), 1e-6))
    figure.colorbar(image, ax=axis, fraction=0.046)
    if tokens is not None:
        axis.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
        axis.set_yticks(range(len(tokens)), tokens, fontsize=7)
    axis.set_xlabel("key")
    axis.set_ylabel("query")
    axis.set_title(title or "Attention probabilities")
    return _save(figure, path)


def plot_head_mass(mass: Mapping[str, Sequence[Sequence[float]]], path: str | os.PathLike, title: str = "") -> Path:
    """Attention mass per layer x head on each key category (first token, delimiters, background)."""
    if not mass:
        raise ValueError("`mass` is empty")
    figure, axes = plt.subplots(1, len(mass), figsize=(4.2 * len(mass), 3.6), squeeze=False)
    for axis, (category, values) in zip(axes[0], mass.items()):
        image = axis.imshow(np.asarray(values), cmap="magma", vmin=0.0, vmax=1.0, aspect="auto")
        axis.set_title(category)
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.suptitle(title or "Attention mass per head")
    return _save(figure, path)
