"""``inheritune compare``: Inheritune against every baseline and pruning alternative, same budget.

Each variant is a model of depth ``l`` (the comparison depth) built from the reference in its own
way, then trained with one shared :class:`~inheritune.train.TrainConfig`: the same corpus, the
same data order (seed), the same tokens per step, the same ``T`` steps and the same fixed
validation windows. The variants (paper section 3 and the layer-pruning literature):

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

Every variant also reports its validation loss before any training (the step-0 eval). Layers
are numbered from 0 (``mergekit.LAYER_NUMBERING``; the paper's plots number from 1).

``--export-mergekit FILE`` also writes the initial layer selection of every variant built from
reference layers as a mergekit passthrough config, one file per variant with the variant name
inserted before the suffix (``merge.yaml`` -> ``merge.prune-bi.yaml``); each file's header
comment lists the variants that have no selection (random init, half width) and were skipped.

Outputs in ``--out``: ``compare.md`` and ``compare.json`` (one row per variant: layers,
parameters, tokens trained, loss before and after training, tokens needed to reach the
reference's loss), ``curves.png`` (all validation curves against the reference line), the
resolved ``config.yaml``, and one folder per variant. A variant's ``result.json`` is written
atomically when it finishes; re-running skips finished variants and resumes an unfinished one
from its last checkpoint (``TrainConfig.resume``). Changing the settings that shape a variant
(depth, steps, training settings, ...) with the same ``--out`` is refused instead of mixing runs.

Bad input (an unknown variant, a depth a variant cannot build) is a :class:`ConfigError`
before any training. Without ``--variants`` every variant the reference can build runs and the
others are listed as skipped with the reason (SmolLM2's 9 attention heads cannot be halved, so
``half-width`` is skipped on it); naming an unbuildable variant explicitly is an error.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch import nn

from inheritune import checkpoint as ckpt
from inheritune import mergekit, models, plots, scoring, surgery
from inheritune.config import (
    ConfigError,
    check_positive,
    check_unit_interval,
    dataclass_from_dict,
    save_resolved,
    to_dict,
)
from inheritune.data import load_tokens, sample_windows
from inheritune.report import write_json_atomic
from inheritune.train import TrainConfig, eval_windows, evaluate_loss, train_model


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

# TrainConfig fields that compare sets itself, per variant; the --train mapping may not.
_OWNED_TRAIN_FIELDS = {
    "model": "--model",
    "data": "--data",
    "out": "--out",
    "steps": "--steps",
    "seed": "--seed",
    "resume": "(always on: finished variants are cached)",
    "teacher": "(the reference, for the kd-* variants)",
    "distill_alpha": "--kd-alpha",
    "distill_temperature": "--kd-temperature",
}
RESULT_JSON = "result.json"
SPEC_JSON = "spec.json"


@dataclass
class CompareConfig:
    """``inheritune compare``: every baseline at the same depth, data and token budget."""

    model: str = field(
        default="smollm2-135m",
        metadata={"help": "reference: default name, HF folder, .gguf file or hub id"},
    )
    data: str = field(
        default="shakespeare",
        metadata={"help": "corpus: default name, .txt/.jsonl/folder, hf:NAME"},
    )
    out: str = field(default="runs/compare", metadata={"help": "output folder (results cached)"})
    depth: int | None = field(
        default=None,
        metadata={
            "help": "layers l of every variant (default: half the reference, rounded down to "
            "an even number so stacking can build)"
        },
    )
    steps: int = field(default=100, metadata={"help": "training budget T in optimizer steps"})
    variants: list[str] | None = field(
        default=None,
        metadata={
            "help": "comma-separated variants (default: all the reference can build): "
            + ",".join(VARIANTS)
        },
    )
    train: dict[str, Any] | str = field(
        default_factory=dict,
        metadata={
            "help": "TrainConfig settings shared by every variant, a mapping, e.g. "
            "'{batch_size: 8, seq_len: 128, lr: 3e-4, eval_every: 10}'"
        },
    )
    kd_alpha: float = field(
        default=0.4, metadata={"help": "distillation weight: loss = (1-a) LM + a KL (paper: 0.4)"}
    )
    kd_temperature: float = field(default=1.0, metadata={"help": "distillation temperature"})
    calib_windows: int = field(
        default=16,
        metadata={"help": "training-split windows for the pruning scores (BI, angular, MaxRank)"},
    )
    calib_seq_len: int = field(default=128, metadata={"help": "tokens per calibration window"})
    angular_tokens: str = field(
        default="last",
        metadata={
            "help": "prune-angular's tokens: 'last' (Gromov et al., PruneMe) or 'all'",
            "choices": scoring.ANGULAR_TOKENS,
        },
    )
    export_mergekit: str | None = field(
        default=None,
        metadata={
            "help": "also write each variant's reference-layer selection as a mergekit "
            "passthrough YAML: FILE with the variant inserted (merge.yaml -> merge.prune-bi.yaml)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed for init, data order and calibration"})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "let transformers run the model repo's own code"}
    )

    def __post_init__(self) -> None:
        check_positive("steps", self.steps)
        if self.depth is not None and self.depth < 1:
            raise ConfigError(f"--depth must be >= 1, got {self.depth}")
        if self.variants is not None:
            if isinstance(self.variants, str):
                self.variants = [v for v in self.variants.split(",") if v]
            unknown = [v for v in self.variants if v not in VARIANTS]
            if unknown:
                raise ConfigError(
                    f"--variants: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}"
                )
            if not self.variants:
                raise ConfigError(f"--variants is empty; known: {', '.join(VARIANTS)}")
            if len(set(self.variants)) != len(self.variants):
                raise ConfigError(f"--variants lists a variant twice: {self.variants}")
        if isinstance(self.train, str):
            try:
                self.train = yaml.safe_load(self.train) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"--train is not a YAML mapping: {e}") from e
        if not isinstance(self.train, dict):
            raise ConfigError(
                f"--train must be a mapping of TrainConfig fields, got {self.train!r}"
            )
        owned = sorted(set(self.train) & set(_OWNED_TRAIN_FIELDS))
        if owned:
            raise ConfigError(
                f"--train may not set {owned}: compare sets them per variant "
                f"({'; '.join(f'{k}: {_OWNED_TRAIN_FIELDS[k]}' for k in owned)})"
            )
        self.train_config("variant", 1)  # TrainConfig's own validation, before anything runs
        check_unit_interval("kd_alpha", self.kd_alpha)
        check_positive("kd_temperature", self.kd_temperature)
        check_positive("calib_windows", self.calib_windows)
        check_positive("calib_seq_len", self.calib_seq_len)
        if self.angular_tokens not in scoring.ANGULAR_TOKENS:
            raise ConfigError(
                f"--angular-tokens must be one of {', '.join(scoring.ANGULAR_TOKENS)}, "
                f"got {self.angular_tokens!r}"
            )

    def train_config(self, out: str | Path, steps: int, distill: bool = False) -> TrainConfig:
        """The shared training settings for one variant's run in ``out``."""
        values = {
            **self.train,
            "model": self.model,
            "data": self.data,
            "out": str(out),
            "steps": steps,
            "seed": self.seed,
            "resume": True,
            "distill_alpha": self.kd_alpha if distill else 0.0,
            "distill_temperature": self.kd_temperature,
            "trust_remote_code": self.trust_remote_code,
        }
        return dataclass_from_dict(TrainConfig, values, where="--train")

    def selected(self) -> list[str]:
        return list(self.variants) if self.variants is not None else list(VARIANTS)


