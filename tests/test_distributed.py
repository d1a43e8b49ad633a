"""Scale-out on CPU: 2 gloo processes (set up from torchrun's environment variables) follow the
1-process loss trajectory at the same global batch, with DDP and with FSDP2."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import CORPUS_TEXT, tiny_model
from inheritune import checkpoint as ckpt
from inheritune import data
from inheritune import train as T

pytestmark = pytest.mark.slow  # two processes each importing torch + transformers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(out: Path, **kw) -> T.TrainConfig:
    base = dict(
        out=str(out),
        steps=6,
        batch_size=4,
        seq_len=16,
        grad_accum=1,
        warmup=1,
        lr=3e-3,
        eval_every=3,
        eval_tokens=96,
        save_every=3,
        log_every=1,
    )
    base.update(kw)
    return T.TrainConfig(**base)


def _worker(rank: int, world: int, port: int, tokens_dir: str, out: str, kw: dict) -> None:
    # Exactly the environment torchrun gives each process.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    tokens = data.open_tokens(Path(tokens_dir))
    T.train_model(tiny_model("llama"), None, tokens, _cfg(Path(out), **kw))
    torch.distributed.destroy_process_group()


def _losses(out: Path) -> tuple[list[float], list[float]]:
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return (
        [r["loss"] for r in recs if r["kind"] == "train"],
        [r["val_loss"] for r in recs if r["kind"] == "eval"],
    )


@pytest.fixture
def tokens(tmp_path, tokenizer, monkeypatch):
    # slow tests share the real cache (conftest); keep these tiny token files out of it
    monkeypatch.setenv("INHERITUNE_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS_TEXT * 2)
    return data.load_tokens(str(p), tokenizer)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, tokens, fsdp):
    torch.set_num_threads(1)
    single = T.train_model(tiny_model("llama"), None, tokens, _cfg(tmp_path / "one"))
    kw = {"fsdp": fsdp, "grad_accum": 2}  # 2 ranks x 2 micro-batches x 1 sequence
    args = (2, _free_port(), str(tokens.path), str(tmp_path / "two"), kw)
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    a_train, a_val = _losses(tmp_path / "one")
    b_train, b_val = _losses(tmp_path / "two")
    assert len(a_train) == len(b_train) == 6 and len(a_val) == len(b_val) == 3
    for x, y in zip(a_train + a_val, b_train + b_val, strict=True):
        assert y == pytest.approx(x, abs=2e-4)
    # Rank 0 alone wrote the outputs; the final model is complete and equals the 1-process one.
    root = ckpt.checkpoints_root(tmp_path / "two")
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000003", "step-00000006"]
    ckpt.verify_checkpoint(root / "step-00000006")
    from transformers import AutoModelForCausalLM

    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")
    one = AutoModelForCausalLM.from_pretrained(single.final_dir)
    assert two.lm_head.weight is two.model.embed_tokens.weight
    for (n, p), (_, q) in zip(one.named_parameters(), two.named_parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-3, msg=n)
