"""``inheritune run``: the whole Inheritune recipe (paper Alg. 1) as one resumable job.

1. analyse the reference's attention collapse (:mod:`inheritune.analysis.analyze`);
2. choose the initial depth: L/2 (paper), the analysis-based suggestion, or a number;
3. inherit the reference's embeddings, l blocks chosen by ``--select`` (the paper's: the first
   l; :mod:`inheritune.analysis.selection`), final norm and head, with ``--bridge block`` a
   fitted block in place of each removed span (:mod:`inheritune.surgery.bridge`);
4. train the target for ``steps`` steps (:func:`inheritune.training.train.train_model`);
5. compare its validation loss with the target loss -- the reference's zero-shot loss, or the
   reference trained with the same budget -- on the same fixed validation windows;
6. while worse (by more than ``tolerance``): grow by ``grow_by`` layers and train again, up to
   ``max_depth`` layers or ``max_rounds`` rounds. The layers added are the dropped ones the
   selection ranks highest (for ``first``: the next ones, the paper's growth).

Growth modes: ``reinit`` (the paper's: each round restarts from the reference's chosen layers)
and ``warm`` (keep the previous round's trained model and put the added reference layers back
in their places).

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

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from inheritune import data, distributed
from inheritune.analysis import analyze as analyze_mod
from inheritune.analysis import report as analysis_report
from inheritune.analysis.layer_scores import selection_scores
from inheritune.analysis.selection import (
    LayerScores,
    bridged_spans,
    grow,
    importance,
    kept_layers,
    layer_ranges,
)
from inheritune.config import ConfigError, save_resolved, to_dict
from inheritune.data import inputs
from inheritune.export.gguf import write_gguf
from inheritune.models import loading as models
from inheritune.models import losses
from inheritune.models.arch import get_arch
from inheritune.models.folders import copy_model_folder
from inheritune.recipe.config import RecipeConfig
from inheritune.recipe.growth import (
    RunState,
    choose_init_depth,
    matches,
    next_step,
    resolve_max_depth,
    warm_grow,
)
from inheritune.recipe.report import build_report, measure_speeds, verdict_line, write_report
from inheritune.storage import atomic_write_json
from inheritune.surgery import bridge
from inheritune.surgery import build as surgery
from inheritune.surgery.auto import choose_auto, format_candidates
from inheritune.surgery.calibrate import calibrate_final_norm
from inheritune.training.config import TrainConfig
from inheritune.training.precision import choose_for_inherited
from inheritune.training.train import TrainResult, train_model


def _round_dir(out: Path, round_no: int, depth: int) -> Path:
    return out / "rounds" / f"round-{round_no:02d}-L{depth}"


def _eval_record(result: TrainResult, out: Path) -> dict[str, Any]:
    return {
        "steps": int(result.steps),
        "tokens": int(result.tokens),
        "wall_s": float(result.wall_s),
        "val_loss": float(result.final_val_loss),
        "val_ppl": _ppl(result.final_val_loss),
        "tokens_per_s": float(result.tokens_per_s),
        "mfu": result.mfu,
        "peak_source": result.peak_source,
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


def _log(msg: str) -> None:
    if distributed.setup().is_main:
        print(f"[inheritune run] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the recipe's steps


@dataclass
class RecipeResult:
    """What ``run`` returns: the report dict and where things were written."""

    out: Path
    report: dict[str, Any]
    report_md: Path
    final_model: Path


@dataclass
class _Job:
    """What every step of one invocation shares."""

    cfg: RecipeConfig
    out: Path
    state: RunState
    env: distributed.DistEnv
    reference: torch.nn.Module
    tokenizer: Any
    tokens: data.Tokens
    windows: Any  # the fixed validation windows of every round and the reference
    extra_windows: dict[str, Any] | None = None  # --extra-eval: name -> windows (same shape)
    _scores: Any = None  # the reference's layer scores for --select, measured on first use
    prebuilt: Any = None  # --select auto: (kept, model, bridge fit) of round 1, built once
    fitted: dict | None = None  # span -> a fitted bridge of this invocation, reused by later rounds

    def scores(self) -> LayerScores | None:
        """The scores ``--select`` keeps and grows by (None for first, keep-last and lists),
        measured once on training-split windows and cached per machine."""
        if self._scores is None:
            sel, seed = self.cfg.selection, self.cfg.train.seed
            self._scores = selection_scores(self.reference, self.tokens, sel, seed)
        return self._scores

    def kept_at(self, prev: list[int] | None, depth: int) -> list[int]:
        """The reference layers a round of ``depth`` layers keeps: round 1 by the rule, later
        rounds ``prev`` plus the dropped layers of highest importance (:func:`grow`)."""
        sel, L = self.cfg.selection.select, self.num_layers
        if prev is None:
            return kept_layers(sel, L, depth, self.scores())
        return grow(prev, depth - len(prev), importance(sel, L, self.scores()))

    def evaluate(self, model: torch.nn.Module, windows: Any, desc: str = "evaluating") -> float:
        """Mean loss on ``windows`` with the rounds' own evaluation batch and precision; the
        models evaluated here are the reference's own (it, its first l layers), so the result
        is cached across runs (:func:`inheritune.models.losses.cached_loss`)."""
        t = self.cfg.train
        desc = desc if self.env.is_main else None
        return losses.cached_loss(model, windows, t.eval_batch(), t.precision, desc)

    def extra_loss(self, model: torch.nn.Module) -> dict[str, float] | None:
        if not self.extra_windows:
            return None
        return {name: self.evaluate(model, w, name) for name, w in self.extra_windows.items()}

    @property
    def num_layers(self) -> int:
        return get_arch(self.reference).num_layers


def _analysis_step(job: _Job) -> None:
    """Step 1, once per run: collapse metrics of the reference, plots in OUT/analysis."""
    cfg, out, state = job.cfg, job.out, job.state
    if state.analysis is not None or not cfg.analysis:
        return
    acfg = cfg.analyze_config(out / "analysis")
    ids = analyze_mod.sample_inputs(job.tokens.val, acfg)
    _log(f"step 1: analysing {acfg.num_seqs} windows x {acfg.seq_len} tokens")
    result = analyze_mod.run_analysis(job.reference, ids, acfg, model_name=cfg.train.model)
    result.data, result.seed = cfg.train.data, cfg.train.seed
    paths = {}
    if job.env.is_main:
        paths = analysis_report.write_report(result, out / "analysis")
        save_resolved(acfg, out / "analysis" / "config.yaml")
        print(analysis_report.summary_table(result), file=sys.stderr)
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


def _select_step(job: _Job, init: int) -> None:
    """``--select auto``, once per run: every rule's round-1 start (its ``init`` layers, with
    ``--bridge block`` a bridge at each seam) built, optionally probed for
    ``--auto-probe-steps`` training steps, and scored on training-split windows; the best rule
    then keeps and grows every round. Resumed runs reuse the recorded choice."""
    cfg, state = job.cfg, job.state
    if cfg.selection.rule != "auto":
        return
    if state.auto is None:
        steps = cfg.selection.auto_probe_steps
        _log(
            f"--select auto: building every rule's {init}-layer start"
            + (f", {steps} probe steps each" if steps else "")
        )
        t0 = time.perf_counter()
        choice = choose_auto(
            job.reference,
            job.tokens,
            cfg.selection,
            init,
            cfg.bridging,
            cfg.train.seed,
            probe=(lambda m, rule: _probe(job, m, rule, steps)) if steps else None,
            eval_batch=cfg.train.eval_batch(),
            count_bridges=False,  # run's depths count the kept layers, bridges on top
        )
        state.auto = {
            **choice.record(),
            "probe_steps": steps,
            "seconds": time.perf_counter() - t0,
        }
        state.save()
        if not steps:  # the winner's start is round 1's: its bridges are not fitted twice
            job.prebuilt = (choice.kept, choice.model, choice.bridge_stats)
        job._scores = choice.scores
    for line in format_candidates(state.auto).splitlines():
        _log(line)
    job.cfg = replace(cfg, selection=replace(cfg.selection, select=state.auto["chosen"]))


def _probe(job: _Job, model: torch.nn.Module, rule: str, steps: int) -> torch.nn.Module:
    """``--auto-probe-steps``: train one candidate ``steps`` steps (no periodic evaluation or
    checkpoint) in OUT/auto/<rule>, and return it trained; the folder is removed after."""
    import shutil

    folder = job.out / "auto" / rule
    shutil.rmtree(folder, ignore_errors=True)  # a probe is short: a stopped one starts over
    t = job.cfg.train
    tcfg = replace(
        t,
        out=str(folder),
        steps=steps,
        warmup=min(t.warmup, max(1, steps // 10)),
        eval_every=0,
        save_every=0,
        time_budget=0.0,
        eval_tokens=t.seq_len,  # the loop's own evaluation is not what auto scores by
        resume=False,
        tensorboard=None,
    )
    result = _train(job, model, tcfg, None, f"auto probe: {rule}")
    trained = models.load_model(str(result.final_dir)).to(job.env.device)
    distributed.barrier(job.env)
    if job.env.is_main:
        shutil.rmtree(folder, ignore_errors=True)
    return trained


def _precision_step(job: _Job, init: int) -> None:
    """``--precision auto``, once per run: time a training step of round 1's model (its
    layers, bridge and freezing) in fp32 and in bf16 here; every round and the reference's
    evaluation then use the faster."""
    cfg, state = job.cfg, job.state
    if cfg.train.precision != "auto":
        return
    if state.precision is None:
        t0 = time.perf_counter()
        init_kind = cfg.bridging.bridge_init if cfg.bridging.bridge == "block" else None
        choice = choose_for_inherited(
            job.reference, init, cfg.train, job.tokens.train, job.env, bridge_init=init_kind
        )
        state.precision = {**choice.to_dict(), "seconds": time.perf_counter() - t0}
        state.save()
    p = state.precision
    timings = ""
    if p["fp32_step_s"] is not None:
        timings = f"; one step: fp32 {p['fp32_step_s']:.2f} s, bf16 {p['bf16_step_s']:.2f} s"
    _log(f"--precision auto: {p['precision']} ({p['reason']}{timings})")
    job.cfg = replace(cfg, train=replace(cfg.train, precision=p["precision"]))


def _reference_step(job: _Job) -> tuple[float, str]:
    """Step 5's yardstick: the reference's own loss (once per run), and the target loss."""
    cfg, state = job.cfg, job.state
    if state.reference is None:
        _log(
            f"reference validation loss on {len(job.windows)} windows x {cfg.train.seq_len} tokens"
        )
        t0 = time.perf_counter()
        loss = job.evaluate(job.reference, job.windows, "reference loss")  # the rounds' windows
        state.reference = {
            "layers": job.num_layers,
            "parameters": models.count_parameters(job.reference),
            "val_loss": float(loss),
            "val_ppl": _ppl(loss),
            "extra_val_loss": job.extra_loss(job.reference),
            "seconds": time.perf_counter() - t0,
        }
        state.save()
    if cfg.target == "reference":
        return state.reference["val_loss"], "reference (zero-shot)"
    _train_reference(job)
    label = {"trained-reference": "trained reference", "scratch-reference": "scratch reference"}
    return state.trained_reference["val_loss"], label[cfg.target]


def _train_reference(job: _Job) -> None:
    """The targets 'trained-reference' (the reference trained further) and 'scratch-reference'
    (its architecture from random init, the paper's protocol), each with one round's budget."""
    if job.state.trained_reference is not None:
        return
    cfg, scratch = job.cfg, job.cfg.target == "scratch-reference"
    how = "from scratch" if scratch else "further"
    _log(f"training the reference {how} for {cfg.train.steps} steps (the target to match)")
    if scratch:
        model = surgery.random_init(job.reference.config, job.num_layers, seed=cfg.train.seed)
    else:
        model = surgery.select_layers(job.reference, range(job.num_layers))
    folder = "reference-scratch" if scratch else "reference-trained"
    tcfg = cfg.round_train_config(job.out / folder)
    result = _train(job, model, tcfg, None, f"reference ({how})")
    job.state.trained_reference = {"kind": cfg.target, **_eval_record(result, job.out)}
    job.state.save()


def _train(job: _Job, model, tcfg: TrainConfig, teacher, desc: str, extra=None) -> TrainResult:
    """One training run; a SIGINT/SIGTERM (checkpoint saved) ends the recipe to be resumed."""
    if tcfg.resume:
        _log(f"{desc}: resuming from the checkpoints in {tcfg.out}")
    result = train_model(
        model, job.tokenizer, job.tokens, tcfg, teacher=teacher, desc=desc, extra_eval=extra
    )
    if result.interrupted:
        _log(f"{desc}: stopped at step {result.steps}; run the same command again to resume")
        raise SystemExit(128 + result.stop_signal)  # the shell convention for "killed by signal"
    return result


def _calibrate(job: _Job, model, desc: str) -> dict[str, float]:
    """Fit the final norm of a fresh target on a few training windows (inheritune.surgery.calibrate)."""
    cfg = job.cfg
    n, seq = cfg.calibrate_windows, cfg.train.seq_len + 1
    ids = data.sample_windows(job.tokens.train, n, seq, cfg.train.seed + 7)
    device = next(model.parameters()).device
    res = calibrate_final_norm(model, torch.from_numpy(ids).to(device), iters=cfg.calibrate_iters)
    _log(
        f"{desc}: final-norm calibration {res['before']:.3f} -> {res['after']:.3f} "
        f"nats/token on {n} training windows ({res['seconds']:.0f} s)"
    )
    return {k: round(v, 4) for k, v in res.items()}


def _kept_of(done: dict[str, Any]) -> list[int]:
    """The reference layers a finished round kept (rounds recorded before --select: first l)."""
    return done.get("kept") or list(range(done.get("depth", done["layers"])))


def _build_round_model(job: _Job, kept: list[int], fresh: bool = False):
    """Step 3 (and the growth of step 6): the model a round starts from (``fresh``: from the
    reference whatever the growth mode, as the baseline does)."""
    cfg, state = job.cfg, job.state
    prev = state.rounds[-1] if state.rounds else None
    if cfg.growth == "warm" and prev is not None and not fresh:
        trained = models.load_model(
            str(job.out / prev["model_dir"]), trust_remote_code=cfg.train.trust_remote_code
        )
        return warm_grow(trained, job.reference, kept, cfg.parts, _kept_of(prev))
    return surgery.select_layers(job.reference, kept, parts=cfg.parts, seed=cfg.train.seed)


def _bridged_round_model(job: _Job, kept: list[int], rdir: Path) -> tuple[Any, dict[str, Any]]:
    """``--bridge block``: the reference's ``kept`` blocks + a fitted bridge block in place of
    each removed span (for first l: one on top).

    The fit is recorded in ``rdir/bridge.json``; a round resumed from its checkpoints gets the
    architecture only (its weights come from the checkpoint)."""
    cfg, record = job.cfg.bridging, rdir / "bridge.json"
    seed = job.cfg.train.seed
    spans = bridged_spans(kept, job.num_layers, cfg.bridge_spans)
    if (rdir / "checkpoints").exists() and record.is_file():
        model = bridge.add_bridges(job.reference, kept, spans, cfg.bridge_init, seed=seed)[0]
        return model, json.loads(record.read_text())
    pre, job.prebuilt = job.prebuilt, None
    if pre is not None and pre[0] == kept and pre[2] is not None:  # --select auto built it
        model, stats = pre[1], pre[2]
    else:
        ids = bridge.calibration_windows(job.tokens.train, cfg, seed)
        model, stats = bridge.build_bridged(
            job.reference, kept, ids, cfg, seed=seed, bridged=spans, reuse=job.fitted
        )
    job.fitted = {**(job.fitted or {}), **bridge.fitted_bridges(model, stats)}
    if job.env.is_main:
        atomic_write_json(record, stats)
    where = ", ".join(f"{a}-{b - 1}" for a, b in spans)
    reused = sum(bool(b.get("reused")) for b in stats["bridges"])
    _log(
        f"{len(spans)} bridge block(s) on {len(kept)} layers (in place of layers {where}"
        + (f"; {reused} fitted in an earlier round, reused" if reused else "")
        + f"): fit loss {stats['fit_loss_before']:.4f} -> {stats['fit_loss_after']:.4f} "
        f"({stats['wall_seconds']:.0f} s)"
    )
    return model, stats


def _train_selection(
    job: _Job, kept: list[int], rdir: Path, desc: str, fresh: bool = False
) -> dict[str, Any]:
    """Build the model of one selection (``kept`` reference layers, with ``--bridge block`` its
    bridges; or warm growth unless ``fresh``), calibrate it if asked, train it in ``rdir`` with
    one round's budget, and return its record (the rounds' and the baseline's)."""
    cfg, depth = job.cfg, len(kept)
    bridged, t_build = None, time.perf_counter()
    if cfg.bridging.bridge == "block":
        model, bridged = _bridged_round_model(job, kept, rdir)
    else:
        model = _build_round_model(job, kept, fresh)
    calibration = None
    if cfg.calibrate_iters > 0 and bridged is None and not (rdir / "checkpoints").exists():
        calibration = _calibrate(job, model, desc)
    params = models.count_parameters(model)  # before training: FSDP shards in place
    build_s = time.perf_counter() - t_build
    if bridged is not None:
        # the bridge's effect: the same l inherited layers without it, on the same windows
        plain = surgery.select_layers(job.reference, kept, parts=cfg.parts, seed=cfg.train.seed)
        bridged = {**bridged, "val_loss_without_bridge": job.evaluate(plain, job.windows)}
        del plain
    teacher = job.reference if cfg.train.distill_alpha > 0 else None
    layers = get_arch(model).num_layers
    extra = job.extra_windows or None
    tcfg = cfg.round_train_config(rdir)
    if tcfg.time_budget > 0:  # the round's wall clock: the build is charged too
        elapsed = time.perf_counter() - t_build  # build, bridge fit, the plain model's eval
        charged = max(elapsed, (bridged or {}).get("wall_seconds", 0.0))  # resumed: the fit
        tcfg = replace(tcfg, time_budget=max(tcfg.time_budget - charged, 0.25 * tcfg.time_budget))
    result = _train(job, model, tcfg, teacher, f"{desc} ({layers} layers)", extra)
    done = {"depth": depth, "layers": layers, "parameters": params, "kept": kept}
    done.update(_eval_record(result, job.out))
    done["build_s"] = build_s  # bridge fit or final-norm calibration (a resumed round: ~0)
    if extra:  # scored by the loop at its first and last evaluation
        first, last = result.evals[0]["extra"], result.evals[-1]["extra"]
        done["extra_val_loss"] = {n: {"start": first[n], "end": last[n]} for n in extra}
    if calibration is not None:
        done["calibration"] = calibration
    if bridged is not None:
        done["bridge"] = bridged
    return done


def _run_round(job: _Job, round_no: int, kept: list[int], target_loss: float) -> dict[str, Any]:
    """Steps 3-5 for one selection: build, (calibrate), train, compare; recorded in the run
    state."""
    cfg, depth = job.cfg, len(kept)
    _log(
        f"round {round_no}: {depth} layers (reference layers {layer_ranges(kept)}), "
        f"{cfg.train.steps} steps ({cfg.growth})"
    )
    rdir = _round_dir(job.out, round_no, depth)
    done = {"round": round_no, **_train_selection(job, kept, rdir, f"round {round_no}")}
    done["matched"] = matches(done["val_loss"], target_loss, cfg.tolerance)
    job.state.rounds.append(done)
    job.state.save()
    return done


def _baseline_step(job: _Job, last: dict[str, Any], target_loss: float) -> dict[str, Any] | None:
    """``--baseline paper``, once per run: the paper's choice of layers (the first ones, with
    this run's ``--bridge``: then one bridge on top) at the final round's size, trained with
    one round's budget on the same windows, so the report shows the two recipes side by side."""
    cfg, state = job.cfg, job.state
    if cfg.baseline != "paper":
        return None
    bridges = last["layers"] - last["depth"]
    kept = list(range(last["layers"] - (1 if cfg.bridging.bridge == "block" else 0)))
    if state.baseline is not None and state.baseline["kept"] != kept:
        state.baseline = None  # the rounds changed (a continued run grew): train it again
    if state.baseline is None:
        if cfg.selection.rule == "first":  # --select auto chose it: the rounds are the paper's
            _log("--baseline paper: the rounds already keep the first layers; nothing to add")
            return None
        _log(
            f"--baseline paper: the first {len(kept)} layers"
            + (" + a top bridge" if cfg.bridging.bridge == "block" else "")
            + f" ({last['layers']} layers, as the final round's {last['depth']} + {bridges})"
        )
        rdir = job.out / "baseline" / f"paper-L{len(kept)}"
        done = {
            "recipe": "paper",
            **_train_selection(job, kept, rdir, "paper's recipe", fresh=True),
        }
        done["matched"] = matches(done["val_loss"], target_loss, cfg.tolerance)
        state.baseline = done
        state.save()
    b = state.baseline
    _log(
        f"paper's recipe: {b['layers']} layers, val loss {b['val_loss']:.4f} against the final "
        f"round's {last['val_loss']:.4f}"
    )
    return b


def _rounds(job: _Job, init: int, max_depth: int, target_loss: float) -> tuple[list[dict], str]:
    """Steps 3-6: train round after round until matched or out of budget."""
    cfg, out = job.cfg, job.out
    depth: int | None = init
    round_no, stop_reason = 0, ""
    kept: list[int] | None = None
    while depth is not None:
        round_no += 1
        kept = job.kept_at(kept, depth)
        done = job.state.rounds[round_no - 1] if round_no <= len(job.state.rounds) else None
        if done is not None and _kept_of(done) != kept:
            raise ConfigError(
                f"--out {out}: finished round {round_no} kept reference layers "
                f"{layer_ranges(_kept_of(done))} but this schedule asks for "
                f"{layer_ranges(kept)}; use the same depth settings or another --out"
            )
        if done is None:
            done = _run_round(job, round_no, kept, target_loss)
        # Re-decided on every run, so a changed tolerance or budget takes effect on resume.
        done["matched"] = matches(done["val_loss"], target_loss, cfg.tolerance)
        verdict = "matched" if done["matched"] else "worse"
        _log(
            f"round {round_no}: {depth} layers, val loss {done['val_loss']:.4f} vs target "
            f"{target_loss:.4f}: {verdict}"
        )
        depth, stop_reason = next_step(round_no, depth, done["matched"], cfg, max_depth)
    return job.state.rounds[:round_no], stop_reason


def _final_model(job: _Job, last: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """OUT/final_model (an atomic copy of the last round's model) and its inference speed."""
    cfg = job.cfg
    src, final_dir = job.out / last["model_dir"], job.out / "final_model"
    final = models.load_model(str(src), trust_remote_code=cfg.train.trust_remote_code)
    if job.env.is_main:
        copy_model_folder(src, final_dir, job.tokenizer)
    speed_len = cfg.speed_seq_len or cfg.train.seq_len
    _log(f"timing inference: batch {cfg.speed_batch_size} x {speed_len} tokens")
    kw = {"warmup": cfg.speed_warmup, "iters": cfg.speed_iters, "seed": cfg.train.seed}
    pair = {"target": final.to(job.env.device), "reference": job.reference}
    t0 = time.perf_counter()
    speeds = measure_speeds(pair, cfg.speed_batch_size, speed_len, **kw)
    speed = {
        "device": str(job.env.device),
        "batch_size": cfg.speed_batch_size,
        "seq_len": speed_len,
        "iters": cfg.speed_iters,
        "warmup": cfg.speed_warmup,
        "target_tokens_per_s": speeds["target"]["tokens_per_s"],
        "reference_tokens_per_s": speeds["reference"]["tokens_per_s"],
        "speedup": speeds["target"]["tokens_per_s"] / speeds["reference"]["tokens_per_s"],
        "seconds": time.perf_counter() - t0,
    }
    return final_dir, speed


# --------------------------------------------------------------------------- the command


def run(cfg: RecipeConfig) -> RecipeResult:
    """The ``inheritune run`` command: Algorithm 1, resumable, with a report at the end."""
    t_start = time.perf_counter()
    out, env = Path(cfg.train.out), distributed.setup(cfg.train.dist_timeout)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    state = RunState.open(out, cfg, write=env.is_main)
    # Cheap checks before any weights load: the config, the tokenizer, the data.
    seq_lens = {"seq_len": cfg.train.seq_len}
    if cfg.analysis:
        seq_lens["analysis_seq_len"] = cfg.analysis_seq_len
    loaded = inputs.load(
        cfg.train.model,
        cfg.train.data,
        device="auto",
        trust_remote_code=cfg.train.trust_remote_code,
        seq_lens=seq_lens,
        dist_timeout=cfg.train.dist_timeout,
    )
    if cfg.init_depth.isdigit():  # refused before --out is written (analysis needs none)
        choose_init_depth(cfg.init_depth, int(loaded.config.num_hidden_layers), None)
    if cfg.selection.rule == "list":  # its indices against the reference, before the weights
        kept_layers(cfg.selection.select, int(loaded.config.num_hidden_layers), None)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out / "config.yaml")
    distributed.barrier(env)
    windows = data.eval_windows(loaded.tokens, cfg.train.seq_len, cfg.train.eval_tokens)
    job = _Job(cfg, out, state, env, loaded.model, loaded.tokenizer, loaded.tokens, windows)
    job.extra_windows = {}
    for name in cfg.extra_sets:  # the held-out split (brown's samples), else all of it
        extra = inputs.load_tokens(name, loaded.tokenizer, val_fraction=1.0)
        job.extra_windows[name] = data.eval_windows(extra, cfg.train.seq_len, cfg.train.eval_tokens)

    _analysis_step(job)
    init = choose_init_depth(cfg.init_depth, job.num_layers, state.analysis)
    if cfg.selection.rule == "list":  # the listed layers are round 1
        init = len(kept_layers(cfg.selection.select, job.num_layers, None))
    max_depth = resolve_max_depth(cfg.max_depth, job.num_layers, init)
    _log(
        f"step 2: initial depth {init} of {job.num_layers} layers (--init-depth "
        f"{cfg.init_depth}, --select {cfg.selection.select})"
    )
    _select_step(job, init)
    _precision_step(job, init)
    target_loss, target_label = _reference_step(job)
    _log(f"target loss {target_loss:.4f} ({target_label}), tolerance {cfg.tolerance}")
    rounds, stop_reason = _rounds(job, init, max_depth, target_loss)
    baseline = _baseline_step(job, rounds[-1], target_loss)
    final_dir, speed = _final_model(job, rounds[-1])
    exported = None
    if cfg.export_gguf and env.is_main:  # before the report, which names the file
        exported = str(write_gguf(final_dir, cfg.export_gguf, cfg.export_outtype, force=True))
        _log(f"GGUF ({cfg.export_outtype}): {exported}")
    report = build_report(
        cfg=to_dict(job.cfg),
        state={
            "reference": state.reference,
            "trained_reference": state.trained_reference,
            "precision": state.precision,
            "auto": state.auto,
            "baseline": baseline,
        },
        analysis=state.analysis,
        rounds=rounds,
        target={
            "kind": cfg.target,
            "label": target_label,
            "val_loss": target_loss,
            "extra_eval": cfg.extra_sets,
        },
        depths={"init_mode": cfg.init_depth, "init": init, "max": max_depth},
        eval_windows=len(windows),
        final={
            "stop_reason": stop_reason,
            "model_dir": _rel(final_dir, out),
            "speed": speed,
            "gguf": exported,
        },
        seconds=time.perf_counter() - t_start,
    )
    md = out / "report.md"
    if env.is_main:
        md = write_report(report, out)
        print(verdict_line(report) + f"\nreport: {md}\nfinal model: {final_dir}")
    distributed.barrier(env)
    return RecipeResult(out, report, md, final_dir)
