"""The recipe's outputs: inference-speed measurement, report.json, report.md and the curve plot.

:mod:`inheritune.recipe` gathers one plain dict (the JSON report) and hands it to
:func:`write_report`, which writes ``report.json``, one PNG with every round's validation curve
against the target loss, and ``report.md`` (a table of the reference and the rounds, the
analysis plots and the curves). :func:`measure_speeds` times forward passes so the report can say
how much faster the smaller model is *on this machine*, not only how much smaller.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from inheritune.analysis import plots
from inheritune.models.arch import LAYER_NUMBERING
from inheritune.storage import atomic_write_json
from inheritune.surgery.auto import candidates_markdown
from inheritune.training.monitor import cpu_info

_TRAINED = {"trained-reference": "trained", "scratch-reference": "from scratch"}
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CURVES_PNG = "curves.png"


def build_report(
    cfg: dict[str, Any],
    state: dict[str, Any],
    analysis: dict[str, Any] | None,
    rounds: list[dict[str, Any]],
    target: dict[str, Any],
    depths: dict[str, Any],
    eval_windows: int,
    final: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """The report.json dict of a recipe run (``cfg`` is the resolved RecipeConfig as a dict)."""
    train, ref, last = cfg["train"], state["reference"], rounds[-1]
    saved = ref["parameters"] - last["parameters"]
    return {
        "model": train["model"],
        "data": train["data"],
        "layer_numbering": LAYER_NUMBERING,
        "growth": cfg["growth"],
        "select": cfg.get("selection", {}).get("select", "first"),
        "grow_by": cfg["grow_by"],
        "parts": cfg["parts"],
        "steps_per_round": train["steps"],
        "init_depth": {"mode": depths["init_mode"], "layers": depths["init"]},
        "max_depth": depths["max"],
        "reference": {**ref, "trained": state["trained_reference"]},
        "target": {
            **target,
            "tolerance": cfg["tolerance"],
            "eval_windows": eval_windows,
            "seq_len": train["seq_len"],
        },
        "analysis": analysis,
        "rounds": rounds,
        "final": {
            "round": last["round"],
            "layers": last["layers"],
            "parameters": last["parameters"],
            "parameters_saved": saved,
            "parameters_saved_pct": 100.0 * saved / ref["parameters"],
            "val_loss": last["val_loss"],
            "val_ppl": last["val_ppl"],
            "matched": last["matched"],
            **final,
        },
        "total": {
            "rounds": len(rounds),
            "tokens": sum(r["tokens"] for r in rounds),
            "wall_s": sum(r["wall_s"] for r in rounds),
            "this_invocation_s": seconds,
        },
        "machine": cpu_info(),
        "precision": state.get("precision")
        or {"precision": train["precision"], "reason": "set by --precision"},
        "auto": state.get("auto"),
        "baseline": state.get("baseline"),
        "time_budget_per_round_s": train.get("time_budget", 0.0),
        "config_file": "config.yaml",
    }


def _machine_section(report: dict[str, Any]) -> list[str]:
    """Where it ran and how: CPU, precision (and what --precision auto measured), each round's
    budget, tokens and the share of its time its evaluations took."""
    m, p = report.get("machine") or {}, report.get("precision") or {}
    if not m and not p:
        return []
    lines = ["## Machine, precision and budget", ""]
    if m:
        flags = ", ".join(m.get("flags") or []) or "none of avx2/avx512/amx"
        lines.append(
            f"- CPU: {m.get('cpu')} ({m.get('cores')} cores, {m.get('torch_threads')} torch "
            f"threads; {flags})"
        )
    if p:
        line = f"- precision: {p.get('precision')} ({p.get('reason')})"
        if p.get("fp32_step_s") is not None:
            line += (
                f"; one training step measured at fp32 {p['fp32_step_s']:.3f} s, "
                f"bf16 {p['bf16_step_s']:.3f} s"
            )
        if p.get("bf16_matmul_ratio") is not None:
            line += f"; a 256^3 bf16 matmul took {p['bf16_matmul_ratio']:.2f}x the fp32 time"
        lines.append(line)
    budget = report.get("time_budget_per_round_s") or 0.0
    if budget > 0:
        lines.append(
            f"- time budget: {budget:.0f} s per round (build, evaluations and checkpoints charged)"
        )
    for who, r in _trainings(report):
        evals = sum(e.get("seconds", 0.0) for e in r.get("evals", []))
        share = 100.0 * evals / r["wall_s"] if r.get("wall_s") else 0.0
        line = (
            f"- {who}: {r['steps']} steps, {r['tokens']:,} tokens, "
            f"{r['wall_s']:.0f} s training ({evals:.0f} s of it evaluating, {share:.1f}%)"
        )
        if r.get("mfu") is not None:
            line += (
                f"; {r['tokens_per_s']:,.0f} tok/s, {r['mfu']:.2f} of the peak ({r['peak_source']})"
            )
        lines.append(line)
    return [*lines, ""]


def verdict_line(report: dict[str, Any]) -> str:
    """The one-line outcome printed at the end of ``inheritune run``."""
    final, target = report["final"], report["target"]
    verdict = "matched" if final["matched"] else "did not match"
    return (
        f"inheritune run: {final['layers']}-layer target {verdict} the {target['label']} "
        f"({final['val_loss']:.4f} vs {target['val_loss']:.4f}); "
        f"{final['parameters_saved_pct']:.1f}% fewer parameters, "
        f"{final['speed']['speedup']:.2f}x inference speed."
    )


@torch.inference_mode()
def measure_speeds(
    models: dict[str, torch.nn.Module],
    batch_size: int,
    seq_len: int,
    *,
    warmup: int = 2,
    iters: int = 5,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Forward-pass throughput of each model on the same random ids of shape (batch_size, seq_len).

    ``warmup`` untimed passes per model first (allocator, kernel selection, lazy init), then
    ``iters`` timed rounds in which every model runs once in turn, so that load from other
    processes on a shared machine hits all models alike; each model's median pass time sets
    its tokens/s.
    """
    if batch_size < 1 or seq_len < 1 or iters < 1 or warmup < 0:
        raise ValueError("measure_speeds needs batch_size, seq_len, iters >= 1 and warmup >= 0")
    gen = torch.Generator().manual_seed(seed)
    vocab = min(m.get_input_embeddings().weight.shape[0] for m in models.values())
    ids_cpu = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)  # (B, T)
    modes = {name: m.training for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}

    def timed(model: torch.nn.Module) -> float:
        device = next(model.parameters()).device
        ids = ids_cpu.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    try:
        for m in models.values():
            m.eval()
            for _ in range(warmup):
                timed(m)
        for _ in range(iters):
            for name, m in models.items():
                times[name].append(timed(m))
    finally:
        for name, m in models.items():
            m.train(modes[name])
    out = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        out[name] = {
            "batch_size": batch_size,
            "seq_len": seq_len,
            "iters": iters,
            "median_s": median,
            "tokens_per_s": batch_size * seq_len / median,
        }
    return out


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def _millions(n: int | None) -> str:
    """134.5M for real models; exact counts for tiny ones where 0.0M would say nothing."""
    if n is None:
        return "-"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _start(run: dict[str, Any]) -> str:
    """Validation loss before the first step (the inherited model), if it was evaluated."""
    evals = run.get("evals") or []
    return _fmt(evals[0]["val_loss"]) if evals and evals[0]["step"] == 0 else "-"


