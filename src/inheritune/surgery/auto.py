"""``--select auto``: build every rule's start, score each on training-split windows, keep the best.

The rules of :mod:`inheritune.analysis.selection` (``first``, ``bi``, ``angular``, ``lazy``,
``keep-last``) each give a model of the same depth: their kept layers and, with ``--bridge
block``, a fitted bridge block at every seam (:func:`inheritune.surgery.bridge.build_bridged`).
Rules that keep the same layers are built once. Every candidate is scored by its mean loss on
``--auto-windows`` windows of the TRAINING split, drawn apart from the score and calibration
windows (another seed), never on a validation split; ``probe`` (given by ``run``) may first train
each candidate a few steps. The lowest loss wins (ties: the earlier rule, so ``first`` wins a
tie). The winner's model is returned too, so its bridges are not fitted twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from inheritune.analysis.layer_scores import layer_scores, score_windows
from inheritune.analysis.selection import (
    RULES,
    SCORE_OF,
    LayerScores,
    SelectConfig,
    kept_for_depth,
    kept_layers,
)
from inheritune.data.windows import sample_windows
from inheritune.models.arch import get_arch
from inheritune.models.losses import evaluate_loss
from inheritune.surgery import bridge as _bridge
from inheritune.surgery.build import select_layers

AUTO_SEED_OFFSET = 7919  # the auto windows' seed: apart from the score and calibration windows


@dataclass
class AutoChoice:
    """What ``--select auto`` measured and chose."""

    rule: str
    kept: list[int]
    bridged: list[tuple[int, int]]
    model: nn.Module
    bridge_stats: dict[str, Any] | None
    scores: LayerScores
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every rule, its loss

    def record(self) -> dict[str, Any]:
        """For provenance.json and the reports."""
        return {"chosen": self.rule, "candidates": self.candidates}


def auto_windows(train: np.ndarray, cfg: SelectConfig, seed: int) -> np.ndarray:
    """The windows every candidate is scored on: (auto_windows, score_seq_len + 1) tokens of the
    TRAINING split, seeded apart from the score windows."""
    return sample_windows(train, cfg.auto_windows, cfg.score_seq_len + 1, seed + AUTO_SEED_OFFSET)


def choose_auto(
    reference: nn.Module,
    tokens: Any,
    cfg: SelectConfig,
    depth: int,
    bridging: _bridge.BridgeConfig | None = None,
    seed: int = 0,
    probe: Callable[[nn.Module, str], nn.Module] | None = None,
    eval_batch: int = 8,
) -> AutoChoice:
    """Build every rule's ``depth``-layer start (bridges included when ``bridging`` is a block
    bridge: ``depth`` then counts them), optionally ``probe`` it (train a few steps), score it on
    :func:`auto_windows` and return the best, with every candidate's numbers."""
    L = get_arch(reference).num_layers
    need = sorted(set(SCORE_OF.values()))
    scores = layer_scores(
        reference, score_windows(tokens.train, cfg, seed), need, cfg.angular_tokens
    )
    windows = auto_windows(tokens.train, cfg, seed)
    bridge_on = bridging is not None and bridging.bridge != "none"
    calib = _bridge.calibration_windows(tokens.train, bridging, seed) if bridge_on else None
    built: dict[tuple, dict[str, Any]] = {}
    candidates, best = [], None
    for rule in RULES:
        if bridge_on:
            kept, spans = kept_for_depth(rule, L, depth, scores, bridging.bridge_spans)
        else:
            kept, spans = kept_layers(rule, L, depth, scores), []
        key = (tuple(kept), tuple(spans))
        if key not in built:
            t0 = time.perf_counter()
            stats = None
            if spans:
                model, stats = _bridge.build_bridged(
                    reference, kept, calib, bridging, seed=seed, bridged=spans
                )
            else:
                model = select_layers(reference, kept)
            if probe is not None:
                model = probe(model, rule)
            loss = evaluate_loss(model, windows, eval_batch, desc=f"auto: {rule}")
            built[key] = {"model": model, "stats": stats, "loss": loss, "rule": rule}
            built[key]["seconds"] = time.perf_counter() - t0
        entry = built[key]
        candidates.append(
            {
                "rule": rule,
                "kept": kept,
                "bridged_spans": [list(s) for s in spans],
                "loss": entry["loss"],
                "same_as": None if entry["rule"] == rule else entry["rule"],
                "seconds": entry["seconds"] if entry["rule"] == rule else 0.0,
            }
        )
        if best is None or entry["loss"] < built[best]["loss"]:
            if best is not None:  # free the losers' weights as we go
                built[best]["model"] = None
            best = key
        elif key != best:
            entry["model"] = None
    win = built[best]
    kept, spans = list(best[0]), [tuple(s) for s in best[1]]
    for c in candidates:
        c["chosen"] = c["rule"] == win["rule"]
    return AutoChoice(win["rule"], kept, spans, win["model"], win["stats"], scores, candidates)
