"""Evaluation throughput: the fused head + cross-entropy with and without gradient work.

``inheritune.losses.linear_cross_entropy`` computes the head's gradients in its forward pass
(the softmax is at hand there). Inside an autograd Function grad mode is always off, so it is
told the caller's grad mode explicitly; before that, an evaluation under ``torch.no_grad()`` paid
for two gradient matmuls per chunk. "before" reproduces that by calling
``_LinearCrossEntropy.apply(..., True)``; "after" is the library as it is. Both evaluate the same
fixed validation windows with :func:`inheritune.losses.evaluate_loss`, interleaved (before,
after, before, ...) so load from other processes hits both alike; the losses must agree.

    .venv/bin/python benchmarks/bench_eval_speed.py [--seq 256 --windows 16 --batch 8 --rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from inheritune import data, losses, models


def old_linear_cross_entropy(hidden, weight, bias, targets, chunk=losses.HEAD_CHUNK_ROWS):
    """The behaviour before the fix: gradient work whatever the grad mode."""
    return losses._LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, True)


def timed_eval(model, windows, batch: int) -> tuple[float, float]:
    """(tokens/s, loss) of one evaluation pass."""
    t = time.perf_counter()
    loss = losses.evaluate_loss(model, windows, batch)
    seconds = time.perf_counter() - t
    return windows[:, 1:].size / seconds, loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_speed.md"))
    args = ap.parse_args()

    model = models.load_model("smollm2-135m").eval()
    tokenizer = models.load_tokenizer("smollm2-135m")
    tokens = data.load_tokens("shakespeare", tokenizer)
    windows = data.eval_windows(tokens, args.seq, args.seq * args.windows)
    new = losses.linear_cross_entropy
    rates: dict[str, list[float]] = {"before": [], "after": []}
    values: dict[str, float] = {}
    timed_eval(model, windows[:1], 1)  # warm-up
    for _ in range(args.rounds):
        for name, fn in (("before", old_linear_cross_entropy), ("after", new)):
            losses.linear_cross_entropy = fn  # CausalLMLoss looks it up at call time
            try:
                rate, values[name] = timed_eval(model, windows, args.batch)
            finally:
                losses.linear_cross_entropy = new
            rates[name].append(rate)
            print(f"{name}: {rate:,.0f} tok/s (loss {values[name]:.6f})", flush=True)
    if abs(values["before"] - values["after"]) > 1e-5:
        raise SystemExit(f"the two evaluations disagree: {values}")
    before, after = statistics.median(rates["before"]), statistics.median(rates["after"])
    n_tok = windows[:, 1:].size
    lines = [
        "# Evaluation throughput: no gradient work under torch.no_grad()",
        "",
        f"SmolLM2-135M (all 30 layers, fp32), {len(windows)} validation windows of {args.seq} "
        f"tokens of Shakespeare ({n_tok:,} tokens), batch {args.batch}, "
        f"{torch.get_num_threads()} threads, CPU, `inheritune.losses.evaluate_loss`; "
        f"{args.rounds} interleaved rounds, median:",
        "",
        "    .venv/bin/python benchmarks/bench_eval_speed.py "
        f"--seq {args.seq} --windows {args.windows} --batch {args.batch} --rounds {args.rounds}",
        "",
        "| head + loss | tokens/s (median) | rounds |",
        "|---|---|---|",
        f"| before: gradient matmuls computed anyway | {before:,.0f} | "
        + ", ".join(f"{r:,.0f}" for r in rates["before"])
        + " |",
        f"| after: forward matmul only | {after:,.0f} | "
        + ", ".join(f"{r:,.0f}" for r in rates["after"])
        + " |",
        "",
        f"Speed-up {after / before:.2f}x; both give the same loss ({values['after']:.6f}). "
        "The head is 2·N·D·V FLOPs of the forward; the two skipped gradient matmuls were "
        "another 4·N·D·V (tests/test_monitor.py counts them with FlopCounterMode).",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
