"""``--precision auto`` (both steps timed here, the faster kept, the choice recorded and reused
on resume), a ``--time-budget`` that charges evaluations and checkpoints, larger evaluation
batches, and the CPU record every figure carries."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import tiny_model, tiny_train_config
from inheritune import training as T
from inheritune.config import ConfigError
from inheritune.distributed import setup
from inheritune.models import losses
from inheritune.training import monitor
from inheritune.training import precision as P
from inheritune.training import train as train_mod

SEQ = 16


def _cfg(out, **kw) -> T.TrainConfig:
    return tiny_train_config(out, seq_len=SEQ, **kw)


def test_emulated_bf16_is_refused_by_the_matmul_probe_alone(tokens, monkeypatch):
    monkeypatch.setattr(P, "_matmul_seconds", lambda dtype: 1.0 if dtype == torch.float32 else 40.0)
    choice = P.choose_precision(tiny_model("llama", layers=2), tokens.train, 2, SEQ)
    assert choice.precision == "fp32" and choice.bf16_matmul_ratio == 40.0
    assert choice.fp32_step_s is None and "emulated" in choice.reason  # no slow bf16 step run


def test_choose_precision_times_both_and_leaves_the_weights(tokens, monkeypatch):
    monkeypatch.setattr(P, "_matmul_seconds", lambda dtype: 1.0)  # as on a CPU with fast bf16
    model = tiny_model("llama", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    choice = P.choose_precision(model, tokens.train, 2, SEQ)
    assert choice.precision in ("fp32", "bf16")
    assert choice.fp32_step_s > 0 and choice.bf16_step_s > 0
    faster = "bf16" if choice.bf16_step_s * P.MIN_SPEEDUP <= choice.fp32_step_s else "fp32"
    assert choice.precision == faster and faster in choice.reason
    after = model.state_dict()
    assert all((after[k] == v).all() for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_auto_precision_is_recorded_and_reused_on_resume(tmp_path, tokens, tokenizer):
    out = tmp_path / "a"
    res = T.train_model(
        tiny_model("llama", layers=2), tokenizer, tokens, _cfg(out, precision="auto")
    )
    record = json.loads((out / train_mod.PRECISION_FILE).read_text())
    assert res.precision == record and record["precision"] in ("fp32", "bf16")
    # resuming reads the record instead of measuring again: a doctored one is obeyed
    (out / train_mod.PRECISION_FILE).write_text(json.dumps({**record, "precision": "bf16"}))
    cfg = _cfg(out, precision="auto", resume=True)
    resolved, choice = train_mod._resolve_precision(None, tokens, cfg, setup())
    assert resolved.precision == "bf16" and choice["precision"] == "bf16"


def test_auto_precision_refuses_fsdp():
    with pytest.raises(ConfigError, match="--precision auto"):
        _cfg("x", precision="auto", fsdp=True)
    with pytest.raises(ConfigError, match="--precision"):
        _cfg("x", precision="fp16")


def test_time_budget_charges_evaluations(tmp_path, tokens, tokenizer):
    """Evaluations every step, each slowed down on purpose: the loop, evaluations included,
    still ends within the budget (the final evaluation reserved), and says what it spent."""
    model = tiny_model("llama", layers=2)
    cfg = _cfg(tmp_path / "b", steps=100_000, time_budget=1.5, eval_every=1)
    loss_on = train_mod.Run._loss_on

    def slow_loss_on(self, windows):
        time.sleep(0.1)
        return loss_on(self, windows)

    train_mod.Run._loss_on = slow_loss_on
    try:
        t0 = time.perf_counter()
        res = T.train_model(model, tokenizer, tokens, cfg)
        loop = time.perf_counter() - t0
    finally:
        train_mod.Run._loss_on = loss_on
    evals = sum(e["seconds"] for e in res.evals)
    assert res.evals[-1]["step"] == res.steps > 0
    assert evals >= 0.1 * len(res.evals)  # each evaluation's time is recorded
    assert evals <= loop
    assert loop < 1.5 + 1.0, loop  # training stopped early enough for evaluations to fit


def test_eval_batch_size_scores_the_same(tmp_path, tokens):
    model = tiny_model("llama", layers=2)
    cfg = _cfg("x", eval_batch_size=8)
    assert cfg.eval_batch() == 8 and _cfg("x").eval_batch() == _cfg("x").micro_batch() == 4
    from inheritune.data import eval_windows

    windows = eval_windows(tokens, SEQ, 16 * SEQ)
    small = losses.evaluate_loss(model, windows, batch_size=2)
    large = losses.evaluate_loss(model, windows, batch_size=8)
    assert large == pytest.approx(small, rel=1e-5)


def test_cpu_info_names_the_machine():
    info = monitor.cpu_info()
    assert info["cpu"] and info["cores"] >= 1
    assert set(info["flags"]) <= set(monitor.CPU_FLAGS)
