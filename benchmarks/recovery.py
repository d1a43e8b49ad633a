"""How fast does an inherited SmolLM2 recover per second of training? A driver of the library.

Each run builds the inherited model with :func:`inheritune.surgery.first_layers` (embeddings +
first K blocks + final norm + tied head of the reference), optionally fits its final norm with
:func:`inheritune.surgery.calibrate.calibrate_final_norm`, trains it with
:func:`inheritune.training.train.train_model` for a fixed wall-clock budget
(``TrainConfig.time_budget``: the lr decays by time spent, so every lever gets the same time
whatever its step cost; since issue #19 the budget charges the loop's own evaluations and
checkpoints too, so rows recorded before it, studies v1-v3 and the long run, got their budget in
pure training seconds and are not comparable step for step with later ones), and evaluates it with :func:`inheritune.models.losses.evaluate_loss` before and
after training on two FIXED sets of validation windows (:func:`inheritune.data.eval_windows`,
256 tokens each, the same in every run): the training corpus's held-out split (Shakespeare's
last 5%) and a general-English text that is never trained on (``botchan``, see
:mod:`inheritune.models.assets`), so domain adaptation shows apart from recovery. The loop's own
evaluations (every ``--eval-every`` steps, on its windows of ``--seq-len`` tokens) give the curve.

An experiment is a named :class:`Experiment`: TrainConfig overrides over :data:`BASE` plus the
few knobs that decide how the starting model is built (``calibrate_iters``; ``bridge``: a
bridge block from :func:`inheritune.surgery.bridge.build_bridged` on training-split windows, its fit
charged to the budget like the calibration). Every run also scores fixed windows of the
TRAINING split (``final_train_windows``) and keeps the logged training loss of its last 10% of
steps (``train_loss_tail``): levers are chosen on those, never on the validation sets. To add a
lever: if it is a TrainConfig field, name it in ``train``; if it changes the starting model, add
a field to :class:`Experiment` and a line to :func:`build`. Every TrainConfig flag is also a flag of this
script (``--lr 2e-3 --freeze embed_tokens``) and overrides the experiment's value.

Usage::

    python benchmarks/recovery.py --list
    python benchmarks/recovery.py --exp recommended --seconds 180
    python benchmarks/recovery.py --exp reference           # the 30-layer model, no training
    python benchmarks/recovery.py --exp recommended --layers 17 --seconds 600 --name rec_k17_600
    python benchmarks/recovery.py --exp fast --seconds 0    # calibrate, evaluate, no training
    python benchmarks/recovery.py --report                  # markdown table of the results

Clock: training seconds are the loop's own (wall time of its training steps; evaluations,
checkpoints and model building are not counted); a calibration is charged, i.e. the loop gets
``--seconds`` minus the calibration's seconds. On the shared 2-core machine a step's wall time
varies with the other jobs, so every record keeps the load average, the step count and the
per-step seconds (median and 10th percentile, from the loop's log.jsonl), and rows can also be
compared at equal steps. ``--threads`` defaults to 1 (under contention a second thread mostly
spins at barriers); the loop's output folder is a temporary one, deleted after the run.

Both sets are also scored by the loop itself at each of its evaluations (its own windows of
``--seq-len`` tokens; the reference's losses on those windows are in ``loop_reference``), so every
curve point has both, and ``tokens_to_reference`` records the tokens at which each set first
reached the reference (issue #10.7). ``--exp prune-angular`` / ``prune-bi`` start from the
compare command's pruning baselines (:func:`inheritune.compare.variants.build_initial`, layer scores on
training-split windows, their cost charged like a bridge fit) instead of the first K blocks;
``--layers`` is then the pruned depth.

Results: one JSON line per run appended to ``--results`` (default
``benchmarks/results/recovery-v2.jsonl``; study v3 and the long run use ``recovery-v3.jsonl``
and ``long-run.jsonl``, their run lists are ``results/recovery-v3.queue``). The first
study (``recovery.jsonl``, its table in ``recovery.md``) was made by v1 of this script, which had
its own copy of every part and charged CPU time instead of wall time; it is kept as history and
``--report`` skips its records.

Dropped from v1, and why:

* the closed-form least-squares start of the final-norm gain before L-BFGS (v1 ``closed+fit``):
  it started better than L-BFGS alone (7.14 vs 7.53 nats, recovery.md lever 1) but needs a
  teacher forward and was never measured after training; the recipe uses the library's L-BFGS
  fit, so the study does. The bridge block (:mod:`inheritune.surgery.bridge`) is the stronger version.
* distillation from a cached top-k teacher whose cost was not charged (v1 ``teacher_cached``):
  it did not help (6.03 vs 5.99 at 180 s, recovery.md lever 5). Online distillation, charged,
  is an ordinary TrainConfig setting (``rec_distill``).
* the ``chunked_ce`` switch: the library's loss is always the fused, chunked head + CE.
* ``--set KEY=VALUE``: every TrainConfig field is a flag of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from inheritune import data
from inheritune.analysis.layer_scores import layer_scores
from inheritune.compare.compare import tokens_to_reach
from inheritune.compare.variants import build_initial
from inheritune.config import (
    ConfigError,
    add_dataclass_args,
    dataclass_from_dict,
    flag,
    flag_fields,
)
from inheritune.data import inputs
from inheritune.models import assets, losses
from inheritune.surgery import build as surgery
from inheritune.surgery.bridge import BridgeConfig, build_bridged, calibration_windows
from inheritune.surgery.calibrate import calibrate_final_norm
from inheritune.training.config import TrainConfig
from inheritune.training.train import train_model

RESULTS = Path(__file__).parent / "results" / "recovery-v2.jsonl"
VERSION = 2
OWNED = ("out", "steps", "time_budget", "resume", "teacher")  # the driver sets these itself
NO_STEP_LIMIT = 10**9  # the time budget is what stops a run
SEL_SEED = 1234  # the fixed training-split windows that choose between levers

BASE: dict[str, Any] = {
    # the plain loop measured first: lr 3e-4 cosine to 3e-5, everything trainable, 8 x 256
    "batch_size": 8,
    "seq_len": 256,
    "lr": 3e-4,
    "min_lr": 3e-5,
    "warmup": 0,
    "schedule": "cosine",
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    # measurement: a curve point every 10 steps on 2,048 tokens, one checkpoint (at the end),
    # every step logged (its seconds give the step-time statistics)
    "eval_every": 10,
    "eval_tokens": 2048,
    "save_every": 0,
    "keep_last": 1,
    "log_every": 1,
}


@dataclass(frozen=True)
class Experiment:
    """One setting of the levers: TrainConfig overrides (over :data:`BASE`) and the knobs that
    decide the starting model."""

    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig field -> value
    layers: int = 15  # K, the inherited blocks
    calibrate_iters: int = 0  # L-BFGS iterations fitting the final norm first (0 = off)
    calibrate_windows: int = 4  # training windows of seq_len + 1 tokens it fits on
    reference: bool = False  # evaluate the reference itself: no inheritance, no training
    # one extra decoder block fitted on the TRAINING split (inheritune.surgery.bridge, BridgeConfig
    # defaults); its fit time is charged to the budget like the calibration's
    bridge: bool = False
    # a compare baseline's starting model instead (inheritune.compare.variants.build_initial, e.g.
    # "prune-angular"), its layer scores on training-split windows; ``layers`` is its depth
    variant: str | None = None
    note: str = ""

    def with_train(self, note: str = "", **changes: Any) -> Experiment:
        return replace(self, train={**self.train, **changes}, note=note)

    def knobs(self) -> dict[str, Any]:
        """The settings that are not TrainConfig's (recorded beside them)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in KNOBLESS}


