"""``inheritune compare``: Inheritune against every baseline and pruning alternative, same budget.

The variants are built by :mod:`inheritune.compare.variants` (see its table) and trained with one
shared :class:`~inheritune.training.config.TrainConfig` (:func:`run_variant`: one training stage,
or stacking's two). Every variant also reports its validation loss before any training (the
step-0 eval). Layers are numbered from 0 (``LAYER_NUMBERING``; the paper's plots number from 1).

Caching: a variant's ``spec.json`` (:func:`variant_spec`: what shapes its result) and
``result.json`` cache it. ``result.json`` is written atomically when it finishes; re-running
skips finished variants and resumes an unfinished one from its last checkpoint. Changing the
settings that shape a variant (depth, steps, training settings, ...) with the same ``--out`` is
refused instead of mixing runs.

``--export-mergekit FILE`` also writes the initial layer selection of every variant built from
reference layers as a mergekit passthrough config, one file per variant with the variant name
inserted before the suffix (``merge.yaml`` -> ``merge.prune-bi.yaml``); each file's header
comment lists the variants that have no selection (random init, half width) and were skipped.

Outputs in ``--out``: ``compare.md`` and ``compare.json`` (one row per variant: layers,
parameters, tokens trained, loss before and after training, tokens needed to reach the
reference's loss: :func:`tokens_to_reach`), ``curves.png`` (all validation curves against the
reference line), the resolved ``config.yaml``, and one folder per variant.

Bad input (an unknown variant, a depth a variant cannot build) is a :class:`ConfigError`
before any training. Without ``--variants`` every variant the reference can build runs and the
others are listed as skipped with the reason; naming an unbuildable variant explicitly is an
error.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from inheritune import storage
from inheritune.analysis import plots
from inheritune.analysis.layer_scores import layer_scores, score_windows
from inheritune.analysis.selection import SCORE_OF, LayerScores, kept_for_depth
from inheritune.compare.config import CompareConfig
from inheritune.compare.variants import (
    VARIANTS,
    Variant,
    build_initial,
    check_depth,
    default_depth,
    half_width_reason,
    layer_ranges,
    train_top_warning,
    unbuildable_reason,
)
from inheritune.config import ConfigError, save_resolved, to_dict
from inheritune.data import inputs
from inheritune.data.windows import eval_windows
from inheritune.models import loading as models
from inheritune.models.arch import LAYER_NUMBERING
from inheritune.models.losses import evaluate_loss
from inheritune.storage import (
    CheckpointError,
    StaleCacheError,
    atomic_write_json,
    canonical,
    read_cached,
    write_cached,
)
from inheritune.surgery import bridge
from inheritune.surgery import build as surgery
from inheritune.surgery.auto import candidates_markdown, choose_auto, format_candidates
from inheritune.surgery.mergekit import check_path, config_dtype, export_selections, source_name
from inheritune.training.checkpoint import checkpoints_root
from inheritune.training.precision import choose_for_inherited, recorded_choice
from inheritune.training.train import PRECISION_FILE, train_model

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
    select = cfg.selection.select if name == "inheritune" else v.select
    if select is not None and select != "first":
        spec["select"] = select
    if select in SCORE_OF or select == "auto":
        sel = cfg.selection
        spec["calibration"] = {"windows": sel.score_windows, "seq_len": sel.score_seq_len}
        if select in ("angular", "auto"):
            spec["calibration"]["angular_tokens"] = sel.angular_tokens
        if select == "auto":
            spec["calibration"]["auto_windows"] = sel.auto_windows
    if name == "inheritune" and cfg.bridging.bridge != "none":
        spec["bridge"] = to_dict(cfg.bridging)
    return canonical(spec)


def is_cached(folder: Path, spec: dict[str, Any]) -> bool:
    """True when ``folder`` holds a finished result for ``spec``; error on a different one."""
    try:
        read_cached(folder / SPEC_JSON, spec)  # an unfinished run of other settings
        return read_cached(folder / RESULT_JSON, spec) is not None
    except StaleCacheError as e:
        raise ConfigError(f"{folder} holds a run with different settings: {e}") from None
    except CheckpointError as e:
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
    _scores: LayerScores | None = None

    def scores(self) -> LayerScores:
        """Every layer score of the reference on training-split windows (the validation windows
        stay unseen), computed once per machine (``$INHERITUNE_CACHE/scores``) and written to
        ``scores.json`` beside the results."""
        if self._scores is None:
            cfg = self.cfg
            windows = score_windows(self.tokens.train, cfg.selection, cfg.train.seed)
            rules = [VARIANTS[n].select for n in cfg.selected()] + [cfg.selection.select]
            need = sorted({SCORE_OF[r] for r in rules if r in SCORE_OF})
            scores = layer_scores(self.reference, windows, need, cfg.selection.angular_tokens)
            spec = {
                "model": cfg.train.model,
                "data": cfg.train.data,
                "seed": cfg.train.seed,
                "windows": cfg.selection.score_windows,
                "seq_len": cfg.selection.score_seq_len,
                "angular_tokens": cfg.selection.angular_tokens,
            }
            write_cached(self.out / "scores.json", spec, {"scores": asdict(scores)})
            self._scores = scores
        return self._scores


def _train_stage(
    ctx: RunContext,
    model: nn.Module,
    folder: Path,
    steps: int,
    v: Variant,
    desc: str,
    budget: int = 1,
):
    """Train one stage into ``folder``; ``<folder>.json`` beside it caches the finished stage.

    An unfinished stage resumes from its latest checkpoint (weights, optimizer, data position);
    a finished one keeps only its final model (``folder/final``) and logs.
    """
    cached = folder.with_suffix(".json")
    if cached.is_file():
        return json.loads(cached.read_text())
    tcfg = ctx.cfg.train_config(folder, steps, v.distill, budget)
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
    atomic_write_json(cached, stage)
    # Finished stages are cached by stage.json + final/; their checkpoints (weights plus AdamW
    # state, ~4x the model) are only needed to resume, so free the disk now.
    shutil.rmtree(checkpoints_root(folder), ignore_errors=True)
    if res.stop_signal:  # a signal during the final eval/save: the stage finished, then stop
        print(f"compare: stopped after finishing {folder}; rerun the same command to go on")
        raise SystemExit(128 + res.stop_signal)
    return stage


def run_variant(ctx: RunContext, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Build, train and record one variant in ``out/<name>``; returns its result.json dict."""
    v, cfg, folder = VARIANTS[name], ctx.cfg, ctx.out / name
    folder.mkdir(parents=True, exist_ok=True)
    write_cached(folder / SPEC_JSON, spec, {})
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
    else:
        if name == "inheritune" and cfg.selection.rule == "auto":
            choice = choose_auto(
                ctx.reference,
                ctx.tokens,
                cfg.selection,
                ctx.depth,
                cfg.bridging,
                cfg.train.seed,
                eval_batch=cfg.train.eval_batch(),
            )
            record = choice.record()
            print(format_candidates(record))
            model, kept = choice.model, choice.kept
            info = {"layers_from": kept, "depth": ctx.depth, "select": "auto", "auto": record}
            if choice.bridge_stats is not None:
                info["bridge"] = extra["bridge"] = choice.bridge_stats
            extra["auto"] = record
        elif name == "inheritune" and cfg.bridging.bridge == "block":
            sel = cfg.selection
            scores = ctx.scores() if sel.needs_scores else None
            kept, spans = kept_for_depth(
                sel.select, ctx.num_layers, ctx.depth, scores, cfg.bridging.bridge_spans
            )
            ids = bridge.calibration_windows(ctx.tokens.train, cfg.bridging, cfg.train.seed)
            model, fit = bridge.build_bridged(
                ctx.reference, kept, ids, cfg.bridging, seed=cfg.train.seed, bridged=spans
            )
            info = {"layers_from": kept, "depth": ctx.depth, "bridge": fit, "select": sel.select}
            extra["bridge"] = fit
        else:
            model, info = build_initial(
                ctx.reference, name, ctx.depth, cfg.train.seed, ctx.scores, cfg.selection.select
            )
        params = models.count_parameters(model)
        s = _train_stage(
            ctx, model, folder / "train", cfg.train.steps * v.budget, v, name, v.budget
        )
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
    atomic_write_json(folder / RESULT_JSON, result)
    return result


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


