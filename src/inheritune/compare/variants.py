"""The baselines and pruning alternatives ``inheritune compare`` trains beside Inheritune.

Each variant is a model of depth ``l`` (the comparison depth) built from the reference in its own
way (:func:`build_initial`) and trained with the one
:class:`~inheritune.training.config.TrainConfig` that :mod:`inheritune.compare.compare` shares
between them all. :data:`VARIANTS` records each one's budget and, for the pruning variants, the
``--select`` rule it keeps layers by: the pruning variants are the selections of
:mod:`inheritune.analysis.selection`, the same that ``inherit`` and ``run`` build, not a second
implementation. The variants (docs/design/paper.md §3 and the layer-pruning literature):

=================  ===============================================================  ======
name               initial model                                                    budget
=================  ===============================================================  ======
inheritune         reference layers 0..l-1 (+ embeddings, final norm, head), or the  T
                   layers ``--select`` keeps
random             l layers, random init                                            T
random-2x          the same random init, trained twice as long                      2T
stacking           l/2 random layers trained T, the whole stack copied on top of    2T
                   itself (Gong et al. 2019: [0..l/2-1, 0..l/2-1]), trained T more
hybrid             reference layers 0..l/2-1 stacked twice the same way             T
half-width         all L layers at half hidden size / heads, sliced weights         T
kd-random          random l layers, loss 0.6 LM + 0.4 KL to the reference           T
kd-every-other     reference layers 0, 2, 4, ... (l of them), same distillation     T
lazy-init          the reference's deepest l layers (the collapsed ones)            T
prune-bi           drop the L-l blocks of lowest Block Influence (ShortGPT)         T
prune-angular      drop the contiguous L-l blocks of least angular distance at the  T
                   last token (Gromov et al.; ``--angular-tokens all``: every token)
prune-keep-last    drop the deepest layers but the final one: layers 0..l-2 and     T
                   L-1 (Gromov et al.'s heuristic)
prune-lazy         drop the L-l layers of lowest MaxRank (attention collapse)       T
scratch-full       all L layers, random init (the reference's architecture trained  T
                   from scratch; not at depth l)
=================  ===============================================================  ======

:func:`unbuildable_reason` says why a reference cannot build a variant (SmolLM2's 9 heads cannot
be halved), and :func:`train_top_warning` why ``--train-top`` would freeze a pruned stack's
seams. Layers are numbered from 0 (``LAYER_NUMBERING``; the paper's plots number from 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from inheritune.analysis import selection
from inheritune.analysis.selection import layer_ranges
from inheritune.config import ConfigError
from inheritune.models.arch import get_arch
from inheritune.surgery import build as surgery


@dataclass(frozen=True)
class Variant:
    """One way to build and train an ``l``-layer model; ``budget`` is in units of T steps."""

    name: str
    description: str
    budget: int = 1
    distill: bool = False
    select: str | None = None  # the --select rule a pruning variant keeps its layers by

    @property
    def scored(self) -> bool:
        """Whether the variant's layers depend on measured layer scores."""
        return self.select in selection.SCORE_OF


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("inheritune", "reference layers 0..l-1"),
        Variant("random", "random init"),
        Variant("random-2x", "random init, trained 2T", budget=2),
        Variant("stacking", "l/2 random layers trained T, stack copied on top, trained T", 2),
        Variant("hybrid", "reference layers 0..l/2-1, stack copied on top"),
        Variant("half-width", "all layers, half hidden size and heads, sliced weights"),
        Variant("kd-random", "random init, distilled from the reference", distill=True),
        Variant("kd-every-other", "reference layers 0,2,4,..., distilled", distill=True),
        Variant("lazy-init", "reference layers L-l..L-1 (deepest)"),
        Variant("prune-bi", "drop lowest Block Influence layers", select="bi"),
        Variant("prune-angular", "drop least angular-distance block", select="angular"),
        Variant(
            "prune-keep-last",
            "drop the deepest layers but the last (0..l-2, L-1)",
            select="keep-last",
        ),
        Variant("prune-lazy", "drop lowest MaxRank layers", select="lazy"),
        Variant("scratch-full", "all L layers, random init (full depth)"),
    ]
}