KNOBLESS = ("train", "note")


# lr 1e-3 with a 2-step warm-up, the tied embedding/head frozen, the final norm fitted first
FAST = Experiment(
    train={"lr": 1e-3, "min_lr": 1e-4, "warmup": 2, "freeze": ["embed_tokens"]},
    calibrate_iters=10,
)
# the demo preset's recipe: FAST at 4 x 128 tokens per step (most updates per second)
REC = FAST.with_train(batch_size=4, seq_len=128)
EXPERIMENTS: dict[str, Experiment] = {
    "reference": Experiment(reference=True, note="the 30-layer reference, no training"),
    "baseline": Experiment(note="plain loop: lr 3e-4 cosine, all trainable, 8 x 256"),
    "freeze_lr1e-3": replace(FAST, calibrate_iters=0, note="lr 1e-3, embedding/head frozen"),
    "fast": replace(FAST, note="freeze_lr1e-3 + final-norm calibration"),
    "fast_b4": FAST.with_train(batch_size=4),
    "recommended": replace(REC, note="fast at 4 x 128 tokens per step (the demo preset)"),
    "rec_k17": replace(REC, layers=17),
    "rec_lr2e-3": REC.with_train(lr=2e-3, min_lr=2e-4),
    "rec_b2": REC.with_train(batch_size=2),
    "rec_linear": REC.with_train(schedule="linear", min_lr=0.0, note="linear decay to 0"),
    "rec_norm_lr3": REC.with_train(norm_lr_scale=3.0),
    "rec_top4": REC.with_train(train_top=4, note="only the top 4 blocks (and norm) train"),
    "rec_distill": REC.with_train(distill_alpha=0.5, note="online KD from the reference, charged"),
    "rec_top4_distill": REC.with_train(
        train_top=4, distill_alpha=0.5, note="KD with the frozen bottom shared with the teacher"
    ),
    # Study v2 (issue #10): the demo preset's recipe, each lever alone, and their combination
    "demo": replace(REC, note="the demo preset: calibrate 10, embed frozen, lr 1e-3 cosine"),
    "+bridge": replace(REC, bridge=True, calibrate_iters=0, note="bridge block instead of calib"),
    "+top": REC.with_train(train_top=6, note="only the top 6 blocks (and the norm) train"),
    "+linear": REC.with_train(schedule="linear", min_lr=0.0, note="linear decay to 0"),
    "+lr6e-4": REC.with_train(lr=6e-4, min_lr=6e-5, note="1/5 of SmolLM2's pretraining peak"),
    "+kd": REC.with_train(
        train_top=6, distill_alpha=0.5, note="KD from the reference, bottom shared, charged"
    ),
    # the levers that lowered the loss on the fixed TRAINING-split windows (+kd and +lr6e-4
    # did not), chosen before any validation number of the combination was seen
    "best": replace(
        REC.with_train(train_top=6, schedule="linear", min_lr=0.0),
        bridge=True,
        calibrate_iters=0,
        note="+bridge +top +linear",
    ),
}
# Study v3: bf16 autocast (AMX on these Xeons: ~1 TFLOP/s bf16 vs ~0.14 fp32 per core)
EXPERIMENTS["+bf16"] = REC.with_train(precision="bf16", note="bf16 autocast, fp32 weights")
EXPERIMENTS["best+bf16"] = replace(
    EXPERIMENTS["best"].with_train(precision="bf16"), note="+bridge +top +linear +bf16"
)
# Issue #10.7: the pruning baselines trained by best+bf16's recipe (a pruned stack keeps the
# reference's last layers, so it needs no bridge); give them best's depth + 1 (--layers)
for _name in ("prune-angular", "prune-bi"):
    EXPERIMENTS[_name] = replace(
        EXPERIMENTS["best+bf16"], bridge=False, variant=_name, note=f"{_name}, trained as best+bf16"
    )
