"""Process groups, one-preparer coordination and the few collectives the training loop needs.

One process trains with no process group at all. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the
environment) :func:`setup` starts one: NCCL when the process has a GPU, gloo on CPU, with a long
timeout (``--dist-timeout``, default 6 h) so that later collectives survive a slow first step.
:class:`DistEnv` says which rank this is; rank 0 alone writes logs and checkpoints. Wrapping a
model for DDP or FSDP is :mod:`inheritune.models.parallel`'s.

Preparing shared files (tokenising a corpus, converting the default model) is done by exactly one
process, :func:`run_once`: global rank 0 when the cache is on a filesystem every node sees (the
default), local rank 0 of every node when ``INHERITUNE_NODE_LOCAL_CACHE=1`` says each node has its
own cache. The others poll for the finished file, not a collective, so a six-hour tokenisation
never trips a collective timeout, and a failure of the preparer reaches them as the same error
(:class:`PeerError`).

Multi-node: run the same ``torchrun`` line on every node with ``--nnodes N --node-rank I
--rdzv-backend c10d --rdzv-endpoint HOST:PORT`` (docs/design/scaling.md).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import importlib
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from inheritune.config import ConfigError

R = TypeVar("R")

# Long enough for one process to tokenise OpenWebText (~9B tokens) while the others wait.
DEFAULT_TIMEOUT_S = 6 * 3600.0
# "1": INHERITUNE_CACHE is local to each node, so one process per node prepares it.
NODE_LOCAL_ENV = "INHERITUNE_NODE_LOCAL_CACHE"


class PeerError(RuntimeError):
    """Another process failed, or did not finish in time, preparing what this one waits for."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, its device, and how long it waits for others."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout: float = DEFAULT_TIMEOUT_S  # seconds to wait for the preparer (and for collectives)
    job: str = ""  # id shared by the ranks of one torchrun job (names its error markers)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_preparer(self) -> bool:
        """The one process (per shared filesystem) that prepares cached files."""
        return self.local_rank == 0 if node_local_cache() else self.rank == 0


def node_local_cache() -> bool:
    return os.environ.get(NODE_LOCAL_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# The process group is process-wide state already (torch.distributed's); these two values
# belong to it: the wait limit the command asked for and the job id agreed when it started.
_group: dict[str, Any] = {}


def setup(timeout: float | None = None) -> DistEnv:
    """The current process's :class:`DistEnv`, starting a process group under torchrun.

    Idempotent: a group started by the caller (or an earlier call) is reused, so the recipe can
    train several rounds in one torchrun job. ``timeout`` (seconds; ``--dist-timeout``) bounds
    every wait for another rank; the first call that starts the group also gives it this timeout.
    """
    if timeout is not None:
        if timeout <= 0:
            raise ConfigError(f"--dist-timeout must be > 0 seconds, got {timeout}")
        _group["timeout"] = float(timeout)
    wait = _group.get("timeout", DEFAULT_TIMEOUT_S)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = _device_for(local) if dist.get_backend() == "nccl" else torch.device("cpu")
        return DistEnv(rank, world, local, device, wait, _job_id(device))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(0, 1, 0, _device_for(0), wait)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device_for(local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=wait),
    )
    atexit.register(cleanup)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, device, wait, _job_id(device))


