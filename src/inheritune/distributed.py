"""Process groups, DDP/FSDP wrapping and the few collectives the training loop needs.

One process trains with no process group at all. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the
environment) :func:`setup` starts one: NCCL when the process has a GPU, gloo on CPU. The loop
then wraps its loss module with DDP, or with FSDP2 (``fully_shard`` per decoder block, then the
root) when ``--fsdp`` is given. Rank 0 alone writes logs and checkpoints; every rank reads them.

Multi-node: run the same ``torchrun`` line on every node with ``--nnodes N --node-rank I
--rdzv-backend c10d --rdzv-endpoint HOST:PORT`` (see the README).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup() -> DistEnv:
    """The current process's :class:`DistEnv`, starting a process group under torchrun.

    Idempotent: a group started by the caller (or an earlier call) is reused, so the recipe can
    train several rounds in one torchrun job.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = _device_for(local) if dist.get_backend() == "nccl" else torch.device("cpu")
        return DistEnv(rank, world, local, device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(0, 1, 0, _device_for(0))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device_for(local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    atexit.register(cleanup)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, device)


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


def gather_tensors(t: torch.Tensor, env: DistEnv) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor (used for per-rank RNG states)."""
    if not env.distributed:
        return [t]
    x = t.to(env.device)
    out = [torch.empty_like(x) for _ in range(env.world_size)]
    dist.all_gather(out, x)
    return [o.cpu() for o in out]


def wrap(module: nn.Module, layers: nn.ModuleList, env: DistEnv, fsdp: bool) -> nn.Module:
    """DDP (or FSDP2 with one shard group per block) around ``module``; as is on one process."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if not env.distributed:
            return module  # one process: sharding would only add overhead
        for block in layers:
            fully_shard(block)
        fully_shard(module)  # root: embeddings, final norm and head (tied weights stay one)
        return module
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if sync:
        yield
    elif is_fsdp(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        yield


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP2), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of ``--precision`` (bf16 autocast, or nothing for fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