# --------------------------------------------------------------------------- the command


def tokens_to_reach(evals: list[dict[str, Any]], target: float) -> int | None:
    """Tokens at the first eval whose loss is <= ``target``; None when never reached."""
    for e in evals:
        if e["val_loss"] <= target:
            return int(e["tokens"])
    return None


def _reference_loss(ctx: RunContext) -> float:
    """The reference's loss on the variants' validation windows (cached in reference.json)."""
    t = ctx.cfg.train
    spec = {"model": t.model, "data": t.data, "seq_len": t.seq_len, "eval_tokens": t.eval_tokens}
    spec.update(batch=t.eval_batch(), precision=t.precision)
    cached = storage.read_cached(ctx.out / "reference.json", spec, strict=False)
    if cached is not None:
        return float(cached["val_loss"])
    windows = eval_windows(ctx.tokens, t.seq_len, t.eval_tokens)
    # the batch size and precision train evaluates with, so the sums are taken in the same order
    loss = evaluate_loss(ctx.reference, windows, t.eval_batch(), t.precision, desc="reference loss")
    storage.write_cached(ctx.out / "reference.json", spec, {"val_loss": loss})
    return loss


def _buildable(cfg: CompareConfig, L: int, depth: int) -> tuple[list[str], dict[str, str]]:
    """The selected variants and, for those that cannot be built at ``depth``, why; naming an
    unbuildable variant explicitly is an error."""
    names = cfg.selected()
    skipped = {n: r for n in names if (r := unbuildable_reason(n, L, depth))}
    if cfg.variants is not None and skipped:
        raise ConfigError(
            f"cannot build at --depth {depth} of a {L}-layer reference: "
            + "; ".join(f"{n}: {r}" for n, r in skipped.items())
        )
    return names, skipped


