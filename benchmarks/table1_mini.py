"""The paper's Table 1 protocol end to end, in miniature, on a CPU.

The paper (arXiv 2404.08634, docs/design/paper.md §2-4) trains its own GPT-2 reference from scratch
for T steps, then compares, all at T steps on the same data: Inheritune (the reference's first
L/2 layers, grown by 2 until it matches the reference), the same depth from random init (T and
2T), stacking, hybrid stacking, half width, distillation and lazy-layer init. This script does
the same with a small GPT-2 on the embedded Shakespeare corpus, one resumable stage at a time
(each stage is skipped when its output exists):

1. ``tokenizer/``: a byte-level BPE (``tokenizers``) trained on the training text only;
2. ``reference/init/``: a randomly initialised GPT-2 (config + safetensors + tokenizer);
3. ``reference/``: that model trained T steps from scratch by ``inheritune train`` -- the
   paper's reference (``reference/final``);
4. ``analyze/``: ``inheritune analyze`` of the reference (are there lazy layers at this size?);
5. ``compare/``: ``inheritune compare`` with the reference, every variant at depth L/2 and T
   steps (``scratch-full`` is the paper's full-depth-from-scratch row);
6. ``run/``: ``inheritune run`` (Algorithm 1) with the reference's own loss as the target,
   growing by 2 from L/2.

Stages 3-6 are the package's own commands, run as subprocesses; the exact command lines and
each stage's wall time are written to ``OUT/commands.json``. The training settings of every
stage come from ``src/inheritune/presets/table1-mini-compare.yaml`` (the run preset must agree,
which is checked), so the reference and every variant train with the same T and settings.

Usage::

    .venv/bin/python benchmarks/table1_mini.py                  # the real run: runs/table1-mini
    .venv/bin/python benchmarks/table1_mini.py --smoke          # T=2, tiny model: runs/table1-mini-smoke
    .venv/bin/python benchmarks/table1_mini.py --collect benchmarks/results/table1-mini

Results of the real run are summarised in benchmarks/results/table1-mini/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from inheritune import data
from inheritune.compare.config import CompareConfig
from inheritune.config import dataclass_from_dict, flat_dict, load_yaml, to_dict
from inheritune.data import sources as readers
from inheritune.models import assets
from inheritune.models import loading as models
from inheritune.models.folders import save_hf_folder
from inheritune.recipe.config import RecipeConfig
from inheritune.storage import atomic_write_json, sha256_file, write_folder_atomically
from inheritune.surgery import build as surgery
from inheritune.training.checkpoint import checkpoints_root, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "src" / "inheritune" / "presets"
COMPARE_PRESET = PRESETS / "table1-mini-compare.yaml"
RUN_PRESET = PRESETS / "table1-mini-run.yaml"
EOS = "<|endoftext|>"
# The tokenizer never sees the last TOKENIZER_HOLDOUT of the corpus's characters. data.py holds
# out the last 5% of the *tokens*; one extra percent of characters keeps the tokenizer's text
# clear of the validation split even where tokens per character vary (checked in stage 1).
TOKENIZER_HOLDOUT = data.VAL_FRACTION + 0.01
# Init seed of the reference, deliberately not the variants' training seed (0): scratch-full,
# which the compare builds with seed 0, is then an independent second sample of "the reference's
# architecture trained T steps from scratch" (same data order), so reference vs scratch-full
# shows the run-to-run spread.
REFERENCE_INIT_SEED = 1234

# The model: a GPT-2 in the paper's official configuration where GPT2Config has the switch
# (scale_attn_by_inverse_layer_idx=True; HF GPT-2 has no bias=False option), no dropout (as
# nanoGPT pre-trains). SIZES["smoke"] only proves the pipeline runs.
SIZES = {
    "real": {"vocab": 4096, "n_layer": 8, "n_embd": 128, "n_head": 4, "n_positions": 256},
    "smoke": {"vocab": 512, "n_layer": 8, "n_embd": 32, "n_head": 2, "n_positions": 64},
}
# --smoke: every setting of the presets but these (tiny, 2 steps).
SMOKE_TRAIN = {
    "steps": 2,
    "batch_size": 2,
    "seq_len": 32,
    "eval_every": 0,
    "eval_tokens": 128,
    "save_every": 0,
    "warmup": 1,
}
SMOKE_COMPARE = {"score_windows": 2, "score_seq_len": 32, "calib_seq_len": 32}
SMOKE_RUN = {
    "analysis_num_seqs": 4,
    "analysis_seq_len": 32,
    "speed_batch_size": 1,
    "speed_seq_len": 32,
    "speed_warmup": 0,
    "speed_iters": 1,
}
SMOKE_ANALYZE = {"num_seqs": 4, "seq_len": 32}


def log(msg: str) -> None:
    print(f"[table1-mini {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- stage 1: tokenizer


def corpus_text() -> list[str]:
    """The embedded corpus's documents in the order data.py tokenises them."""
    source = data.resolve_data(str(assets.ensure_default_corpus()))
    return list(readers.iter_documents(source))


