"""The tokeniser processes of ``inheritune prepare``: one shard of text in, one shard file out.

An :class:`Encoder` tokenises a shard's pieces with batched fast-tokenizer calls (EOS after every
document's last piece) and writes ``shard-NNNNN.bin`` atomically (temporary name, fsync, rename);
:func:`read_shard` reads it back. :class:`Workers` runs the encoder in a pool of processes
(forked on Linux; one core each, Ctrl-C left to the main process, gone when the main process
dies), or in this process when one is asked for. :mod:`inheritune.prepare` decides what to
tokenise and appends the shard files in order.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

from inheritune import data
from inheritune.readers import Piece

_BATCH_CHARS = 1 << 18  # texts per fast-tokenizer call: bounds the Encoding objects alive at once


def available_cpus() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


class Encoder:
    """Turns a shard's texts into one flat token array with batched fast-tokenizer calls.

    It holds a copy of the fast tokenizer's Rust backend (what ``tokenizer(list_of_texts)``
    calls, minus the Python conversion of offsets and masks), so workers need no transformers.
    Tokenizers without a backend are called as they are.
    """

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.tokenizer = None if backend is not None else tokenizer
        self.backend = None
        if backend is not None:
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_str(backend.to_str())
            # transformers sets this before each call; do the same so special-token text in the
            # corpus is handled exactly as tokenizer(...) handles it
            self.backend.encode_special_tokens = bool(
                getattr(tokenizer, "split_special_tokens", False)
            )
        self.eos = tokenizer.eos_token_id
        self.dtype = data.token_dtype(len(tokenizer))

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def write_shard(self, path: Path, texts: list[str], ends: list[bool]) -> int:
        """Tokenise one shard and write it atomically; returns its number of tokens."""
        lengths = np.empty(len(texts), dtype=np.int64)
        chunks: list[np.ndarray] = []
        i = 0
        for batch in _batches(texts):
            for ids in self.encode(batch):
                if ends[i] and self.eos is not None:
                    ids.append(self.eos)
                lengths[i] = len(ids)
                chunks.append(np.asarray(ids, dtype=self.dtype))
                i += 1
        tokens = np.concatenate(chunks) if chunks else np.empty(0, dtype=self.dtype)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, lengths)
            np.save(f, np.asarray(ends, dtype=bool))
            np.save(f, tokens)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return int(tokens.size)


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shard file written by :meth:`Encoder.write_shard`: (lengths, ends, tokens), one length
    and one document-end flag per piece."""
    with open(path, "rb") as f:
        return np.load(f), np.load(f), np.load(f)


def _batches(texts: list[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_WORKER: Encoder | None = None  # the encoder of a worker process, set by _start_worker


def _start_worker(encoder: Encoder) -> None:
    global _WORKER
    _WORKER = encoder
    # One process, one core: N processes are the parallelism (the Rust thread pool would
    # oversubscribe), and Ctrl-C is handled by the main process, which lets running shards finish.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A killed main process leaves its workers waiting on a queue nobody closes (they hold its
    other end themselves), and holding the folder's lock: end them within half a second."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _worker_shard(path: Path, texts: list[str], ends: list[bool]) -> int:
    assert _WORKER is not None
    return _WORKER.write_shard(path, texts, ends)


class Workers:
    """Shard tokenisation in a pool of ``num_proc`` processes, or in this process for one."""

    def __init__(self, encoder: Encoder, num_proc: int):
        self.encoder = encoder
        self.pool: ProcessPoolExecutor | None = None
        if num_proc > 1:
            # fork: workers start in milliseconds with the tokenizer already in memory
            method = "fork" if sys.platform == "linux" else "spawn"
            self.pool = ProcessPoolExecutor(
                num_proc,
                mp_context=multiprocessing.get_context(method),
                initializer=_start_worker,
                initargs=(encoder,),
            )

    def submit(self, path: Path, pieces: list[Piece]) -> Future:
        texts, ends = [p.text for p in pieces], [p.end for p in pieces]
        if self.pool is not None:
            return self.pool.submit(_worker_shard, path, texts, ends)
        fut: Future = Future()
        fut.set_result(self.encoder.write_shard(path, texts, ends))
        return fut

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
