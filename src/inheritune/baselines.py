"""The baselines and pruning alternatives ``inheritune compare`` trains beside Inheritune.

Each variant is a model of depth ``l`` (the comparison depth) built from the reference in its own
way (:func:`build_initial`) and trained with the one :class:`~inheritune.train.TrainConfig` that
:mod:`inheritune.compare` shares between them all (:func:`run_variant`: one training stage, or
stacking's two). A variant's ``spec.json`` (:func:`variant_spec`: what shapes its result) and
``result.json`` cache it: a finished variant is not trained again, an unfinished one resumes.
The variants (paper section 3 and the layer-pruning literature):

=================  ===============================================================  ======
name               initial model                                                    budget
=================  ===============================================================  ======
inheritune         reference layers 0..l-1 (+ embeddings, final norm, head)         T
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

Layers are numbered from 0 (``mergekit.LAYER_NUMBERING``; the paper's plots number from 1).
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from inheritune import bridge, models, scoring, surgery
from inheritune import checkpoint as ckpt
from inheritune.arch import get_arch
from inheritune.config import ConfigError, to_dict
from inheritune.data import sample_windows
from inheritune.train import train_model

if TYPE_CHECKING:  # compare.py builds on this module
    from inheritune.compare import CompareConfig


@dataclass(frozen=True)
class Variant:
    """One way to build and train an ``l``-layer model; ``budget`` is in units of T steps."""

    name: str
    description: str
    budget: int = 1
    distill: bool = False
    score: str | None = None  # the layer score a pruning variant needs


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
        Variant("prune-bi", "drop lowest Block Influence layers", score="block_influence"),
        Variant("prune-angular", "drop least angular-distance block", score="angular_distance"),
        Variant("prune-keep-last", "drop the deepest layers but the last (0..l-2, L-1)"),
        Variant("prune-lazy", "drop lowest MaxRank layers", score="max_rank"),
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
    pruned = [n for n in names if VARIANTS[n].score]
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


def layer_scores(
    reference: nn.Module, windows: np.ndarray, drop: int, angular_tokens: str
) -> dict[str, list[float]]:
    """The pruning variants' layer scores on calibration windows (one forward for BI and
    angular distance, one eager pass for MaxRank)."""
    states = scoring.block_states(reference, windows)
    angular = scoring.angular_distances_from_states(states, drop, angular_tokens)
    scores = {
        "block_influence": scoring.block_influence_from_states(states).tolist(),
        "angular_distance": angular.tolist(),
        "max_rank": _max_ranks(reference, windows),
    }
    del states
    return scores


def _max_ranks(reference: nn.Module, windows: np.ndarray) -> list[float]:
    """MaxRank per layer (PAPER.md section 1, tau = 0.9) on the calibration windows."""
    from inheritune import analyze

    result = analyze.run_analysis(reference, windows, analyze.AnalyzeConfig(), progress=False)
    return [float(x) for x in result.max_rank]


def build_initial(
    reference: nn.Module,
    name: str,
    depth: int,
    seed: int,
    scores: Callable[[], dict[str, list[float]]],
) -> tuple[nn.Module, dict[str, Any]]:
    """The untrained ``depth``-layer model of variant ``name`` and a record of how it was made;
    ``scores()`` gives the pruning variants' layer scores (computed only when needed)."""
    ref, d = reference, depth
    L = get_arch(ref).num_layers
    if name == "inheritune":
        return surgery.first_layers(ref, d), {"layers_from": list(range(d))}
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
    if name == "prune-keep-last":
        drop = scoring.keep_last_drop(L, L - d)
        keep = [i for i in range(L) if i not in set(drop)]
        return surgery.drop_layers(ref, drop), {"layers_from": keep, "dropped": drop}
    if name in ("prune-bi", "prune-angular", "prune-lazy"):
        scores = scores()
        k = L - d
        if name == "prune-bi":
            drop = scoring.lowest_bi_drop(scores["block_influence"], k)
        elif name == "prune-angular":
            drop = scoring.best_block_drop(scores["angular_distance"], k)
        else:  # collapse is a property of depth: among equal MaxRanks drop the deeper layer
            drop = scoring.lowest_score_drop(scores["max_rank"], k, prefer_deep=True)
        keep = [i for i in range(L) if i not in set(drop)]
        return surgery.drop_layers(ref, drop), {"layers_from": keep, "dropped": drop}
    raise ConfigError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")  # unreachable


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