def plot_rounds(report: dict[str, Any], path: str | Path) -> Path:
    """All rounds' validation curves (x = tokens trained in that round) and the target line."""
    curves: dict[str, tuple[list, list]] = {}
    recipe = recipe_name(report)
    for r in report["rounds"]:
        who = f"round {r['round']}"
        _add_curves(curves, r, f"{who} ({recipe}): {r['layers']} layers", who)
    baseline = report.get("baseline")
    if baseline:
        who = "paper's recipe"
        _add_curves(curves, baseline, f"{who}: {baseline_name(baseline)}", who)
    ref = _extra_refs(report)
    more = {f"reference on {name}": loss for name, loss in ref.items()} or None
    return plots.plot_curves(
        curves,
        path,
        title="validation loss per round" + (" and the paper's recipe" if baseline else ""),
        xlabel="tokens trained in the round",
        reference=report["target"]["val_loss"],
        reference_label=report["target"]["label"],
        more_references=more,
    )


def _trainings(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, record) of every training the run did: the rounds, then ``--baseline``'s."""
    runs = [(f"round {r['round']}", r) for r in report["rounds"]]
    return runs + ([("paper's recipe", report["baseline"])] if report.get("baseline") else [])


def _add_curves(curves: dict, r: dict[str, Any], val_label: str, who: str) -> None:
    """One training's validation curve (as ``val_label``) and its --extra-eval curves."""
    evals = r.get("evals") or []
    xs = [e["tokens"] for e in evals]
    curves[val_label] = (xs, [e["val_loss"] for e in evals])
    for name in evals[0].get("extra", {}) if evals else ():
        curves[f"{who}: {name} (held out)"] = (xs, [e["extra"][name] for e in evals])


