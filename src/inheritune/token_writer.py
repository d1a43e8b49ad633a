"""The files of a token folder while ``inheritune prepare`` writes it, and how it is finished.

``prepare.json`` (the plan: corpus and tokenizer fingerprints, options, format) marks an
unfinished folder; :func:`check_folder` continues one only under the same plan and refuses
foreign folders; :func:`locked` lets one prepare at a time write it. ``progress.json``
(:class:`Progress`) records the state after the last shard that :class:`Appender` appended to
``tokens.bin`` (and, with ``val_docs_every``, to ``val.bin``), so a rerun truncates a half-done
append. :func:`finish` puts the validation documents after the training ones, writes
``meta.json`` (its presence means finished) and deletes the work files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from inheritune import checkpoint as ckpt
from inheritune import data
from inheritune.data import META_FILE, PLAN_FILE, TOKENS_FILE, DataError, TextSource
from inheritune.tokenize_pool import read_shard

PROGRESS_FILE, SHARDS_DIR, VAL_FILE = "progress.json", "shards", "val.bin"
FORMAT = 1
_IDENTITY = ("corpus_fingerprint", "tokenizer_fingerprint", "max_tokens", "val_docs_every")


@dataclass
class Progress:
    """``progress.json``: the state after the last shard appended to ``tokens.bin``."""

    shards: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    docs: int = 0
    val_docs: int = 0
    input_bytes: int = 0
    complete: bool = False  # input exhausted or max_tokens reached

    @property
    def tokens(self) -> int:
        return self.train_tokens + self.val_tokens


class Appender:
    """Appends shards in order to ``tokens.bin`` (and ``val.bin``), then records progress."""

    def __init__(self, out: Path, plan: dict, progress: Progress):
        self.out, self.plan, self.p = out, plan, progress
        self.itemsize = np.dtype(plan["dtype"]).itemsize
        self.every = plan["val_docs_every"]
        self.train = self._open(TOKENS_FILE, progress.train_tokens)
        self.val = self._open(VAL_FILE, progress.val_tokens) if self.every else None

    def _open(self, name: str, tokens: int):
        """Open for appending after ``tokens`` tokens, dropping anything a killed run wrote past
        the last recorded shard."""
        path = self.out / name
        f = open(path, "r+b" if path.exists() else "w+b")  # noqa: SIM115 - closed in close()
        size = os.fstat(f.fileno()).st_size
        if size < tokens * self.itemsize:
            f.close()
            raise DataError(
                f"{path} is shorter than {PROGRESS_FILE} records (lost writes?); delete "
                f"{self.out} and prepare again"
            )
        f.truncate(tokens * self.itemsize)
        f.seek(0, os.SEEK_END)
        return f

    def append(self, path: Path, expected_pieces: int, nbytes: int) -> None:
        try:
            lengths, ends, toks = read_shard(path)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{path} is unreadable ({e}); delete it and rerun") from e
        if len(lengths) != expected_pieces or int(lengths.sum()) != len(toks):
            raise DataError(
                f"{path} does not match the input ({len(lengths)} documents, expected "
                f"{expected_pieces}); delete {self.out} and prepare again"
            )
        max_tokens = self.plan["max_tokens"]
        if max_tokens is not None and self.p.tokens + len(toks) >= max_tokens:
            keep = max_tokens - self.p.tokens
            starts = np.cumsum(lengths) - lengths
            kept = np.clip(keep - starts, 0, lengths)
            ends = ends & (kept == lengths)  # a document cut short has no EOS and is not counted
            lengths, toks = kept, toks[:keep]
            self.p.complete = True
        if self.every:
            # document index of each piece: documents before it end with an `end` piece
            doc = self.p.docs + np.concatenate([[0], np.cumsum(ends[:-1])]).astype(np.int64)
            is_val = doc % self.every == self.every - 1
            tok_val = np.repeat(is_val, lengths)
            self.train.write(toks[~tok_val].tobytes())
            self.val.write(toks[tok_val].tobytes())
            n_val = int(tok_val.sum())
            self.p.val_tokens += n_val
            self.p.train_tokens += len(toks) - n_val
            self.p.val_docs += int((ends & is_val).sum())
        else:
            self.train.write(toks.tobytes())
            self.p.train_tokens += len(toks)
        self.p.docs += int(ends.sum())
        self.p.input_bytes += nbytes
        self.p.shards += 1
        self.save()
        path.unlink()

    def save(self) -> None:
        for f in (self.train, self.val):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
        ckpt.atomic_write_json(self.out / PROGRESS_FILE, asdict(self.p))

    def close(self) -> None:
        for f in (self.train, self.val):
            if f is not None:
                f.close()


def make_plan(source: TextSource, tokenizer, max_tokens, val_docs_every, shard_mb) -> dict:
    """The plan of a new folder: what its tokens are made from and how (``prepare.json``)."""
    return {
        "format": FORMAT,
        "corpus": source.name,
        "corpus_fingerprint": source.fingerprint(),
        "tokenizer_fingerprint": data.tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "dtype": data.token_dtype(len(tokenizer)).name,
        "max_tokens": max_tokens,
        "val_docs_every": val_docs_every,
        "shard_bytes": max(1, int(shard_mb * 1e6)),
    }


def _differences(old: dict, plan: dict) -> list[str]:
    """Identity keys where ``old`` (a meta or plan, maybe from an older version) differs."""
    defaults = {"max_tokens": None, "val_docs_every": 0}
    return [k for k in _IDENTITY if old.get(k, defaults.get(k)) != plan.get(k)]


def check_folder(out: Path, plan: dict) -> dict | None:
    """The plan to continue in ``out`` (None: already finished); refuses foreign folders."""
    if (out / META_FILE).is_file():
        meta = json.loads((out / META_FILE).read_text())
        diff = _differences(meta, plan)
        if diff:
            raise DataError(
                f"{out} already holds tokens prepared with another {', '.join(diff)}; choose "
                f"another --out or delete it"
            )
        return None
    if (out / PLAN_FILE).is_file():
        old = json.loads((out / PLAN_FILE).read_text())
        diff = _differences(old, plan)
        if old.get("format") != FORMAT or diff:
            raise DataError(
                f"{out} holds an unfinished prepare with another {', '.join(diff) or 'format'}; "
                f"rerun that one, or delete {out} (or choose another --out)"
            )
        return old  # its shard size too: shard numbers must mean the same text
    if any(f.name != ".lock" for f in out.iterdir()):
        raise DataError(f"{out} is not empty and not a token folder; choose another --out")
    ckpt.atomic_write_json(out / PROGRESS_FILE, asdict(Progress()))
    ckpt.atomic_write_json(out / PLAN_FILE, plan)
    return plan


@contextlib.contextmanager
def locked(out: Path):
    """One prepare per folder at a time (two commands may find the same cold cache)."""
    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another prepare of {out} ...", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def finish(out: Path, plan: dict, p: Progress) -> dict:
    """Put validation documents after the training ones, write meta.json, drop the work files."""
    itemsize = np.dtype(plan["dtype"]).itemsize
    if plan["val_docs_every"]:
        with open(out / TOKENS_FILE, "r+b") as dst, open(out / VAL_FILE, "rb") as src:
            dst.truncate(p.train_tokens * itemsize)  # a killed earlier finish() may have appended
            dst.seek(0, os.SEEK_END)
            shutil.copyfileobj(src, dst, 1 << 24)
            dst.flush()
            os.fsync(dst.fileno())
    meta = {
        "corpus": plan["corpus"],
        "corpus_fingerprint": plan["corpus_fingerprint"],
        "tokenizer_fingerprint": plan["tokenizer_fingerprint"],
        "vocab_size": plan["vocab_size"],
        "eos_token_id": plan["eos_token_id"],
        "dtype": plan["dtype"],
        "num_tokens": p.tokens,
        "num_docs": p.docs,
        "input_bytes": p.input_bytes,
        "max_tokens": plan["max_tokens"],
        "val_docs_every": plan["val_docs_every"],
    }
    if plan["val_docs_every"]:
        meta.update(split=p.train_tokens, val_tokens=p.val_tokens, val_docs=p.val_docs)
        meta["val_rule"] = f"every {plan['val_docs_every']}-th document, stored last"
    else:
        meta["val_rule"] = "the last val_fraction (default 5%) of the tokens"
    ckpt.atomic_write_json(out / META_FILE, meta)
    for name in (PROGRESS_FILE, PLAN_FILE, VAL_FILE, ".lock"):  # finished: nothing to lock
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    return meta