# --------------------------------------------------------------------------- caching

RESULT_JSON = "result.json"
SPEC_JSON = "spec.json"


def variant_spec(cfg: CompareConfig, name: str, depth: int) -> dict[str, Any]:
    """Everything that shapes one variant's result; a cached result must match it exactly."""
    v = VARIANTS[name]
    train = to_dict(cfg.train_config("", cfg.train.steps, v.distill))
    for key in ("out", "resume", "dist_timeout", "tensorboard"):  # no effect on the result
        train.pop(key, None)
    spec: dict[str, Any] = {"variant": name, "depth": depth, "train": train}
    if v.score:
        spec["calibration"] = {"windows": cfg.calib_windows, "seq_len": cfg.calib_seq_len}
    if name == "inheritune" and cfg.bridging.bridge != "none":
        spec["bridge"] = to_dict(cfg.bridging)
    if v.score == "angular_distance":
        spec["calibration"]["angular_tokens"] = cfg.angular_tokens
    return ckpt.canonical(spec)


def is_cached(folder: Path, spec: dict[str, Any]) -> bool:
    """True when ``folder`` holds a finished result for ``spec``; error on a different one."""
    try:
        ckpt.read_cached(folder / SPEC_JSON, spec)  # an unfinished run of other settings
        return ckpt.read_cached(folder / RESULT_JSON, spec) is not None
    except ckpt.StaleCacheError as e:
        raise ConfigError(f"{folder} holds a run with different settings: {e}") from None
    except ckpt.CheckpointError as e:
        raise ConfigError(f"{e} (the variant in {folder} is re-run once it is deleted)") from None


# --------------------------------------------------------------------------- running variants


@dataclass
class RunContext:
    """What every variant's run shares: the settings, the reference, its data, the depth and
    the results folder; the pruning scores are computed on first use."""

    cfg: CompareConfig
    reference: nn.Module
    tokenizer: Any
    tokens: Any
    depth: int
    num_layers: int
    out: Path
    _scores: dict[str, list[float]] | None = None

    def scores(self) -> dict[str, list[float]]:
        """Layer scores of the reference on calibration windows, computed once and cached."""
        if self._scores is None:
            self._scores = self._load_or_compute_scores()
        return self._scores

    def _load_or_compute_scores(self) -> dict[str, list[float]]:
        cfg, path = self.cfg, self.out / "scores.json"
        spec = {
            "model": cfg.train.model,
            "data": cfg.train.data,
            "seed": cfg.train.seed,
            "windows": cfg.calib_windows,
            "seq_len": cfg.calib_seq_len,
            "drop": self.num_layers - self.depth,
            "angular_tokens": cfg.angular_tokens,
        }
        cached = ckpt.read_cached(path, spec, strict=False)
        if cached is not None:
            return cached["scores"]
        # Calibration data from the training split: the validation windows stay unseen.
        windows = sample_windows(
            self.tokens.train, cfg.calib_windows, cfg.calib_seq_len, cfg.train.seed
        )
        drop = self.num_layers - self.depth
        scores = layer_scores(self.reference, windows, drop, cfg.angular_tokens)
        ckpt.write_cached(path, spec, {"scores": scores})
        return scores