def recipe_name(report: dict[str, Any]) -> str:
    """What the rounds are, in words: ``bi + seam bridges``, ``first layers (paper)``, ..."""
    select = report.get("select", "first")
    bridged = any(r.get("bridge") for r in report["rounds"])
    if select == "first":
        return "paper's recipe" + (" + top bridge" if bridged else "")
    return f"{select}" + (" + seam bridges" if bridged else "")


def baseline_name(b: dict[str, Any]) -> str:
    """The baseline's layers in words: ``first 19 + top bridge (20 layers)``."""
    extra = b["layers"] - b["depth"]
    return f"first {b['depth']}" + (" + top bridge" if extra else "") + f" ({b['layers']} layers)"


def _baseline_section(report: dict[str, Any]) -> list[str]:
    """--baseline paper: the final round beside the paper's choice of layers, same size and
    budget, on the same windows."""
    b = report.get("baseline")
    if not b:
        return []
    last, extra = report["rounds"][-1], _extra_sets(report)
    refs = _extra_refs(report)
    head = "".join(f" {n} (held out): start -> end |" for n in extra)
    lines = [
        "## Against the paper's recipe",
        "",
        f"`--baseline paper`: the paper's choice of layers (the reference's first ones) at the "
        f"final round's size, trained with the same budget per round on the same windows. "
        f"**inheritune** is this run's recipe ({recipe_name(report)}); **paper** keeps the "
        f"first layers.",
        "",
        f"| recipe | layers | tokens trained | wall time (s) | val loss at start | val loss |{head}",
        "|---|---|---|---|---|---|" + "---|" * len(extra),
    ]
    for who, r in ((f"inheritune ({recipe_name(report)})", last), ("paper", b)):
        layers = f"{layer_ranges_of(r)} ({r['layers']} layers)"
        lines.append(
            f"| {who} | {layers} | {r['tokens']:,} | {_fmt(r['wall_s'], 0)} | {_start(r)} | "
            f"{_fmt(r['val_loss'])} |" + "".join(f" {_extra(r, n)} |" for n in extra)
        )
    ref = report["reference"]
    lines.append(
        f"| reference (zero-shot) | {ref['layers']} | - | - | - | {_fmt(ref['val_loss'])} |"
        + "".join(f" {_fmt(refs.get(n))} |" for n in extra)
    )
    diff = last["val_loss"] - b["val_loss"]
    better = "inheritune" if diff < 0 else "the paper's recipe"
    lines += [
        "",
        f"At the end, {better} is lower on this run's validation windows by {abs(diff):.4f} "
        f"nats/token ({_fmt(last['val_loss'])} vs {_fmt(b['val_loss'])}); one seed, so a "
        "difference of a few hundredths may be noise (benchmarks/results/study.md measured "
        "a seed spread of up to 0.025 at 20 layers).",
        "",
    ]
    return lines


def layer_ranges_of(r: dict[str, Any]) -> str:
    """A record's kept reference layers, as ranges, plus its bridges."""
    from inheritune.analysis.selection import layer_ranges

    kept = r.get("kept") or list(range(r["depth"]))
    extra = r["layers"] - r["depth"]
    return f"layers {layer_ranges(kept)}" + (f" + {extra} bridge(s)" if extra else "")


def _extra_sets(report: dict[str, Any]) -> list[str]:
    """The ``--extra-eval`` corpora of a report (a single name in reports before lists)."""
    sets = report["target"].get("extra_eval") or []
    return [sets] if isinstance(sets, str) else list(sets)


def _extra_refs(report: dict[str, Any]) -> dict[str, float]:
    """The reference's loss on each extra set."""
    ref = report["reference"].get("extra_val_loss")
    sets = _extra_sets(report)
    if isinstance(ref, int | float):  # reports before lists: one set
        return {sets[0]: ref} if sets else {}
    return {k: v for k, v in (ref or {}).items() if v is not None}


def _extra(r: dict[str, Any], name: str) -> str:
    e = (r.get("extra_val_loss") or {}).get(name) or {}
    return f"{_fmt(e.get('start'))} -> {_fmt(e.get('end'))}" if e else "-"


