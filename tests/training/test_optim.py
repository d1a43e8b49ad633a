"""The optimiser side of training: the lr schedule, parameter groups and freezing."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from conftest import tiny_model
from inheritune.config import ConfigError
from inheritune.training import config as T
from inheritune.training import optim


def cfg_for(out: Path, **kw) -> T.TrainConfig:
    base = {"out": str(out), "steps": 8, "batch_size": 4, "seq_len": 16, "warmup": 2}
    return T.TrainConfig(**{**base, **kw})


def test_lr_schedule():
    cfg = cfg_for(Path("x"), steps=100, warmup=10, lr=1.0, min_lr=0.1)
    lrs = [optim.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert optim.lr_at(100, cfg) == pytest.approx(0.1)
    assert optim.lr_at(55, cfg) == pytest.approx(0.55)  # half way through the cosine


def test_param_groups_decay_and_scales():
    model = tiny_model("llama")  # tied embeddings/head
    cfg = cfg_for(Path("x"), weight_decay=0.1, embed_lr_scale=0.5, norm_lr_scale=2.0)
    groups = {g["name"]: g for g in optim.param_groups(model, cfg)}
    emb = model.get_input_embeddings().weight
    assert any(p is emb for p in groups["embed"]["params"])
    assert groups["embed"]["weight_decay"] == 0.0 and groups["embed"]["lr_scale"] == 0.5
    assert groups["norm"]["weight_decay"] == 0.0 and groups["norm"]["lr_scale"] == 2.0
    assert all(p.ndim == 2 for p in groups["decay"]["params"])
    n_opt = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())  # tied weight counted once
    untied = tiny_model("gpt_neox")  # untied head with decay, its own scale
    g2 = {g["name"]: g for g in optim.param_groups(untied, cfg_for(Path("x"), head_lr_scale=3.0))}
    assert g2["head"]["lr_scale"] == 3.0 and g2["head"]["weight_decay"] == 0.1


def test_freeze_patterns():
    model = tiny_model("llama")
    frozen = optim.apply_freeze(model, ["embed_tokens", "model.layers.0.*"])
    assert "model.embed_tokens.weight" in frozen
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    assert model.lm_head.weight.requires_grad is False  # tied: frozen together
    names = {n for g in optim.param_groups(model, cfg_for(Path("x"))) for n in [g["name"]]}
    assert "embed" not in names
    with pytest.raises(ConfigError, match="--freeze"):
        optim.apply_freeze(model, ["no_such_param"])
