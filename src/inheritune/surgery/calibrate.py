"""Final-norm calibration: make a truncated stack speak the head's language before training.

An inherited model's first l blocks produce hidden states whose per-channel scale differs from
what the reference's final norm and LM head were trained to read after all L blocks; on SmolLM2
the first 15 of 30 layers start at ~20 nats/token for this reason alone. Re-fitting only the
final norm's affine parameters (a few hundred numbers) on a few calibration windows, with the
blocks and the head frozen, removes most of that gap in seconds, before any training step.

It works for any family through :func:`inheritune.models.arch.get_arch`: the input of the final norm is
captured once, then L-BFGS minimises next-token cross-entropy of ``head(final_norm(x))`` over the
norm's parameters only. Measured on SmolLM2 (15 of 30 layers, Shakespeare): 20.5 -> ~7.5
nats/token before any training step (benchmarks/results/recovery.md).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from inheritune.models.arch import get_arch


@torch.no_grad()
def _final_norm_inputs(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Hidden states entering the final norm: (B*T, D), one forward of the blocks only."""
    arch = get_arch(model)
    captured: list[torch.Tensor] = []
    hook = arch.final_norm.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    try:
        model.base_model(input_ids=input_ids, use_cache=False)
    finally:
        hook.remove()
    x = captured[0]  # (B, T, D)
    return x.reshape(-1, x.shape[-1])


def calibrate_final_norm(
    model: nn.Module, input_ids: torch.Tensor, iters: int = 20, chunk: int = 1024
) -> dict[str, float]:
    """Fit the final norm's parameters in place on ``input_ids`` (B, T); returns losses before/after.

    The loss is computed in token chunks so the (tokens, vocab) logits never exist at once.
    """
    arch = get_arch(model)
    norm, head = arch.final_norm, arch.head
    params = [p for p in norm.parameters()]
    if not params:
        return {"before": float("nan"), "after": float("nan"), "seconds": 0.0}
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    x = _final_norm_inputs(model, input_ids[:, :-1])  # (N, D)
    y = input_ids[:, 1:].reshape(-1)  # (N,)
    w = head.weight.detach()
    b = head.bias.detach() if getattr(head, "bias", None) is not None else None
    saved = [p.requires_grad for p in params]
    original = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)

    def loss_fn() -> torch.Tensor:
        total = x.new_zeros(())
        for s in range(0, x.shape[0], chunk):
            logits = F.linear(norm(x[s : s + chunk]), w, b)  # (chunk, V)
            total = total + F.cross_entropy(logits.float(), y[s : s + chunk], reduction="sum")
        return total / x.shape[0]

    with torch.no_grad():
        before = float(loss_fn())
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        after = float(loss_fn())
        if not after < before:  # never leave the model worse than it came in (or NaN)
            for p, o in zip(params, original, strict=True):
                p.copy_(o)
            after = before
    for p, req in zip(params, saved, strict=True):
        p.grad = None
        p.requires_grad_(req)
    model.train(was_training)
    return {"before": before, "after": after, "seconds": time.perf_counter() - t0}