@dataclass
class CompareResult:
    """What :func:`compare` wrote: the table rows (as in compare.json) and the file paths."""

    out: Path
    reference_loss: float
    rows: list[dict[str, Any]]
    skipped: dict[str, str]
    markdown: Path
    json: Path
    plot: Path


# --------------------------------------------------------------------------- planning


def default_depth(num_layers: int) -> int:
    """Half the reference, rounded down to even (stacking duplicates l/2 layers)."""
    return max(2, (num_layers // 2) // 2 * 2)


def unbuildable_reason(name: str, num_layers: int, depth: int) -> str | None:
    """Why ``name`` cannot be built at ``depth`` from an ``num_layers``-layer reference, if so.

    (Half width also depends on the head counts; :func:`_check_half_width` asks surgery.)
    """
    L, d = num_layers, depth
    if name in ("stacking", "hybrid") and d % 2:
        return f"needs an even --depth (l/2 layers are stacked twice), got {d}"
    if name == "kd-every-other" and 2 * (d - 1) > L - 1:
        return (
            f"needs reference layers {_ranges(list(range(0, 2 * d, 2)))} but the reference has "
            f"{L}; use --depth <= {(L + 1) // 2}"
        )
    return None


def _check_depth(depth: int, num_layers: int) -> None:
    if depth >= num_layers:
        raise ConfigError(
            f"--depth {depth} must be smaller than the reference's {num_layers} layers "
            f"(choose 1-{num_layers - 1})"
        )


def _check_half_width(reference: nn.Module) -> str | None:
    try:
        surgery.half_width(reference)
    except ConfigError as e:
        return str(e)
    return None


def variant_spec(cfg: CompareConfig, name: str, depth: int) -> dict[str, Any]:
    """Everything that shapes one variant's result; a cached result must match it exactly."""
    v = VARIANTS[name]
    spec: dict[str, Any] = {
        "variant": name,
        "model": cfg.model,
        "data": cfg.data,
        "depth": depth,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "train": to_dict(cfg.train_config("", cfg.steps, v.distill)),
    }
    spec["train"].pop("out", None)
    if v.score:
        spec["calibration"] = {"windows": cfg.calib_windows, "seq_len": cfg.calib_seq_len}
    if v.score == "angular_distance":
        spec["calibration"]["angular_tokens"] = cfg.angular_tokens
    return json.loads(json.dumps(spec, default=str))


def _check_cache(folder: Path, spec: dict[str, Any]) -> bool:
    """True when ``folder`` holds a finished result for ``spec``; error on a different one."""
    for fname in (RESULT_JSON, SPEC_JSON):
        path = folder / fname
        if not path.is_file():
            continue
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError:
            if fname == RESULT_JSON:  # written atomically, so this is outside damage
                raise ConfigError(f"{path} is corrupt; delete it to re-run the variant") from None
            continue
        stored = stored.get("spec", stored) if fname == RESULT_JSON else stored
        if stored != spec:
            diff = sorted(k for k in {**stored, **spec} if stored.get(k) != spec.get(k))
            raise ConfigError(
                f"{folder} holds a run with different settings (differs in {diff}); pass another "
                f"--out or delete that folder"
            )
        if fname == RESULT_JSON:
            return True
    return False


# --------------------------------------------------------------------------- building variants


@dataclass
class _Context:
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
            self._scores = _layer_scores(self)
        return self._scores


def _layer_scores(ctx: _Context) -> dict[str, list[float]]:
    cfg, path = ctx.cfg, ctx.out / "scores.json"
    spec = {
        "model": cfg.model,
        "data": cfg.data,
        "seed": cfg.seed,
        "windows": cfg.calib_windows,
        "seq_len": cfg.calib_seq_len,
        "drop": ctx.num_layers - ctx.depth,
        "angular_tokens": cfg.angular_tokens,
    }
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("spec") == spec:
            return cached["scores"]
    # Calibration data from the training split: the validation windows stay unseen.
    windows = sample_windows(ctx.tokens.train, cfg.calib_windows, cfg.calib_seq_len, cfg.seed)
    n = ctx.num_layers - ctx.depth
    states = scoring.block_states(ctx.reference, windows)  # one forward pass for both scores
    angular = scoring.angular_distances_from_states(states, n, cfg.angular_tokens)
    scores = {
        "block_influence": scoring.block_influence_from_states(states).tolist(),
        "angular_distance": angular.tolist(),
        "max_rank": _max_ranks(ctx.reference, windows),
    }
    del states
    write_json_atomic(path, {"spec": spec, "scores": scores})
    return scores


def _max_ranks(reference: nn.Module, windows: np.ndarray) -> list[float]:
    """MaxRank per layer (PAPER.md section 1, tau = 0.9) on the calibration windows."""
    from inheritune import analyze

    result = analyze.run_analysis(reference, windows, analyze.AnalyzeConfig(), progress=False)
    return [float(x) for x in result.max_rank]


def build_initial(ctx: _Context, name: str) -> tuple[nn.Module, dict[str, Any]]:
    """The untrained ``l``-layer model of variant ``name`` and a record of how it was made."""
    ref, L, d, seed = ctx.reference, ctx.num_layers, ctx.depth, ctx.cfg.seed
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
        scores = ctx.scores()
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


def _train_stage(ctx: _Context, model: nn.Module, folder: Path, steps: int, v: Variant, desc: str):
    """Train one stage into ``folder``; ``<folder>.json`` beside it caches the finished stage.

    An unfinished stage resumes from its latest checkpoint (weights, optimizer, data position);
    a finished one keeps only its final model (``folder/final``) and logs.
    """
    cached = folder.with_suffix(".json")
    if cached.is_file():
        return json.loads(cached.read_text())
    tcfg = ctx.cfg.train_config(folder, steps, v.distill)
    # resume only when there is something to resume (train warns on an empty --resume)
    tcfg.resume = bool(ckpt.list_checkpoints(ckpt.checkpoints_root(folder)))
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
    write_json_atomic(cached, stage)
    # Finished stages are cached by stage.json + final/; their checkpoints (weights plus AdamW
    # state, ~4x the model) are only needed to resume, so free the disk now.
    shutil.rmtree(ckpt.checkpoints_root(folder), ignore_errors=True)
    if res.stop_signal:  # a signal during the final eval/save: the stage finished, then stop
        print(f"compare: stopped after finishing {folder}; rerun the same command to go on")
        raise SystemExit(128 + res.stop_signal)
    return stage


def run_variant(ctx: _Context, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Build, train and record one variant in ``out/<name>``; returns its result.json dict."""
    v, cfg, folder = VARIANTS[name], ctx.cfg, ctx.out / name
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / SPEC_JSON, spec)
    extra: dict[str, Any] = {}
    if name == "stacking":
        half = ctx.depth // 2
        small = surgery.random_init(ctx.reference.config, half, seed=cfg.seed)
        s1 = _train_stage(ctx, small, folder / "stage1", cfg.steps, v, f"{name} 1/2 ({half}L)")
        trained = models.load_model(s1["final_dir"])
        # Gong et al. 2019 copy the whole trained stack on top of itself: [0..k-1, 0..k-1].
        idx = list(range(half)) * 2
        model = surgery.select_layers(trained, idx, allow_repeats=True)
        info: dict[str, Any] = {"layers_from": None, "stacked": idx}
        params = models.count_parameters(model)
        s2 = _train_stage(ctx, model, folder / "stage2", cfg.steps, v, f"{name} 2/2 ({ctx.depth}L)")
        offset = s1["tokens"]
        evals = s1["evals"] + [{**e, "tokens": e["tokens"] + offset} for e in s2["evals"]]
        stages = [s1, s2]
        extra["loss_after_stacking"] = s2["evals"][0]["val_loss"]
    else:
        model, info = build_initial(ctx, name)
        params = models.count_parameters(model)
        s = _train_stage(ctx, model, folder / "train", cfg.steps * v.budget, v, name)
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
    write_json_atomic(folder / RESULT_JSON, result)
    return result


# --------------------------------------------------------------------------- the command


def tokens_to_reach(evals: list[dict[str, Any]], target: float) -> int | None:
    """Tokens at the first eval whose loss is <= ``target``; None when never reached."""
    for e in evals:
        if e["val_loss"] <= target:
            return int(e["tokens"])
    return None


def _reference_loss(ctx: _Context) -> float:
    tcfg = ctx.cfg.train_config("", ctx.cfg.steps)
    spec = {"model": ctx.cfg.model, "data": ctx.cfg.data, "train": to_dict(tcfg)}
    spec["train"].pop("out", None)
    spec = json.loads(json.dumps(spec, default=str))
    path = ctx.out / "reference.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("spec") == spec:
            return float(cached["val_loss"])
    windows = eval_windows(ctx.tokens, tcfg.seq_len, tcfg.eval_tokens)
    # the batch size train uses for its evals, so the sums are taken in the same order
    loss = float(evaluate_loss(ctx.reference, windows, max(1, tcfg.batch_size // tcfg.grad_accum)))
    write_json_atomic(path, {"spec": spec, "val_loss": loss})
    return loss


def compare(cfg: CompareConfig) -> CompareResult:
    """Run (or resume) every selected variant and write compare.md, compare.json, curves.png."""
    config = models.load_config(cfg.model, cfg.trust_remote_code)
    models.check_context(config, cfg.train_config("", 1).seq_len)
    models.check_context(config, cfg.calib_seq_len, "calib_seq_len")
    L = int(config.num_hidden_layers)
    depth = cfg.depth if cfg.depth is not None else default_depth(L)
    _check_depth(depth, L)
    # a model mergekit cannot read is refused before any training
    mk_source = None
    if cfg.export_mergekit:
        mergekit.check_path(cfg.export_mergekit)
        mk_source = mergekit.source_name(cfg.model)
    names = cfg.selected()
    skipped: dict[str, str] = {}
    for name in names:
        reason = unbuildable_reason(name, L, depth)
        if reason:
            skipped[name] = reason
    if cfg.variants is not None and skipped:
        raise ConfigError(
            f"cannot build at --depth {depth} of a {L}-layer reference: "
            + "; ".join(f"{n}: {r}" for n, r in skipped.items())
        )
    out = Path(cfg.out)
    specs = {n: variant_spec(cfg, n, depth) for n in names if n not in skipped}
    done = {n: _check_cache(out / n, s) for n, s in specs.items()}

    reference = models.load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if "half-width" in specs and not done["half-width"]:
        reason = _check_half_width(reference)
        if reason and cfg.variants is not None:
            raise ConfigError(f"cannot build half-width: {reason}")
        if reason:
            skipped["half-width"] = reason
            specs.pop("half-width")
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    tokens = load_tokens(cfg.data, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / "config.yaml")
    ctx = _Context(cfg, reference, tokenizer, tokens, depth, L, out)
    ref_loss = _reference_loss(ctx)
    print(
        f"reference {cfg.model}: {L} layers, val loss {ref_loss:.4f}; variants at depth {depth}",
        flush=True,
    )

    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    rows = []
    for i, name in enumerate(specs, 1):
        tag = f"[{i}/{len(specs)}] {name}"
        if done[name]:
            print(f"{tag}: cached in {out / name}", flush=True)
            row = json.loads((out / name / RESULT_JSON).read_text())
        else:
            print(f"{tag}: {VARIANTS[name].description}", flush=True)
            row = run_variant(ctx, name, specs[name])
        row["tokens_to_reference"] = tokens_to_reach(row["evals"], ref_loss)
        rows.append(row)

    reference_row = {
        "layers": L,
        "parameters": models.count_parameters(reference),
        "val_loss": ref_loss,
    }
    summary = {
        "config": to_dict(cfg),
        "depth": depth,
        "steps": cfg.steps,
        "reference": reference_row,
        "variants": [{k: v for k, v in r.items() if k != "spec"} for r in rows],
        "skipped": skipped,
        "layer_numbering": mergekit.LAYER_NUMBERING,
    }
    if cfg.export_mergekit:
        summary["mergekit"] = _export_mergekit(cfg, mk_source, config, rows)
    json_path = write_json_atomic(out / "compare.json", summary)
    curves = {
        r["variant"] + (f" ({r['budget']})" if r["budget"] != "1T" else ""): (
            [e["tokens"] for e in r["evals"]],
            [e["val_loss"] for e in r["evals"]],
        )
        for r in rows
    }
    plot = plots.plot_curves(
        curves,
        out / "curves.png",
        title=f"validation loss at depth {depth} ({cfg.steps} steps = T)",
        reference=ref_loss,
        reference_label=f"reference ({L} layers)",
    )
    md = out / "compare.md"
    md.write_text(render_markdown(summary, plot.name))
    print(f"wrote {md}, {json_path.name}, {plot.name}")
    return CompareResult(out, ref_loss, rows, skipped, md, json_path, plot)


def _export_mergekit(cfg: CompareConfig, source: str, config, rows: list[dict]) -> dict[str, Any]:
    """Each variant's initial reference-layer selection as a mergekit config (module docstring)."""
    selections, not_exported = {}, {}
    for r in rows:
        init = r["init"]
        if init.get("width"):
            not_exported[r["variant"]] = "half width: sliced weights, not whole layers"
        elif init.get("layers_from") is None:
            not_exported[r["variant"]] = "random init: no reference layers"
        else:
            selections[r["variant"]] = init["layers_from"]
    written = mergekit.export_selections(
        cfg.export_mergekit,
        source,
        mergekit.config_dtype(config),
        selections,
        {n: VARIANTS[n].description for n in selections},
        not_exported,
    )
    for name, path in written.items():
        print(f"mergekit config of {name}: {path}", flush=True)
    return {"written": {n: str(p) for n, p in written.items()}, "not_exported": not_exported}


def _fmt_tokens(n: int | None) -> str:
    if n is None:
        return "not reached"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def render_markdown(summary: dict[str, Any], plot_name: str) -> str:
    """compare.md: settings, the table (2T-budget rows marked) and the curve plot."""
    ref, cfg, depth = summary["reference"], summary["config"], summary["depth"]
    rows = summary["variants"]
    inh = next((r["loss_after"] for r in rows if r["variant"] == "inheritune"), None)
    lines = [
        f"# Baselines at depth {depth}: {Path(cfg['model']).name} on {Path(cfg['data']).name}",
        "",
        f"Every variant has {depth} layers (half-width: all {ref['layers']} at half width; "
        f"scratch-full: all {ref['layers']} from scratch) and is "
        f"trained with the same settings for T = {summary['steps']} steps on the same data; "
        f"losses are on the same fixed validation windows. Reference ({ref['layers']} layers, "
        f"{ref['parameters']:,} parameters, untrained here): **{ref['val_loss']:.4f}**.",
        "",
        "| variant | init | layers | params | tokens | loss before | loss after "
        "| vs inheritune | tokens to reference |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = " †" if r["budget"] != "1T" else ""
        delta = "" if inh is None else f"{r['loss_after'] - inh:+.4f}"
        lines.append(
            f"| {r['variant']}{mark} | {_init_text(r)} | {r['layers']} | {r['parameters']:,} "
            f"| {_fmt_tokens(r['tokens'])} | {r['loss_before']:.4f} | {r['loss_after']:.4f} "
            f"| {delta} | {_fmt_tokens(r['tokens_to_reference'])} |"
        )
    lines += [
        "",
        "† trained for 2T steps in all (random-2x: 2T at depth l; stacking: T at l/2 layers, "
        "then T at l after copying the stack on top of itself), so twice the others' tokens.",
        "'loss before' is the step-0 eval (stacking: its l/2-layer start); 'tokens to reference' "
        "is the first eval at or below the reference's loss. Layers are numbered from 0 (the "
        "paper's plots number from 1).",
    ]
    if summary["skipped"]:
        lines += ["", "Skipped (cannot be built for this reference at this depth):", ""]
        lines += [f"* {n}: {why}" for n, why in summary["skipped"].items()]
    lines += ["", f"![validation curves]({plot_name})", ""]
    return "\n".join(lines)


def _init_text(row: dict[str, Any]) -> str:
    init = row["init"]
    if "dropped" in init:
        return f"drop {_ranges(init['dropped'])}"
    if "stacked" in init:
        return "random, stacked"
    if init.get("width") == "half":
        return "sliced"
    src = init.get("layers_from")
    return "random" if src is None else f"layers {_ranges(src)}"


def _ranges(idx: list[int]) -> str:
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


__all__ = [
    "VARIANTS",
    "CompareConfig",
    "CompareResult",
    "Variant",
    "compare",
    "default_depth",
    "render_markdown",
    "tokens_to_reach",
    "unbuildable_reason",
]
