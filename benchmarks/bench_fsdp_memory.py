"""Per-rank peak memory of `inheritune train` under torchrun: DDP vs FSDP (2 processes).

Each mode runs the real command, ``torchrun --nproc-per-node 2 -m inheritune train ...``, on
SmolLM2-135M (the embedded default, all 30 layers unless ``--layers``) and Shakespeare, through a
small wrapper that records each rank's high-water mark (``resource.getrusage`` RSS on CPU, the
CUDA allocator's peak on GPU: :func:`inheritune.training.monitor.peak_memory`) twice:

* ``train``: when training ends, before the final checkpoint (model load + the steps + evals);
* ``end``: at exit, after the final checkpoint. Checkpoints are full Hugging Face folders, so
  under FSDP rank 0 gathers the whole model and optimizer state into CPU memory to write them.

Each mode runs twice: with glibc's default allocator settings, and with
``MALLOC_MMAP_THRESHOLD_=1048576``. By default glibc raises its mmap threshold after large frees
(up to 32 MB), so FSDP's per-block all-gather buffers (allocated and freed every forward and
backward) come from the heap and their freed pages stay in RSS; the fixed threshold returns
them to the OS, which is closer to what a GPU's caching allocator reports.

    .venv/bin/python benchmarks/bench_fsdp_memory.py [--layers 0 --seq 128 --steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WRAPPER = """
import json, os, sys
from pathlib import Path
import torch
from inheritune import cli
from inheritune import distributed
from inheritune.training import monitor
from inheritune.training import train as trainer
marks = {"imports": monitor.peak_memory(torch.device("cpu"))}
real = trainer.finish
def finish(run, *a, **k):
    marks["train"] = monitor.peak_memory(run.env.device)
    return real(run, *a, **k)
trainer.finish = finish
rc = cli.main(sys.argv[1:])
marks["end"] = monitor.peak_memory(distributed.setup().device)
Path(os.environ["MARKS"], os.environ["RANK"] + ".json").write_text(json.dumps(marks))
sys.exit(rc)
"""

MMAP = {"MALLOC_MMAP_THRESHOLD_": "1048576"}
MODES = {  # name: (flags, extra environment)
    "DDP": ([], {}),
    "FSDP": (["--fsdp"], {}),
    "DDP, mmap threshold 1 MiB": ([], MMAP),
    "FSDP, mmap threshold 1 MiB": (["--fsdp"], MMAP),
    "FSDP + --grad-checkpointing, mmap threshold 1 MiB": (["--fsdp", "--grad-checkpointing"], MMAP),
}


def model_folder(layers: int, tmp: Path) -> str:
    """The default model, or its first ``layers`` blocks saved as a folder."""
    if layers <= 0:
        return "smollm2-135m"
    from inheritune.models import loading as models
    from inheritune.surgery import build as surgery

    ref = models.load_model("smollm2-135m")
    small = surgery.select_layers(ref, list(range(layers)))
    folder = tmp / f"smollm2-first{layers}"
    small.save_pretrained(folder)
    models.load_tokenizer("smollm2-135m").save_pretrained(folder)
    return str(folder)


def run_mode(flags, extra_env, model: str, args, tmp: Path, name: str) -> list[dict]:
    tag = str(len(list(tmp.glob("marks-*"))))
    marks = tmp / f"marks-{tag}"
    marks.mkdir()
    script = tmp / "wrapper.py"
    script.write_text(WRAPPER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(script), "train", "--model", model, "--data", "shakespeare"]
    cmd += ["--out", str(tmp / f"out-{tag}"), "--steps", str(args.steps)]
    cmd += ["--batch-size", "2", "--seq-len", str(args.seq), "--eval-every", "0"]
    cmd += ["--eval-tokens", str(args.seq), "--save-every", "0", "--log-every", "1", *flags]
    env = {**os.environ, "MARKS": str(marks), "OMP_NUM_THREADS": str(args.threads), **extra_env}
    print(f"[{name}] {' '.join(cmd[4:])}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return [json.loads((marks / f"{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=0, help="first N blocks only (0 = all 30)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fsdp_memory.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = model_folder(args.layers, tmp)
        rows = {
            name: run_mode(flags, extra, model, args, tmp, name)
            for name, (flags, extra) in MODES.items()
        }
    gb = 1e9
    lines = [
        "# Per-rank peak memory: DDP vs FSDP, 2 processes (CPU, gloo)",
        "",
        f"SmolLM2-135M ({'all 30' if args.layers <= 0 else f'the first {args.layers}'} layers),"
        f" fp32, AdamW, global batch 2 x {args.seq} tokens (1 sequence per rank), "
        f"{args.steps} steps, {args.threads} thread(s) per rank. Measured with",
        "",
        "    .venv/bin/python benchmarks/bench_fsdp_memory.py "
        + " ".join(sys.argv[1:]).replace(str(args.out), "").strip(),
        "",
        "which runs `torchrun --standalone --nproc-per-node 2 -m inheritune train --model "
        "smollm2-135m --data shakespeare ...` once per mode (plus the flags below) and reads each "
        "rank's RSS high-water mark (`resource.getrusage`) when training ends (`train`: load, "
        "steps, evaluations) and at exit (`end`: after the final checkpoint). `imports` is the "
        "process after importing torch and transformers.",
        "",
        "| mode | rank | imports (GB) | train peak (GB) | end peak (GB) |",
        "|---|---|---|---|---|",
    ]
    for name, ranks in rows.items():
        for r, m in enumerate(ranks):
            lines.append(
                f"| {name} | {r} | {m['imports'] / gb:.2f} | {m['train'] / gb:.2f} | "
                f"{m['end'] / gb:.2f} |"
            )
    lines.append("")
    for suffix, label in (
        ("", "glibc defaults"),
        (", mmap threshold 1 MiB", "mmap threshold 1 MiB"),
    ):
        ddp = max(m["train"] for m in rows["DDP" + suffix])
        fsdp = max(m["train"] for m in rows["FSDP" + suffix])
        base = rows["DDP" + suffix][0]["imports"]
        lines.append(
            f"* {label}: training peak of the worst rank DDP {ddp / gb:.2f} GB, FSDP "
            f"{fsdp / gb:.2f} GB ({fsdp / ddp:.0%} of DDP); above the import baseline DDP "
            f"{(ddp - base) / gb:.2f} GB, FSDP {(fsdp - base) / gb:.2f} GB."
        )
    lines += [
        "",
        "Under FSDP no rank reads or holds the whole model while training: each builds the "
        "model on the meta device, shards every block, and reads only its rows from the "
        "safetensors file (`inheritune.models.parallel.load_sharded_model`); embeddings, final norm "
        "and head are sharded with the root. The `end` column shows the price of a consolidated "
        "checkpoint (an ordinary HF folder): rank 0 gathers the full model and AdamW state into "
        "CPU memory to write it.",
        "",
        "Reading RSS on CPU: glibc by default keeps freed heap pages after its mmap threshold "
        "has grown (up to 32 MB), which FSDP's per-block all-gather buffers (allocated and "
        "freed every forward and backward) trigger; with the threshold fixed at 1 MiB they go "
        "back to the OS, closer to what a GPU's caching allocator would report "
        "(`peak_mem_gb` in log.jsonl is `torch.cuda.max_memory_allocated` there). RSS also "
        "counts the pages of the safetensors file a process maps while it loads.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
