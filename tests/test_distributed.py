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

import inheritune
from conftest import CORPUS_TEXT, tiny_model
from inheritune import data
from inheritune.training import checkpoint as ckpt
from inheritune.training.config import TrainConfig
from inheritune.training.train import train_model

pytestmark = pytest.mark.slow  # two processes each importing torch + transformers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(out: Path, **kw) -> TrainConfig:
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
    return TrainConfig(**base)


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
    train_model(tiny_model("llama"), None, tokens, _cfg(Path(out), **kw))
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
    single = train_model(tiny_model("llama"), None, tokens, _cfg(tmp_path / "one"))
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


def _torchrun(args: list[str], cache: Path, env_extra: dict | None = None):
    """``torchrun --standalone --nproc-per-node 2 ARGS`` with its own cache, one thread each."""
    env = {
        **os.environ,
        "INHERITUNE_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(inheritune.__file__).parents[1]),
        **(env_extra or {}),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------- run_once


def _run_once_worker(rank: int, world: int, port: int, root: str) -> None:
    from inheritune.distributed import NODE_LOCAL_ENV, PeerError, run_once, setup
    from inheritune.models.parallel import load_sharded_model

    _spawn_env(rank, world, port)
    root_p = Path(root)
    env = setup()
    out: dict = {"job": env.job}

    # 1. Only the preparer runs fn (slowly); the other waits for the marker, then sees the file.
    def make() -> str:
        time.sleep(1.0)
        (root_p / "made").mkdir()
        (root_p / "made" / "by").write_text(str(rank))
        return "made"

    out["result"] = run_once(root_p / "made" / "by", make, env, what="a test folder")
    out["made_by"] = (root_p / "made" / "by").read_text()

    # 2. The preparer fails: the waiting rank gets the same error type, not a hang.
    def fail() -> None:
        time.sleep(0.5)
        raise data.DataError("corpus is empty")

    try:
        run_once(root_p / "never", fail, env, what="the failing corpus")
    except data.DataError as e:
        out["error"] = str(e)

    # 3. Nobody prepares: the waiting rank gives up after --dist-timeout with a clear error.
    short = dataclasses.replace(env, timeout=1.0)
    if rank == 1:
        try:
            run_once(root_p / "absent", lambda: None, short, what="nothing", poll=0.1)
        except PeerError as e:
            out["timeout"] = str(e)

    # 4. A node-local cache (one node per rank here): every node's local rank 0 prepares its own.
    os.environ[NODE_LOCAL_ENV] = "1"
    node = dataclasses.replace(env, local_rank=0)
    mine = root_p / f"node{rank}"
    run_once(mine / "done", lambda: mine.mkdir(), node, what="a node-local folder")
    out["node_local"] = mine.is_dir() and (mine / "done").is_file()
    del os.environ[NODE_LOCAL_ENV]

    # 5. The sharded loader: each rank holds only its rows of every block, equal to the file's.
    from torch.distributed.tensor import DTensor

    from inheritune.models import loading as models
    from inheritune.models.arch import get_arch

    folder = root_p / "tiny"
    config = models.load_config(str(folder))
    sharded = load_sharded_model(folder, config, env)
    whole = models.load_model(str(folder))
    local = 0
    for (name, p), (_, q) in zip(sharded.named_parameters(), whole.named_parameters(), strict=True):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        assert torch.equal(full, q), name
        local += p.to_local().numel() if isinstance(p, DTensor) else 0
    out["block_params_local"] = local
    out["block_params"] = sum(p.numel() for p in whole.model.layers.parameters())
    out["tied"] = sharded.lm_head.weight is sharded.model.embed_tokens.weight
    out["plain_head"] = get_arch(sharded).plain_head  # probed without running the blocks
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
        assert r["tied"] and r["plain_head"]
        assert r["block_params_local"] == r["block_params"] // 2  # half of every block each


# ----------------------------------------------------------------------------- inheritune run


def test_two_process_run_tokenises_once(tmp_path, tiny_folder, corpus_file):
    """`inheritune run` under torchrun on a corpus not yet cached: one token folder, no
    temporary leftovers, and the 1-process run's round losses."""
    from conftest import TINY_RUN

    model = tiny_folder("llama", layers=6)
    cache = tmp_path / "cache"

    def preset(out: Path) -> Path:
        values = {"model": str(model), "data": str(corpus_file), "out": str(out), **TINY_RUN}
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(json.dumps(values))  # JSON is YAML
        return path

    two = _torchrun(["-m", "inheritune", "run", "--config", str(preset(tmp_path / "two"))], cache)
    assert two.returncode == 0, two.stderr[-3000:]
    folders = list((cache / "tokens").iterdir())
    assert len(folders) == 1  # one token folder, no error markers
    assert sorted(p.name for p in folders[0].iterdir()) == ["meta.json", "tokens.bin"]
    leftovers = [
        p
        for p in [*cache.rglob("*"), *(tmp_path / "two").rglob("*")]
        if p.name.startswith(".tmp") or ".error-" in p.name or p.suffix in (".tmp", ".partial")
    ]
    assert leftovers == []

    env = {**os.environ, "INHERITUNE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "inheritune", "run", "--config", str(preset(tmp_path / "one"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "report.json").read_text())["rounds"]
    b = json.loads((tmp_path / "two" / "report.json").read_text())["rounds"]
    assert [r["layers"] for r in a] == [r["layers"] for r in b] == [2, 4]
    for x, y in zip(a, b, strict=True):
        assert y["val_loss"] == pytest.approx(x["val_loss"], abs=2e-4)


# ----------------------------------------------------------------------------- exact resume

# Rank 0 kill -9s both processes while the second checkpoint is half-written (its manifest,
# written last, is missing), so resuming must fall back to the first one.
KILL_BOTH = """
import os, signal, sys
from pathlib import Path
Path(os.environ["PIDS"], os.environ["RANK"]).write_text(str(os.getpid()))
from inheritune import storage as checkpoint
from inheritune import cli
real, calls = checkpoint.write_manifest, []
def write_manifest(folder, meta=None):
    calls.append(folder)
    if len(calls) == 2:
        os.kill(int(Path(os.environ["PIDS"], "1").read_text()), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    real(folder, meta)
checkpoint.write_manifest = write_manifest
sys.exit(cli.main(sys.argv[1:]))
"""


def _train_args(model: Path, corpus: Path, out: Path, fsdp: bool) -> list[str]:
    args = ["train", "--model", str(model), "--data", str(corpus), "--out", str(out)]
    opts = dict(steps=8, batch_size=4, seq_len=16, warmup=2, eval_every=4, save_every=3)
    opts.update(eval_tokens=64, log_every=1, lr=3e-3, keep_last=3)
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return [*args, "--fsdp"] if fsdp else args


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_kill9_resume_is_exact_with_dropout(tmp_path, tiny_folder, corpus_file, fsdp):
    """2 processes, GPT-2 with dropout 0.1: killed (kill -9, both ranks) mid-checkpoint and
    resumed, the per-step losses equal an uninterrupted run's (each rank's RNG is restored)."""
    model = tiny_folder("gpt2", layers=2)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(model).resid_pdrop > 0
    cache = tmp_path / "cache"
    ref = _torchrun(
        ["-m", "inheritune", *_train_args(model, corpus_file, tmp_path / "ref", fsdp)], cache
    )
    assert ref.returncode == 0, ref.stderr[-3000:]

    script, pids = tmp_path / "kill_both.py", tmp_path / "pids"
    script.write_text(KILL_BOTH)
    pids.mkdir()
    run_args = _train_args(model, corpus_file, tmp_path / "run", fsdp)
    killed = _torchrun([str(script), *run_args], cache, env_extra={"PIDS": str(pids)})
    assert killed.returncode != 0
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.read_latest(root).name == "step-00000003"
    assert not (tmp_path / "run" / "result.json").exists()

    resumed = _torchrun(["-m", "inheritune", *run_args, "--resume"], cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a_train, a_val = _losses(tmp_path / "ref")
    b_train, b_val = _losses(tmp_path / "run")
    assert len(a_train) == len(b_train) == 8 and len(a_val) == len(b_val) == 3
    for x, y in zip(a_train + a_val, b_train + b_val, strict=True):
        assert y == pytest.approx(x, abs=1e-5)
