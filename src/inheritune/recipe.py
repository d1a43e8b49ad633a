"""``inheritune run``: the whole Inheritune recipe (paper Alg. 1) as one resumable job.

1. analyse the reference's attention collapse (:mod:`inheritune.analyze`);
2. choose the initial depth: L/2 (paper), the analysis-based suggestion, or a number;
3. inherit the reference's embeddings, first l blocks, final norm and head
   (:func:`inheritune.surgery.first_layers`);
4. train the target for ``steps`` steps (:func:`inheritune.train.train_model`);
5. compare its validation loss with the target loss -- the reference's zero-shot loss, or the
   reference trained with the same budget -- on the same fixed validation windows;
6. while worse (by more than ``tolerance``): grow by ``grow_by`` layers and train again, up to
   ``max_depth`` layers or ``max_rounds`` rounds.

Growth modes: ``reinit`` (the paper's: each round restarts from the reference's first l layers)
and ``warm`` (keep the previous round's trained model and append the next reference layers).

Resuming: ``OUT/run_state.json`` (written atomically after every finished step of the recipe)
lists the analysis, the reference's loss and every finished round. Running the same command
again skips what is finished and resumes an unfinished round from its own checkpoints
(``OUT/rounds/round-NN-LK``, training loop resume). Settings that decide when to stop
(``max_rounds``, ``max_depth``, ``min_rounds``, ``tolerance``) may change between runs, so a
finished run can be continued with a larger budget; anything else must match.

Outputs in ``OUT``: ``final_model/`` (Hugging Face folder), ``report.json``, ``report.md``,
``curves.png``, ``analysis/`` (collapse plots and numbers), ``config.yaml`` (resolved config).

Usage::

    inheritune run --config src/inheritune/presets/demo.yaml --out runs/demo
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from inheritune import analyze as analyze_mod
from inheritune import assets, data, models, surgery
from inheritune import checkpoint as ckpt
from inheritune import train as train_mod
from inheritune.arch import get_arch
from inheritune.calibrate import calibrate_final_norm
from inheritune.config import (
    ConfigError,
    check_positive,
    check_unit_interval,
    dataclass_from_dict,
    flag,
    save_resolved,
    to_dict,
)
from inheritune.report import measure_speeds, write_json_atomic, write_report

STATE_FILE = "run_state.json"
STATE_VERSION = 1
GROWTH_MODES = ("reinit", "warm")
TARGETS = ("reference", "trained-reference")
# Settings that only decide when the recipe stops or how the report is measured; a finished or
# interrupted run may be continued with different values (e.g. a larger --max-rounds).
RESUMABLE_CHANGES = frozenset(
    {
        "out",
        "max_rounds",
        "max_depth",
        "min_rounds",
        "tolerance",
        "speed_batch_size",
        "speed_seq_len",
        "speed_warmup",
        "speed_iters",
        "eval_every",
        "save_every",
        "keep_last",
        "log_every",
    }
)
# TrainConfig fields the recipe sets itself for every round instead of mirroring them.
SET_BY_RECIPE = frozenset({"model", "data", "out", "resume", "teacher", "steps"})


def _h(text: str, **kw: Any) -> dict[str, Any]:
    return {"help": text, **kw}


@dataclass
class RecipeConfig:
    """Settings of ``inheritune run``; a YAML preset is this dataclass written down (flat keys).

    The training settings of every round (``steps`` ... ``distill_temperature``) have the same
    names and meaning as ``inheritune train``'s flags.
    """

    # -- what
    model: str = field(
        default=assets.DEFAULT_MODEL,
        metadata=_h("reference model: default name, HF folder, .gguf file or hub id"),
    )
    data: str = field(
        default=assets.DEFAULT_CORPUS,
        metadata=_h("training corpus; its held-out last 5 percent is the validation split"),
    )
    out: str = field(
        default="runs/run", metadata=_h("run folder (resumed when it holds an unfinished run)")
    )

    # -- step 1: analysis
    analysis: bool = field(
        default=True, metadata=_h("analyse the reference's attention collapse first")
    )
    analysis_num_seqs: int = field(
        default=100, metadata=_h("validation windows analysed (paper: 100)")
    )
    analysis_seq_len: int = field(
        default=100, metadata=_h("tokens per analysed window (paper: 100)")
    )
    tau: float = field(
        default=0.9, metadata=_h("spectral energy share for the approximate rank (paper: 0.9)")
    )
    eta: float = field(
        default=0.9, metadata=_h("mass share for the dominant-column count (paper: 0.9)")
    )

    # -- step 2/6: depth schedule
    init_depth: str = field(
        default="half",
        metadata=_h(
            "initial depth: 'half' (L/2, paper), 'analysis' (analysis-based suggestion) or a number"
        ),
    )
    grow_by: int = field(default=2, metadata=_h("layers added per round (paper: 2)"))
    max_depth: int | None = field(
        default=None, metadata=_h("deepest target tried (default: reference layers - 1)")
    )
    max_rounds: int = field(default=5, metadata=_h("most training rounds"))
    min_rounds: int = field(
        default=1, metadata=_h("train at least this many rounds even if matched earlier")
    )
    growth: str = field(
        default="reinit",
        metadata={
            "help": "reinit: each round restarts from the reference's first l layers (paper); "
            "warm: keep the trained layers and append the next reference layers",
            "choices": GROWTH_MODES,
        },
    )
    parts: str = field(
        default="block",
        metadata={
            "help": "what each inherited block brings (paper ablation)",
            "choices": surgery.PARTS,
        },
    )
    calibrate_iters: int = field(
        default=0,
        metadata=_h(
            "L-BFGS iterations fitting the final norm to each new target before training "
            "(0 = off; see inheritune.calibrate)"
        ),
    )
    calibrate_windows: int = field(
        default=4, metadata=_h("training windows of --seq-len tokens used by the calibration")
    )

    # -- step 5: the comparison
    target: str = field(
        default="reference",
        metadata={
            "help": "loss to match: the reference's zero-shot validation loss ('reference') or "
            "the reference trained with the same budget ('trained-reference')",
            "choices": TARGETS,
        },
    )
    tolerance: float = field(
        default=0.0,
        metadata=_h("a round matches when its val loss <= target loss + tolerance (nats/token)"),
    )

    # -- step 4: training of every round (same meaning as `inheritune train`)
    steps: int = field(default=1000, metadata=_h("optimizer steps per round (the paper's T)"))
    batch_size: int = field(
        default=8,
        metadata=_h("global sequences per optimizer step (split by grad_accum and processes)"),
    )
    seq_len: int = field(default=256, metadata=_h("tokens per training and validation window"))
    grad_accum: int = field(default=1, metadata=_h("micro-batches per step (splits batch_size)"))
    lr: float = field(default=3e-4, metadata=_h("peak learning rate"))
    min_lr: float = field(default=1e-5, metadata=_h("final learning rate of the cosine schedule"))
    warmup: int = field(default=100, metadata=_h("linear warm-up steps"))
    weight_decay: float = field(default=0.1, metadata=_h("AdamW weight decay (matrices only)"))
    grad_clip: float = field(default=1.0, metadata=_h("gradient-norm clip (0: off)"))
    eval_every: int = field(default=200, metadata=_h("steps between validation evaluations"))
    eval_tokens: int = field(
        default=65536,
        metadata=_h(
            "validation tokens per evaluation (fixed windows, also used for the reference)"
        ),
    )
    save_every: int = field(default=200, metadata=_h("steps between checkpoints"))
    keep_last: int = field(default=2, metadata=_h("checkpoints kept per round"))
    log_every: int = field(default=10, metadata=_h("steps between log lines"))
    precision: str = field(
        default="fp32", metadata={"help": "fp32, or bf16 autocast", "choices": ("fp32", "bf16")}
    )
    compile: bool = field(default=False, metadata=_h("torch.compile the model"))
    seed: int = field(
        default=0, metadata=_h("seed of initialisation, data order and analysis windows")
    )
    fsdp: bool = field(default=False, metadata=_h("shard with FSDP2 under torchrun (else DDP)"))
    embed_lr_scale: float = field(
        default=1.0, metadata=_h("learning-rate multiplier of the embeddings")
    )
    head_lr_scale: float = field(
        default=1.0, metadata=_h("learning-rate multiplier of an untied LM head")
    )
    norm_lr_scale: float = field(default=1.0, metadata=_h("learning-rate multiplier of the norms"))
    freeze: list[str] = field(
        default_factory=list,
        metadata=_h("comma list of parameter-name substrings or globs kept frozen"),
    )
    distill_alpha: float = field(
        default=0.0,
        metadata=_h(
            "weight of the KL loss to the reference's logits (0: plain LM loss; paper KD: 0.4)"
        ),
    )
    distill_temperature: float = field(default=1.0, metadata=_h("distillation temperature"))

    # -- report: inference speed
    speed_batch_size: int = field(default=8, metadata=_h("batch of the timed forward passes"))
    speed_seq_len: int | None = field(
        default=None, metadata=_h("tokens per timed sequence (default: seq_len)")
    )
    speed_warmup: int = field(default=2, metadata=_h("untimed forward passes before timing"))
    speed_iters: int = field(
        default=5, metadata=_h("timed forward passes (the median is reported)")
    )

    trust_remote_code: bool = field(
        default=False, metadata=_h("allow custom model code from the model folder")
    )

    def __post_init__(self) -> None:
        if isinstance(self.freeze, str):  # YAML may give one pattern as a plain string
            self.freeze = [s for s in self.freeze.split(",") if s]
        self.init_depth = str(self.init_depth).strip()
        if self.init_depth not in ("half", "analysis") and (
            not self.init_depth.isdigit() or int(self.init_depth) < 1
        ):
            raise ConfigError(
                f"--init-depth must be 'half', 'analysis' or a positive number of layers, "
                f"got {self.init_depth!r}"
            )
        if self.init_depth == "analysis" and not self.analysis:
            raise ConfigError("--init-depth analysis needs the analysis (drop --no-analysis)")
        for name, value in (("growth", self.growth), ("target", self.target)):
            choices = GROWTH_MODES if name == "growth" else TARGETS
            if value not in choices:
                raise ConfigError(
                    f"{flag(name)} must be one of {', '.join(choices)}, got {value!r}"
                )
        if self.parts not in surgery.PARTS:
            raise ConfigError(
                f"--parts must be one of {', '.join(surgery.PARTS)}, got {self.parts!r}"
            )
        for name in (
            "grow_by",
            "max_rounds",
            "min_rounds",
            "analysis_num_seqs",
            "analysis_seq_len",
        ):
            check_positive(name, getattr(self, name))
        for name in ("speed_batch_size", "speed_iters"):
            check_positive(name, getattr(self, name))
        check_positive("speed_warmup", self.speed_warmup, allow_zero=True)
        if self.speed_seq_len is not None:
            check_positive("speed_seq_len", self.speed_seq_len)
        if self.max_depth is not None:
            check_positive("max_depth", self.max_depth)
        if self.min_rounds > self.max_rounds:
            raise ConfigError(
                f"--min-rounds {self.min_rounds} exceeds --max-rounds {self.max_rounds}"
            )
        check_positive("tolerance", self.tolerance, allow_zero=True)
        check_unit_interval("tau", self.tau)
        check_unit_interval("eta", self.eta)
        # The training settings are validated by TrainConfig itself, before anything heavy runs.
        self.round_train_config(Path(self.out) / "rounds" / "check")

    # -- derived configs

    def round_train_config(self, out: Path, model: str | None = None) -> train_mod.TrainConfig:
        """The TrainConfig of one round (or of the trained reference) written into ``out``."""
        names = {f.name for f in fields(train_mod.TrainConfig)}
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name in names}
        values = {k: v for k, v in values.items() if k not in SET_BY_RECIPE}
        values.update(model=model or self.model, data=self.data, out=str(out), steps=self.steps)
        # An interrupted round continues from its own checkpoints; a new one starts fresh.
        values["resume"] = bool(ckpt.list_checkpoints(ckpt.checkpoints_root(out)))
        return dataclass_from_dict(
            train_mod.TrainConfig, values, where="the recipe's training settings"
        )

    def eval_batch_size(self) -> int:
        """The micro-batch the training loop evaluates with (one process)."""
        return max(1, self.batch_size // self.grad_accum)

    def analyze_config(self, out: Path) -> analyze_mod.AnalyzeConfig:
        return analyze_mod.AnalyzeConfig(
            model=self.model,
            data=self.data,
            num_seqs=self.analysis_num_seqs,
            seq_len=self.analysis_seq_len,
            tau=self.tau,
            eta=self.eta,
            seed=self.seed,
            out=str(out),
            trust_remote_code=self.trust_remote_code,
        )

    def fingerprint(self) -> str:
        """Hash of every setting a finished round depends on (see RESUMABLE_CHANGES)."""
        values = {k: v for k, v in to_dict(self).items() if k not in RESUMABLE_CHANGES}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- run state


@dataclass
class RunState:
    """What a run has finished; ``OUT/run_state.json``, rewritten atomically after each step."""

    path: Path
    fingerprint: str
    settings: dict[str, Any]
    analysis: dict[str, Any] | None = None
    reference: dict[str, Any] | None = None
    trained_reference: dict[str, Any] | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    write: bool = True  # False on non-main ranks under torchrun

    @classmethod
    def open(cls, out: Path, cfg: RecipeConfig, write: bool = True) -> RunState:
        """The run state in ``out``: a new one, or the saved one if its settings match."""
        path = out / STATE_FILE
        fp = cfg.fingerprint()
        settings = {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_CHANGES}
        if not path.is_file():
            return cls(path, fp, settings, write=write)
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--out {out}: {STATE_FILE} is unreadable ({e})") from e
        if saved.get("version") != STATE_VERSION:
            raise ConfigError(f"--out {out}: {STATE_FILE} has an unknown version")
        if saved.get("fingerprint") != fp:
            old = saved.get("settings", {})
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ConfigError(
                f"--out {out} holds a run made with different settings ({', '.join(flag(k) for k in diff)}); "
                f"use the same settings to resume it, or choose another --out"
            )
        return cls(
            path,
            fp,
            settings,
            analysis=saved.get("analysis"),
            reference=saved.get("reference"),
            trained_reference=saved.get("trained_reference"),
            rounds=list(saved.get("rounds", [])),
            write=write,
        )

    def save(self) -> None:
        if not self.write:
            return
        write_json_atomic(
            self.path,
            {
                "version": STATE_VERSION,
                "fingerprint": self.fingerprint,
                "settings": self.settings,
                "analysis": self.analysis,
                "reference": self.reference,
                "trained_reference": self.trained_reference,
                "rounds": self.rounds,
            },
        )


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


def warm_grow(trained: torch.nn.Module, reference: torch.nn.Module, depth: int, parts: str):
    """Warm growth: ``trained`` (its k layers, embeddings, norm, head) + reference layers k..depth-1."""
    k = get_arch(trained).num_layers
    if not k < depth <= get_arch(reference).num_layers:
        raise ValueError(f"cannot grow a {k}-layer model to {depth} layers")
    grown = surgery.first_layers(reference, depth, parts=parts)
    state = trained.state_dict()
    missing, unexpected = grown.load_state_dict(state, strict=False)
    prefix = get_arch(grown).layout.layers + "."
    # Only the appended blocks may be missing from the trained model's state.
    bad = [
        m for m in missing if not m.startswith(prefix) or int(m[len(prefix) :].split(".")[0]) < k
    ]
    if unexpected or bad:
        raise RuntimeError(
            f"warm growth: state mismatch (missing {bad[:5]}, unexpected {unexpected[:5]})"
        )
    return grown


def _round_dir(out: Path, round_no: int, depth: int) -> Path:
    return out / "rounds" / f"round-{round_no:02d}-L{depth}"


def _eval_record(result: train_mod.TrainResult, out: Path) -> dict[str, Any]:
    return {
        "steps": int(result.steps),
        "tokens": int(result.tokens),
        "wall_s": float(result.wall_s),
        "val_loss": float(result.final_val_loss),
        "val_ppl": _ppl(result.final_val_loss),
        "tokens_per_s": float(result.tokens_per_s),
        "evals": [
            {k: (float(v) if isinstance(v, float) else v) for k, v in e.items()}
            for e in result.evals
        ],
        "model_dir": _rel(Path(result.final_dir), out),
    }


def _ppl(loss: float) -> float:
    return float(math.exp(min(loss, 50.0)))


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _is_main() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _device() -> torch.device:
    from inheritune import distributed

    return distributed.setup().device


def _log(msg: str) -> None:
    if _is_main():
        print(f"[inheritune run] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the recipe


@dataclass
class RecipeResult:
    """What ``run`` returns: the report dict and where things were written."""

    out: Path
    report: dict[str, Any]
    report_md: Path
    final_model: Path


def _analysis_step(cfg: RecipeConfig, reference, tokens, out: Path, state: RunState) -> None:
    """Step 1, once per run: collapse metrics of the reference, plots in OUT/analysis."""
    if state.analysis is not None or not cfg.analysis:
        return
    acfg = cfg.analyze_config(out / "analysis")
    ids = analyze_mod.sample_inputs(tokens.val, acfg)
    _log(f"step 1: analysing {acfg.num_seqs} windows x {acfg.seq_len} tokens")
    result = analyze_mod.run_analysis(reference, ids, acfg, model_name=cfg.model)
    result.data, result.seed = cfg.data, cfg.seed
    paths = {}
    if _is_main():
        paths = analyze_mod.write_report(result, out / "analysis")
        save_resolved(acfg, out / "analysis" / "config.yaml")
        print(analyze_mod.summary_table(result), file=sys.stderr)
    depth, rule = result.suggestion
    state.analysis = {
        "json": "analysis/analysis.json",
        "plots": [_rel(p, out) for k, p in paths.items() if str(p).endswith(".png")],
        "lazy_layers": result.lazy_layers,
        "max_rank": [round(float(x), 4) for x in result.max_rank],
        "suggested_depth": {"paper_half": result.half_depth, "analysis": depth, "rule": rule},
        "seconds": round(result.seconds, 1),
    }
    state.save()


def _train_reference(cfg, reference, tokenizer, tokens, out: Path, state: RunState) -> None:
    """Target 'trained-reference': the reference trained with the same budget as one round."""
    if state.trained_reference is not None:
        return
    _log(f"training the reference for {cfg.steps} steps (the target to match)")
    model = surgery.select_layers(reference, range(get_arch(reference).num_layers))
    tcfg = cfg.round_train_config(out / "reference-trained")
    result = _train(model, tokenizer, tokens, tcfg, None, "reference (trained)")
    state.trained_reference = _eval_record(result, out)
    state.save()
    del model


def _train(model, tokenizer, tokens, tcfg, teacher, desc: str) -> train_mod.TrainResult:
    """One training run; a SIGINT/SIGTERM (checkpoint saved) ends the recipe to be resumed."""
    if tcfg.resume:
        _log(f"{desc}: resuming from the checkpoints in {tcfg.out}")
    result = train_mod.train_model(model, tokenizer, tokens, tcfg, teacher=teacher, desc=desc)
    if result.interrupted:
        _log(f"{desc}: stopped at step {result.steps}; run the same command again to resume")
        raise SystemExit(128 + result.stop_signal)  # the shell convention for "killed by signal"
    return result


def _calibrate(cfg, model, tokens, round_no: int) -> dict[str, float]:
    """Fit the final norm of a fresh target on a few training windows (inheritune.calibrate)."""
    ids = data.sample_windows(tokens.train, cfg.calibrate_windows, cfg.seq_len + 1, cfg.seed + 7)
    device = next(model.parameters()).device
    res = calibrate_final_norm(model, torch.from_numpy(ids).to(device), iters=cfg.calibrate_iters)
    _log(
        f"round {round_no}: final-norm calibration {res['before']:.3f} -> {res['after']:.3f} "
        f"nats/token on {cfg.calibrate_windows} training windows ({res['seconds']:.0f} s)"
    )
    return {k: round(v, 4) for k, v in res.items()}


def _build_round_model(cfg, reference, depth: int, state: RunState, out: Path):
    """Step 3 (and the growth of step 6): the model a round starts from."""
    prev = state.rounds[-1] if state.rounds else None
    if cfg.growth == "warm" and prev is not None:
        trained = models.load_model(
            str(out / prev["model_dir"]), trust_remote_code=cfg.trust_remote_code
        )
        model = warm_grow(trained, reference, depth, cfg.parts)
        del trained
        return model
    return surgery.first_layers(reference, depth, parts=cfg.parts, seed=cfg.seed)


def run(cfg: RecipeConfig) -> RecipeResult:
    """The ``inheritune run`` command: Algorithm 1, resumable, with a report at the end."""
    t_start = time.perf_counter()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    main = _is_main()
    state = RunState.open(out, cfg, write=main)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out / "config.yaml")
    _barrier()

    # Cheap checks before any weights load: the config, the tokenizer, the data.
    ref_config = models.load_config(cfg.model, cfg.trust_remote_code)
    analyze_mod.check_seq_len(ref_config, cfg.seq_len)
    if cfg.analysis:
        analyze_mod.check_seq_len(ref_config, cfg.analysis_seq_len)
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    tokens = data.load_tokens(cfg.data, tokenizer)
    windows = train_mod.eval_windows(tokens, cfg.seq_len, cfg.eval_tokens)

    device = _device()
    reference = models.load_model(cfg.model, trust_remote_code=cfg.trust_remote_code).to(device)
    num_layers = get_arch(reference).num_layers
    ref_params = models.count_parameters(reference)

    _analysis_step(cfg, reference, tokens, out, state)
    init = choose_init_depth(cfg.init_depth, num_layers, state.analysis)
    max_depth = resolve_max_depth(cfg.max_depth, num_layers, init)
    _log(f"step 2: initial depth {init} of {num_layers} layers (--init-depth {cfg.init_depth})")

    if state.reference is None:
        _log(f"reference validation loss on {len(windows)} windows x {cfg.seq_len} tokens")
        # Same windows, micro-batch and precision as the rounds' own evaluations.
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if cfg.precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            loss = train_mod.evaluate_loss(reference, windows, batch_size=cfg.eval_batch_size())
        state.reference = {
            "layers": num_layers,
            "parameters": ref_params,
            "val_loss": float(loss),
            "val_ppl": _ppl(loss),
        }
        state.save()
    if cfg.target == "trained-reference":
        _train_reference(cfg, reference, tokenizer, tokens, out, state)
        target_loss, target_label = state.trained_reference["val_loss"], "trained reference"
    else:
        target_loss, target_label = state.reference["val_loss"], "reference (zero-shot)"
    _log(f"target loss {target_loss:.4f} ({target_label}), tolerance {cfg.tolerance}")

    depth: int | None = init
    round_no, stop_reason = 0, ""
    while depth is not None:
        round_no += 1
        done = state.rounds[round_no - 1] if round_no <= len(state.rounds) else None
        if done is not None and done["layers"] != depth:
            raise ConfigError(
                f"--out {out}: finished round {round_no} has {done['layers']} layers but this "
                f"schedule asks for {depth}; use the same depth settings or another --out"
            )
        if done is None:
            _log(f"round {round_no}: {depth} layers, {cfg.steps} steps ({cfg.growth})")
            model = _build_round_model(cfg, reference, depth, state, out)
            rdir = _round_dir(out, round_no, depth)
            calibration = None
            if cfg.calibrate_iters > 0 and not (rdir / "checkpoints").exists():
                calibration = _calibrate(cfg, model, tokens, round_no)
            params = models.count_parameters(model)  # before training: FSDP shards in place
            teacher = reference if cfg.distill_alpha > 0 else None
            tcfg = cfg.round_train_config(rdir)
            result = _train(
                model, tokenizer, tokens, tcfg, teacher, f"round {round_no} ({depth} layers)"
            )
            done = {
                "round": round_no,
                "layers": depth,
                "parameters": params,
                **_eval_record(result, out),
            }
            if calibration is not None:
                done["calibration"] = calibration
            done["matched"] = matches(done["val_loss"], target_loss, cfg.tolerance)
            state.rounds.append(done)
            state.save()
            del model
        # Re-decided on every run, so a changed tolerance or budget takes effect on resume.
        done["matched"] = matches(done["val_loss"], target_loss, cfg.tolerance)
        _log(
            f"round {round_no}: {depth} layers, val loss {done['val_loss']:.4f} vs target "
            f"{target_loss:.4f}: {'matched' if done['matched'] else 'worse'}"
        )
        depth, stop_reason = next_step(round_no, depth, done["matched"], cfg, max_depth)
    rounds = state.rounds[:round_no]
    last = rounds[-1]

    # Outputs: the final model, the speed comparison, the report.
    final_dir = out / "final_model"
    final = models.load_model(str(out / last["model_dir"]), trust_remote_code=cfg.trust_remote_code)
    if main:
        _copy_model_folder(out / last["model_dir"], final_dir, tokenizer)
    final = final.to(device)
    speed_len = cfg.speed_seq_len or cfg.seq_len
    _log(f"timing inference: batch {cfg.speed_batch_size} x {speed_len} tokens")
    kw = {"warmup": cfg.speed_warmup, "iters": cfg.speed_iters, "seed": cfg.seed}
    speeds = measure_speeds(
        {"target": final, "reference": reference}, cfg.speed_batch_size, speed_len, **kw
    )
    t_speed, r_speed = speeds["target"], speeds["reference"]
    saved = ref_params - last["parameters"]
    report = {
        "model": cfg.model,
        "data": cfg.data,
        "growth": cfg.growth,
        "grow_by": cfg.grow_by,
        "parts": cfg.parts,
        "steps_per_round": cfg.steps,
        "init_depth": {"mode": cfg.init_depth, "layers": init},
        "max_depth": max_depth,
        "reference": {**state.reference, "trained": state.trained_reference},
        "target": {
            "kind": cfg.target,
            "label": target_label,
            "val_loss": target_loss,
            "tolerance": cfg.tolerance,
            "eval_windows": len(windows),
            "seq_len": cfg.seq_len,
        },
        "analysis": state.analysis,
        "rounds": rounds,
        "final": {
            "round": last["round"],
            "layers": last["layers"],
            "parameters": last["parameters"],
            "parameters_saved": saved,
            "parameters_saved_pct": 100.0 * saved / ref_params,
            "val_loss": last["val_loss"],
            "val_ppl": last["val_ppl"],
            "matched": last["matched"],
            "stop_reason": stop_reason,
            "model_dir": _rel(final_dir, out),
            "speed": {
                "device": str(device),
                "batch_size": cfg.speed_batch_size,
                "seq_len": speed_len,
                "iters": cfg.speed_iters,
                "warmup": cfg.speed_warmup,
                "target_tokens_per_s": t_speed["tokens_per_s"],
                "reference_tokens_per_s": r_speed["tokens_per_s"],
                "speedup": t_speed["tokens_per_s"] / r_speed["tokens_per_s"],
            },
        },
        "total": {
            "rounds": len(rounds),
            "tokens": sum(r["tokens"] for r in rounds),
            "wall_s": sum(r["wall_s"] for r in rounds),
            "this_invocation_s": time.perf_counter() - t_start,
        },
        "config_file": "config.yaml",
    }
    md = out / "report.md"
    if main:
        md = write_report(report, out)
        verdict = "matched" if last["matched"] else "did not match"
        print(
            f"inheritune run: {last['layers']}-layer target {verdict} the {target_label} "
            f"({last['val_loss']:.4f} vs {target_loss:.4f}); "
            f"{100.0 * saved / ref_params:.1f}% fewer parameters, "
            f"{report['final']['speed']['speedup']:.2f}x inference speed.\n"
            f"report: {md}\nfinal model: {final_dir}"
        )
    _barrier()
    return RecipeResult(out, report, md, final_dir)


def _copy_model_folder(src: Path, dst: Path, tokenizer) -> None:
    """Copy the last round's model folder to OUT/final_model (model files and tokenizer only)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and not p.name.startswith(("optimizer", "rng", "trainer_state", "manifest")):
            shutil.copy2(p, tmp / p.name)
    if not (tmp / "tokenizer_config.json").is_file():
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
