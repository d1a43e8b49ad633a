"""Training throughput: inheritune's loop vs a plain Hugging Face loop, same model, same run.

Model: the first 15 layers of SmolLM2-135M (the embedded default), built here by keeping
``model.model.layers[:15]``. Both loops train fp32 on the same batch size and sequence length;
they run interleaved (plain, ours, plain, ours, ...) so load from other processes on the machine
hits both alike. The plain loop is written the obvious way::

    loss = model(input_ids, labels=labels).loss; loss.backward(); opt.step(); opt.zero_grad()

with ``torch.optim.AdamW`` defaults. Ours is :func:`inheritune.training.train.train_model` itself; its
reported tokens/s excludes its evaluation and checkpoint time (and so does nothing else).

Model FLOPs per token: 6 * N_nonembedding + 6 * V * D (head) + 12 * L * T * D (attention scores
and values, forward + backward, non-causal convention as in PaLM); the peak is measured in the
same run with a 2048^3 fp32 matmul loop.

    .venv/bin/python benchmarks/bench_train.py [--batch 8 --seq 256 --steps 3 --rounds 2]
    .venv/bin/python benchmarks/bench_train.py --profile   # where the time goes, both loops
    .venv/bin/python benchmarks/bench_train.py --train-top 5   # + partial training, same run
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from inheritune import data
from inheritune import training as T
from inheritune.models import loading as models
from inheritune.surgery import build as surgery
from inheritune.training import monitor

LAYERS = 15


def build_model() -> torch.nn.Module:
    return surgery.first_layers(models.load_model("smollm2-135m"), LAYERS)


def matmul_peak(dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of a 2048^3 matmul loop in ``dtype`` (the training loop's own MFU method)."""
    return monitor.measure_matmul_peak(torch.device("cpu"), dtype, n=2048, seconds=1.0) / 1e9


def flops_per_token(model: torch.nn.Module, seq: int) -> float:
    cfg = model.config
    d, v, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    n_total = models.count_parameters(model)
    n_nonembed = n_total - v * d  # tied head = embedding, counted separately below
    return 6 * n_nonembed + 6 * v * d + 12 * layers * seq * d


def batches(tokens: data.Tokens, batch: int, seq: int, steps: int, seed: int) -> list[torch.Tensor]:
    starts = data.WindowSampler(len(tokens.train), seq, seed)
    return [data.gather_windows(tokens.train, starts.next_starts(batch), seq) for _ in range(steps)]


