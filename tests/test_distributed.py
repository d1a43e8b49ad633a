"""Scale-out on CPU with 2 gloo processes (torchrun's environment variables, or torchrun itself):

* they follow the 1-process loss trajectory at the same global batch, with DDP and with FSDP2;
* exactly one process prepares (run_once): a failure there is an error everywhere, a missing
  preparer a timeout, a node-local cache one preparer per node; a cold corpus is tokenised once;
* the FSDP loader gives each rank only its shards;
* an interrupted-and-resumed run (kill -9 of every process) equals an uninterrupted one, with
  dropout (per-rank RNG), under DDP and FSDP.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
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


# ----------------------------------------------------------------------------- helpers


def _spawn_env(rank: int, world: int, port: int) -> None:
    """Exactly the environment torchrun gives each process."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)


def _torchrun(args: list[str], cache: Path, **kw) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` with its own cache, one thread each."""
    env = {
        **os.environ,
        "INHERITUNE_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(T.__file__).parents[1]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600, **kw)


# ----------------------------------------------------------------------------- run_once


def _run_once_worker(rank: int, world: int, port: int, root: str) -> None:
    from inheritune import distributed as D

    _spawn_env(rank, world, port)
    root_p = Path(root)
    env = D.setup()
    out: dict = {"job": env.job}

    # 1. Only the preparer runs fn (slowly); the other waits for the marker, then sees the file.
    def make() -> str:
        time.sleep(1.0)
        (root_p / "made").mkdir()
        (root_p / "made" / "by").write_text(str(rank))
        return "made"

    out["result"] = D.run_once(root_p / "made" / "by", make, env, what="a test folder")
    out["made_by"] = (root_p / "made" / "by").read_text()

    # 2. The preparer fails: the waiting rank gets the same error type, not a hang.
    def fail() -> None:
        time.sleep(0.5)
        raise data.DataError("corpus is empty")

    try:
        D.run_once(root_p / "never", fail, env, what="the failing corpus")
    except data.DataError as e:
        out["error"] = str(e)

    # 3. Nobody prepares: the waiting rank gives up after --dist-timeout with a clear error.
    short = dataclasses.replace(env, timeout=1.0)
    if rank == 1:
        try:
            D.run_once(root_p / "absent", lambda: None, short, what="nothing", poll=0.1)
        except D.PeerError as e:
            out["timeout"] = str(e)

    # 4. A node-local cache (one node per rank here): every node's local rank 0 prepares its own.
    os.environ[D.NODE_LOCAL_ENV] = "1"
    node = dataclasses.replace(env, local_rank=0)
    mine = root_p / f"node{rank}"
    D.run_once(mine / "done", lambda: mine.mkdir(), node, what="a node-local folder")
    out["node_local"] = mine.is_dir() and (mine / "done").is_file()
    del os.environ[D.NODE_LOCAL_ENV]

    # 5. The sharded loader: each rank holds only its rows of every block, equal to the file's.
    from torch.distributed.tensor import DTensor

    from inheritune import models

    folder = root_p / "tiny"
    config = models.load_config(str(folder))
    sharded = D.load_sharded_model(folder, config, env)
    whole = models.load_model(str(folder))
    local = 0
    for (name, p), (_, q) in zip(sharded.named_parameters(), whole.named_parameters(), strict=True):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        assert torch.equal(full, q), name
        local += p.to_local().numel() if isinstance(p, DTensor) else 0
    out["block_params_local"] = local
    out["block_params"] = sum(p.numel() for p in whole.model.layers.parameters())
    out["tied"] = sharded.lm_head.weight is sharded.model.embed_tokens.weight
    (root_p / f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def test_run_once_and_sharded_loading(tmp_path, tokenizer):
    from conftest import save_tiny

    save_tiny("llama", tmp_path / "tiny", tokenizer, layers=3)
    mp.spawn(_run_once_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["job"] == r1["job"] != ""
    assert (r0["result"], r1["result"]) == ("made", None)
    assert r0["made_by"] == r1["made_by"] == "0"  # rank 0 made it, rank 1 saw it finished
    assert r0["error"].startswith("corpus is empty")
    assert r1["error"].startswith("corpus is empty (while rank 0 prepared the failing corpus)")
    assert "waited 1 s for rank 0 to prepare nothing" in r1["timeout"]
    assert "--dist-timeout" in r1["timeout"]
    assert r0["node_local"] and r1["node_local"]
    # an error marker names the job: a later job does not mistake it for its own
    assert [p.name for p in tmp_path.glob(".never.error-*")] == [f".never.error-{r0['job']}"]
    for r in (r0, r1):
        assert r["tied"]
        assert r["block_params_local"] == r["block_params"] // 2  # half of every block each