# --------------------------------------------------------------------------- planning


def default_depth(num_layers: int) -> int:
    """Half the reference, rounded down to even (stacking duplicates l/2 layers)."""
    return max(2, (num_layers // 2) // 2 * 2)


def train_top_warning(train_top: int, names: list[str]) -> str | None:
    """Why ``--train-top`` hurts the pruned variants among ``names`` (None when it does not):
    those that drop layers by a score, whose seams can lie anywhere in the stack."""
    pruned = [n for n in names if VARIANTS[n].scored]
    if not train_top or not pruned:
        return None
    return (
        f"--train-top {train_top} freezes the bottom of {', '.join(pruned)} too: a pruned "
        "stack's seams then lie in the frozen part and heal only from above (prune-bi at 16 of "
        "SmolLM2's 30 layers ended 0.68 nats worse than with every block trained; "
        "benchmarks/results/long-run.md). Compare pruning without --train-top."
    )


def unbuildable_reason(name: str, num_layers: int, depth: int) -> str | None:
    """Why ``name`` cannot be built at ``depth`` from an ``num_layers``-layer reference, if so.

    (Half width also depends on the head counts; :func:`half_width_reason` asks surgery.)
    """
    L, d = num_layers, depth
    if name in ("stacking", "hybrid") and d % 2:
        return f"needs an even --depth (l/2 layers are stacked twice), got {d}"
    if name == "kd-every-other" and 2 * (d - 1) > L - 1:
        return (
            f"needs reference layers {layer_ranges(list(range(0, 2 * d, 2)))} but the reference has "
            f"{L}; use --depth <= {(L + 1) // 2}"
        )
    return None


def check_depth(depth: int, num_layers: int) -> None:
    if depth >= num_layers:
        raise ConfigError(
            f"--depth {depth} must be smaller than the reference's {num_layers} layers "
            f"(choose 1-{num_layers - 1})"
        )


def half_width_reason(reference: nn.Module) -> str | None:
    try:
        surgery.half_width(reference)
    except ConfigError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------- building


def build_initial(
    reference: nn.Module,
    name: str,
    depth: int,
    seed: int,
    scores: Callable[[], selection.LayerScores],
    select: str = "first",
) -> tuple[nn.Module, dict[str, Any]]:
    """The untrained ``depth``-layer model of variant ``name`` and a record of how it was made;
    ``scores()`` gives the reference's layer scores (computed only when a selection needs them);
    ``select`` is the inheritune variant's rule (``--select``)."""
    ref, d = reference, depth
    L = get_arch(ref).num_layers
    rule = VARIANTS[name].select if name in VARIANTS else None
    if name == "inheritune":
        rule = select
    if rule is not None:
        needed = selection.parse_select(rule)[0] in selection.SCORE_OF
        keep = selection.kept_layers(rule, L, d, scores() if needed else None)
        drop = [i for i in range(L) if i not in set(keep)]
        info: dict[str, Any] = {"layers_from": keep, "select": rule}
        if drop and name != "inheritune":
            info["dropped"] = drop
        return surgery.select_layers(ref, keep), info
    if name in ("random", "random-2x", "kd-random"):
        # One seed for all three: they start from the very same weights.
        return surgery.random_init(ref.config, d, seed=seed), {"layers_from": None}
    if name == "hybrid":
        idx = list(range(d // 2)) * 2
        return surgery.select_layers(ref, idx, allow_repeats=True), {"layers_from": idx}
    if name == "half-width":
        return surgery.half_width(ref), {"layers_from": list(range(L)), "width": "half"}
    if name == "scratch-full":  # the reference's own architecture from scratch: exempt from l
        return surgery.random_init(ref.config, L, seed=seed), {"layers_from": None, "depth": L}
    if name == "kd-every-other":
        idx = list(range(0, 2 * d, 2))
        return surgery.select_layers(ref, idx), {"layers_from": idx}
    if name == "lazy-init":
        idx = list(range(L - d, L))
        return surgery.select_layers(ref, idx), {"layers_from": idx}
    raise ConfigError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")  # unreachable
