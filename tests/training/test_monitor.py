"""What a run reports about itself: the FLOPs per token behind MFU (checked against PyTorch's own
FLOP counter), the peak it is measured against, memory, data wait, TensorBoard; and that an
evaluation pays for the forward matmuls only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conftest import CORPUS_TEXT, tiny_model
from inheritune import training as T
from inheritune.config import ConfigError
from inheritune.data import prepare as data
from inheritune.models import losses
from inheritune.training import monitor

SEQ = 16


@pytest.fixture
def tokens(tmp_path, tokenizer):
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS_TEXT * 2)
    return data.load_tokens(str(p), tokenizer)


def _cfg(out: Path, **kw) -> T.TrainConfig:
    base = dict(out=str(out), steps=4, batch_size=4, seq_len=SEQ, warmup=1, eval_every=2)
    base.update(eval_tokens=4 * SEQ, save_every=0, log_every=1, lr=3e-3)
    return T.TrainConfig(**{**base, **kw})


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def _counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("arch", ["llama", "phi3"], ids=["tied", "untied"])
def test_flops_per_token_equals_what_pytorch_counts(arch):
    """6N + 12 L d T is exactly the matmul FLOPs of a forward + backward (eager attention, the
    full T x T scores), with the embedding lookup left out and a tied head counted once."""
    model = tiny_model(arch, layers=2).train()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (arch == "llama")
    batch, seq = 2, SEQ
    x = torch.randint(0, model.config.vocab_size, (batch, seq + 1))

    def step():
        logits = model(input_ids=x[:, :-1], use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()

    expected = monitor.model_flops_per_token(model, seq) * batch * seq
    assert _counted_flops(step) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("top", [1, 2])
def test_flops_per_token_counts_frozen_weights_by_the_passes_they_get(top):
    """With --train-top the frozen bottom runs forward only (2N), the frozen tied head forward
    plus its input gradient (4N), the trained blocks all three matmuls (6N): the formula equals
    the matmul FLOPs actually run."""
    from inheritune.training import optim

    model = tiny_model("llama", layers=3).train()
    optim.train_only_top(model, top)
    x = torch.randint(0, model.config.vocab_size, (2, SEQ + 1))

    def step():
        logits = model(input_ids=x[:, :-1], use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()

    expected = monitor.model_flops_per_token(model, SEQ) * 2 * SEQ
    assert _counted_flops(step) == pytest.approx(expected, rel=1e-9)
    assert monitor.model_flops_per_token(model, SEQ) < monitor.model_flops_per_token(
        tiny_model("llama", layers=3), SEQ
    )


def test_evaluation_runs_the_forward_matmul_only():
    """Under torch.no_grad the chunked head + loss costs 2 N D V FLOPs (the logits), not the
    6 N D V of training, whose two gradient matmuls are computed in the same forward pass.
    (It cost 6 N D V before grad mode was passed into the autograd Function.)"""
    n, d, v = 96, 32, 320
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(v, d, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    with torch.no_grad():
        flops = _counted_flops(lambda: losses.linear_cross_entropy(hidden, weight, None, targets))
    assert flops == 2 * n * d * v
    train = _counted_flops(lambda: losses.linear_cross_entropy(hidden, weight, None, targets))
    assert train == 6 * n * d * v


def test_log_states_the_peak_and_reports_mfu_memory_and_data_wait(tmp_path, tokens, tokenizer):
    model = tiny_model("llama", layers=2)
    T.train_model(model, tokenizer, tokens, _cfg(tmp_path / "run"))
    recs = _log(tmp_path / "run")
    meta = recs[0]
    assert meta["kind"] == "meta" and [r["kind"] for r in recs].count("meta") == 1
    assert meta["peak_flops"] > 1e8  # any CPU does 0.1 GFLOP/s
    assert meta["peak_flops_source"].startswith("measured: largest fp32 matmul loop (")
    assert meta["flops_per_token"] == monitor.model_flops_per_token(model, SEQ)
    assert meta["devices"] == 1 and meta["device"] == "cpu"
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        want = r["tokens_per_s"] * meta["flops_per_token"] / meta["peak_flops"]
        assert r["mfu"] == pytest.approx(want) and 0 < r["mfu"] < 1
        assert 0.05 < r["peak_mem_gb"] < 100  # this process's RSS high-water mark
        assert 0 <= r["data_wait_s"] < 1


def test_resumed_log_keeps_one_header_first(tmp_path):
    path = tmp_path / "log.jsonl"
    log = monitor.JsonlLog(path, True, None, header={"peak_flops": 1.0})
    for step in (1, 2, 3):
        log.write({"kind": "train", "step": step, "loss": 1.0})
    monitor.JsonlLog(path, True, 2, header={"peak_flops": 2.0})  # resumed from step 2
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert recs == [
        {"kind": "meta", "peak_flops": 2.0},
        {"kind": "train", "step": 1, "loss": 1.0},
        {"kind": "train", "step": 2, "loss": 1.0},
    ]


def test_tensorboard_gets_the_logged_scalars(tmp_path, tokens, tokenizer):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    T.train_model(
        tiny_model("llama", layers=2), tokenizer, tokens, _cfg(tmp_path / "run", tensorboard=tb)
    )
    events = EventAccumulator(str(tb))
    events.Reload()
    recs = _log(tmp_path / "run")
    for kind, key in (("train", "loss"), ("train", "mfu"), ("eval", "val_loss")):
        got = [(e.step, e.value) for e in events.Scalars(f"{kind}/{key}")]
        want = [(r["step"], r[key]) for r in recs if r["kind"] == kind]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert "train/peak_mem_gb" in events.Tags()["scalars"]


def test_tensorboard_missing_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    with pytest.raises(ConfigError, match="--tensorboard needs the tensorboard package"):
        T.TrainConfig(tensorboard="tb")


def test_grad_checkpointing_changes_memory_not_the_trajectory(tmp_path, tokens, tokenizer):
    results = {}
    for on in (False, True):
        out = tmp_path / f"gc-{on}"
        model = tiny_model("llama", layers=2)
        T.train_model(model, tokenizer, tokens, _cfg(out, grad_checkpointing=on))
        assert model.is_activation_checkpointing == on
        results[on] = [r["loss"] for r in _log(out) if r["kind"] == "train"]
    assert results[True] == pytest.approx(results[False], abs=1e-6)
