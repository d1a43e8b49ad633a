"""The losses: the chunked head + cross-entropy, the loss normalisation under accumulation,
and the fused path against the HF logits."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from inheritune.models import losses

SEQ = 16


def test_micro_loss_scale_makes_accumulation_equal_one_batch():
    """G micro-batches of B/G, each scaled by micro_loss_scale, give the gradient of one batch B."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    x = torch.randint(0, 300, (8, SEQ + 1))

    def grads(accum: int) -> dict[str, torch.Tensor]:
        m = copy.deepcopy(model).train()
        loss_mod = losses.CausalLMLoss(m)
        micro = 8 // accum
        scale = losses.micro_loss_scale(micro * SEQ, 8 * SEQ, world_size=1)
        for chunk in x.split(micro):
            (loss_mod(chunk[:, :-1], chunk[:, 1:]) * scale).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    one, four = grads(1), grads(4)
    for n in one:
        torch.testing.assert_close(four[n], one[n], rtol=1e-4, atol=1e-6, msg=n)
    assert losses.micro_loss_scale(64, 256, 1) == 0.25
    # Two ranks, each holding half of the batch: DDP's average over ranks is undone.
    assert losses.micro_loss_scale(128, 256, 2) == 1.0


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_matches_reference(with_bias):
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True) if with_bias else None
    t = torch.randint(0, 50, (37,))
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), t)
    ref_grads = torch.autograd.grad(ref * 3.0, [h, w] + ([b] if with_bias else []))
    mine = losses.linear_cross_entropy(h, w, b, t, chunk=8)  # several chunks, one ragged
    my_grads = torch.autograd.grad(mine * 3.0, [h, w] + ([b] if with_bias else []))
    torch.testing.assert_close(mine, ref)
    for a, r in zip(my_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_fused_model_loss_matches_hf_logits_path():
    model = tiny_model("gpt2")  # gpt2 keeps dropout: eval mode to compare
    x = torch.randint(0, 300, (3, SEQ + 1))
    logits = model(x[:, :-1]).logits
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    assert losses.CausalLMLoss(model).fused
    torch.testing.assert_close(losses.CausalLMLoss(model, chunk=5)(x[:, :-1], x[:, 1:]), ref)


def test_cached_loss_is_computed_once_per_model_and_windows(monkeypatch):
    import numpy as np

    model = tiny_model("llama", layers=2)
    windows = np.random.default_rng(0).integers(0, 90, size=(6, 17))
    first = losses.cached_loss(model, windows, batch_size=3)
    assert first == pytest.approx(losses.evaluate_loss(model, windows, batch_size=3))

    def fail(*a, **k):
        raise AssertionError("recomputed a cached loss")

    real = losses.evaluate_loss
    monkeypatch.setattr(losses, "evaluate_loss", fail)
    assert losses.cached_loss(model, windows, batch_size=3) == first  # from the cache
    monkeypatch.setattr(losses, "evaluate_loss", real)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1.0  # one weight: another model
    assert losses.weights_fingerprint(changed) != losses.weights_fingerprint(model)
    assert losses.cached_loss(changed, windows, batch_size=3) != first
    assert losses.cached_loss(model, windows[:3], batch_size=3) != first  # other windows
