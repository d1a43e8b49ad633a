"""What a training run reports while it runs: log.jsonl, throughput, stop signals, the plot.

* :class:`JsonlLog`: one JSON object per line (train steps and evaluations), rank 0 only; on
  resume the lines of steps the run will redo are dropped.
* :class:`Throughput`: tokens/s over training time only (evaluation and checkpoints excluded).
* :class:`StopFlag` + :func:`catch_signals`: SIGINT/SIGTERM ask the loop to save and stop at the
  next step boundary; a second Ctrl-C stops at once.
* :func:`plot_training`: ``loss.png`` of the train and validation curves.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from inheritune.checkpoint import atomic_write_text


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
    """log.jsonl writer (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.is_file():  # drop lines of steps the resumed run will redo
            keep = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            atomic_write_text(path, "".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            _append_log(self.path, record)


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(out: Path, evals: list[dict], log_path: Path) -> None:
    from inheritune import plots

    train = [r for r in read_log(log_path) if r.get("kind") == "train"]
    curves = {
        "train loss": ([r["tokens"] for r in train], [r["loss"] for r in train]),
        "validation loss": ([e["tokens"] for e in evals], [e["val_loss"] for e in evals]),
    }
    plots.plot_curves(curves, out / "loss.png", title="training")
