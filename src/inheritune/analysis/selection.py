"""Which reference layers a smaller model keeps: one selection mechanism for every command.

``--select`` names a rule or lists the layers:

=============  ===========================================================================
``first``      layers ``0..k-1``: the paper's recipe (Inheritune, arXiv 2404.08634)
``bi``         the ``k`` blocks of highest Block Influence (ShortGPT drops the lowest)
``angular``    all but the contiguous span of ``L-k`` blocks of least angular distance
               (Gromov et al.; ``--angular-tokens``)
``lazy``       the ``k`` layers of highest MaxRank: the collapsed (rank ~ 1) ones are dropped,
               among equal ranks the deeper first
``keep-last``  layers ``0..k-2`` and ``L-1`` (Gromov et al.'s heuristic)
``0,1,5-11``   exactly these layers (inclusive ranges, ascending, no repeats)
``auto``       every rule above is built (with its bridges), scored on training-split windows,
               and the best kept (:mod:`inheritune.surgery.auto`)
=============  ===========================================================================

Every rule also ranks the layers it dropped (:func:`importance`): growth adds back the dropped
layers of highest importance, in their original order (:func:`grow`). For ``first`` and
``keep-last`` and an explicit list that is the next layer by depth, so ``first`` grows exactly as
the paper does; ``bi`` and ``lazy`` rank by their own score, ``angular`` by each layer's own
angular distance (span 1).

The rules here are pure functions of the scores (:class:`LayerScores`);
:mod:`inheritune.analysis.layer_scores` measures them on training-split windows, once per
reference weights, windows and settings.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from inheritune.analysis import scoring
from inheritune.config import ConfigError, validate_numbers

RULES = ("first", "bi", "angular", "lazy", "keep-last")
# The score each rule needs (None: the rule is a function of depth alone).
SCORE_OF = {"bi": "block_influence", "angular": "angular", "lazy": "max_rank"}


@dataclass
class SelectConfig:
    """``--select`` and the calibration windows its scores are measured on; the configs of
    ``inherit``, ``run`` and ``compare`` hold it as their ``selection`` field (the same flags)."""

    select: str = field(
        default="first",
        metadata={
            "help": "which reference layers to keep: first (the paper's), bi (Block Influence), "
            "angular (angular distance), lazy (MaxRank), keep-last, auto (the best of these on "
            "training-split windows), or a list like 0-5,9,12"
        },
    )
    auto_windows: int = field(
        default=16,
        metadata={
            "help": "--select auto: training-split windows (--score-seq-len tokens) every "
            "candidate is scored on (drawn apart from the score windows)",
            "min": 1,
        },
    )
    auto_probe_steps: int = field(
        default=0,
        metadata={
            "help": "--select auto in run: train each candidate this many steps before "
            "scoring it (0: score the starts as built)",
            "min": 0,
        },
    )
    score_windows: int = field(
        default=32,
        metadata={"help": "training-split windows the layer scores are measured on", "min": 1},
    )
    score_seq_len: int = field(
        default=128, metadata={"help": "tokens per layer-score window", "min": 2}
    )
    angular_tokens: str = field(
        default="last",
        metadata={
            "help": "angular distance at the last token (Gromov et al., PruneMe) or at all",
            "choices": scoring.ANGULAR_TOKENS,
        },
    )

    def __post_init__(self) -> None:
        validate_numbers(self)
        if self.angular_tokens not in scoring.ANGULAR_TOKENS:
            raise ConfigError(
                f"--angular-tokens must be one of {', '.join(scoring.ANGULAR_TOKENS)}, "
                f"got {self.angular_tokens!r}"
            )
        parse_select(self.select)  # the rule's name or the list's syntax, before any work

    @property
    def rule(self) -> str:
        """The rule's name, or ``"list"`` for an explicit list."""
        return parse_select(self.select)[0]

    @property
    def needs_scores(self) -> bool:
        return self.rule in SCORE_OF or self.rule == "auto"


# --------------------------------------------------------------------------- parsing


def parse_layers(spec: str, num_layers: int | None = None, what: str = "--layers") -> list[int]:
    """Indices from ``"0-13"``, ``"0,1,2,5"`` or ``"0-3,8"`` (inclusive ranges), in the given
    order; checked against ``num_layers`` when it is known (:func:`check_indices`)."""
    text = (spec or "").replace(" ", "")
    if not text:
        raise ConfigError(f"{what} is empty; give indices like 0-13 or 0,1,2,5")
    indices: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if m is None:
            raise ConfigError(f"{what}: cannot parse {item!r} in {spec!r}; use e.g. 0-13 or 0,1,5")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise ConfigError(f"{what}: range {item!r} runs backwards")
        indices.extend(range(lo, hi + 1))
    return indices if num_layers is None else check_indices(indices, num_layers, what=what)


