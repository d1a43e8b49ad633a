"""What a training run reports while it runs: log.jsonl, throughput, MFU, memory, stop signals,
the plot.

* :class:`JsonlLog`: one JSON object per line (train steps and evaluations), rank 0 only; on
  resume the lines of steps the run will redo are dropped. Its first line (``"kind": "meta"``)
  states the peak FLOP/s that MFU is measured against and where that number comes from. With
  ``--tensorboard DIR`` the same scalars also go to TensorBoard.
* :class:`Throughput`: tokens/s over training time only (evaluation and checkpoints excluded).
* :func:`model_flops_per_token`, :func:`device_peak`, :func:`peak_memory`: MFU (model FLOPs
  utilisation) = FLOPs per token x tokens/s / (peak FLOP/s x devices), and the memory high-water
  mark (CUDA allocator on GPU, process RSS on CPU).
* :class:`StopFlag` + :func:`catch_signals`: SIGINT/SIGTERM ask the loop to save and stop at the
  next step boundary; a second Ctrl-C stops at once.
* :func:`plot_training`: ``loss.png`` of the train and validation curves.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inheritune.config import ConfigError
from inheritune.models.arch import get_arch
from inheritune.models.assets import cache_dir
from inheritune.storage import atomic_write_text, memoized


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop saves a checkpoint and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signum = 0

    def handler(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum


@contextlib.contextmanager
def catch_signals(flag_: StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    old = {s: signal.signal(s, flag_.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Throughput:
    """Tokens/s over training time only (evaluation and checkpointing excluded)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._win_tokens = 0
        self._win_seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self._win_tokens += tokens
        self._win_seconds += seconds

    def window_rate(self) -> float:
        """Tokens/s since the previous call."""
        rate = self._win_tokens / self._win_seconds if self._win_seconds > 0 else 0.0
        self._win_tokens, self._win_seconds = 0, 0.0
        return rate

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class JsonlLog:
    """log.jsonl writer (rank 0 only), and TensorBoard scalars when ``tensorboard`` names a folder.

    ``header``: the run's ``"kind": "meta"`` record, kept as the file's first line (a resumed run
    replaces the earlier one: it may run on other devices).
    """

    def __init__(
        self,
        path: Path,
        enabled: bool,
        resume_step: int | None,
        header: dict[str, Any] | None = None,
        tensorboard: str | None = None,
    ):
        self.path = path
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        keep: list[str] = []
        if resume_step is not None and path.is_file():  # drop lines of steps to be redone
            keep = [
                line
                for line in path.read_text().splitlines()
                if line.strip()
                and (header is None or json.loads(line).get("kind") != "meta")
                and json.loads(line).get("step", 0) <= resume_step
            ]
        if header is not None:
            keep.insert(0, json.dumps({"kind": "meta", **header}))
        atomic_write_text(path, "".join(line + "\n" for line in keep))
        if tensorboard:
            self._tb = tensorboard_writer(tensorboard)
            if resume_step is not None:
                self._tb.purge_step = resume_step + 1  # TensorBoard drops the redone steps

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        _append_log(self.path, record)
        if self._tb is not None and "step" in record:
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, int | float):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def check_tensorboard() -> None:
    """Refuse ``--tensorboard`` up front when the package is not installed."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "--tensorboard needs the tensorboard package, which is not installed: "
            "pip install tensorboard"
        )


def tensorboard_writer(logdir: str):
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=logdir)


# ----------------------------------------------------------------------------- MFU and memory

# Dense (no sparsity) peak FLOP/s per device from NVIDIA's datasheets, by a substring of
# torch.cuda.get_device_name(); the more specific names first. "tf32" applies to fp32 matmuls
# when torch.backends.cuda.matmul.allow_tf32 is on.
GPU_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H100 NVL": {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    "H100 PCIe": {"bf16": 756.0e12, "tf32": 378.0e12, "fp32": 51.2e12},
    "H100": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},  # SXM
    "A100": {"bf16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
}


@dataclass(frozen=True)
class Peak:
    """Peak FLOP/s of one device in the run's precision, and where the number comes from."""

    flops: float
    source: str


def _known_gpu_peak(device: torch.device, precision: str) -> Peak | None:
    name = torch.cuda.get_device_name(device)
    kind = precision
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        kind = "tf32"
    for key, peaks in GPU_PEAKS.items():
        if key in name:
            return Peak(peaks[kind], f"datasheet: {name}, {kind} dense")
    return None


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.3
) -> float:
    """FLOP/s of a square ``n``^3 matmul loop run for about ``seconds`` (the method of
    benchmarks/bench_train.py, bounded in time so every run can afford it at startup)."""
    g = torch.Generator(device).manual_seed(0)  # a private generator: training's RNG untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up (kernel selection, thread pool start)
    sync()
    iters, t0 = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and iters >= 3:
            return 2 * n**3 * iters / elapsed


