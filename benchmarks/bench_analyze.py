"""Attention analysis speed: inheritune's path vs the straightforward way, same inputs, same run.

Inputs: the windows ``inheritune analyze`` would use (default: 100 x 100 tokens of the
Shakespeare validation split, seed 0) on SmolLM2-135M, loaded once with eager attention.

* ours: :func:`inheritune.analysis.analyze.run_analysis` (hooks reduce each layer's (B, H, T, T) weights
  at once; base model only, no LM head; batched float32 eigenvalues of A A^T with float64
  re-checks near tau);
* straightforward: ``model(ids, output_attentions=True)`` on the full LM, then one
  ``np.linalg.svd(A, compute_uv=False)`` (float64) and one column-norm sort per matrix. numpy's
  OpenBLAS is held to one thread (threadpoolctl, BLAS only: torch keeps its threads) because its
  multi-threaded LAPACK crawls on 100 x 100 matrices when other processes share the cores: this
  makes the baseline faster, not slower.

Both use the same batch size. The script checks the two agree (mean ranks and masses equal,
top-column shares to 1e-5) and prints both times and their ratio. The two paths alternate
(``--rounds``) so load from other processes hits both alike.

    .venv/bin/python benchmarks/bench_analyze.py [--num-seqs 100 --seq-len 100 --rounds 1]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from inheritune.analysis.analyze import AnalyzeConfig, run_analysis, sample_inputs
from inheritune.data import prepare as data
from inheritune.models import loading as models


def one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def straightforward(model, ids: np.ndarray, cfg: AnalyzeConfig):
    """(L, H) mean rank, mass and top share the obvious way: all attentions, one SVD each."""
    rank = mass = top = None
    with torch.inference_mode(), one_blas_thread():
        for lo in range(0, len(ids), cfg.batch_size):
            batch = torch.as_tensor(ids[lo : lo + cfg.batch_size])
            out = model(input_ids=batch, output_attentions=True, use_cache=False)
            if rank is None:
                shape = (len(out.attentions), out.attentions[0].shape[1])
                rank, mass, top = np.zeros(shape), np.zeros(shape), np.zeros(shape)
            for layer, attn in enumerate(out.attentions):  # (B, H, T, T)
                for seq in attn.numpy():
                    for h, a in enumerate(seq.astype(np.float64)):
                        s2 = np.linalg.svd(a, compute_uv=False) ** 2
                        rank[layer, h] += np.argmax(np.cumsum(s2) / s2.sum() >= cfg.tau - 1e-9) + 1
                        col = (a**2).sum(0)
                        p = np.sort(col / col.sum())[::-1]
                        mass[layer, h] += np.argmax(np.cumsum(p) >= cfg.eta - 1e-9) + 1
                        top[layer, h] += p[0]
    n = len(ids)
    return rank / n, mass / n, top / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="shakespeare")
    parser.add_argument("--num-seqs", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    cfg = AnalyzeConfig(
        model=args.model,
        data=args.data,
        num_seqs=args.num_seqs,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
    )
    model = models.load_model(cfg.model, attn_implementation="eager")
    ids = sample_inputs(data.load_tokens(cfg.data, models.load_tokenizer(cfg.model)).val, cfg)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    print(
        f"{cfg.model}: {n_layers} layers x {n_heads} heads x {len(ids)} windows of "
        f"{cfg.seq_len} tokens = {n_layers * n_heads * len(ids)} matrices; "
        f"torch threads {torch.get_num_threads()}"
    )
    with torch.inference_mode():  # warm-up, so neither path pays first-call costs
        model(input_ids=torch.as_tensor(ids[:2]), use_cache=False)
    times: dict[str, list[float]] = {"ours": [], "straightforward": []}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        plain = straightforward(model, ids, cfg)
        times["straightforward"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = run_analysis(model, ids, cfg, progress=False)
        times["ours"].append(time.perf_counter() - t0)
        np.testing.assert_allclose(result.rank, plain[0], err_msg="mean ranks differ")
        np.testing.assert_allclose(result.mass, plain[1], err_msg="mean masses differ")
        np.testing.assert_allclose(result.top_share, plain[2], rtol=1e-5)
    best = {k: min(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>16}: " + ", ".join(f"{t:.2f} s" for t in v))
    print(
        f"agree: yes (rank, mass exact; top share 1e-5). speed-up "
        f"{best['straightforward'] / best['ours']:.2f}x (best of {args.rounds})"
    )


if __name__ == "__main__":
    main()
