"""Plotting shared by every report: headless matplotlib and one curve plot used by training,
the recipe and the comparison. Analysis-specific figures live here too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written to files, never shown
import matplotlib.pyplot as plt


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "validation loss",
    xlabel: str = "tokens trained",
    ylabel: str = "loss (nats/token)",
    reference: float | None = None,
    reference_label: str = "reference",
) -> Path:
    """One line per named (x, y) series, with an optional horizontal reference line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=3, label=name)
    if reference is not None:
        ax.axhline(
            reference,
            color="k",
            linestyle="--",
            linewidth=1,
            label=f"{reference_label} ({reference:.3f})",
        )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if curves or reference is not None:
        ax.legend(fontsize=8)
    return save(fig, path)