def plain_loop(model: torch.nn.Module, windows: list[torch.Tensor], bf16: bool = False) -> float:
    """The obvious HF loop (``bf16``: the forward under ``torch.autocast``, as the PyTorch
    docs write it); returns tokens/s over its steps."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    t = time.perf_counter()
    for w in windows:
        x = w[:, :-1]
        # HF shifts labels itself, so labels are the inputs.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return sum(w[:, :-1].numel() for w in windows) / (time.perf_counter() - t)


def our_loop(
    model,
    tokenizer,
    tokens,
    batch: int,
    seq: int,
    steps: int,
    out: Path,
    train_top: int = 0,
    precision: str = "fp32",
    compile: bool = False,
) -> float:
    return our_run(
        model, tokenizer, tokens, batch, seq, steps, out, train_top, precision, compile
    ).tokens_per_s


def our_run(
    model, tokenizer, tokens, batch, seq, steps, out, train_top=0, precision="fp32", compile=False
):
    cfg = T.TrainConfig(
        train_top=train_top,
        precision=precision,
        compile=compile,
        out=str(out),
        steps=steps,
        batch_size=batch,
        seq_len=seq,
        eval_every=0,
        eval_tokens=seq,
        save_every=0,
        log_every=1,
        warmup=1,
    )
    return T.train_model(model, tokenizer, tokens, cfg, desc="inheritune loop")


def compiled_rates(result, out: Path) -> tuple[float, float]:
    """(steady tokens/s, start-up seconds) of a ``--compile`` run, from log.jsonl's per-step
    elapsed times: steady is the median of the last half of the steps (compilation, and any
    recompilation after the first evaluation, happen in the first ones); start-up is what the
    run took beyond that many steady steps."""
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in recs if r.get("kind") == "train"]
    durations = np.diff([0.0, *elapsed])
    step_s = float(np.median(durations[len(durations) // 2 :]))
    tokens_per_step = result.tokens / max(1, result.steps)
    return tokens_per_step / step_s, float(elapsed[-1] - len(elapsed) * step_s)


def profile(model, tokenizer, tokens, batch: int, seq: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    windows = batches(tokens, batch, seq, 2, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in [
            ("plain HF loop", lambda m: plain_loop(m, windows)),
            ("inheritune loop", lambda m: our_loop(m, tokenizer, tokens, batch, seq, 2, Path(tmp))),
        ]:
            m = copy.deepcopy(model)
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                fn(m)
            print(f"\n=== {name}: top ops by self CPU time (2 steps of {batch}x{seq}) ===")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per loop per round")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both loops")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--train-top",
        type=int,
        default=0,
        help="also time ours with --train-top N (frozen bottom) in the same interleaving",
    )
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="also time ours with --precision bf16 (autocast; AMX on recent Xeons) and the plain "
        "loop under bf16 autocast, same run",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time ours with --compile (steady tokens/s and the start-up cost), same run",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = build_model()
    tokenizer = models.load_tokenizer("smollm2-135m")
    tokens = data.load_tokens("shakespeare", tokenizer)
    if args.profile:
        profile(model, tokenizer, tokens, args.batch, args.seq)
        return
    peak = matmul_peak()
    fpt = flops_per_token(model, args.seq)
    peak_bf16 = matmul_peak(torch.bfloat16) if args.bf16 else None
    plain, ours, top, bf16, compiled, startup = [], [], [], [], [], []
    plain_bf16: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        # One untimed warm-up step of each (allocator, thread pools, lazy inits).
        plain_loop(copy.deepcopy(model), batches(tokens, args.batch, args.seq, 1, seed=9))
        for r in range(args.rounds):
            windows = batches(tokens, args.batch, args.seq, args.steps, seed=r)
            plain.append(plain_loop(copy.deepcopy(model), windows))
            out = Path(tmp) / f"ours{r}"
            ours.append(
                our_loop(
                    copy.deepcopy(model), tokenizer, tokens, args.batch, args.seq, args.steps, out
                )
            )
            line = f"round {r}: plain {plain[-1]:.1f} tok/s, inheritune {ours[-1]:.1f} tok/s"
            if args.train_top:
                m = copy.deepcopy(model)
                top.append(
                    our_loop(
                        m, tokenizer, tokens, args.batch, args.seq, args.steps,
                        Path(tmp) / f"top{r}", train_top=args.train_top,
                    )
                )  # fmt: skip
                line += f", --train-top {args.train_top} {top[-1]:.1f} tok/s"
            if args.bf16:
                plain_bf16.append(plain_loop(copy.deepcopy(model), windows, bf16=True))
                line += f", plain bf16 {plain_bf16[-1]:.1f} tok/s"
                m = copy.deepcopy(model)
                bf16.append(
                    our_loop(
                        m, tokenizer, tokens, args.batch, args.seq, args.steps,
                        Path(tmp) / f"bf16{r}", train_top=args.train_top, precision="bf16",
                    )
                )  # fmt: skip
                line += f", bf16 (same train-top) {bf16[-1]:.1f} tok/s"
            if args.compile:
                out = Path(tmp) / f"compile{r}"
                res = our_run(
                    copy.deepcopy(model), tokenizer, tokens, args.batch, args.seq,
                    args.steps, out, compile=True,
                )  # fmt: skip
                rate, start_s = compiled_rates(res, out)
                compiled.append(rate)
                startup.append(start_s)
                line += f", --compile {rate:.1f} tok/s after a {start_s:.0f} s start-up"
            print(line)
    peak_after = matmul_peak()
    p, o = float(np.mean(plain)), float(np.mean(ours))
    result = {
        "model": f"SmolLM2-135M first {LAYERS} layers",
        "params": models.count_parameters(model),
        "batch": args.batch,
        "seq": args.seq,
        "threads": torch.get_num_threads(),
        # figures from different CPUs are never one series: record which machine ran this
        "machine": monitor.cpu_info(),
        "torch": torch.__version__,
        "plain_tok_s": p,
        "ours_tok_s": o,
        "speedup": o / p,
        "flops_per_token": fpt,
        "matmul_peak_gflops": [peak, peak_after],
        "plain_frac_peak": p * fpt / 1e9 / max(peak, peak_after),
        "ours_frac_peak": o * fpt / 1e9 / max(peak, peak_after),
    }
    if top:
        result["train_top"] = args.train_top
        result["train_top_tok_s"] = float(np.mean(top))
        result["train_top_speedup_vs_full"] = float(np.mean(top)) / o
    if bf16:
        b = float(np.mean(bf16))
        result["bf16_tok_s"] = b
        result["bf16_speedup_vs_fp32_same_train_top"] = b / (float(np.mean(top)) if top else o)
        result["plain_bf16_tok_s"] = float(np.mean(plain_bf16))
        if not args.train_top:  # the same work: all parameters trained in bf16 autocast
            result["bf16_speedup_vs_plain_bf16"] = b / float(np.mean(plain_bf16))
        result["matmul_peak_bf16_gflops"] = peak_bf16
        if not args.train_top:
            result["bf16_frac_bf16_peak"] = b * fpt / 1e9 / peak_bf16
    if compiled:
        result["compile_tok_s"] = float(np.mean(compiled))
        result["compile_speedup_vs_eager"] = float(np.mean(compiled)) / o
        result["compile_startup_s"] = startup
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