def _write_outputs(cfg: CompareConfig, summary: dict[str, Any], out: Path):
    """compare.json, curves.png and compare.md; returns (json path, plot path, md path)."""
    rows, ref = summary["variants"], summary["reference"]
    json_path = storage.atomic_write_json(out / "compare.json", summary)
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
        title=f"validation loss at depth {summary['depth']} ({summary['steps']} steps = T)",
        reference=ref["val_loss"],
        reference_label=f"reference ({ref['layers']} layers)",
    )
    md = out / "compare.md"
    storage.atomic_write_text(md, render_markdown(summary, plot.name))
    print(f"wrote {md}, {json_path.name}, {plot.name}")
    return json_path, plot, md


def _auto_precision(cfg: CompareConfig, reference, tokens, depth: int) -> str:
    """``--precision auto`` for the whole comparison, timed on the inheritune variant's model;
    recorded in ``OUT/precision.json`` and reused when the comparison resumes."""
    choice = recorded_choice(
        Path(cfg.train.out) / PRECISION_FILE,
        lambda: choose_for_inherited(reference, depth, cfg.train, tokens.train),
        reuse=True,  # a comparison always resumes
    )
    return choice["precision"]


def compare(cfg: CompareConfig) -> CompareResult:
    """Run (or resume) every selected variant and write compare.md, compare.json, curves.png."""
    t = cfg.train
    config = models.load_config(t.model, t.trust_remote_code)
    models.check_context(config, t.seq_len)
    models.check_context(config, cfg.bridging.calib_seq_len, "calib_seq_len")
    models.check_context(config, cfg.selection.score_seq_len, "score_seq_len")
    L = int(config.num_hidden_layers)
    depth = cfg.depth if cfg.depth is not None else default_depth(L)
    check_depth(depth, L)
    # a model mergekit cannot read is refused before any training
    mk_source = None
    if cfg.export_mergekit:
        check_path(cfg.export_mergekit)
        mk_source = source_name(t.model)
    names, skipped = _buildable(cfg, L, depth)
    out = Path(t.out)
    specs = {n: variant_spec(cfg, n, depth) for n in names if n not in skipped}
    done = {n: is_cached(out / n, s) for n, s in specs.items()}

    loaded = inputs.load(
        t.model,
        t.data,
        device=cfg.device,
        trust_remote_code=t.trust_remote_code,
        dist_timeout=t.dist_timeout,
    )
    reference, tokenizer, tokens = loaded.model, loaded.tokenizer, loaded.tokens
    if "half-width" in specs and not done["half-width"]:
        reason = half_width_reason(reference)
        if reason and cfg.variants is not None:
            raise ConfigError(f"cannot build half-width: {reason}")
        if reason:
            skipped["half-width"] = reason
            specs.pop("half-width")
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / "config.yaml")
    if t.precision == "auto":  # once for the reference and every variant alike
        cfg = replace(
            cfg, train=replace(t, precision=_auto_precision(cfg, reference, tokens, depth))
        )
        t = cfg.train
    ctx = RunContext(cfg, reference, tokenizer, tokens, depth, L, out)
    ref_loss = _reference_loss(ctx)
    print(
        f"reference {t.model}: {L} layers, val loss {ref_loss:.4f}; variants at depth {depth}",
        flush=True,
    )

    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    warning = train_top_warning(t.train_top, [n for n in specs if not done[n]])
    if warning:
        warnings.warn(warning, stacklevel=2)
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
        "steps": t.steps,
        "reference": reference_row,
        "variants": [{k: v for k, v in r.items() if k != "spec"} for r in rows],
        "skipped": skipped,
        "layer_numbering": LAYER_NUMBERING,
    }
    if cfg.export_mergekit:
        summary["mergekit"] = _export_mergekit(cfg, mk_source, config, rows)
    json_path, plot, md = _write_outputs(cfg, summary, out)
    return CompareResult(out, ref_loss, rows, skipped, md, json_path, plot)