PRUNE_WINDOWS = 16  # training-split windows of --eval-seq tokens the layer scores use


# ----------------------------------------------------------------------------- one run


def build(
    reference: nn.Module, exp: Experiment, tokens: data.Tokens, cfg: TrainConfig
) -> tuple[nn.Module, dict[str, Any]]:
    """The starting model: the reference's first K blocks (plus a bridge block fitted on
    training windows if asked), its final norm fitted if asked (on training windows chosen as
    the recipe chooses them). Also returns what the setup did, with its wall ``seconds``."""
    device = next(reference.parameters()).device
    setup: dict[str, Any] = {"calibration": None, "bridge": None, "seconds": 0.0}
    if exp.variant:
        windows = data.sample_windows(tokens.train, PRUNE_WINDOWS, cfg.seq_len, cfg.seed)
        t0 = time.perf_counter()
        scores = layer_scores(reference, windows)
        model, info = build_initial(reference, exp.variant, exp.layers, cfg.seed, lambda: scores)
        setup.update(variant=info, seconds=time.perf_counter() - t0)
    elif exp.bridge:
        bcfg = BridgeConfig(bridge="block")
        ids = calibration_windows(tokens.train, bcfg, seed=cfg.seed)
        model, stats = build_bridged(reference, exp.layers, ids, bcfg, seed=cfg.seed)
        setup.update(bridge=stats, seconds=stats["wall_seconds"])
    else:
        model = surgery.first_layers(reference, exp.layers, seed=cfg.seed)
    model = model.to(device)
    if exp.calibrate_iters > 0:
        ids = data.sample_windows(
            tokens.train, exp.calibrate_windows, cfg.seq_len + 1, cfg.seed + 7
        )
        calib = calibrate_final_norm(model, torch.from_numpy(ids).to(device), exp.calibrate_iters)
        setup.update(calibration=calib, seconds=setup["seconds"] + calib["seconds"])
    return model, setup


