"""Models under ``torch.distributed``: DDP/FSDP2 wrapping, sharded loading, gradient sync.

:func:`wrap` wraps the training loop's loss module with DDP, or with FSDP2 (:func:`shard_blocks`:
``fully_shard`` per decoder block, then the root; bf16 parameters with fp32 gradient reduction
under ``--precision bf16``, :func:`mixed_precision`) when ``--fsdp`` is given.
:func:`load_sharded_model` builds a model from a folder straight into its shards, so no rank
ever holds the whole model; :func:`load_weights` fills it from the folder's safetensors, each
rank reading its own rows. :func:`gradient_sync` skips the all-reduce on accumulation
micro-steps, :func:`full_tensor` gathers a sharded tensor, and
:func:`return_freed_memory_on_cpu` hands FSDP's freed all-gather buffers back to the OS on CPU.
Process groups and collectives are :mod:`inheritune.distributed`'s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inheritune.distributed import DistEnv

# ----------------------------------------------------------------------------- DDP and FSDP


def mixed_precision(precision: str):
    """FSDP2's policy for ``--precision``: bf16 parameters and activations, fp32 gradient
    reduction (the sum over ranks keeps full precision); for fp32, the parameters' own dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision != "bf16":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_blocks(layers: nn.ModuleList, precision: str = "fp32") -> None:
    """``fully_shard`` every decoder block not sharded yet (one all-gather per block)."""
    from torch.distributed.fsdp import fully_shard

    for block in layers:
        if not is_fsdp(block):
            fully_shard(block, mp_policy=mixed_precision(precision))


def wrap(
    module: nn.Module, layers: nn.ModuleList, env: DistEnv, fsdp: bool, precision: str = "fp32"
) -> nn.Module:
    """DDP (or FSDP2 with one shard group per block) around ``module``; as is on one process.

    Blocks already sharded by :func:`load_sharded_model` are kept as they are.
    """
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if not env.distributed:
            return module  # one process: sharding would only add overhead
        return_freed_memory_on_cpu(env)
        shard_blocks(layers, precision)
        # root: embeddings, final norm and head (tied weights stay one)
        fully_shard(module, mp_policy=mixed_precision(precision))
        return module
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is an FSDP shard (a DTensor)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def return_freed_memory_on_cpu(env: DistEnv) -> None:
    """Under FSDP on CPU, give freed heap pages back to the OS (glibc's M_MMAP_THRESHOLD fixed at
    1 MiB, what ``MALLOC_MMAP_THRESHOLD_=1048576`` does). By default glibc raises its threshold
    after large frees and then keeps FSDP's per-block all-gather buffers in the heap, so a rank's
    resident memory would not show what sharding saves (benchmarks/results/fsdp_memory.md)."""
    if env.device.type != "cpu" or not env.distributed:
        return
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (malloc.h)


def load_sharded_model(
    folder: str | Path, config, env: DistEnv, precision: str = "fp32", **from_config: Any
) -> nn.Module:
    """The model of an HF ``folder`` with every decoder block FSDP-sharded across the ranks.

    Built without memory (parameters on the meta device; buffers such as rotary frequencies are
    computed for real), each block sharded, then every rank allocates and reads only its own rows
    of each block's tensors from the safetensors files. Embeddings, final norm and head stay
    whole until :func:`wrap` shards the root. One process: an ordinary model.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    return_freed_memory_on_cpu(env)

    from inheritune.models.arch import get_arch, get_module

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **from_config)
    arch = get_arch(model)
    if env.distributed:
        shard_blocks(arch.layers, precision)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.to_empty(device=env.device)  # parameters get memory (this rank's shards only)
    model.tie_weights()  # the meta and the materialised parameters are new objects: tie again
    for name, buf in model.named_buffers():
        buf.copy_(buffers[name])
    load_weights(model, folder)
    # Whether the fused head loss applies (Arch.plain_head) is checked by a probe forward, and
    # FSDP allows no block a forward before the root's: probe now with the blocks set aside
    # (what the probe checks happens after them: the final norm, the head, the logits).
    owner, _, name = arch.layout.layers.rpartition(".")
    parent = get_module(model, owner) if owner else model
    setattr(parent, name, nn.ModuleList())
    try:
        arch.plain_head  # noqa: B018 (cached per model)
    finally:
        setattr(parent, name, arch.layers)
    return model


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Read ``model``'s weights from the safetensors files in ``folder`` in place: a sharded
    parameter gets only this rank's rows, a whole one all of them. Tied copies may be absent."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from inheritune.models.folders import OPTIMIZER, RNG
    from inheritune.storage import CheckpointError

    folder = Path(folder)
    where: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name not in (OPTIMIZER, RNG):
            with safe_open(str(f), framework="pt") as st:
                where.update(dict.fromkeys(st.keys(), f))
    params = dict(model.named_parameters())  # tied weights once, under their first name
    wanted: dict[str, torch.Tensor] = dict(params)
    for name, t in model.state_dict(keep_vars=True).items():  # + persistent buffers
        if name not in params and not isinstance(t, nn.Parameter):
            wanted[name] = t
    missing = [n for n in params if n not in where]
    if missing:
        raise CheckpointError(
            f"{folder} does not fit this model: it lacks {len(missing)} tensor(s) "
            f"({', '.join(missing[:5])})"
        )
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        if name in where:
            by_file.setdefault(where[name], []).append(name)
    with torch.no_grad():
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt") as st:
                for name in names:
                    t = wanted[name]
                    if isinstance(t, DTensor):
                        local = t.to_local()
                        start = _shard_start(t)
                        rows = st.get_slice(name)[start : start + local.shape[0]]
                        local.copy_(rows)
                    else:
                        t.copy_(st.get_tensor(name))


def _shard_start(t) -> int:
    """First row of this rank's shard of a dim-0-sharded DTensor (FSDP2 uses torch.chunk)."""
    mesh = t.device_mesh
    per = math.ceil(t.shape[0] / mesh.size())
    start = min(mesh.get_local_rank() * per, t.shape[0])
    if t.to_local().shape[0] != max(0, min(per, t.shape[0] - start)):
        raise RuntimeError(f"unexpected shard layout {t.placements} for shape {tuple(t.shape)}")
    return start


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
