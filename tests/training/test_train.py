"""Training loop: loss normalisation, fused head loss, schedule, parameter groups, fixed
evaluation windows, exact resume (clean stop and kill -9), NaN stop, tokenizer mismatch, the CLI.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import inheritune
from conftest import make_tokenizer, tiny_model
from inheritune import cli, data
from inheritune.config import ConfigError
from inheritune.models import losses
from inheritune.training import checkpoint as ckpt
from inheritune.training import monitor
from inheritune.training.config import TrainConfig
from inheritune.training.distill import Teacher
from inheritune.training.train import TrainingError, train, train_model

SEQ = 16


def cfg_for(out: Path, **kw) -> TrainConfig:
    base = dict(
        model="unused",
        data="unused",
        out=str(out),
        steps=8,
        batch_size=4,
        seq_len=SEQ,
        warmup=2,
        eval_every=4,
        eval_tokens=4 * SEQ,
        save_every=4,
        log_every=1,
        lr=3e-3,
    )
    base.update(kw)
    return TrainConfig(**base)


def train_losses(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    losses = {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert len(steps) == len(set(steps)), "a step is logged twice"
    return losses


# ----------------------------------------------------------------------------- pure pieces


def test_config_validation():
    with pytest.raises(ConfigError, match="--grad-accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ConfigError, match="--min-lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ConfigError, match="--distill-alpha"):
        TrainConfig(distill_alpha=1.5)


def test_sampler_is_deterministic_and_resumable():
    a = data.WindowSampler(1000, 10, seed=3)
    seq = [a.next_starts(8) for _ in range(30)]  # crosses epochs (99 windows)
    b = data.WindowSampler(1000, 10, seed=3)
    for _ in range(13):
        b.next_starts(8)
    c = data.WindowSampler(1000, 10, seed=3)
    c.load_state_dict(b.state_dict())
    for s in seq[13:]:
        np.testing.assert_array_equal(c.next_starts(8), s)
    assert {int(x) for x in seq[0]} <= set(range(0, 990, 10))
    assert len(set(seq[0].tolist())) == 8  # no window twice in a batch
    other = data.WindowSampler(1000, 10, seed=4)
    assert not np.array_equal(other.next_starts(8), seq[0])


def test_eval_windows_fixed_and_from_validation(tokens):
    w1 = data.eval_windows(tokens, SEQ, 5 * SEQ)
    w2 = data.eval_windows(tokens, SEQ, 5 * SEQ)
    assert w1.shape == (5, SEQ + 1)
    np.testing.assert_array_equal(w1, w2)
    val = np.asarray(tokens.val, dtype=np.int64)
    np.testing.assert_array_equal(w1[1], val[SEQ : 2 * SEQ + 1])
    assert (w1[:-1, -1] == w1[1:, 0]).all()  # consecutive: each token predicted once
    model = tiny_model("llama")
    a = losses.evaluate_loss(model, w1, batch_size=2)
    b = losses.evaluate_loss(model, w1, batch_size=5)
    x = torch.from_numpy(w1)
    with torch.no_grad():
        logits = model(x[:, :-1]).logits
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item()
    assert a == pytest.approx(ref, rel=1e-5) and b == pytest.approx(ref, rel=1e-5)


# ----------------------------------------------------------------------------- the loop


def test_train_model_outputs_and_tied_weights(tmp_path, tokens, tokenizer):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    res = train_model(model, tokenizer, tokens, cfg_for(tmp_path / "run", keep_last=1))
    out = tmp_path / "run"
    for name in ("log.jsonl", "config.yaml", "loss.png", "result.json"):
        assert (out / name).is_file(), name
    assert [e["step"] for e in res.evals] == [0, 4, 8]
    assert res.final_val_loss < res.evals[0]["val_loss"]  # it learned something
    assert res.steps == 8 and res.tokens == 8 * 4 * SEQ and res.tokens_per_s > 0
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-00000008"]
    train_recs = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]
    keys = {"step", "tokens", "loss", "lr", "tokens_per_s", "grad_norm"}
    assert keys <= set(next(r for r in train_recs if r["kind"] == "train"))
    for folder in (res.final_dir, res.checkpoint):
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        torch.testing.assert_close(
            loaded.model.embed_tokens.weight, model.model.embed_tokens.weight
        )
    # The final model reproduces the final evaluation.
    windows = data.eval_windows(tokens, SEQ, 4 * SEQ)
    assert losses.evaluate_loss(loaded, windows, 4) == pytest.approx(res.final_val_loss, rel=1e-6)


def test_existing_run_needs_resume(tmp_path, tokens, tokenizer):
    train_model(tiny_model("llama"), tokenizer, tokens, cfg_for(tmp_path / "r", steps=2))
    with pytest.raises(ConfigError, match="--resume"):
        train_model(tiny_model("llama"), tokenizer, tokens, cfg_for(tmp_path / "r", steps=2))


def test_exact_resume_after_clean_stop(tmp_path, tokens, tokenizer, monkeypatch):
    """SIGINT mid-run saves and stops; --resume then reproduces the uninterrupted losses.

    gpt2 keeps dropout on, so the RNG state must be restored too.
    """
    ref = train_model(tiny_model("gpt2"), tokenizer, tokens, cfg_for(tmp_path / "ref"))
    assert ref.steps == 8
    real_append = monitor._append_log

    def append_then_interrupt(path, record):
        real_append(path, record)
        if record.get("kind") == "train" and record["step"] == 5:
            signal.raise_signal(signal.SIGINT)  # the real handler runs

    monkeypatch.setattr(monitor, "_append_log", append_then_interrupt)
    first = train_model(tiny_model("gpt2"), tokenizer, tokens, cfg_for(tmp_path / "run"))
    monkeypatch.setattr(monitor, "_append_log", real_append)
    assert first.interrupted and first.stop_signal == signal.SIGINT
    assert 5 <= first.steps < 8 and first.checkpoint.name == ckpt.step_name(first.steps)
    assert not (tmp_path / "run" / "final").exists()
    # Resume with a freshly initialised model: everything comes from the checkpoint.
    second = train_model(
        tiny_model("gpt2", seed=1), tokenizer, tokens, cfg_for(tmp_path / "run", resume=True)
    )
    assert second.steps == 8 and not second.interrupted
    a, b = train_losses(tmp_path / "ref"), train_losses(tmp_path / "run")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:
        assert b[s] == pytest.approx(a[s], abs=1e-5), s
    assert [e["step"] for e in second.evals] == [0, 4, 8]
    assert second.final_val_loss == pytest.approx(ref.final_val_loss, abs=1e-5)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from inheritune import storage as checkpoint
    from inheritune import cli
    real = checkpoint.write_manifest
    calls = []
    def write_manifest(folder, meta=None):
        calls.append(folder)
        if len(calls) == 2:  # die half-way through writing the second checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        real(folder, meta)
    checkpoint.write_manifest = write_manifest
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def _cli_args(model: Path, corpus: Path, out: Path, **extra) -> list[str]:
    args = ["train", "--model", str(model), "--data", str(corpus), "--out", str(out)]
    opts = dict(steps=8, batch_size=4, seq_len=SEQ, warmup=2, eval_every=4, save_every=3)
    opts.update(eval_tokens=4 * SEQ, log_every=1, lr=3e-3, keep_last=3)
    opts.update(extra)
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_exact_resume_after_kill9(tmp_path, tiny_folder, corpus_file):
    """kill -9 while the second checkpoint is half-written: resume uses the first, exactly."""
    model = tiny_folder("gpt2")
    assert cli.main(_cli_args(model, corpus_file, tmp_path / "ref")) == 0
    script = tmp_path / "killme.py"
    script.write_text(KILL_SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(inheritune.__file__).parents[1]),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(script), *_cli_args(model, corpus_file, tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.read_latest(root).name == "step-00000003"
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())  # the torn write is left over
    assert cli.main([*_cli_args(model, corpus_file, tmp_path / "run"), "--resume"]) == 0
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    a, b = train_losses(tmp_path / "ref"), train_losses(tmp_path / "run")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:
        assert b[s] == pytest.approx(a[s], abs=1e-5), s


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tokens, tokenizer, monkeypatch):
    model = tiny_model("llama")
    real_append = monitor._append_log

    def poison(path, record):
        real_append(path, record)
        if record.get("kind") == "train" and record["step"] == 5:
            with torch.no_grad():
                model.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))

    monkeypatch.setattr(monitor, "_append_log", poison)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite loss .* step 6.*step-00000004"):
        train_model(model, tokenizer, tokens, cfg_for(out))
    monkeypatch.setattr(monitor, "_append_log", real_append)
    root = out / "checkpoints"
    assert ckpt.read_latest(root).name == "step-00000004"
    ckpt.verify_checkpoint(root / "step-00000004")
    res = train_model(tiny_model("llama"), tokenizer, tokens, cfg_for(out, resume=True))
    assert res.steps == 8 and math.isfinite(res.final_val_loss)


def test_tokenizer_mismatch_refused(tmp_path, tiny_folder, corpus_file, tokens):
    other = make_tokenizer(vocab=300)
    other_tokens = data.load_tokens(str(corpus_file), other)
    # A token folder made by another tokenizer, passed as --data, is refused by the CLI ...
    model = tiny_folder("llama")
    with pytest.raises(data.TokenizerMismatchError):
        train(cfg_for(tmp_path / "cli", model=str(model), data=str(other_tokens.path)))
    assert cli.main(_cli_args(model, other_tokens.path, tmp_path / "cli2")) == 2
    # ... and so is a Tokens object that does not belong to the tokenizer in process.
    with pytest.raises(data.TokenizerMismatchError):
        train_model(tiny_model("llama"), other, tokens, cfg_for(tmp_path / "inproc"))


def test_distillation_loss(tmp_path, tokens, tokenizer):
    """loss = (1-a)*LM + a*KL(teacher||student); with the student's own copy the KL is 0."""
    student = tiny_model("llama")
    x = torch.randint(0, 300, (2, SEQ + 1))
    other = tiny_model("llama", seed=5)
    with torch.no_grad():
        t_logits = other(x[:, :-1]).logits
        s_logits = student(x[:, :-1]).logits
    lm = torch.nn.functional.cross_entropy(s_logits.flatten(0, 1), x[:, 1:].flatten())
    p_t = torch.softmax(t_logits / 2.0, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s_logits / 2.0, -1))).sum(-1).mean() * 4.0
    got = losses.CausalLMLoss(student)(x[:, :-1], x[:, 1:], Teacher(other), 0.4, 2.0)
    torch.testing.assert_close(got, 0.6 * lm + 0.4 * kl, rtol=1e-5, atol=1e-6)
    teacher = copy.deepcopy(student)
    cfg = cfg_for(tmp_path / "kd", steps=2, distill_alpha=1.0)
    res = train_model(student, tokenizer, tokens, cfg, teacher=teacher)
    assert train_losses(tmp_path / "kd")[1] == pytest.approx(0.0, abs=1e-6)
    assert res.steps == 2
    with pytest.raises(ConfigError, match="teacher"):
        train_model(student, tokenizer, tokens, cfg_for(tmp_path / "kd2", distill_alpha=0.4))