def _phase_times(report: dict[str, Any]) -> list[str]:
    """Where the wall time of the run went, phase by phase."""
    rows = []
    if report.get("analysis") and report["analysis"].get("seconds") is not None:
        rows.append(("analysis of the reference", report["analysis"]["seconds"]))
    if report["reference"].get("seconds") is not None:
        rows.append(("reference evaluation", report["reference"]["seconds"]))
    trained = report["reference"].get("trained")
    if trained:
        rows.append(("training the reference (target)", trained["wall_s"]))
    for who, r in _trainings(report):
        what = "bridge fit" if r.get("bridge") else "final-norm calibration"
        if r.get("build_s") is not None:
            rows.append((f"{who}: build + {what}", r["build_s"]))
        rows.append((f"{who}: training ({r['layers']} layers)", r["wall_s"]))
    speed = report["final"].get("speed") or {}
    if speed.get("seconds") is not None:
        rows.append(("inference-speed timing", speed["seconds"]))
    if not rows:
        return []
    out = ["## Time per phase", "", "| phase | wall time (s) |", "|---|---:|"]
    out += [f"| {name} | {sec:.0f} |" for name, sec in rows]
    return [*out, ""]


def _analysis_section(analysis: dict[str, Any] | None) -> list[str]:
    """report.md's summary of the reference's attention-collapse analysis, with its plots."""
    lines: list[str] = []
    if analysis:
        lines += ["## Attention-collapse analysis of the reference", ""]
        lazy = analysis.get("lazy_layers")
        if lazy is not None:
            lines.append(f"- lazy layers (MaxRank ~ 1): {lazy if lazy else 'none'}")
        suggested = analysis.get("suggested_depth")
        if suggested:
            lines.append(
                f"- suggested initial depth: paper L/2 = {suggested['paper_half']}; "
                f"analysis-based = {suggested['analysis']} ({suggested['rule']})"
            )
        if analysis.get("json"):
            lines.append(f"- full numbers: `{analysis['json']}`")
        lines.append("")
        for png in analysis.get("plots", []):
            lines += [f"![{Path(png).stem}]({png})", ""]
    return lines