def _job_id(device: torch.device) -> str:
    """A random id rank 0 draws once per process group and broadcasts (every rank calls setup
    when the group starts). Error markers carry it, so a marker left by an earlier failed job
    is never mistaken for this job's."""
    key = id(dist.group.WORLD)
    if _group.get("job_of") != key:
        box = [secrets.token_hex(8) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        _group["job"], _group["job_of"] = box[0], key
    return _group["job"]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op on one process)."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Element-wise maximum of a tensor over ranks, in place (no-op on one process)."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_tensors(t: torch.Tensor, env: DistEnv) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor (used for per-rank RNG states)."""
    if not env.distributed:
        return [t]
    x = t.to(env.device)
    out = [torch.empty_like(x) for _ in range(env.world_size)]
    dist.all_gather(out, x)
    return [o.cpu() for o in out]


# ----------------------------------------------------------------------------- one preparer


def run_once(
    marker: str | Path,
    fn: Callable[[], R],
    env: DistEnv | None = None,
    *,
    what: str,
    error_dir: str | Path | None = None,
    poll: float = 0.5,
) -> R | None:
    """Run ``fn`` on the preparer (:attr:`DistEnv.is_preparer`) only; the others wait for it.

    ``marker`` is the file whose existence means "done" (``fn`` may write it; otherwise it is
    written atomically here after ``fn`` returns). Waiting ranks poll for it for at most
    ``env.timeout`` seconds; when ``fn`` raises, the preparer writes an error marker (in
    ``error_dir``, default the marker's folder: pass a folder outside whatever ``fn`` builds) and
    every waiting rank raises the same error type with its message instead of hanging. On one
    process ``fn`` simply runs. Returns ``fn``'s result on the preparer, None elsewhere.
    """
    env = env or setup()
    if not env.distributed:
        return fn()
    marker = Path(marker)
    error_dir = Path(error_dir) if error_dir is not None else marker.parent
    stem = "." + str(marker.relative_to(error_dir)).replace(os.sep, "--") + ".error-"
    error = error_dir / (stem + env.job)
    if env.is_preparer:
        for stale in error_dir.glob(stem + "*") if error_dir.is_dir() else ():
            if stale != error:  # left by an earlier job that failed
                stale.unlink(missing_ok=True)
        try:
            result = fn()
        except BaseException as e:
            _write_error(error, e, env)
            raise
        if not marker.exists():
            from inheritune.storage import atomic_write_text

            marker.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, "done\n")
        return result
    _wait_for(marker, error, env, what, poll)
    return None


def _write_error(path: Path, err: BaseException, env: DistEnv) -> None:
    """Best effort: the preparer is failing already, and its own error must win."""
    from inheritune.storage import atomic_write_text

    cls = type(err)
    record = {
        "module": cls.__module__,
        "type": cls.__qualname__,
        "message": str(err) or cls.__name__,
        "rank": env.rank,
    }
    with contextlib.suppress(Exception):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record))


def _wait_for(marker: Path, error: Path, env: DistEnv, what: str, poll: float) -> None:
    deadline = time.monotonic() + env.timeout
    announced = False
    while not marker.exists():  # polled ever more slowly (up to 5 s): many ranks, one filesystem
        if error.is_file():
            raise _peer_error(json.loads(error.read_text()), what)
        if time.monotonic() > deadline:
            who = "local rank 0 of this node" if node_local_cache() else "rank 0"
            raise PeerError(
                f"rank {env.rank} waited {env.timeout:.0f} s for {who} to prepare {what} "
                f"({marker} did not appear); raise --dist-timeout, or prepare it ahead of the "
                f"job (inheritune prepare / inheritune setup)"
            )
        if not announced and env.local_rank == 1:  # one line per node, not one per rank
            print(f"[inheritune] waiting for another process to prepare {what}", file=sys.stderr)
            announced = True
        time.sleep(poll)
        poll = min(poll * 1.5, 5.0)


def _peer_error(record: dict[str, Any], what: str) -> BaseException:
    """The preparer's exception, re-raised here as the same type where that is one of ours or a
    builtin (so the CLI prints it as the one-line error it is), else as :class:`PeerError`."""
    message = f"{record['message']} (while rank {record.get('rank', 0)} prepared {what})"
    module, name = record.get("module", ""), record.get("type", "")
    if module == "builtins" or module.startswith("inheritune."):
        with contextlib.suppress(Exception):
            cls = getattr(importlib.import_module(module), name)
            if isinstance(cls, type) and issubclass(cls, Exception):
                return cls(message)
    return PeerError(f"{name}: {message}")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of ``--precision`` (bf16 autocast, or nothing for fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