# the instruction-set flags that decide whether bf16 (and how fast fp32) runs on an x86 CPU
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_info() -> dict[str, Any]:
    """This machine's CPU model, core count and the flags in :data:`CPU_FLAGS` it has, so that
    figures from different machines are never compared as if they were one."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "flags": [f for f in CPU_FLAGS if f in flags],
    }


def _largest_matmul_rate(device: torch.device, dtype: torch.dtype) -> tuple[float, int]:
    """(FLOP/s, n) of the fastest of the 1024^3 and 2048^3 matmul loops; the larger is skipped
    where one 1024^3 matmul already takes half a second (emulated bf16)."""
    best, size = measure_matmul_peak(device, dtype, n=1024, seconds=0.3), 1024
    if 2 * 1024**3 / best < 0.5:
        large = measure_matmul_peak(device, dtype, n=2048, seconds=1.0)
        if large > best:
            best, size = large, 2048
    return best, size


@functools.cache
def device_peak(device: torch.device, precision: str = "fp32") -> Peak:
    """The peak MFU is measured against: a known GPU's datasheet value, else the largest matmul
    rate measured on this machine (CPU: with this process's threads), measured once and cached
    in ``$INHERITUNE_CACHE/peaks`` by CPU, flags, threads, precision and torch version."""
    device = torch.device(device)
    if device.type == "cuda":
        known = _known_gpu_peak(device, precision)
        if known is not None:
            return known
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    where = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    spec = {"device": where, "precision": precision, "torch": torch.__version__}
    if device.type == "cpu":
        spec.update(cpu_info())

    def measure() -> dict:
        flops, n = _largest_matmul_rate(device, dtype)
        return {"flops": flops, "n": n}

    hit = memoized(cache_dir() / "peaks", spec, measure)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    source = f"measured: largest {precision} matmul loop ({hit['n']}^3) on {where}{threads}"
    return Peak(float(hit["flops"]), source)


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward + backward) plus 12 L d T for the
    attention scores and values (PaLM, appendix B; the non-causal convention).

    N counts the weights that take part in a matmul: every matrix except the embedding tables
    (lookups), but a table tied to the head counts, being the head's matmul too. Norm scales and
    biases are element-wise and left out. A frozen weight counts 2 (its forward only): frozen
    weights are the bottom of the model (``--freeze``, ``--train-top``), where no gradient
    flows, so they have no backward pass at all.
    """
    cfg = model.config
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    blocks = list(get_arch(model).layers)
    # blocks below the lowest one holding a trainable weight run forward only
    trains = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    forward_only = trains.index(True) if True in trains else len(blocks)
    below = {id(p) for b in blocks[:forward_only] for p in b.parameters()}
    flops = 0.0
    for i, p in {id(p): p for p in model.parameters()}.items():
        if p.ndim < 2 or (i in lookups and p is not head_weight):
            continue
        # trained: forward + two gradient matmuls; frozen above a trained weight: forward +
        # the input gradient; frozen below every trained weight: forward only
        flops += p.numel() * (6.0 if p.requires_grad else 2.0 if i in below else 4.0)
    d = int(cfg.hidden_size)
    attention = 12.0 * (len(blocks) - forward_only) + 4.0 * forward_only
    return flops + attention * d * seq_len


def mfu(flops_per_token: float, tokens_per_s: float, peak: Peak, devices: int) -> float:
    """Model FLOPs utilisation of ``devices`` devices with the given peak each."""
    if not math.isfinite(tokens_per_s) or peak.flops <= 0:
        return 0.0
    return flops_per_token * tokens_per_s / (peak.flops * devices)


def peak_memory(device: torch.device) -> int:
    """Bytes at this process's high-water mark: the CUDA allocator's on GPU, RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(out: Path, evals: list[dict], log_path: Path) -> None:
    from inheritune.analysis import plots

    train = [r for r in read_log(log_path) if r.get("kind") == "train"]
    curves = {
        "train loss": ([r["tokens"] for r in train], [r["loss"] for r in train]),
        "validation loss": ([e["tokens"] for e in evals], [e["val_loss"] for e in evals]),
    }
    for name in evals[0].get("extra", {}) if evals else ():
        curves[f"{name} (held out)"] = (
            [e["tokens"] for e in evals],
            [e["extra"][name] for e in evals],
        )
    plots.plot_curves(curves, out / "loss.png", title="training")