def _layers_section(report: dict[str, Any]) -> list[str]:
    """Which reference layers each round kept (``--select``) and what its bridges did."""
    from inheritune.analysis.selection import layer_ranges

    select, auto = report.get("select", "first"), report.get("auto")
    lines = candidates_markdown(auto)
    lines += ["## Layers kept", ""] if select != "first" else []
    for r in report["rounds"] if lines else []:
        kept = r.get("kept") or list(range(r["depth"]))
        lines.append(
            f"- round {r['round']}: reference layers {layer_ranges(kept)} (`--select {select}`"
            + (", chosen by `--select auto`)" if auto else ")")
        )
    lines += [""] if select != "first" else []
    bridged = [r for r in report["rounds"] if r.get("bridge")]
    if bridged:
        lines += ["## The bridge blocks", ""]
    for r in bridged:
        b = r["bridge"]
        spans = ", ".join(f"{br['span'][0]}-{br['span'][1] - 1}" for br in b.get("bridges", []))
        lines.append(
            f"- round {r['round']}: {r['depth']} inherited layers alone start at "
            f"{_fmt(b.get('val_loss_without_bridge'))}; with "
            f"{len(b.get('bridges', [b]))} fitted bridge block(s)"
            + (f" in place of layers {spans}" if spans else "")
            + f" ({r['layers']} layers) at {_start(r)} (fit loss {_fmt(b['fit_loss_before'])} "
            f"-> {_fmt(b['fit_loss_after'])} on held-out calibration windows, "
            f"{_fmt(b['wall_seconds'], 0)} s)"
        )
    return lines + ([""] if bridged else [])


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: what was run, the table, the verdict, the speed and the plots."""
    ref, final, tgt = report["reference"], report["final"], report["target"]
    extra, extra_ref = _extra_sets(report), _extra_refs(report)
    extra_head = "".join(f" {name} (held out): start -> end |" for name in extra)
    lines = [
        "# Inheritune run",
        "",
        f"- reference: `{report['model']}` ({ref['layers']} layers, "
        f"{_millions(ref['parameters'])} parameters)",
        f"- data: `{report['data']}`; validation on {tgt['eval_windows']} fixed windows of "
        f"{tgt['seq_len']} tokens from the held-out split",
        f"- initial depth: {report['init_depth']['layers']} layers "
        f"(`--init-depth {report['init_depth']['mode']}`); grow by {report['grow_by']} "
        f"layers per round, growth mode `{report['growth']}` "
        f"({'each round restarts from the reference' if report['growth'] == 'reinit' else 'trained layers kept, next reference layers appended'})",
        f"- target: {tgt['label']} validation loss {_fmt(tgt['val_loss'])}, "
        f"tolerance {_fmt(tgt['tolerance'])}: a round matches when its loss <= "
        f"{_fmt(tgt['val_loss'] + tgt['tolerance'])}",
        f"- recipe: {recipe_name(report)} (`--select {report.get('select', 'first')}`"
        + (", `--bridge block`)" if any(r.get("bridge") for r in report["rounds"]) else ")"),
        f"- steps per round: {report['steps_per_round']}",
        "",
        "| model | layers | parameters | tokens trained | wall time (s) | val loss at start "
        f"| val loss | val ppl | matched |{extra_head}",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra),
        f"| reference (zero-shot) | {ref['layers']} | {_millions(ref['parameters'])} | - | - | "
        f"- | {_fmt(ref['val_loss'])} | {_fmt(ref['val_ppl'], 2)} | - |"
        + "".join(f" {_fmt(extra_ref.get(name))} |" for name in extra),
    ]
    trained = ref.get("trained")
    if trained:
        lines.append(
            f"| reference ({_TRAINED[trained.get('kind', 'trained-reference')]}) | {ref['layers']} | {_millions(ref['parameters'])} | "
            f"{trained['tokens']:,} | {_fmt(trained['wall_s'], 0)} | {_start(trained)} | "
            f"{_fmt(trained['val_loss'])} | "
            f"{_fmt(trained['val_ppl'], 2)} | - |"
        )
    for r in report["rounds"]:
        lines.append(
            f"| round {r['round']} | {r['layers']} | {_millions(r['parameters'])} | "
            f"{r['tokens']:,} | {_fmt(r['wall_s'], 0)} | {_start(r)} | {_fmt(r['val_loss'])} | "
            f"{_fmt(r['val_ppl'], 2)} | {'yes' if r['matched'] else 'no'} |"
            + "".join(f" {_extra(r, name)} |" for name in extra)
        )
    speed = final.get("speed") or {}
    verdict = "matched" if final["matched"] else "did NOT match"
    lines += [
        "",
        f"**Result:** the {final['layers']}-layer target {verdict} the {tgt['label']} "
        f"(val loss {_fmt(final['val_loss'])} vs {_fmt(tgt['val_loss'])}, difference "
        f"{final['val_loss'] - tgt['val_loss']:+.4f}); stopped because: {final['stop_reason']}.",
        "",
        f"- parameters: {final['parameters']:,} vs {ref['parameters']:,} "
        f"(saved {final['parameters_saved']:,}, {final['parameters_saved_pct']:.1f}%)",
        f"- total training: {report['total']['tokens']:,} tokens in {report['total']['rounds']} "
        f"round(s), {_fmt(report['total']['wall_s'], 0)} s",
    ]
    if speed:
        lines.append(
            f"- inference speed on this machine ({speed['device']}, batch {speed['batch_size']} x "
            f"{speed['seq_len']} tokens, median of {speed['iters']} forward passes after "
            f"warm-up): target {speed['target_tokens_per_s']:,.0f} tok/s, reference "
            f"{speed['reference_tokens_per_s']:,.0f} tok/s ({speed['speedup']:.2f}x)"
        )
    lines += [f"- final model (Hugging Face folder): `{final['model_dir']}`"]
    if final.get("gguf"):
        lines.append(f"- the same as one GGUF file for llama.cpp and Ollama: `{final['gguf']}`")
    lines += [""]
    lines += _baseline_section(report)
    lines += _layers_section(report)
    lines += _phase_times(report)
    lines += _machine_section(report)
    lines += ["## Validation curves", "", f"![validation curves]({report['curves_png']})", ""]
    lines += _analysis_section(report.get("analysis"))
    lines += [f"Resolved config: `{report['config_file']}`", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """Write report.json, the curve PNG and report.md into ``out``; returns report.md's path."""
    out = Path(out)
    report = dict(report, curves_png=CURVES_PNG)
    plot_rounds(report, out / CURVES_PNG)
    atomic_write_json(out / REPORT_JSON, report)
    md = out / REPORT_MD
    md.write_text(render_markdown(report))
    return md