def test_grad_accum_follows_same_trajectory(tmp_path, tokens, tokenizer):
    a = train_model(tiny_model("llama"), tokenizer, tokens, cfg_for(tmp_path / "a", steps=4))
    b = train_model(
        tiny_model("llama"), tokenizer, tokens, cfg_for(tmp_path / "b", steps=4, grad_accum=4)
    )
    la, lb = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    for s in la:
        assert lb[s] == pytest.approx(la[s], abs=1e-4)
    assert b.final_val_loss == pytest.approx(a.final_val_loss, abs=1e-4)


def test_cli_train_bf16(tmp_path, tiny_folder, corpus_file):
    model = tiny_folder("qwen2")
    out = tmp_path / "bf16"
    assert cli.main(_cli_args(model, corpus_file, out, steps=2, precision="bf16")) == 0
    res = json.loads((out / "result.json").read_text())
    assert math.isfinite(res["final_val_loss"]) and res["steps"] == 2


def test_eval_every_zero_evaluates_at_start_and_end(tmp_path, tokenizer, tokens):
    cfg = TrainConfig(
        out=str(tmp_path / "run"),
        steps=3,
        batch_size=2,
        seq_len=SEQ,
        warmup=1,
        eval_every=0,
        eval_tokens=32,
        save_every=0,
    )
    res = train_model(tiny_model("llama"), tokenizer, tokens, cfg)
    assert [e["step"] for e in res.evals] == [0, 3]


def test_extra_eval_scored_at_every_evaluation(tmp_path, tokenizer, tokens):
    """extra_eval: another corpus's fixed windows are scored at each evaluation; the first and
    last numbers equal an independent evaluation of the start and the trained model, and the
    log and the loss plot carry the curve."""
    other = data.eval_windows(tokens, SEQ, 4 * SEQ)[:, ::-1].copy()  # different sequences
    model = tiny_model("llama")
    start = losses.evaluate_loss(copy.deepcopy(model), other, 4)
    res = train_model(
        model, tokenizer, tokens, cfg_for(tmp_path / "run"), extra_eval={"rev": other}
    )
    curve = [e["extra"]["rev"] for e in res.evals]
    assert [e["step"] for e in res.evals] == [0, 4, 8] and len(set(curve)) == 3
    assert curve[0] == pytest.approx(start, rel=1e-6)
    assert curve[-1] == pytest.approx(losses.evaluate_loss(model, other, 4), rel=1e-6)
    logged = [
        json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    ]
    assert [r["extra"]["rev"] for r in logged if r["kind"] == "eval"] == curve