def train_tokenizer(folder: Path, vocab: int) -> dict:
    """A byte-level BPE trained on the corpus minus its last TOKENIZER_HOLDOUT of characters,
    saved as a transformers PreTrainedTokenizerFast with EOS (the document separator)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    docs = corpus_text()
    total = sum(len(d) for d in docs)
    cut = int(total * (1 - TOKENIZER_HOLDOUT))
    seen, pieces = 0, []
    for d in docs:  # the documents up to character `cut`, the last one truncated
        if seen >= cut:
            break
        pieces.append(d[: cut - seen])
        seen += len(pieces[-1])
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(pieces, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)

    def populate(tmp: Path) -> None:
        fast.save_pretrained(tmp)

    write_folder_atomically(folder, populate)
    return {"vocab_size": len(fast), "chars_total": total, "chars_trained_on": cut}


def load_tokenizer(folder: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def check_tokenizer_holdout(tokenizer_dir: Path, info: dict) -> dict:
    """Where the validation split starts in characters: it must lie beyond the tokenizer's text."""
    tokenizer = load_tokenizer(tokenizer_dir)
    tokens = data.load_tokens(str(assets.ensure_default_corpus()), tokenizer)
    head = [int(t) for t in tokens.val[:64] if int(t) != tokenizer.eos_token_id]
    snippet = tokenizer.decode(head)
    text = "\n".join(corpus_text())
    # The corpus's documents are joined by EOS in the token file and by one newline here, so
    # character offsets agree to within the number of documents.
    at = text.find(snippet, int(len(text) * 0.8))
    info.update(
        num_tokens=len(tokens.ids),
        train_tokens=len(tokens.train),
        val_tokens=len(tokens.val),
        val_starts_at_char=at,
    )
    if at < 0 or at < info["chars_trained_on"]:
        raise SystemExit(
            f"the validation split starts at character {at}, inside the tokenizer's training "
            f"text (first {info['chars_trained_on']} characters): raise TOKENIZER_HOLDOUT"
        )
    return info


# --------------------------------------------------------------------------- stage 2: model