def _train_stage(
    ctx: RunContext, model: nn.Module, folder: Path, steps: int, v: Variant, desc: str
):
    """Train one stage into ``folder``; ``<folder>.json`` beside it caches the finished stage.

    An unfinished stage resumes from its latest checkpoint (weights, optimizer, data position);
    a finished one keeps only its final model (``folder/final``) and logs.
    """
    cached = folder.with_suffix(".json")
    if cached.is_file():
        return json.loads(cached.read_text())
    tcfg = ctx.cfg.train_config(folder, steps, v.distill)
    teacher = ctx.reference if v.distill else None
    res = train_model(model, ctx.tokenizer, ctx.tokens, tcfg, teacher=teacher, desc=desc)
    if res.interrupted:
        print(f"compare: stopped in {folder} at step {res.steps}; rerun the same command to resume")
        raise SystemExit(128 + res.stop_signal)
    stage = {
        "steps": res.steps,
        "tokens": res.tokens,
        "wall_s": res.wall_s,
        "tokens_per_s": res.tokens_per_s,
        "final_dir": str(res.final_dir),
        "evals": [dict(e) for e in res.evals],
    }
    ckpt.atomic_write_json(cached, stage)
    # Finished stages are cached by stage.json + final/; their checkpoints (weights plus AdamW
    # state, ~4x the model) are only needed to resume, so free the disk now.
    shutil.rmtree(ckpt.checkpoints_root(folder), ignore_errors=True)
    if res.stop_signal:  # a signal during the final eval/save: the stage finished, then stop
        print(f"compare: stopped after finishing {folder}; rerun the same command to go on")
        raise SystemExit(128 + res.stop_signal)
    return stage


def run_variant(ctx: RunContext, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Build, train and record one variant in ``out/<name>``; returns its result.json dict."""
    v, cfg, folder = VARIANTS[name], ctx.cfg, ctx.out / name
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.write_cached(folder / SPEC_JSON, spec, {})
    extra: dict[str, Any] = {}
    if name == "stacking":
        half = ctx.depth // 2
        small = surgery.random_init(ctx.reference.config, half, seed=cfg.train.seed)
        s1 = _train_stage(
            ctx, small, folder / "stage1", cfg.train.steps, v, f"{name} 1/2 ({half}L)"
        )
        trained = models.load_model(s1["final_dir"])
        # Gong et al. 2019 copy the whole trained stack on top of itself: [0..k-1, 0..k-1].
        idx = list(range(half)) * 2
        model = surgery.select_layers(trained, idx, allow_repeats=True)
        info: dict[str, Any] = {"layers_from": None, "stacked": idx}
        params = models.count_parameters(model)
        s2 = _train_stage(
            ctx, model, folder / "stage2", cfg.train.steps, v, f"{name} 2/2 ({ctx.depth}L)"
        )
        offset = s1["tokens"]
        evals = s1["evals"] + [{**e, "tokens": e["tokens"] + offset} for e in s2["evals"]]
        stages = [s1, s2]
        extra["loss_after_stacking"] = s2["evals"][0]["val_loss"]
    elif name == "inheritune" and cfg.bridging.bridge == "block":
        ids = bridge.calibration_windows(ctx.tokens.train, cfg.bridging, cfg.train.seed)
        model, fit = bridge.build_bridged(
            ctx.reference, ctx.depth - 1, ids, cfg.bridging, seed=cfg.train.seed
        )
        info = {"layers_from": list(range(ctx.depth - 1)), "depth": ctx.depth, "bridge": fit}
        extra["bridge"] = fit
        params = models.count_parameters(model)
        s = _train_stage(ctx, model, folder / "train", cfg.train.steps * v.budget, v, name)
        evals, stages = s["evals"], [s]
    else:
        model, info = build_initial(ctx.reference, name, ctx.depth, cfg.train.seed, ctx.scores)
        params = models.count_parameters(model)
        s = _train_stage(ctx, model, folder / "train", cfg.train.steps * v.budget, v, name)
        evals, stages = s["evals"], [s]
    layers = info.get("depth") or len(
        info.get("stacked") or info["layers_from"] or range(ctx.depth)
    )
    result = {
        "variant": name,
        "description": v.description,
        "budget": f"{v.budget}T",
        "layers": layers,
        "parameters": params,
        "init": info,
        "steps": sum(s["steps"] for s in stages),
        "tokens": sum(s["tokens"] for s in stages),
        "loss_before": evals[0]["val_loss"],
        "loss_after": evals[-1]["val_loss"],
        "evals": evals,
        "wall_s": sum(s["wall_s"] for s in stages),
        "tokens_per_s": [s["tokens_per_s"] for s in stages],
        **extra,
        "spec": spec,
    }
    ckpt.atomic_write_json(folder / RESULT_JSON, result)
    return result
