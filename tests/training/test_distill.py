"""Partial training (--train-top), shared-bottom distillation, the time budget and schedules."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model, tiny_train_config
from inheritune import training as T
from inheritune.config import ConfigError
from inheritune.models import losses
from inheritune.models.hooks import capture_block_input
from inheritune.surgery import build as surgery
from inheritune.training import optim
from inheritune.training.distill import Teacher, shared_bottom

SEQ = 16


def _cfg(out, **kw) -> T.TrainConfig:
    return tiny_train_config(out, seq_len=SEQ, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_train_top_freezes_embeddings_and_bottom_blocks(tmp_path, tokens, tokenizer, arch):
    model = surgery.first_layers(tiny_model(arch, layers=4), 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    T.train_model(model, tokenizer, tokens, _cfg(tmp_path / "t", train_top=1))
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed, "the top block must train"
    top = get_prefix(model, 3)
    assert all(k.startswith(top) or "norm" in k or "ln_f" in k for k in changed), changed
    embed = model.get_input_embeddings().weight
    assert not embed.requires_grad


def get_prefix(model, i: int) -> str:
    from inheritune.models.arch import get_arch

    return get_arch(model).layout.layers + f".{i}."


def test_train_top_out_of_range_is_a_clear_error():
    model = tiny_model("llama", layers=2)
    with pytest.raises(ConfigError, match="--train-top 3"):
        optim.train_only_top(model, 3)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_shared_bottom_teacher_equals_full_teacher(arch):
    """With the bottom k blocks frozen copies of the teacher's, the teacher's top run from the
    student's block-k input gives the full teacher's logits."""
    teacher = tiny_model(arch, layers=4)
    student = surgery.first_layers(teacher, 3)
    optim.train_only_top(student, 1)  # blocks 0-1 frozen, equal to the teacher's
    k = shared_bottom(student, teacher)
    assert k == 2
    t = Teacher(teacher, shared=k)
    x = torch.randint(3, 100, (2, 12))
    captured = {}
    from inheritune.models.arch import get_arch

    with capture_block_input(get_arch(student).layers[k], captured):
        student(input_ids=x)
    got, _ = t.outputs(x, captured["hidden"])
    want = teacher(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_shared_bottom_is_zero_when_blocks_train_or_differ():
    teacher = tiny_model("llama", layers=4)
    student = surgery.first_layers(teacher, 3)
    assert shared_bottom(student, teacher) == 0  # nothing frozen
    optim.train_only_top(student, 1)
    with torch.no_grad():
        next(student.model.layers[0].parameters()).add_(1.0)
    assert shared_bottom(student, teacher) == 0  # block 0 differs


def test_shared_bottom_distillation_loss_equals_full_teacher_loss():
    teacher = tiny_model("llama", layers=4)
    student = surgery.first_layers(teacher, 3)
    optim.train_only_top(student, 1)
    x = torch.randint(3, 100, (2, 12))
    mod = losses.CausalLMLoss(student)
    shared = mod(x[:, :-1], x[:, 1:], Teacher(teacher, 2), 0.4, 2.0, 0.5)
    full = mod(x[:, :-1], x[:, 1:], Teacher(teacher, 0), 0.4, 2.0, 0.5)
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-6)


def test_distill_weight_decays_linearly_to_zero():
    assert losses.distill_weight(0.4, False, 0.75) == 0.4
    assert losses.distill_weight(0.4, True, 0.0) == pytest.approx(0.4)
    assert losses.distill_weight(0.4, True, 0.75) == pytest.approx(0.1)
    assert losses.distill_weight(0.4, True, 1.0) == 0.0


def test_linear_schedule_and_time_progress():
    cfg = _cfg("x", steps=11, warmup=1, lr=1.0, min_lr=0.0, schedule="linear")
    assert optim.lr_at(0, cfg) == pytest.approx(1.0)
    assert optim.lr_at(6, cfg) == pytest.approx(0.5)
    assert optim.lr_at(11, cfg) == pytest.approx(0.0)
    assert optim.lr_at(3, cfg, progress=0.25) == pytest.approx(0.75)  # by time, not steps
    with pytest.raises(ConfigError, match="--schedule"):
        _cfg("x", schedule="step")


def test_time_budget_stops_early_and_evaluates_at_the_end(tmp_path, tokens, tokenizer):
    model = tiny_model("llama", layers=2)
    cfg = _cfg(tmp_path / "b", steps=100_000, time_budget=0.3, log_every=1)
    res = T.train_model(model, tokenizer, tokens, cfg)
    assert 0 < res.steps < 100_000
    assert res.evals[-1]["step"] == res.steps
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()
           if json.loads(x)["kind"] == "train"]  # fmt: skip
    assert lrs[-1] < lrs[1]  # decayed by time
