"""The training state beside a checkpoint's weights: pickle-free optimizer and RNG state that
round-trips exactly (train_state.py)."""

from __future__ import annotations

import random

import numpy as np
import torch

from conftest import tiny_model
from inheritune import storage as ckpt
from inheritune.training import checkpoint as train_state
from inheritune.training import config as T
from inheritune.training import optim


def test_optimizer_and_rng_round_trip(tmp_path):
    model = tiny_model("llama")
    cfg = T.TrainConfig()
    opt = optim.make_optimizer(model, cfg, fsdp=False)
    model(torch.randint(0, 300, (2, 8)), labels=torch.randint(0, 300, (2, 8))).loss.backward()
    opt.step()
    sd = train_state.optimizer_state(model, opt, fsdp=False)
    assert "model.embed_tokens.weight" in sd["state"]
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    tensors, scalars = train_state.rng_state()
    train_state.save_training_state(tmp_path, sd, {"step": 1}, tensors, scalars)
    ckpt.write_manifest(tmp_path)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    opt_sd, state, rt, rs = train_state.load_training_state(tmp_path)
    assert state["step"] == 1
    train_state.set_rng_state(rt, rs)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])
    opt2 = optim.make_optimizer(model, cfg, fsdp=False)
    train_state.load_optimizer_state(model, opt2, opt_sd, fsdp=False)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, st in a["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["state"][i][k]), (i, k)
