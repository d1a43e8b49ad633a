"""Evaluation throughput: the fused head + cross-entropy with and without gradient work.

``inheritune.models.losses.linear_cross_entropy`` computes the head's gradients in its forward pass
(the softmax is at hand there). Inside an autograd Function grad mode is always off, so it is
told the caller's grad mode explicitly; before that, an evaluation under ``torch.no_grad()`` paid
for two gradient matmuls per chunk. "before" reproduces that by calling
``_LinearCrossEntropy.apply(..., True)``; "after" is the library as it is. Both evaluate the same
fixed validation windows with :func:`inheritune.models.losses.evaluate_loss`, interleaved (before,
after, before, ...) so load from other processes hits both alike; the losses must agree. On a
shared machine wall time swings with the neighbours' load, so both the best wall-clock rate and
the rate per CPU-second of this process (``time.process_time``, which other processes' load
affects far less) are reported.

    .venv/bin/python benchmarks/bench_eval_speed.py [--seq 256 --windows 8 --batch 8 --rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from inheritune import data
from inheritune.models import loading as models
from inheritune.models import losses
from inheritune.training import monitor


def old_linear_cross_entropy(hidden, weight, bias, targets, chunk=losses.HEAD_CHUNK_ROWS):
    """The behaviour before the fix: gradient work whatever the grad mode."""
    return losses._LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, True)


def timed_eval(model, windows, batch: int) -> tuple[float, float, float]:
    """(tokens per wall second, tokens per CPU second, loss) of one evaluation pass."""
    t, c = time.perf_counter(), time.process_time()
    loss = losses.evaluate_loss(model, windows, batch)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    n = windows[:, 1:].size
    return n / wall, n / cpu, loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_speed.md"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = models.load_model("smollm2-135m").eval()
    tokenizer = models.load_tokenizer("smollm2-135m")
    tokens = data.load_tokens("shakespeare", tokenizer)
    windows = data.eval_windows(tokens, args.seq, args.seq * args.windows)
    new = losses.linear_cross_entropy
    rates: dict[str, list[float]] = {"before": [], "after": []}
    cpu_rates: dict[str, list[float]] = {"before": [], "after": []}
    values: dict[str, float] = {}
    timed_eval(model, windows[:1], 1)  # warm-up
    for _ in range(args.rounds):
        for name, fn in (("before", old_linear_cross_entropy), ("after", new)):
            losses.linear_cross_entropy = fn  # CausalLMLoss looks it up at call time
            try:
                rate, cpu_rate, values[name] = timed_eval(model, windows, args.batch)
            finally:
                losses.linear_cross_entropy = new
            rates[name].append(rate)
            cpu_rates[name].append(cpu_rate)
            print(
                f"{name}: {rate:,.0f} tok/s, {cpu_rate:,.0f} tok/CPU-s (loss {values[name]:.6f})",
                flush=True,
            )
    if abs(values["before"] - values["after"]) > 1e-5:
        raise SystemExit(f"the two evaluations disagree: {values}")
    best = {k: max(v) for k, v in rates.items()}
    per_cpu = {k: statistics.median(v) for k, v in cpu_rates.items()}
    n_tok = windows[:, 1:].size
    forward = monitor.model_flops_per_token(model, args.seq) / 3  # 2N + 4 L d T
    d, v = model.config.hidden_size, model.config.vocab_size
    extra = 4 * d * v  # grad_h and grad_w: two (N, V) x (V, D) matmuls per token

    def row(name: str, label: str) -> str:
        walls = ", ".join(f"{r:,.0f}" for r in rates[name])
        cpus = ", ".join(f"{r:,.0f}" for r in cpu_rates[name])
        return f"| {label} | {best[name]:,.0f} | {per_cpu[name]:,.0f} | {walls} | {cpus} |"

    lines = [
        "# Evaluation throughput: no gradient work under torch.no_grad()",
        "",
        f"SmolLM2-135M (all 30 layers, fp32), {len(windows)} validation windows of {args.seq} "
        f"tokens of Shakespeare ({n_tok:,} tokens), batch {args.batch}, {args.threads} "
        f"thread(s), CPU (a 2-core machine shared with other jobs), "
        f"`inheritune.models.losses.evaluate_loss`; {args.rounds} interleaved rounds:",
        "",
        "    .venv/bin/python benchmarks/bench_eval_speed.py --seq "
        f"{args.seq} --windows {args.windows} --batch {args.batch} --rounds {args.rounds} "
        f"--threads {args.threads}",
        "",
        "| head + loss | tokens/s (best wall) | tokens per CPU-s (median) | wall, each round | "
        "per CPU-s, each round |",
        "|---|---|---|---|---|",
        row("before", "before: gradient matmuls computed anyway"),
        row("after", "after: forward matmul only"),
        "",
        f"Speed-up: {best['after'] / best['before']:.2f}x (best wall), "
        f"{per_cpu['after'] / per_cpu['before']:.2f}x (CPU time); both give the same loss "
        f"({values['after']:.6f}). The head's forward is 2·N·D·V FLOPs; the two skipped "
        "gradient matmuls were another 4·N·D·V (tests/training/test_monitor.py counts them with "
        f"FlopCounterMode): {extra / 1e9:.3f} GFLOP per token on top of the model's "
        f"{forward / 1e9:.3f} GFLOP forward, a {(forward + extra) / forward:.2f}x FLOP ratio.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