def read_log(path: Path, tokens_per_step: int) -> tuple[list[float], dict[int, float], list]:
    """From the loop's log.jsonl: per-step training seconds, the training seconds spent by each
    logged step, and the loop's evaluations."""
    step_s, spent, evals = [], {0: 0.0}, []
    prev, total = 0, 0.0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "eval":
            evals.append(rec)
        elif rec["kind"] == "train" and rec["tokens_per_s"] > 0:
            n = rec["step"] - prev  # steps in this logging window
            seconds = n * tokens_per_step / rec["tokens_per_s"]
            step_s += [seconds / n] * n
            total += seconds
            spent[rec["step"]] = total
            prev = rec["step"]
    return step_s, spent, evals


def tail_train_loss(path: Path, fraction: float = 0.1) -> float | None:
    """Mean logged training loss over the last ``fraction`` of the steps (log.jsonl)."""
    train = [json.loads(line) for line in path.read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    if not train:
        return None
    first = train[-1]["step"] * (1.0 - fraction)
    tail = [r["loss"] for r in train if r["step"] > first] or [train[-1]["loss"]]
    return float(statistics.fmean(tail))


def run(
    name: str, exp: Experiment, seconds: float, overrides: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Build, calibrate, train for ``seconds`` and evaluate one experiment; its result record."""
    t_wall = time.perf_counter()
    settings = {**BASE, **exp.train, **overrides}
    cfg = dataclass_from_dict(TrainConfig, settings, "the experiment's settings")
    lens = {"seq_len": cfg.seq_len, "eval_seq": args.eval_seq}
    loaded = inputs.load(cfg.model, cfg.data, device="auto", seq_lens=lens)
    reference, tok, tokens = loaded.model, loaded.tokenizer, loaded.tokens
    del loaded  # the reference is freed below when no teacher needs it
    general = data.load_tokens(args.general, tok, val_fraction=1.0)  # all held out
    n_tokens = args.eval_windows * args.eval_seq
    windows = {
        cfg.data: data.eval_windows(tokens, args.eval_seq, n_tokens),
        args.general: data.eval_windows(general, args.eval_seq, n_tokens),
    }

    # fixed TRAINING-split windows (seeded, the same in every run): a lever or combination is
    # chosen on these, never on the validation windows above
    selection = data.sample_windows(tokens.train, args.eval_windows, args.eval_seq + 1, SEL_SEED)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {k: losses.evaluate_loss(model, w) for k, w in windows.items()}

    # the loop's own windows (--seq-len, --eval-tokens) of both sets: the loop scores the
    # general text at each evaluation too, and the reference's numbers on the same windows
    # give tokens-to-reference on both
    loop_general = data.eval_windows(general, cfg.seq_len, cfg.eval_tokens)
    loop_reference = {
        cfg.data: losses.evaluate_loss(
            reference, data.eval_windows(tokens, cfg.seq_len, cfg.eval_tokens)
        ),
        args.general: losses.evaluate_loss(reference, loop_general),
    }

    if args.layers:
        exp = replace(exp, layers=args.layers)
    rec: dict[str, Any] = {
        "version": VERSION,
        "exp": args.name or name,
        "base_exp": name,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": seconds,
        "train": settings,
        "knobs": exp.knobs(),
        "eval": {"seq_len": args.eval_seq, "windows": {k: len(w) for k, w in windows.items()}},
        "threads": torch.get_num_threads(),
        "device": str(next(reference.parameters()).device),
        "load_avg": list(os.getloadavg()),
        "loop_reference": loop_reference,
    }
    if exp.reference:
        rec["start"] = rec["final"] = evaluate(reference)
        rec["wall_s"] = time.perf_counter() - t_wall
        return rec

    model, setup = build(reference, exp, tokens, cfg)
    rec["calibration"], rec["bridge"] = setup["calibration"], setup["bridge"]
    rec["variant"] = setup.get("variant")
    rec["setup_s"] = setup["seconds"]
    rec["start"] = evaluate(model)
    rec["start_train_windows"] = losses.evaluate_loss(model, selection)
    print(f"[{name}] K={exp.layers} start {fmt(rec['start'])} setup {setup}", flush=True)
    budget = seconds - setup["seconds"]
    teacher = reference if cfg.distill_alpha > 0 else None
    del reference
    rec.update(steps=0, tokens=0, train_s=0.0, curve=[])
    if budget > 0:
        with tempfile.TemporaryDirectory(prefix="recovery-") as out:
            tcfg = replace(cfg, out=out, steps=NO_STEP_LIMIT, time_budget=budget, resume=False)
            result = train_model(
                model, tok, tokens, tcfg, teacher, name, extra_eval={args.general: loop_general}
            )
            per_step = cfg.batch_size * cfg.seq_len
            step_s, spent, evals = read_log(Path(out) / "log.jsonl", per_step)
            train_tail = tail_train_loss(Path(out) / "log.jsonl")
        mean = (result.tokens / result.tokens_per_s) / max(result.steps, 1)
        rec.update(
            steps=result.steps,
            tokens=result.tokens,
            train_s=result.tokens / result.tokens_per_s if result.tokens_per_s else 0.0,
            tokens_per_s=result.tokens_per_s,
            # the loop's logged loss over the last 10% of steps (includes the KD term if any)
            train_loss_tail=train_tail,
            step_s_median=statistics.median(step_s) if step_s else mean,
            step_s_p10=float(np.percentile(step_s, 10)) if step_s else mean,
            # the loop's evaluations on its own --seq-len windows of the training corpus
            curve=[
                {
                    "step": e["step"],
                    "train_s": round(spent.get(e["step"], e["step"] * mean), 2),
                    "tokens": e["tokens"],
                    "val_loss": e["val_loss"],
                    args.general: e["extra"][args.general],
                }
                for e in evals
            ],
        )
        rec["tokens_to_reference"] = {
            name: tokens_to_reach(
                [{"tokens": c["tokens"], "val_loss": c[key]} for c in rec["curve"]], ref
            )
            for (name, ref), key in zip(
                loop_reference.items(), ("val_loss", args.general), strict=True
            )
        }
    rec["final"] = evaluate(model)
    rec["final_train_windows"] = losses.evaluate_loss(model, selection)
    rec["wall_s"] = time.perf_counter() - t_wall
    print(f"[{name}] {rec['steps']} steps, {rec['train_s']:.0f} s: final {fmt(rec['final'])}")
    return rec


def fmt(losses_by_set: dict[str, float]) -> str:
    return " / ".join(f"{k} {v:.3f}" for k, v in losses_by_set.items())


# ----------------------------------------------------------------------------- report


def settings_diff(rec: dict[str, Any]) -> str:
    """What a record changed against the baseline (K has its own column)."""
    base, defaults = Experiment(), TrainConfig(**BASE)
    diff = {k: v for k, v in rec["train"].items() if getattr(defaults, k, None) != v}
    diff.update({k: v for k, v in rec["knobs"].items() if k != "layers" and getattr(base, k) != v})
    return ", ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in diff.items())


def command(rec: dict[str, Any]) -> str:
    """The command line that reproduces a record (its name, depth, seed and budget)."""
    base = rec.get("base_exp", rec["exp"])
    parts = [f"--exp {base}"]
    if base in EXPERIMENTS and rec["knobs"].get("layers") != EXPERIMENTS[base].layers:
        parts.append(f"--layers {rec['knobs']['layers']}")
    known = {**BASE, **EXPERIMENTS[base].train} if base in EXPERIMENTS else BASE
    for key, value in rec["train"].items():  # the TrainConfig flags given on the command line
        if key != "seed" and known.get(key) != value:
            value = " ".join(value) if isinstance(value, list) else value
            parts.append(f"{flag(key)} {value}")
    if rec["train"].get("seed", 0):
        parts.append(f"--seed {rec['train']['seed']}")
    if rec["exp"] != base:
        parts.append(f"--name {rec['exp']}")
    return " ".join([*parts, f"--seconds {rec['seconds']:.0f}", f"--threads {rec['threads']}"])


def report(path: Path) -> str:
    """Markdown table of the v2 records: settings, command, clock, both validation sets, and
    the training-split numbers that levers are chosen on."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    old = [r for r in rows if r.get("version") != VERSION]
    rows = [r for r in rows if r.get("version") == VERSION]
    sets = list(rows[0]["final"]) if rows else []
    names = " / ".join(sets)
    head = (
        f"| experiment | K | settings (vs baseline) | command | budget s | setup s | steps "
        f"| step s (med/p10) | load | start ({names}) | final ({names}) "
        f"| train-split windows (start / final) | train loss, last 10% |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        start = " / ".join(f"{r['start'][s]:.3f}" for s in sets)
        final = " / ".join(f"{r['final'][s]:.3f}" for s in sets)
        load = f"{r['load_avg'][0]:.1f}"
        if r["knobs"].get("reference"):
            out.append(
                f"| {r['exp']} | all | reference, no training | `{command(r)}` | | | | | {load} "
                f"| {start} | {final} | | |"
            )
            continue
        step = f"{r.get('step_s_median', 0):.2f}/{r.get('step_s_p10', 0):.2f}"
        sel = ""
        if "final_train_windows" in r:
            sel = f"{r['start_train_windows']:.3f} / {r['final_train_windows']:.3f}"
        tail = r.get("train_loss_tail")
        out.append(
            f"| {r['exp']} | {r['knobs']['layers']} | {settings_diff(r) or 'baseline'} | "
            f"`{command(r)}` | {r['seconds']:.0f} | {r.get('setup_s', 0):.0f} | {r['steps']} | "
            f"{step} | {load} | {start} | {final} | {sel} | "
            f"{'' if tail is None else f'{tail:.3f}'} |"
        )
    if old:
        out.append(f"\n({len(old)} v1 record(s) skipped: their table is in recovery.md)")
    reached = [r for r in rows if "tokens_to_reference" in r]
    if reached:
        out += ["", "| experiment | layers | tokens trained | " + " | ".join(
            f"{s}: reference (loop windows) / final / tokens to reference" for s in sets
        ) + " |", "|---|---|---|" + "---|" * len(sets)]  # fmt: skip
        for r in reached:
            cells = []
            for s, key in zip(sets, ("val_loss", sets[-1]), strict=True):
                hit = r["tokens_to_reference"][s]
                last = r["curve"][-1][key] if r["curve"] else float("nan")
                when = f"{hit:,}" if hit is not None else f"not within {r['tokens']:,}"
                cells.append(f"{r['loop_reference'][s]:.3f} / {last:.3f} / {when}")
            layers = r["knobs"]["layers"] + bool(r["knobs"].get("bridge"))
            out.append(f"| {r['exp']} | {layers} | {r['tokens']:,} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot_curves(path: Path, png_stem: Path) -> list[Path]:
    """One plot per validation set: every record's loop curve (tokens trained on x) and the
    reference's loss on the same windows; written to ``png_stem``-SET.png."""
    from inheritune.analysis import plots

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("loop_reference") and r.get("curve")]
    if not rows:
        return []
    written = []
    for s, key in zip(rows[0]["loop_reference"], ("val_loss", None), strict=True):
        key = key or s
        curves = {r["exp"]: ([c["tokens"] for c in r["curve"]], [c[key] for c in r["curve"]])
                  for r in rows}  # fmt: skip
        png = png_stem.parent / f"{png_stem.name}-{s}.png"
        ref = statistics.fmean(r["loop_reference"][s] for r in rows)
        plots.plot_curves(curves, png, title=f"validation loss on {s}", reference=ref)
        written.append(png)
    return written


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--exp", choices=sorted(EXPERIMENTS), help="experiment (see --list)")
    ap.add_argument(
        "--seconds", type=float, default=120.0, help="training seconds, calibration included"
    )
    ap.add_argument("--layers", type=int, help="override the experiment's inherited depth K")
    ap.add_argument("--eval-windows", type=int, default=8, help="fixed windows per val set")
    ap.add_argument(
        "--eval-seq", type=int, default=256, help="tokens per fixed window (any --seq-len)"
    )
    ap.add_argument(
        "--general",
        default=assets.GENERAL_CORPUS,
        help="second validation set, never trained on (a --data argument)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: see the docstring)")
    ap.add_argument("--name", help="name recorded in the results (default: --exp)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="jsonl the run is appended to")
    ap.add_argument("--list", action="store_true", help="list the experiments")
    ap.add_argument("--report", action="store_true", help="markdown table of --results")
    ap.add_argument("--curves", type=Path, help="with --report: also plot the curves (PNG stem)")
    group = ap.add_argument_group("training settings (TrainConfig; override the experiment's)")
    add_dataclass_args(group, TrainConfig)
    args = ap.parse_args(argv)
    if args.list:
        for name, exp in EXPERIMENTS.items():
            rec = {"train": {**BASE, **exp.train}, "knobs": exp.knobs()}
            print(f"{name:15s} K={exp.layers} {settings_diff(rec) or '-'}  {exp.note}")
        return 0
    if args.report:
        if not args.results.is_file():
            ap.error(f"--results: no such file: {args.results}")
        print(report(args.results))
        if args.curves:
            for png in plot_curves(args.results, args.curves):
                print(f"\n![{png.stem}]({png.name})")
        return 0
    if not args.exp:
        ap.error("--exp is required (see --list)")
    for name, low in (("seconds", 0), ("eval_windows", 1), ("eval_seq", 1), ("threads", 1)):
        if getattr(args, name) < low:
            ap.error(f"{flag(name)} must be >= {low}, got {getattr(args, name)}")
    given = {n: getattr(args, n) for n in flag_fields(TrainConfig) if getattr(args, n) is not None}
    for name in OWNED:
        if name in given:
            ap.error(f"{flag(name)} is set by this script (use --seconds for the budget)")
    torch.set_num_threads(args.threads)
    try:
        rec = run(args.exp, EXPERIMENTS[args.exp], args.seconds, given, args)
    except ConfigError as e:
        ap.error(str(e))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps({k: v for k, v in rec.items() if k != "curve"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
