"""The recipe's decisions and its memory: pure functions for the initial depth, matching, the
next depth (stop or grow), warm growth, and :class:`RunState` (``OUT/run_state.json``, the
rounds a run has finished, rewritten atomically after each step so a rerun resumes).

Used by :mod:`inheritune.recipe`; every function here is tested on its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inheritune import storage
from inheritune.config import ConfigError, flag
from inheritune.models.arch import get_arch
from inheritune.recipe.config import RecipeConfig
from inheritune.surgery import build as surgery

STATE_FILE = "run_state.json"
STATE_VERSION = 1


@dataclass
class RunState:
    """What a run has finished; ``OUT/run_state.json``, rewritten atomically after each step."""

    path: Path
    spec: dict[str, Any]
    analysis: dict[str, Any] | None = None
    reference: dict[str, Any] | None = None
    trained_reference: dict[str, Any] | None = None
    precision: dict[str, Any] | None = None  # --precision auto: the choice and its timings
    auto: dict[str, Any] | None = None  # --select auto: every candidate's loss and the choice
    baseline: dict[str, Any] | None = None  # --baseline paper: its training, like a round's
    rounds: list[dict[str, Any]] = field(default_factory=list)
    write: bool = True  # False on non-main ranks under torchrun

    @classmethod
    def open(cls, out: Path, cfg: RecipeConfig, write: bool = True) -> RunState:
        """The run state in ``out``: a new one, or the saved one if its settings match."""
        path, spec = out / STATE_FILE, cfg.spec()
        try:
            saved = storage.read_cached(path, spec)
        except storage.StaleCacheError:
            old = json.loads(path.read_text()).get("spec", {})
            diff = ", ".join(flag(k) for k in storage.spec_diff(old, spec))
            raise ConfigError(
                f"--out {out} holds a run made with different settings ({diff}); "
                f"use the same settings to resume it, or choose another --out"
            ) from None
        except storage.CheckpointError as e:
            raise ConfigError(f"--out {out}: {STATE_FILE} is unreadable ({e})") from e
        if saved is None:
            return cls(path, spec, write=write)
        if saved.get("version") != STATE_VERSION:
            raise ConfigError(f"--out {out}: {STATE_FILE} has an unknown version")
        keys = ("analysis", "reference", "trained_reference", "precision", "auto", "baseline")
        state = cls(path, spec, **{k: saved.get(k) for k in keys}, write=write)
        state.rounds = list(saved.get("rounds", []))
        return state

    def save(self) -> None:
        if not self.write:
            return
        payload = {
            "version": STATE_VERSION,
            "analysis": self.analysis,
            "reference": self.reference,
            "trained_reference": self.trained_reference,
            "precision": self.precision,
            "auto": self.auto,
            "baseline": self.baseline,
            "rounds": self.rounds,
        }
        storage.write_cached(self.path, self.spec, payload)


# --------------------------------------------------------------------------- pure decisions


def choose_init_depth(spec: str, num_layers: int, analysis: dict[str, Any] | None) -> int:
    """Step 2: the initial depth from ``--init-depth`` (half | analysis | N)."""
    if spec == "half":
        return max(1, num_layers // 2)
    if spec == "analysis":
        if not analysis:
            raise ConfigError("--init-depth analysis needs the analysis step")
        return int(analysis["suggested_depth"]["analysis"])
    depth = int(spec)
    if not 1 <= depth <= num_layers:
        raise ConfigError(
            f"--init-depth {depth} is out of range: the reference has {num_layers} layers"
        )
    return depth


def resolve_max_depth(max_depth: int | None, num_layers: int, init: int) -> int:
    """The deepest target tried: ``--max-depth`` or L - 1 (as deep as the reference saves nothing)."""
    deepest = num_layers - 1 if max_depth is None else max_depth
    if deepest > num_layers:
        raise ConfigError(f"--max-depth {deepest} exceeds the reference's {num_layers} layers")
    return max(deepest, init)


def matches(val_loss: float, target_loss: float, tolerance: float) -> bool:
    """Step 5: is the target at least as good as the target loss (within ``tolerance``)?"""
    return math.isfinite(val_loss) and val_loss <= target_loss + tolerance


def next_step(
    round_no: int, depth: int, matched: bool, cfg: RecipeConfig, max_depth: int
) -> tuple[int | None, str]:
    """Step 6: the next round's depth, or None and why the recipe stops."""
    if matched and round_no >= cfg.min_rounds:
        return None, "matched the target loss"
    if round_no >= cfg.max_rounds:
        return None, f"reached --max-rounds {cfg.max_rounds}"
    if depth >= max_depth:
        return None, f"reached --max-depth {max_depth}"
    return min(depth + cfg.grow_by, max_depth), ""


# --------------------------------------------------------------------------- model building


def warm_grow(
    trained: torch.nn.Module,
    reference: torch.nn.Module,
    kept: int | Sequence[int],
    parts: str,
    prev_kept: Sequence[int] | None = None,
):
    """Warm growth: ``trained`` (its blocks, embeddings, norm, head) with the reference blocks it
    lacks put back in their places. ``trained`` holds reference layers ``prev_kept`` (default:
    its first k), the grown model ``kept`` (an int: the first that many), a superset of them."""
    k = get_arch(trained).num_layers
    L = get_arch(reference).num_layers
    new = list(range(kept)) if isinstance(kept, int) else [int(i) for i in kept]
    old = list(range(k)) if prev_kept is None else [int(i) for i in prev_kept]
    if len(old) != k or not set(old) < set(new) or not len(new) <= L:
        raise ValueError(f"cannot grow a {k}-layer model of layers {old} to layers {new}")
    grown = surgery.select_layers(reference, new, parts=parts)
    prefix = get_arch(grown).layout.layers + "."
    place = {j: new.index(i) for j, i in enumerate(old)}  # trained block j -> grown position
    state = {}
    for name, t in trained.state_dict().items():
        if name.startswith(prefix):
            j, rest = name[len(prefix) :].split(".", 1)
            name = f"{prefix}{place[int(j)]}.{rest}"
        state[name] = t
    missing, unexpected = grown.load_state_dict(state, strict=False)
    added = {new.index(i) for i in new if i not in set(old)}
    # Only the added blocks may be missing from the trained model's state.
    bad = [
        m
        for m in missing
        if not m.startswith(prefix) or int(m[len(prefix) :].split(".")[0]) not in added
    ]
    if unexpected or bad:
        raise RuntimeError(
            f"warm growth: state mismatch (missing {bad[:5]}, unexpected {unexpected[:5]})"
        )
    return grown
