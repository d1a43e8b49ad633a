"""Distillation in the demo, at equal wall-clock (issue #25, point 5): ``make demo``'s preset as
it is and with ``--distill-alpha 0.5``, on the same machine, one after the other, nothing else
running.

Each training of the demo has a wall-clock budget, so a distilled round (a teacher forward per
step) trains fewer tokens: this measures whether what distillation keeps of general English is
worth the tokens it costs. Both runs' final models (and their ``--baseline paper`` models) are
then scored on the same windows as ``benchmarks/study.py``'s rows (64 fixed windows of 128
tokens each):

* the choice is made on TRAINING-split windows only: Brown's (the corpus both train on; the
  study's selection windows) and Shakespeare's (a text neither trains on: how much general
  English a model keeps beyond its training corpus, without touching a reported set);
* Brown's held-out samples, Shakespeare's validation split and botchan are reported, never
  chosen on.

A finished run (its ``report.json``) is not rerun, and each scored model appends one JSON line
to ``--out`` at once (skipped on a rerun); the CPU is recorded with every line.

    .venv/bin/python benchmarks/demo_distill.py --out benchmarks/results/demo-distill.jsonl
    .venv/bin/python benchmarks/demo_distill.py --out benchmarks/results/demo-distill.jsonl --report
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from inheritune import data
from inheritune.data.windows import sample_windows
from inheritune.models import loading as models
from inheritune.models.losses import evaluate_loss
from inheritune.training.monitor import cpu_info

PRESET = "src/inheritune/presets/demo.yaml"
REFERENCE = "smollm2-135m"
VARIANTS = {"plain": [], "kd": ["--distill-alpha", "0.5"]}
SEQ, WINDOWS, SEED = 128, 64, 4242  # benchmarks/study.py's windows and selection seed
HELD_OUT = {"brown": "brown (held out)", "shakespeare": "shakespeare (val)", "botchan": "botchan"}
TRAIN = {"brown": "brown (train win.)", "shakespeare": "shakespeare (train win.)"}


def score_sets(tokenizer) -> dict[str, Any]:
    sets = {}
    for name, label in HELD_OUT.items():
        t = data.load_tokens(name, tokenizer, val_fraction=1.0 if name == "botchan" else 0.05)
        sets[label] = data.eval_windows(t, SEQ, SEQ * WINDOWS)
    for name, label in TRAIN.items():
        train = data.load_tokens(name, tokenizer).train
        sets[label] = sample_windows(train, WINDOWS, SEQ, SEED, "training")
    return sets


def run_demo(work: Path, variant: str) -> Path:
    out = work / f"demo-{variant}"
    if not (out / "report.json").is_file():
        cmd = [sys.executable, "-m", "inheritune", "run", "--config", PRESET, "--out", str(out)]
        subprocess.run(cmd + VARIANTS[variant], check=True)
    return out


def models_of(run: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """recipe -> (model folder, its training record) of a finished demo run."""
    state = json.loads((run / "run_state.json").read_text())
    last = state["rounds"][-1]
    found = {"inheritune": (run / "final_model", last)}
    if state.get("baseline"):
        found["paper"] = (run / state["baseline"]["model_dir"], state["baseline"])
    return found


def report(rows: list[dict[str, Any]], path: Path) -> None:
    ref = next(r for r in rows if r["row"] == "reference")["loss"]
    labels = [*TRAIN.values(), *HELD_OUT.values()]
    lines = [
        "# Distillation in the demo, at equal wall-clock (issue #25, point 5)",
        "",
        f"Made by `.venv/bin/python benchmarks/demo_distill.py --out {path.with_suffix('.jsonl')}`"
        f" from [{path.with_suffix('.jsonl').name}]({path.with_suffix('.jsonl').name}): "
        f"`make demo`'s preset run as it is and with `--distill-alpha 0.5`, one after the other "
        "on one machine, every training under the preset's wall-clock budget. Losses "
        f"(nats/token) on {WINDOWS} fixed windows of {SEQ} tokens; the choice is made on the "
        "training-split windows only (Brown's, the corpus trained on; Shakespeare's, a text "
        "never trained on), the held-out sets are reported.",
        "",
        "| model | tokens | train s | " + " | ".join(labels) + " | CPU |",
        "|---|---:|---:|" + "---:|" * len(labels) + "---|",
    ]
    for r in rows:
        cells = [f"{r['loss'][k]:.3f}" for k in labels]
        cpu = r["machine"]["cpu"] + " (" + ", ".join(r["machine"]["flags"]) + ")"
        tokens = f"{r['tokens']:,}" if r.get("tokens") else "-"
        wall = f"{r['train_s']:.0f}" if r.get("train_s") else "-"
        lines.append(f"| {r['row']} | {tokens} | {wall} | " + " | ".join(cells) + f" | {cpu} |")
    lines += ["", "Above the reference (end minus reference, nats/token):", ""]
    lines += ["| model | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for r in rows:
        if r["row"] != "reference":
            cells = [f"{r['loss'][k] - ref[k]:+.3f}" for k in labels]
            lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    lines += verdict({r["row"]: r for r in rows})
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def verdict(rows: dict[str, dict[str, Any]]) -> list[str]:
    """What the training-split windows say of distillation for each recipe, in plain words."""
    out = ["", "## Verdict", ""]
    for recipe in ("inheritune", "paper"):
        plain, kd = rows.get(f"{recipe}, plain"), rows.get(f"{recipe}, kd")
        if plain is None or kd is None:
            continue
        d = {k: kd["loss"][k] - plain["loss"][k] for k in TRAIN.values()}
        ratio = plain["tokens"] / kd["tokens"]
        words = " and ".join(f"{d[k]:+.3f} on {k}" for k in TRAIN.values())
        better = sum(v < 0 for v in d.values())
        say = [
            "worse on both: plain stays the default.",
            "a trade, not a win: plain stays the default.",
        ]
        out.append(
            f"- {recipe}: distillation (at {ratio:.1f}x fewer tokens in the same wall clock) "
            f"ends {words} against plain training: "
            + (say[better] if better < len(d) else "better on both.")
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSONL of scored models")
    ap.add_argument("--work", type=Path, default=Path("runs/demo-distill"), help="runs' folders")
    ap.add_argument("--report", action="store_true", help="only write the .md from --out")
    args = ap.parse_args()
    done: dict[str, dict[str, Any]] = {}
    if args.out.is_file():
        done = {json.loads(x)["row"]: json.loads(x) for x in args.out.read_text().splitlines()}
    if not args.report:
        tokenizer = models.load_tokenizer(REFERENCE)
        sets = score_sets(tokenizer)
        machine = cpu_info()

        def record(row: str, folder: str, extra: dict[str, Any]) -> None:
            if row in done:
                return
            model = models.load_model(folder)
            loss = {k: evaluate_loss(model, w, 32, desc=f"{row}: {k}") for k, w in sets.items()}
            done[row] = {"row": row, "model": folder, "loss": loss, **extra, "machine": machine}
            with open(args.out, "a") as f:
                f.write(json.dumps(done[row]) + "\n")
            print(row, {k: round(v, 3) for k, v in loss.items()}, flush=True)

        record("reference", REFERENCE, {})
        for variant in VARIANTS:
            run = run_demo(args.work, variant)
            for recipe, (folder, rec) in models_of(run).items():
                extra = {"tokens": rec["tokens"], "train_s": rec["wall_s"], "run": str(run)}
                record(f"{recipe}, {variant}", str(folder), extra)
    report(list(done.values()), args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