def check_indices(
    indices: Sequence[int], num_layers: int, allow_repeats: bool = False, what: str = "--layers"
) -> list[int]:
    """Validated list of layer indices of a model with ``num_layers`` blocks."""
    out = [int(i) for i in indices]
    if not out:
        raise ConfigError(f"{what}: no layers selected")
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(
            f"{what}: layer index {bad[0]} is out of range; the reference has {num_layers} "
            f"layers (valid indices 0-{num_layers - 1})"
        )
    dups = sorted({i for i in out if out.count(i) > 1})
    if dups and not allow_repeats:
        raise ConfigError(f"{what}: duplicate layer indices {dups} (stacking needs allow_repeats)")
    return out


def parse_select(spec: str) -> tuple[str, list[int] | None]:
    """``(rule, None)`` for a rule's name, ``("list", indices)`` for an explicit list."""
    text = str(spec).strip()
    if text in (*RULES, "auto"):
        return text, None
    if not text or not text[0].isdigit():
        raise ConfigError(
            f"--select must be one of {', '.join(RULES)}, auto or a layer list like 0-5,9, got "
            f"{spec!r}"
        )
    indices = parse_layers(text, what="--select")
    dups = sorted({i for i in indices if indices.count(i) > 1})
    if dups:
        raise ConfigError(f"--select: duplicate layer indices {dups}")
    if indices != sorted(indices):
        raise ConfigError(f"--select: list the layers in ascending order, got {spec!r}")
    return "list", indices


# --------------------------------------------------------------------------- scores


@dataclass
class LayerScores:
    """Per-layer scores of one reference on one set of calibration windows.

    ``block_influence[i]``: ShortGPT's BI of block ``i``; ``angular[n - 1][i]``: the angular
    distance from the input of block ``i`` to that of block ``i + n`` (every span n = 1..L);
    ``max_rank[i]``: MaxRank (docs/design/paper.md §1). A score a rule did not need is None.
    """

    num_layers: int
    block_influence: list[float] | None = None
    angular: list[list[float]] | None = None
    max_rank: list[float] | None = None
    angular_tokens: str = "last"

    def angular_distance(self, n: int) -> np.ndarray:
        """Distances of every span of ``n`` blocks, (L - n + 1,)."""
        if self.angular is None:
            raise ConfigError("angular distances were not measured")
        if not 1 <= n <= self.num_layers:
            raise ConfigError(f"angular distance span must be in [1, {self.num_layers}], got {n}")
        return np.asarray(self.angular[n - 1])

    def require(self, name: str) -> np.ndarray:
        values = self.angular_distance(1) if name == "angular" else getattr(self, name)
        if values is None:
            raise ConfigError(f"the layer score {name!r} was not measured")
        return np.asarray(values, dtype=float)


# --------------------------------------------------------------------------- the rules


def _check_keep(keep: int, num_layers: int) -> None:
    if not 1 <= keep <= num_layers:
        raise ConfigError(
            f"cannot keep {keep} of the reference's {num_layers} layers (choose 1-{num_layers})"
        )


def kept_layers(
    select: str, num_layers: int, keep: int | None, scores: LayerScores | None = None
) -> list[int]:
    """The ascending reference layers ``select`` keeps out of ``num_layers``, ``keep`` of them
    (an explicit list keeps itself; ``keep``, if given, must match its length)."""
    rule, listed = parse_select(select)
    L = num_layers
    if rule == "list":
        idx = check_indices(listed, L, what="--select")
        if keep is not None and keep != len(idx):
            raise ConfigError(f"--select lists {len(idx)} layers but {keep} are to be kept")
        return idx
    if rule == "auto":
        raise ConfigError("--select auto is decided by building every rule's candidate first")
    if keep is None:
        raise ConfigError(f"--select {rule} needs the number of layers to keep")
    _check_keep(keep, L)
    if rule == "first":
        return list(range(keep))
    if rule == "keep-last":
        if keep == L:
            return list(range(L))
        return [i for i in range(L) if i not in set(scoring.keep_last_drop(L, L - keep))]
    if scores is None:
        raise ConfigError(f"--select {rule} needs layer scores")
    if rule == "angular":
        drop = (
            []
            if keep == L
            else scoring.best_block_drop(scores.angular_distance(L - keep), L - keep)
        )
    elif rule == "bi":
        drop = scoring.lowest_bi_drop(scores.require("block_influence"), L - keep)
    else:  # lazy: collapse is a property of depth, so among equal MaxRanks the deeper goes first
        drop = scoring.lowest_score_drop(scores.require("max_rank"), L - keep, prefer_deep=True)
    return [i for i in range(L) if i not in set(drop)]


def importance(select: str, num_layers: int, scores: LayerScores | None = None) -> np.ndarray:
    """(L,) how much each layer matters to ``select``: higher comes back first in growth.

    Depth order (shallower first) for ``first``, ``keep-last`` and lists; the rule's own score
    for ``bi`` (Block Influence), ``angular`` (span-1 angular distance) and ``lazy`` (MaxRank).
    :func:`grow` breaks ties towards the shallower layer."""
    rule, _ = parse_select(select)
    depth_order = -np.arange(num_layers, dtype=float)
    if rule not in SCORE_OF:
        return depth_order
    if scores is None:
        raise ConfigError(f"--select {rule} needs layer scores")
    return scores.require(SCORE_OF[rule])


