"""A reference's layer scores, measured once: the numbers the scored ``--select`` rules use.

:func:`layer_scores` measures Block Influence and every span's angular distance in one forward
pass (:mod:`inheritune.analysis.scoring`) and MaxRank in one eager pass of
:func:`inheritune.analysis.analyze.run_analysis`, only those a rule needs, and keeps each in
``$INHERITUNE_CACHE/scores`` under the weights' fingerprint, the windows and the settings: a
reference is scored once per machine, not once per run. :func:`score_windows` draws the windows
from a TRAINING split (the validation windows stay unseen) and :func:`choose_layers` is the one
call ``inherit``, ``run`` and ``compare`` make.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from inheritune import storage
from inheritune.analysis import scoring
from inheritune.analysis.selection import (
    SCORE_OF,
    LayerScores,
    SelectConfig,
    kept_for_depth,
    kept_layers,
)
from inheritune.config import ConfigError
from inheritune.models.arch import get_arch

SCORES_VERSION = 1  # bump when a score's definition changes: older cache entries are ignored


def _states_scores(model: nn.Module, windows: np.ndarray, angular_tokens: str) -> dict:
    states = scoring.block_states(model, windows, desc="layer scores: BI, angular")
    L = len(states) - 1
    return {
        "block_influence": scoring.block_influence_from_states(states).tolist(),
        "angular": [
            scoring.angular_distances_from_states(states, n, angular_tokens).tolist()
            for n in range(1, L + 1)
        ],
    }


def _max_rank(model: nn.Module, windows: np.ndarray) -> dict:
    from inheritune.analysis import analyze

    result = analyze.run_analysis(model, windows, analyze.AnalyzeConfig(), progress=True)
    return {"max_rank": [float(x) for x in result.max_rank]}


def layer_scores(
    model: nn.Module,
    windows: np.ndarray,
    need: Sequence[str] = ("block_influence", "angular", "max_rank"),
    angular_tokens: str = "last",
    cache: bool = True,
) -> LayerScores:
    """The scores in ``need`` of ``model`` on ``windows`` (N, T), each computed once per machine
    (``$INHERITUNE_CACHE/scores``, keyed by the weights' fingerprint, the windows and the
    settings) unless ``cache`` is False."""
    from inheritune.models.assets import cache_dir
    from inheritune.models.losses import weights_fingerprint

    unknown = set(need) - {"block_influence", "angular", "max_rank"}
    if unknown:
        raise ConfigError(f"unknown layer score(s) {sorted(unknown)}")
    windows = np.ascontiguousarray(windows)
    base = {
        "version": SCORES_VERSION,
        "weights": weights_fingerprint(model),
        "windows": hashlib.sha256(windows.tobytes()).hexdigest()[:16],
        "shape": list(windows.shape),
    }
    out = LayerScores(get_arch(model).num_layers, angular_tokens=angular_tokens)

    def get(kind: str, spec: dict, compute) -> dict:
        def announced() -> dict:
            n, t = windows.shape
            print(
                f"[inheritune] layer scores ({kind}) on {n} windows x {t} tokens", file=sys.stderr
            )
            return compute()

        if not cache:
            return announced()
        return storage.memoized(cache_dir() / "scores", {**base, "kind": kind, **spec}, announced)

    if {"block_influence", "angular"} & set(need):
        got = get(
            "states",
            {"angular_tokens": angular_tokens},
            lambda: _states_scores(model, windows, angular_tokens),
        )
        out.block_influence, out.angular = got["block_influence"], got["angular"]
    if "max_rank" in need:
        out.max_rank = get("max_rank", {}, lambda: _max_rank(model, windows))["max_rank"]
    return out


def score_windows(train: np.ndarray, cfg: SelectConfig, seed: int) -> np.ndarray:
    """The layer scores' calibration windows, at seeded random positions of a TRAINING split."""
    from inheritune.data.windows import sample_windows

    return sample_windows(
        train, cfg.score_windows, cfg.score_seq_len, seed, "training", "--score-seq-len"
    )


def selection_scores(
    reference: nn.Module, tokens, cfg: SelectConfig, seed: int = 0
) -> LayerScores | None:
    """The scores ``cfg.select`` keeps and grows by, on :func:`score_windows` of the TRAINING
    split ``tokens.train`` (``auto``: every score, one per rule); None for a rule that needs
    none (``tokens`` is then not read)."""
    if not cfg.needs_scores:
        return None
    need = [SCORE_OF[cfg.rule]] if cfg.rule in SCORE_OF else sorted(set(SCORE_OF.values()))
    windows = score_windows(tokens.train, cfg, seed)
    return layer_scores(reference, windows, need, cfg.angular_tokens)


@dataclass
class Choice:
    """What a selection chose: the kept reference layers, the removed spans that get a bridge
    block (empty without ``--bridge``) and the scores it chose by (None if it needed none)."""

    kept: list[int]
    bridged: list[tuple[int, int]] = field(default_factory=list)
    scores: LayerScores | None = None


def choose_layers(
    reference: nn.Module,
    tokens,
    cfg: SelectConfig,
    depth: int | None,
    seed: int = 0,
    bridge_spans: int | None = None,
) -> Choice:
    """The layers ``cfg.select`` keeps of ``reference`` for a ``depth``-layer model, with the
    scores it chose them by, measured on ``tokens.train`` (:func:`score_windows`).

    ``bridge_spans`` None: no bridges, ``depth`` layers are kept. Otherwise ``depth`` counts the
    bridge blocks too (:func:`~inheritune.analysis.selection.kept_for_depth`; 0 bridges every
    removed span, N only the N longest)."""
    scores = selection_scores(reference, tokens, cfg, seed)
    L = get_arch(reference).num_layers
    if bridge_spans is None:
        return Choice(kept_layers(cfg.select, L, depth, scores), [], scores)
    kept, bridged = kept_for_depth(cfg.select, L, depth, scores, bridge_spans)
    return Choice(kept, bridged, scores)
