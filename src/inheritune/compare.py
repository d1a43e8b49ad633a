"""``inheritune compare``: Inheritune against every baseline and pruning alternative, same budget.

The variants are built by :mod:`inheritune.baselines` (see its table) and trained with one
shared :class:`~inheritune.train.TrainConfig`: the same corpus, the same data order (seed), the
same tokens per step, the same ``T`` steps and the same fixed validation windows.

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

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from inheritune import checkpoint as ckpt
from inheritune import inputs, mergekit, models, plots, scoring
from inheritune.baselines import (
    RESULT_JSON,
    VARIANTS,
    RunContext,
    check_depth,
    default_depth,
    half_width_reason,
    is_cached,
    layer_ranges,
    run_variant,
    train_top_warning,
    unbuildable_reason,
    variant_spec,
)
from inheritune.bridge import BridgeConfig
from inheritune.config import (
    ConfigError,
    check_unit_interval,
    nested,
    save_resolved,
    to_dict,
    validate_numbers,
)
from inheritune.data import eval_windows
from inheritune.losses import evaluate_loss
from inheritune.train import TrainConfig


@dataclass
class CompareConfig:
    """``inheritune compare``: every baseline at the same depth, data and token budget."""

    train: TrainConfig = nested(  # noqa: RUF009 (nested() returns a dataclasses.field)
        TrainConfig,
        overrides={"out": "runs/compare", "steps": 100},
        owned=("resume", "teacher", "distill_alpha"),
    )
    # ^ the settings every variant trains with, the same flat flags as `inheritune train`
    # (--model is the reference, --out the results folder, --steps the budget T, --seed also
    # seeds the random inits and the calibration windows); only the defaults above differ.
    depth: int | None = field(
        default=None,
        metadata={
            "help": "layers l of every variant (default: half the reference, rounded down to "
            "an even number so stacking can build)",
            "min": 1,
        },
    )
    variants: list[str] | None = field(
        default=None,
        metadata={
            "help": "comma-separated variants (default: all the reference can build): "
            + ",".join(VARIANTS)
        },
    )
    kd_alpha: float = field(
        default=0.4,
        metadata={"help": "the kd-* variants' loss = (1-a) LM + a KL (paper: 0.4)", "max": 1},
    )
    calib_windows: int = field(
        default=16,
        metadata={
            "help": "training-split windows for the pruning scores (BI, angular, MaxRank)",
            "min": 1,
        },
    )
    bridging: BridgeConfig = nested(BridgeConfig)  # noqa: RUF009 (nested() returns a field)
    # ^ --bridge block: the inheritune variant becomes the reference's first l-1 layers + one
    # fitted bridge block (still l layers; inheritune.bridge). --calib-seq-len is shared: the
    # pruning scores' calibration windows have the same length.
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
    device: str = field(
        default="auto",
        metadata={"help": "device of the reference (its loss, the scores): cpu, cuda[:N] or auto"},
    )

    def __post_init__(self) -> None:
        validate_numbers(self)  # finite, in range, of the declared type (config.py)
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
        check_unit_interval("kd_alpha", self.kd_alpha)
        if self.angular_tokens not in scoring.ANGULAR_TOKENS:
            raise ConfigError(
                f"--angular-tokens must be one of {', '.join(scoring.ANGULAR_TOKENS)}, "
                f"got {self.angular_tokens!r}"
            )

    def train_config(self, out: str | Path, steps: int, distill: bool = False) -> TrainConfig:
        """The shared training settings for one variant's run in ``out``; it resumes only when
        there is something to resume (finished variants are cached)."""
        resume = bool(ckpt.list_checkpoints(ckpt.checkpoints_root(out))) if out else False
        alpha = self.kd_alpha if distill else 0.0
        # one TensorBoard run per variant stage: <dir>/<variant>-<stage>
        tb = (
            self.train.tensorboard
            and out
            and str(Path(self.train.tensorboard) / f"{Path(out).parent.name}-{Path(out).name}")
        )
        return replace(
            self.train,
            out=str(out),
            steps=steps,
            resume=resume,
            distill_alpha=alpha,
            tensorboard=tb or None,
        )

    @property
    def calib_seq_len(self) -> int:
        """Tokens per calibration window (the bridge's and the pruning scores')."""
        return self.bridging.calib_seq_len

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
    spec.update(batch=t.micro_batch(), precision=t.precision)
    cached = ckpt.read_cached(ctx.out / "reference.json", spec, strict=False)
    if cached is not None:
        return float(cached["val_loss"])
    windows = eval_windows(ctx.tokens, t.seq_len, t.eval_tokens)
    # the batch size and precision train evaluates with, so the sums are taken in the same order
    loss = evaluate_loss(ctx.reference, windows, t.micro_batch(), t.precision)
    ckpt.write_cached(ctx.out / "reference.json", spec, {"val_loss": loss})
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
    json_path = ckpt.atomic_write_json(out / "compare.json", summary)
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
    ckpt.atomic_write_text(md, render_markdown(summary, plot.name))
    print(f"wrote {md}, {json_path.name}, {plot.name}")
    return json_path, plot, md


def compare(cfg: CompareConfig) -> CompareResult:
    """Run (or resume) every selected variant and write compare.md, compare.json, curves.png."""
    t = cfg.train
    config = models.load_config(t.model, t.trust_remote_code)
    models.check_context(config, t.seq_len)
    models.check_context(config, cfg.calib_seq_len, "calib_seq_len")
    L = int(config.num_hidden_layers)
    depth = cfg.depth if cfg.depth is not None else default_depth(L)
    check_depth(depth, L)
    # a model mergekit cannot read is refused before any training
    mk_source = None
    if cfg.export_mergekit:
        mergekit.check_path(cfg.export_mergekit)
        mk_source = mergekit.source_name(t.model)
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
        "layer_numbering": mergekit.LAYER_NUMBERING,
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
    ref, cfg, depth = summary["reference"], summary["config"]["train"], summary["depth"]
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
        return f"drop {layer_ranges(init['dropped'])}"
    if "stacked" in init:
        return "random, stacked"
    if init.get("width") == "half":
        return "sliced"
    src = init.get("layers_from")
    bridged = " + bridge block" if "bridge" in init else ""
    return "random" if src is None else f"layers {layer_ranges(src)}{bridged}"