def _export_mergekit(cfg: CompareConfig, source: str, config, rows: list[dict]) -> dict[str, Any]:
    """Each variant's initial reference-layer selection as a mergekit config (module docstring)."""
    selections, not_exported = {}, {}
    for r in rows:
        init = r["init"]
        if init.get("width"):
            not_exported[r["variant"]] = "half width: sliced weights, not whole layers"
        elif "bridge" in init:
            not_exported[r["variant"]] = "bridge block: fitted weights, not a reference layer"
        elif init.get("layers_from") is None:
            not_exported[r["variant"]] = "random init: no reference layers"
        else:
            selections[r["variant"]] = init["layers_from"]
    written = export_selections(
        cfg.export_mergekit,
        source,
        config_dtype(config),
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
    ref, cfg, depth = summary["reference"], summary["config"]["train"], summary["depth"]
    rows = summary["variants"]
    inh = next((r["loss_after"] for r in rows if r["variant"] == "inheritune"), None)
    budget = cfg.get("time_budget") or 0
    how_long = (
        f"for a wall-clock budget of {budget:g} s each (2T rows: twice that), at most "
        f"T = {summary['steps']} steps; the 'steps' column says how many each really ran"
        if budget
        else f"for T = {summary['steps']} steps"
    )
    lines = [
        f"# Baselines at depth {depth}: {Path(cfg['model']).name} on {Path(cfg['data']).name}",
        "",
        f"Every variant has {depth} layers (half-width: all {ref['layers']} at half width; "
        f"scratch-full: all {ref['layers']} from scratch) and is "
        f"trained with the same settings {how_long}, on the same data; "
        f"losses are on the same fixed validation windows. Reference ({ref['layers']} layers, "
        f"{ref['parameters']:,} parameters, untrained here): **{ref['val_loss']:.4f}**.",
        "",
        "| variant | init | layers | params | steps | tokens | loss before | loss after "
        "| vs inheritune | tokens to reference |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    doubled = False
    for r in rows:
        mark = " †" if r["budget"] != "1T" else ""
        doubled |= bool(mark)
        delta = "" if inh is None else f"{r['loss_after'] - inh:+.4f}"
        lines.append(
            f"| {r['variant']}{mark} | {_init_text(r)} | {r['layers']} | {r['parameters']:,} "
            f"| {r['steps']:,} | {_fmt_tokens(r['tokens'])} | {r['loss_before']:.4f} "
            f"| {r['loss_after']:.4f} | {delta} | {_fmt_tokens(r['tokens_to_reference'])} |"
        )
    lines.append("")
    if doubled:
        lines.append(
            "† trained for 2T steps in all (random-2x: 2T at depth l; stacking: T at l/2 "
            "layers, then T at l after copying the stack on top of itself), so twice the "
            "others' tokens."
        )
    lines += [
        "'loss before' is the step-0 eval (stacking: its l/2-layer start); 'tokens to reference' "
        "is the first eval at or below the reference's loss. Layers are numbered from 0 (the "
        "paper's plots number from 1).",
    ]
    for r in rows:  # --select auto: the inheritune row's candidates
        if r["init"].get("auto"):
            lines += ["", *candidates_markdown(r["init"]["auto"])]
    if summary["skipped"]:
        lines += ["", "Skipped (cannot be built for this reference at this depth):", ""]
        lines += [f"* {n}: {why}" for n, why in summary["skipped"].items()]
    lines += ["", f"![validation curves]({plot_name})", ""]
    return "\n".join(lines)


def _init_text(row: dict[str, Any]) -> str:
    init = row["init"]
    if "dropped" in init:
        return f"drop {layer_ranges(init['dropped'])}"
    if "stacked" in init:
        return "random, stacked"
    if init.get("width") == "half":
        return "sliced"
    src = init.get("layers_from")
    n = len(init["bridge"].get("bridges", [None])) if "bridge" in init else 0
    bridged = f" + {n} bridge block{'s' if n > 1 else ''}" if n else ""
    chosen = f" (auto: {init['auto']['chosen']})" if init.get("auto") else ""
    return "random" if src is None else f"layers {layer_ranges(src)}{bridged}{chosen}"
