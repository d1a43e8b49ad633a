"""Where does a selection start, before any training? Zero-shot loss of ``inheritune inherit``
outputs on general English and on Shakespeare (issue #24, point 7).

Rows (SmolLM2-135M, 30 layers; every model is built by the ``inherit`` command itself, so this
measures the product's path): the reference; ``--select first --num-layers 20 --bridge block``
(the first 19 layers + the top bridge); ``--select bi --num-layers 20 --bridge block`` (Block
Influence, a bridge at every seam, 20 layers in all); ``--select auto --bridge block`` (every
rule's bridged start scored on training-split windows, the best kept); and first and bi without
bridges. Scores
and bridges are fitted on the TRAINING split of ``--data`` (default ``brown``: its held-out
samples stay unseen); the evaluation sets are Brown's held-out samples, Shakespeare's validation
split and all of botchan, 64 fixed windows of 128 tokens each (the demo's windows).

Each row is also scored on fixed windows of the TRAINING split of ``--data``: a choice between
rows (e.g. of ``--bridge-input``) is made there, never on the held-out sets. Each finished row is
appended to ``--out`` (JSONL) at once and skipped on a rerun, so a stopped run resumes. The CPU
is recorded with every row.

    .venv/bin/python benchmarks/zero_shot_select.py --out benchmarks/results/zero-shot-select.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from inheritune import data
from inheritune.config import build
from inheritune.models import loading as models
from inheritune.models.losses import evaluate_loss
from inheritune.surgery.inherit import InheritConfig, inherit
from inheritune.training.monitor import cpu_info

SETS = {"brown (held out)": "brown", "shakespeare (val)": "shakespeare", "botchan (all)": "botchan"}
ROWS = {
    # measured when --calib-tokens defaulted to 8192 (now 32768): stated, so a rerun is the same
    "first-19 + top bridge": {"select": "first", "bridge": "block", "calib_tokens": 8192},
    "bi + bridge at every seam": {"select": "bi", "bridge": "block", "calib_tokens": 8192},
    "auto + bridge at every seam": {"select": "auto", "bridge": "block", "calib_tokens": 8192},
    # the same bridges fitted from the reference's streams and from the smaller model's own
    # (--bridge-input), each also scored on training-split windows, where the choice is made
    "bi + bridge at every seam, reference input": {
        "select": "bi",
        "bridge": "block",
        "bridge_input": "reference",
        "calib_tokens": 8192,
    },
    "bi + bridge at every seam, pruned input": {
        "select": "bi",
        "bridge": "block",
        "bridge_input": "pruned",
        "calib_tokens": 8192,
    },
    # the final-norm refit (off by default: benchmarks/results/bridge.md) and twice the
    # calibration tokens, on the same training-split windows
    "bi + bridge at every seam, final-norm refit": {
        "select": "bi",
        "bridge": "block",
        "norm_iters": 20,
        "norm_windows": 16,
        "calib_tokens": 8192,
    },
    "bi + bridge at every seam, 16K calibration tokens": {
        "select": "bi",
        "bridge": "block",
        "calib_tokens": 16384,
    },
    "bi + bridge at every seam, 32K calibration tokens": {
        "select": "bi",
        "bridge": "block",
        "calib_tokens": 32768,
    },
    "first-19 + top bridge, 32K calibration tokens": {
        "select": "first",
        "bridge": "block",
        "calib_tokens": 32768,
    },
    "first-20, no bridge": {"select": "first", "bridge": "none"},
    "bi-20, no bridge": {"select": "bi", "bridge": "none"},
}


TRAIN_SET = "brown (training-split windows)"  # what a choice between rows may be made on
TRAIN_SEED = 4242  # apart from the score, calibration and auto windows' seeds


def eval_sets(tokenizer, seq_len: int, tokens: int, corpus: str) -> dict:
    out = {}
    for label, name in SETS.items():
        whole = name == "botchan"  # botchan is all held out; the others have their own splits
        t = data.load_tokens(name, tokenizer, val_fraction=1.0 if whole else 0.05)
        out[label] = data.eval_windows(t, seq_len, tokens)
    train = data.load_tokens(corpus, tokenizer).train
    out[TRAIN_SET] = data.sample_windows(train, tokens // seq_len, seq_len, TRAIN_SEED)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSONL of finished rows")
    ap.add_argument("--layers", type=int, default=20, help="--num-layers (bridges included)")
    ap.add_argument("--data", default="brown", help="corpus whose training split fits it all")
    ap.add_argument("--score-windows", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()

    done = set()
    if args.out.is_file():
        done = {json.loads(line)["row"] for line in args.out.read_text().splitlines() if line}
    tokenizer = models.load_tokenizer("smollm2-135m")
    sets = eval_sets(tokenizer, args.seq_len, args.eval_tokens, args.data)
    machine = cpu_info()

    def record(row: str, model_dir: str, extra: dict) -> None:
        model = models.load_model(model_dir)
        t0 = time.perf_counter()
        losses = {label: evaluate_loss(model, w, 32) for label, w in sets.items()}
        line = {"row": row, "layers": model.config.num_hidden_layers, "loss": losses, **extra}
        line |= {"eval_seconds": time.perf_counter() - t0, "machine": machine}
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(row, {k: round(v, 3) for k, v in losses.items()}, flush=True)

    for row in ("reference", "reference, with training-split windows"):
        if row not in done and (row == "reference" or "reference" in done):
            record(row, "smollm2-135m", {})
    for row, knobs in ROWS.items():
        if row in done:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cfg = build(
                InheritConfig,
                num_layers=args.layers,
                data=args.data,
                out=tmp,
                score_windows=args.score_windows,
                eval_tokens=0,
                **knobs,
            )
            t0 = time.perf_counter()
            inherit(cfg)
            build_s = time.perf_counter() - t0
            prov = json.loads((Path(tmp) / "provenance.json").read_text())
            bridges = (prov.get("bridge") or {}).get("bridges", [])
            extra = {
                "command": f"inheritune inherit --num-layers {args.layers} --data {args.data} "
                f"--score-windows {args.score_windows} "
                + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in knobs.items()),
                "kept": prov["kept_layers"],
                "bridged_spans": [b["span"] for b in bridges],
                "auto": prov.get("auto"),
                "build_seconds": build_s,
            }
            record(row, tmp, extra)


if __name__ == "__main__":
    main()
