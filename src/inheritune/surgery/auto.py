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
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch import nn

from inheritune.analysis.layer_scores import selection_scores
from inheritune.analysis.selection import (
    RULES,
    LayerScores,
    SelectConfig,
    bridged_spans,
    kept_for_depth,
    kept_layers,
    layer_ranges,
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

    windows: int = 0
    seq_len: int = 0

    def record(self) -> dict[str, Any]:
        """For provenance.json and the reports."""
        return {
            "chosen": self.rule,
            "candidates": self.candidates,
            "windows": self.windows,
            "seq_len": self.seq_len,
        }


def auto_windows(train: np.ndarray, cfg: SelectConfig, seed: int) -> np.ndarray:
    """The windows every candidate is scored on: (auto_windows, score_seq_len + 1) tokens of the
    TRAINING split, seeded apart from the score windows."""
    seed += AUTO_SEED_OFFSET
    n, t = cfg.auto_windows, cfg.score_seq_len + 1
    return sample_windows(train, n, t, seed, "training", "--score-seq-len (+1)")


def choose_auto(
    reference: nn.Module,
    tokens: Any,
    cfg: SelectConfig,
    depth: int,
    bridging: _bridge.BridgeConfig | None = None,
    seed: int = 0,
    probe: Callable[[nn.Module, str], nn.Module] | None = None,
    eval_batch: int = 8,
    count_bridges: bool = True,
) -> AutoChoice:
    """Build every rule's ``depth``-layer start (with a bridge block at its seams when
    ``bridging`` is a block bridge), optionally ``probe`` it (train a few steps), score it on
    :func:`auto_windows` and return the best, with every candidate's numbers.

    ``count_bridges``: ``depth`` counts the bridges (``inherit`` and ``compare``'s
    ``--num-layers``/``--depth``); False: ``depth`` layers are kept and the bridges come on top
    (``run``'s rounds)."""
    L = get_arch(reference).num_layers
    scores = selection_scores(reference, tokens, replace(cfg, select="auto"), seed)
    windows = auto_windows(tokens.train, cfg, seed)
    bridge_on = bridging is not None and bridging.bridge != "none"
    calib = _bridge.calibration_windows(tokens.train, bridging, seed) if bridge_on else None
    built: dict[tuple, dict[str, Any]] = {}
    candidates, best = [], None
    for rule in RULES:
        if bridge_on and count_bridges:
            kept, spans = kept_for_depth(rule, L, depth, scores, bridging.bridge_spans)
        elif bridge_on:
            kept = kept_layers(rule, L, depth, scores)
            spans = bridged_spans(kept, L, bridging.bridge_spans)
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
    return AutoChoice(
        win["rule"],
        kept,
        spans,
        win["model"],
        win["stats"],
        scores,
        candidates,
        windows=len(windows),
        seq_len=int(windows.shape[1]) - 1,
    )


def format_candidates(auto: dict[str, Any]) -> str:
    """:meth:`AutoChoice.record` as plain text: one line a candidate, the chosen one marked."""
    lines = ["--select auto: every rule's start, mean loss on training-split windows"]
    for c in auto["candidates"]:
        same = f" (= {c['same_as']})" if c["same_as"] else ""
        bridges = len(c["bridged_spans"])
        lines.append(
            f"  {'*' if c['chosen'] else ' '} {c['rule']:<10} {c['loss']:.4f}  layers "
            f"{layer_ranges(c['kept'])}" + (f" + {bridges} bridge(s)" if bridges else "") + same
        )
    lines.append(f"chosen: {auto['chosen']}")
    return "\n".join(lines)


def candidates_markdown(auto: dict[str, Any] | None) -> list[str]:
    """A report's ``--select auto`` section from :meth:`AutoChoice.record` (``run`` adds
    ``probe_steps``): every rule's start and its loss on the training-split windows."""
    if not auto:
        return []
    probe = auto.get("probe_steps") or 0
    lines = [
        "## `--select auto`",
        "",
        f"Every rule's start, scored by its mean loss on {auto.get('windows')} windows of "
        f"{auto.get('seq_len')} tokens of the training split"
        + (f" after {probe} probe steps of training" if probe else " as built (no training)")
        + f"; the lowest is kept: **{auto['chosen']}**.",
        "",
        "| rule | reference layers kept | bridge blocks | loss (training-split windows) |",
        "|---|---|---|---|",
    ]
    for c in auto["candidates"]:
        name = f"**{c['rule']}**" if c.get("chosen") else c["rule"]
        same = f" (same layers as {c['same_as']})" if c.get("same_as") else ""
        lines.append(
            f"| {name} | {layer_ranges(c['kept'])} | {len(c['bridged_spans'])} | "
            f"{c['loss']:.4f}{same} |"
        )
    return [*lines, ""]