def grow(kept: Sequence[int], by: int, weights: np.ndarray) -> list[int]:
    """``kept`` plus the ``by`` dropped layers of highest ``weights`` (ties: shallower first),
    ascending; as many as there are when fewer than ``by`` are left."""
    have = set(int(i) for i in kept)
    dropped = [i for i in range(len(weights)) if i not in have]
    ranked = sorted(dropped, key=lambda i: (-float(weights[i]), i))
    return sorted(have | set(ranked[: max(0, by)]))


def spans(kept: Sequence[int], num_layers: int) -> list[tuple[int, int]]:
    """The removed contiguous spans ``[start, end)`` of a selection, shallowest first; a span
    at the top (``end == L``) is the one the paper's recipe leaves."""
    have = set(kept)
    out: list[tuple[int, int]] = []
    i = 0
    while i < num_layers:
        if i in have:
            i += 1
            continue
        j = i
        while j < num_layers and j not in have:
            j += 1
        out.append((i, j))
        i = j
    return out


def selection_table(num_layers: int, keep: int, scores: LayerScores | None) -> dict[str, list[int]]:
    """What each rule keeps at ``keep`` layers, for reports (rules whose score is missing are
    left out)."""
    out = {}
    for rule in RULES:
        need = SCORE_OF.get(rule)
        if need and (scores is None or getattr(scores, need) is None):
            continue
        out[rule] = kept_layers(rule, num_layers, keep, scores)
    return out


def layer_ranges(idx: list[int]) -> str:
    """Layer lists for the table: [0,1,2,5] -> '0-2,5'; [0,2,4,6] -> '0,2,...,6'."""
    if len(idx) > 3 and all(b - a == 2 for a, b in itertools.pairwise(idx)):
        return f"{idx[0]},{idx[1]},...,{idx[-1]}"
    parts: list[str] = []
    start = prev = idx[0] if idx else None
    for i in [*idx[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = i
    return ",".join(parts) if idx else "-"


def bridged_spans(
    kept: Sequence[int], num_layers: int, max_spans: int = 0
) -> list[tuple[int, int]]:
    """The removed spans that get a bridge block: all of them, or the ``max_spans`` longest
    (ties: the deeper), ascending."""
    gaps = spans(kept, num_layers)
    if max_spans and len(gaps) > max_spans:
        gaps = sorted(sorted(gaps, key=lambda s: (s[1] - s[0], s[0]), reverse=True)[:max_spans])
    return gaps


def kept_for_depth(
    select: str,
    num_layers: int,
    depth: int | None,
    scores: LayerScores | None = None,
    max_spans: int = 0,
) -> tuple[list[int], list[tuple[int, int]]]:
    """The kept layers and the bridged spans of a model ``depth`` layers deep, bridges included
    (``--num-layers`` with ``--bridge block``): ``b`` bridges leave ``depth - b`` kept layers,
    whose removed spans must number ``b`` (at most ``max_spans``). The smallest such ``b`` is
    taken; where the span count jumps past it, the selection one layer larger bridges its
    ``b - 1`` longest spans and leaves the rest unbridged, so the depth is always ``depth``. An
    explicit list keeps itself and bridges its spans (``depth`` may be None)."""
    rule, listed = parse_select(select)
    if rule == "auto":
        raise ConfigError("--select auto is decided by building every rule's candidate first")
    if rule == "list":
        kept = check_indices(listed, num_layers, what="--select")
        gaps = bridged_spans(kept, num_layers, max_spans)
        if depth is not None and depth != len(kept) + len(gaps):
            raise ConfigError(
                f"--select lists {len(kept)} layers, which with {len(gaps)} bridge block(s) make "
                f"{len(kept) + len(gaps)} layers, not --num-layers {depth}"
            )
        return kept, gaps
    if depth is None:
        raise ConfigError(f"--select {rule} needs the number of layers")
    _check_keep(depth, num_layers)
    cap = max_spans or num_layers

    def count(b: int) -> int:
        return min(cap, len(spans(kept_layers(select, num_layers, depth - b, scores), num_layers)))

    if depth == num_layers or count(0) == 0:
        return kept_layers(select, num_layers, depth, scores), []
    for b in range(1, depth):
        n = count(b)
        if n == b:
            kept = kept_layers(select, num_layers, depth - b, scores)
            return kept, bridged_spans(kept, num_layers, cap)
        if n < b:  # the span count jumped past b: one kept layer more, b - 1 bridges
            kept = kept_layers(select, num_layers, depth - b + 1, scores)
            return kept, bridged_spans(kept, num_layers, b - 1)
    raise ConfigError(
        f"--num-layers {depth} leaves no room for the bridges --select {rule} needs; use more "
        "layers or --bridge-spans"
    )
