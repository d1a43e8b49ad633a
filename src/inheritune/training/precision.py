"""``--precision auto``: time one training step in fp32 and one in bf16 here, keep the faster.

Whether bf16 pays depends on the processor, not on the model: on Xeons with AMX a bf16 step of
SmolLM2 is ~2.5x faster than fp32, on EPYCs with avx512_bf16 somewhat faster, and on CPUs with
AVX2 only bf16 is emulated and a step is 6x or more slower (docs/results.md, training
throughput). So no precision is hard-coded for a machine: :func:`choose_precision` measures.

First a 256^3 matmul is timed in each dtype (milliseconds): where bf16 is emulated it is tens
of times slower than fp32, and that settles it without a bf16 training step (one took 53 s on
an AVX2-only EPYC, against 1.6 s in fp32). Otherwise the measurement is one forward and backward
pass of the training loss on one micro-batch of the run's own shape, after one warm-up pass, in
each precision; gradients are cleared afterwards and no optimizer step is taken, so the weights
are untouched (the loop seeds or restores every RNG after it). On CUDA bf16 is taken where the
GPU supports it, without timing.

The choice, both timings and the reason are a :class:`PrecisionChoice`, written into the run's
report so a reader knows what ran.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inheritune import data
from inheritune.distributed import DistEnv, all_reduce_sum, autocast
from inheritune.models.losses import CausalLMLoss
from inheritune.storage import atomic_write_json
from inheritune.surgery.bridge import add_bridge_block
from inheritune.surgery.build import first_layers
from inheritune.training import optim
from inheritune.training.config import TrainConfig

# bf16 is kept only when its step is at least this much faster: a tie goes to fp32, which
# scores exactly what the reference scores and needs no autocast.
MIN_SPEEDUP = 1.05
# bf16 this many times slower than fp32 (the probe matmul, or the bf16 warm-up step against the
# fp32 step) is emulated bf16: nothing more of it is timed
HOPELESS = 3.0


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``--precision auto`` chose on this machine, and why."""

    precision: str
    fp32_step_s: float | None
    bf16_step_s: float | None
    reason: str
    bf16_matmul_ratio: float | None = None  # bf16 / fp32 time of the 256^3 probe matmul

    def to_dict(self) -> dict:
        return asdict(self)


def _step_seconds(loss_module: nn.Module, batch: torch.Tensor, precision: str) -> float:
    """Wall seconds of one forward + backward of the training loss (gradients cleared)."""
    device = batch.device
    t0 = time.perf_counter()
    with autocast(precision, device):
        loss = loss_module(batch[:, :-1], batch[:, 1:])
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    for p in loss_module.parameters():
        p.grad = None
    return seconds


def _mean_over_ranks(values: list[float], env: DistEnv | None, device) -> list[float]:
    """Each value averaged over the ``torchrun`` ranks (as is without one), so that every rank
    decides on the same numbers."""
    if env is None or not env.distributed:
        return values
    both = torch.tensor(values, dtype=torch.float64, device=device)
    all_reduce_sum(both, env)
    return [float(x) / env.world_size for x in both]


def _matmul_seconds(dtype: torch.dtype, n: int = 256, reps: int = 3) -> float:
    """Mean seconds of an (n, n) @ (n, n) matmul in ``dtype`` on the CPU, after one warm-up."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return (time.perf_counter() - t0) / reps


def choose_precision(
    model: nn.Module,
    train_ids: np.ndarray,
    micro_batch: int,
    seq_len: int,
    env: DistEnv | None = None,
) -> PrecisionChoice:
    """Time a training step of ``model`` in fp32 and in bf16 on ``micro_batch`` windows of
    ``seq_len`` tokens from ``train_ids`` (with the model's current freezing), keep the faster.
    Under ``torchrun`` (``env``) the ranks' timings are averaged, so every rank chooses alike."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", None, None, "CUDA device with bf16 support")
        return PrecisionChoice("fp32", None, None, "CUDA device without bf16 support")
    ratio = _matmul_seconds(torch.bfloat16) / _matmul_seconds(torch.float32)
    (ratio,) = _mean_over_ranks([ratio], env, device)
    if ratio > HOPELESS:
        why = f"a bf16 matmul is {ratio:.0f}x slower than fp32 on this CPU (bf16 is emulated)"
        return PrecisionChoice("fp32", None, None, why, ratio)
    span = max(1, len(train_ids) - seq_len - 1)
    starts = np.arange(micro_batch, dtype=np.int64) * seq_len % span
    batch = data.gather_windows(train_ids, starts, seq_len).to(device)
    loss_module = CausalLMLoss(model)
    was_training = model.training
    model.train()
    try:
        _step_seconds(loss_module, batch, "fp32")  # warm-up: allocator, kernels
        fp32 = _step_seconds(loss_module, batch, "fp32")
        bf16 = _step_seconds(loss_module, batch, "bf16")  # warm-up, and the verdict if hopeless
        if bf16 < HOPELESS * fp32:
            bf16 = _step_seconds(loss_module, batch, "bf16")
    finally:
        model.train(was_training)
    fp32, bf16 = _mean_over_ranks([fp32, bf16], env, device)
    if bf16 * MIN_SPEEDUP <= fp32:
        why = f"bf16 step {fp32 / bf16:.2f}x faster than fp32 on this CPU"
        return PrecisionChoice("bf16", fp32, bf16, why, ratio)
    why = f"bf16 step {bf16 / fp32:.2f}x the fp32 step's time on this CPU (no fast bf16 matmul)"
    return PrecisionChoice("fp32", fp32, bf16, why, ratio)


def choose_for_inherited(
    reference: nn.Module,
    depth: int,
    cfg: TrainConfig,
    train_ids: np.ndarray,
    env: DistEnv | None = None,
    bridge_init: str | None = None,
) -> PrecisionChoice:
    """:func:`choose_precision` on the model a run trains first: the reference's first
    ``depth`` layers (with a bridge block when ``bridge_init`` is given), frozen as ``cfg``
    says, with ``cfg``'s micro-batch and sequence length. Used by ``run`` and ``compare``,
    which resolve ``--precision auto`` once for every model they train and evaluate."""
    if bridge_init is not None:
        probe = add_bridge_block(reference, depth, bridge_init)
    else:
        probe = first_layers(reference, depth)
    optim.apply_freeze(probe, cfg.freeze)
    if cfg.train_top:
        optim.train_only_top(probe, cfg.train_top)
    return choose_precision(probe, train_ids, cfg.micro_batch(), cfg.seq_len, env)


def recorded_choice(
    record: Path, measure: Callable[[], PrecisionChoice], reuse: bool, is_main: bool = True
) -> dict:
    """The choice in ``record`` when ``reuse`` (a resumed run keeps the precision it started
    with) and the file exists; else ``measure()``, written to ``record`` by the main process.
    Says what was chosen, and why, on the console."""
    if reuse and record.is_file():
        choice = json.loads(record.read_text())
    else:
        choice = measure().to_dict()
        if is_main:
            atomic_write_json(record, choice)
    if is_main:
        print(f"--precision auto: {choice['precision']} ({choice['reason']})", flush=True)
    return choice
