"""Plotting shared by every report: headless matplotlib and one curve plot used by training,
the recipe and the comparison. Analysis-specific figures live here too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
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
    more_references: Mapping[str, float] | None = None,
) -> Path:
    """One line per named (x, y) series, with optional horizontal reference lines (``reference``
    and any ``more_references``: label -> value, drawn dotted)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ("-", "--", ":", "-.")  # the colour cycle has 10 colours; tell curve 11 from curve 1
    for i, (name, (xs, ys)) in enumerate(curves.items()):
        style = styles[(i // 10) % len(styles)]
        ax.plot(list(xs), list(ys), marker="o", markersize=3, linestyle=style, label=name)
    if reference is not None:
        ax.axhline(
            reference,
            color="k",
            linestyle="--",
            linewidth=1,
            label=f"{reference_label} ({reference:.3f})",
        )
    for label, value in (more_references or {}).items():
        ax.axhline(value, color="0.4", linestyle=":", linewidth=1, label=f"{label} ({value:.3f})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if curves or reference is not None:
        ax.legend(fontsize=8)
    return save(fig, path)


# ---- attention-collapse figures (inheritune analyze) -----------------------------------------


def plot_rank_heatmap(rank, path: str | Path, *, title: str = "") -> Path:
    """Layer x head heatmap of the mean approximate rank k*, one cell per head, values printed."""
    import numpy as np

    rank = np.asarray(rank, dtype=float)  # (L, H)
    num_layers, num_heads = rank.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * num_heads, 1.2 + 0.28 * num_layers))
    # Ranks are >= 1 and span 1..T: a log colour scale keeps the near-1 (collapsed) heads apart.
    norm = matplotlib.colors.LogNorm(vmin=1.0, vmax=max(2.0, float(rank.max())))
    im = ax.imshow(rank, aspect="auto", cmap="viridis", origin="upper", norm=norm)
    if num_layers * num_heads <= 600:  # numbers stay legible up to ~600 cells
        for (i, h), v in np.ndenumerate(rank):
            color = "w" if v < np.sqrt(norm.vmax) else "k"
            ax.text(h, i, f"{v:.1f}", ha="center", va="center", fontsize=6, color=color)
    ax.set_xticks(range(num_heads))
    ax.set_yticks(range(num_layers))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"mean approximate rank k* {title}".strip(), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    return save(fig, path)


def plot_layer_collapse(
    max_rank,
    avg_mass,
    lazy,
    path: str | Path,
    *,
    groups: Sequence[tuple[int, int]] = (),
    title: str = "",
) -> Path:
    """MaxRank and AvgMass per layer; lazy layers marked, lazy groups shaded."""
    layers = list(range(len(max_rank)))
    lazy_idx = [i for i in layers if lazy[i]]
    fig, (ax_r, ax_m) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for ax, values, label in ((ax_r, max_rank, "MaxRank"), (ax_m, avg_mass, "AvgMass")):
        for k, (a, b) in enumerate(groups):
            ax.axvspan(a - 0.5, b + 0.5, color="tab:orange", alpha=0.15, lw=0,
                       label="lazy group" if k == 0 else None)  # fmt: skip
        ax.plot(layers, list(values), marker="o", markersize=3, label=label)
        if lazy_idx:
            ax.scatter(lazy_idx, [values[i] for i in lazy_idx], color="tab:red", zorder=3,
                       label="lazy layer")  # fmt: skip
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_r.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
    ax_r.set_yscale("log")  # MaxRank spans 1..T; lazy layers sit at the bottom
    ax_m.set_xlabel("layer")
    ax_r.set_title(f"attention collapse per layer {title}".strip(), fontsize=9)
    return save(fig, path)