def write_init_model(folder: Path, tokenizer_dir: Path, size: dict) -> dict:
    """A randomly initialised GPT-2 (seed REFERENCE_INIT_SEED) with the tokenizer, as HF files."""
    from transformers import GPT2Config

    tokenizer = load_tokenizer(tokenizer_dir)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=size["n_positions"],
        n_embd=size["n_embd"],
        n_layer=size["n_layer"],
        n_head=size["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        scale_attn_by_inverse_layer_idx=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = surgery.random_init(config, seed=REFERENCE_INIT_SEED)
    write_folder_atomically(folder, lambda tmp: save_hf_folder(model, tokenizer, tmp))
    return {"parameters": models.count_parameters(model), **size, "seed": REFERENCE_INIT_SEED}


# --------------------------------------------------------------------------- stages 3-6


def presets(smoke: bool, out: Path) -> tuple[CompareConfig, RecipeConfig]:
    """The two presets (with --smoke's overrides), checked to share every training setting."""
    reference = rel(out / "reference" / "final")
    t_over = {"model": reference, **(SMOKE_TRAIN if smoke else {})}
    cmp_values = {**load_yaml(COMPARE_PRESET), **t_over, "out": rel(out / "compare")}
    run_values = {**load_yaml(RUN_PRESET), **t_over, "out": rel(out / "run")}
    if smoke:
        cmp_values.update(SMOKE_COMPARE)
        run_values.update(SMOKE_RUN)
    cmp_cfg = dataclass_from_dict(CompareConfig, cmp_values, where=str(COMPARE_PRESET))
    run_cfg = dataclass_from_dict(RecipeConfig, run_values, where=str(RUN_PRESET))
    a, b = flat_dict(cmp_cfg.train), flat_dict(run_cfg.train)
    differ = [k for k in a if k != "out" and a[k] != b[k]]
    if differ:
        raise SystemExit(f"{RUN_PRESET.name} and {COMPARE_PRESET.name} differ in {differ}")
    return cmp_cfg, run_cfg


def flags(values: dict) -> list[str]:
    """--key value pairs for the CLI (lists comma-joined, booleans as --x / --no-x)."""
    args: list[str] = []
    for key, value in values.items():
        name = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(name if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            if value:
                args += [name, ",".join(map(str, value))]
        elif value is not None:
            args += [name, str(value)]
    return args


def rel(path: Path) -> str:
    """``path`` as the commands show it: relative to the repository root when inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def overrides(preset: Path, smoke: bool, out: Path, sub: str, extra: dict) -> dict:
    """Flags that replace preset values: the reference and output folders where they differ
    from the preset's (a custom --out), and --smoke's sizes."""
    written = load_yaml(preset)
    values = {"model": rel(out / "reference" / "final"), "out": rel(out / sub)}
    values = {k: v for k, v in values.items() if written.get(k) != v}
    if smoke:
        values.update(SMOKE_TRAIN, **extra)
    return values


def inheritune(*args: str) -> list[str]:
    return [sys.executable, "-m", "inheritune", *args]


class Stages:
    """Runs each stage once, recording its command and wall time in OUT/commands.json."""

    def __init__(self, out: Path):
        self.path = out / "commands.json"
        self.record = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def done(self, name: str) -> bool:
        return "wall_s" in self.record.get(name, {})

    def save(self, name: str, entry: dict) -> None:
        self.record[name] = entry
        atomic_write_json(self.path, self.record)

    def command(self, name: str, cmd: list[str], finished: Path) -> None:
        if finished.exists() and self.done(name):
            log(f"{name}: done ({finished})")
            return
        shown = " ".join(str(c) for c in cmd).replace(sys.executable, "python")
        log(f"{name}: {shown}")
        t0 = time.time()
        if subprocess.run(cmd, cwd=ROOT).returncode:
            raise SystemExit(f"table1-mini: stage {name} failed; fix it and rerun to resume")
        self.save(name, {"command": shown, "wall_s": round(time.time() - t0, 1)})

    def function(self, name: str, fn, finished: Path) -> dict:
        if finished.exists() and self.done(name):
            log(f"{name}: done ({finished})")
            return self.record[name]
        log(f"{name}: ...")
        t0 = time.time()
        info = fn()
        self.save(name, {**info, "wall_s": round(time.time() - t0, 1)})
        return self.record[name]


# The small outputs committed to benchmarks/results/table1-mini (no weights): OUT-relative paths.
COLLECT = [
    "commands.json",
    "summary.json",
    "reference-train.yaml",
    "reference/result.json",
    "reference/loss.png",
    "reference/log.jsonl",
    "analyze/analysis.json",
    "analyze/summary.txt",
    "analyze/heads.csv",
    "analyze/rank_heatmap.png",
    "analyze/layers.png",
    "analyze/config.yaml",
    "compare/compare.md",
    "compare/compare.json",
    "compare/curves.png",
    "compare/config.yaml",
    "compare/scores.json",
    "run/report.md",
    "run/report.json",
    "run/curves.png",
    "run/config.yaml",
]


def collect(out: Path, dest: Path) -> None:
    """Copy the small outputs into ``dest`` (same layout), with the tokenizer's sha256."""
    import shutil

    for name in COLLECT:
        src = out / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    tok = out / "tokenizer" / "tokenizer.json"
    atomic_write_json(dest / "tokenizer.json.sha256.json", {"tokenizer.json": sha256_file(tok)})
    log(f"copied the small outputs to {dest}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", default=None, help="default runs/table1-mini (--smoke: ...-smoke)")
    p.add_argument("--smoke", action="store_true", help="T=2 and a tiny model: the plumbing only")
    p.add_argument(
        "--collect",
        default=None,
        help="at the end, copy the small outputs (no weights) here, e.g. "
        "benchmarks/results/table1-mini",
    )
    args = p.parse_args(argv)
    kind = "smoke" if args.smoke else "real"
    out = Path(args.out or ("runs/table1-mini-smoke" if args.smoke else "runs/table1-mini"))
    out = (ROOT / out) if not out.is_absolute() else out
    out.mkdir(parents=True, exist_ok=True)
    size = SIZES[kind]
    cmp_cfg, run_cfg = presets(args.smoke, out)  # checked before any work
    stages = Stages(out)
    t_all = time.time()

    tok_dir, init_dir, ref_dir = out / "tokenizer", out / "reference" / "init", out / "reference"
    stages.function(
        "1-tokenizer",
        lambda: check_tokenizer_holdout(tok_dir, train_tokenizer(tok_dir, size["vocab"])),
        tok_dir,
    )
    stages.function("2-init-model", lambda: write_init_model(init_dir, tok_dir, size), init_dir)

    # 3. the reference: the compare preset's training settings, from the random init.
    train_cfg = replace(cmp_cfg.train, model=rel(init_dir), out=rel(ref_dir))
    train_cfg.resume = bool(list_checkpoints(checkpoints_root(ref_dir)))
    train_yaml = out / "reference-train.yaml"
    if not stages.done("3-train-reference"):
        from inheritune.config import save_resolved

        save_resolved(train_cfg, train_yaml)
    stages.command(
        "3-train-reference",
        inheritune("train", "--config", rel(train_yaml)),
        ref_dir / "result.json",
    )

    # 4. the analysis of the reference (the paper's 100 windows x 100 tokens by default).
    analyze_args = {"model": rel(ref_dir / "final"), "out": rel(out / "analyze")}
    if args.smoke:
        analyze_args.update(SMOKE_ANALYZE)
    stages.command(
        "4-analyze",
        inheritune("analyze", "--data", cmp_cfg.train.data, *flags(analyze_args)),
        out / "analyze" / "analysis.json",
    )

    # 5-6. the presets themselves, with only the folders (and --smoke's sizes) overridden.
    cmp_flags = flags(overrides(COMPARE_PRESET, args.smoke, out, "compare", SMOKE_COMPARE))
    stages.command(
        "5-compare",
        inheritune("compare", "--config", str(COMPARE_PRESET.relative_to(ROOT)), *cmp_flags),
        out / "compare" / "compare.json",
    )
    run_flags = flags(overrides(RUN_PRESET, args.smoke, out, "run", SMOKE_RUN))
    stages.command(
        "6-run",
        inheritune("run", "--config", str(RUN_PRESET.relative_to(ROOT)), *run_flags),
        out / "run" / "report.json",
    )
    summary = {
        "kind": kind,
        "compare_config": to_dict(cmp_cfg),
        "run_config": to_dict(run_cfg),
        "stages": stages.record,
        "stage_wall_s_total": round(sum(s.get("wall_s", 0) for s in stages.record.values()), 1),
        "this_invocation_wall_s": round(time.time() - t_all, 1),
    }
    atomic_write_json(out / "summary.json", summary)
    log(f"done: {out}/summary.json (stages {summary['stage_wall_s_total']} s)")
    if args.collect:
        collect(out, ROOT / args.collect)


if __name__ == "__main__":
    main()
