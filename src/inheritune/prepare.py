"""Tokenise a corpus once, in parallel and resumably, into a token folder.

``inheritune prepare --model M --data D --num-proc N [--out DIR]`` writes a folder that every
command accepts as ``--data DIR`` (and, with the default options, the cache entry that
``--data D`` finds); :func:`inheritune.data.load_tokens` runs the same :func:`prepare_tokens`
when its cache is cold. Read it with ``inheritune.data.open_tokens(DIR).ids``.

How it works. The corpus is streamed in input order (:func:`inheritune.readers.iter_pieces`) and
cut into shards of about ``shard_mb`` MB of text. Worker processes (:mod:`inheritune.tokenize_pool`)
tokenise whole shards (batched calls of the fast tokenizer, EOS after every document) and each
writes ``shards/shard-NNNNN.bin`` atomically (temporary name, fsync, rename: a half-written shard
never has the final name). The main process appends finished shards to ``tokens.bin`` strictly in
shard order, records the appended length in ``progress.json`` and deletes the shard
(:mod:`inheritune.token_writer`), so the result is the same bytes for any number of processes,
memory stays at a few shards, and disk at about one copy of the output.

Resuming: ``prepare.json`` (the plan: corpus, tokenizer, options) marks an unfinished folder. A
rerun with the same plan truncates ``tokens.bin`` to the recorded length (dropping a half-done
append), reuses the shard files already written, re-reads the input up to where it stopped and
tokenises only the rest. ``meta.json`` is written last; its presence means finished.

Validation split: by default the last 5% of the tokens (chosen when the folder is opened, as
before). ``val_docs_every=N`` instead sends every N-th document to validation; those documents are
stored after all training documents and ``meta.json`` records the split point.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from inheritune import assets, data, readers
from inheritune.config import ConfigError, check_positive, flag, save_resolved, validate_numbers
from inheritune.data import META_FILE, DataError, TextSource
from inheritune.readers import Piece
from inheritune.token_writer import (
    PROGRESS_FILE,
    SHARDS_DIR,
    Appender,
    Progress,
    check_folder,
    finish,
    locked,
    make_plan,
)
from inheritune.tokenize_pool import Encoder, Workers, available_cpus

DEFAULT_SHARD_MB = 8.0


@dataclass
class PrepareConfig:
    """Settings of ``inheritune prepare``."""

    model: str = field(
        default=assets.DEFAULT_MODEL,
        metadata={
            "help": "model whose tokenizer is used: default name, HF folder, .gguf or hub id"
        },
    )
    data: str = field(
        default=assets.DEFAULT_CORPUS,
        metadata={
            "help": "corpus: default name, .txt file or folder, .jsonl, .parquet, "
            "hf:NAME[:CONFIG][@REVISION]"
        },
    )
    out: str | None = field(
        default=None,
        metadata={
            "help": "token folder to write; default: the cache entry that `--data DATA` of every "
            "other command reads"
        },
    )
    num_proc: int = field(
        default=0, metadata={"help": "tokeniser processes; 0 = every available core"}
    )
    max_tokens: int | None = field(
        default=None, metadata={"help": "stop after exactly this many tokens (default: all)"}
    )
    val_docs_every: int = field(
        default=0,
        metadata={
            "help": "send every N-th document to the validation split (N >= 2); 0 keeps the "
            "token-level split (the last 5%% of the tokens)"
        },
    )
    shard_mb: float = field(
        default=DEFAULT_SHARD_MB,
        metadata={"help": "MB of text per shard: the unit of parallel work and of resuming"},
    )
    text_field: str = field(
        default="text", metadata={"help": "field of .jsonl lines / column of parquet rows"}
    )
    lossy_text: bool = field(
        default=False,
        metadata={"help": "replace undecodable bytes in .txt/.jsonl input instead of refusing"},
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "allow custom tokenizer code from the model folder"}
    )

    def __post_init__(self) -> None:
        validate_numbers(self)  # finite, in range, of the declared type (config.py)
        for name in ("num_proc", "val_docs_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{flag(name)} must be an integer, got {value!r}")
        check_positive("num_proc", self.num_proc, allow_zero=True)
        if self.val_docs_every < 0 or self.val_docs_every == 1:
            raise ConfigError(
                f"{flag('val_docs_every')} must be 0 (token-level split) or >= 2, got "
                f"{self.val_docs_every}"
            )
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 1
        ):
            raise ConfigError(
                f"{flag('max_tokens')} must be an integer >= 1, got {self.max_tokens!r}"
            )
        check_positive("shard_mb", self.shard_mb)
        if not str(self.text_field).strip():
            raise ConfigError(f"{flag('text_field')} must not be empty")
        for name in ("model", "data"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"{flag(name)} must not be empty")


@dataclass
class PrepareResult:
    """What a prepare made (or found already made) and how long this run took."""

    folder: Path
    num_tokens: int
    val_tokens: int  # tokens of the document-level validation split (0: token-level split)
    num_docs: int
    input_bytes: int
    seconds: float  # this run's time
    num_proc: int
    resumed_shards: int  # shards appended by earlier, interrupted runs
    reused_shards: int = 0  # shard files written by earlier runs, appended by this one
    already_done: bool = False


def _shards(pieces: Iterator[Piece], shard_bytes: int) -> Iterator[list[Piece]]:
    """Consecutive groups of pieces of >= ``shard_bytes`` input bytes (the last may be smaller)."""
    shard: list[Piece] = []
    size = 0
    for p in pieces:
        shard.append(p)
        size += p.nbytes
        if size >= shard_bytes:
            yield shard
            shard, size = [], 0
    if shard:
        yield shard


def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return ""  # pragma: no cover


def prepare_tokens(
    source: TextSource,
    tokenizer,
    out: str | Path,
    *,
    num_proc: int | None = None,
    max_tokens: int | None = None,
    val_docs_every: int = 0,
    shard_mb: float = DEFAULT_SHARD_MB,
    progress: bool = True,
) -> PrepareResult:
    """Tokenise ``source`` with ``tokenizer`` into the token folder ``out`` (see the module doc).

    Identical output for any ``num_proc`` (default: every available core); an interrupted run
    continues where it stopped when called again with the same arguments.
    """
    t0 = time.perf_counter()
    num_proc = num_proc or available_cpus()
    out = Path(out)
    if source.kind == "tokens":
        raise DataError(f"{source.files[0]} is already a token folder")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(source, tokenizer, max_tokens, val_docs_every, shard_mb)
    with locked(out):
        kept = check_folder(out, plan)
        if kept is None:
            meta = json.loads((out / META_FILE).read_text())
            return PrepareResult(
                out, meta["num_tokens"], meta.get("val_tokens", 0), meta.get("num_docs", 0),
                meta.get("input_bytes", 0), time.perf_counter() - t0, num_proc, 0,
                already_done=True,
            )  # fmt: skip
        plan = kept
        shards_dir = out / SHARDS_DIR
        shards_dir.mkdir(exist_ok=True)
        for tmp in shards_dir.glob("*.tmp"):  # half-written by a killed run: never data
            tmp.unlink()
        p = Progress(**json.loads((out / PROGRESS_FILE).read_text()))
        resumed = p.shards
        reused = _run(source, tokenizer, out, plan, p, num_proc, progress)
        if p.tokens == 0 or (plan["val_docs_every"] and p.val_tokens == 0):
            shutil.rmtree(out, ignore_errors=True)  # nothing worth keeping
            if p.tokens == 0:
                raise DataError(f"corpus {source.name!r} is empty: it has no text")
            raise DataError(
                f"--val-docs-every {plan['val_docs_every']}: the corpus has {p.docs} "
                f"document(s), too few for one to go to validation"
            )
        meta = finish(out, plan, p)
    seconds = time.perf_counter() - t0
    result = PrepareResult(
        out, p.tokens, p.val_tokens, p.docs, p.input_bytes, seconds, num_proc, resumed, reused
    )
    if progress:
        size = meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
        print(
            f"prepared {source.name}: {p.tokens:,} tokens ({_size(size)}, {p.docs:,} documents) "
            f"from {_size(p.input_bytes)} of text in {seconds:.1f} s "
            f"({num_proc} process{'es' if num_proc > 1 else ''}"
            + (f"; continued: {resumed} + {reused} shards done before" if resumed + reused else "")
            + f") -> {out}",
            file=sys.stderr,
        )
    return result


def _run(
    source: TextSource,
    tokenizer,
    out: Path,
    plan: dict,
    p: Progress,
    num_proc: int,
    show: bool,
) -> int:
    """Stream shards to the workers and append their results in order, until done; returns
    the number of shard files reused from an earlier run."""
    if p.complete:
        return 0
    total = sum(f.stat().st_size for f in source.files) if source.kind in ("txt", "jsonl") else None
    pending: deque[tuple[Path, Future, int, int]] = deque()
    reused = 0
    with contextlib.ExitStack() as stack:  # closed in reverse: workers, bar, files
        appender = Appender(out, plan, p)
        stack.callback(appender.close)
        bar = stack.enter_context(
            tqdm(
                total=total,
                initial=p.input_bytes,
                unit="B",
                unit_scale=True,
                desc=f"tokenising {source.name}",
                disable=not show,
                leave=False,
            )
        )
        t0, tokens0 = time.perf_counter(), p.tokens

        def append_next() -> None:
            path, fut, n_pieces, nbytes = pending.popleft()
            fut.result()  # re-raises a worker's error
            appender.append(path, n_pieces, nbytes)
            rate = (p.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{p.tokens / 1e6:.1f}M tokens, {rate / 1e6:.2f}M tokens/s", False)
            bar.update(nbytes)

        shards = enumerate(_shards(readers.iter_pieces(source), plan["shard_bytes"]))
        first = list(itertools.islice(shards, 2))  # one shard is not worth starting processes
        workers = Workers(Encoder(tokenizer), num_proc if len(first) > 1 else 1)
        stack.callback(workers.close)  # lets running shards finish: their files are kept
        for index, shard in itertools.chain(first, shards):
            if index < p.shards:
                continue  # appended by an earlier run: only re-read
            path = out / SHARDS_DIR / f"shard-{index:05d}.bin"
            if path.exists():  # written by an earlier run, not yet appended
                fut: Future = Future()
                fut.set_result(None)
                reused += 1
            else:
                fut = workers.submit(path, shard)
            pending.append((path, fut, len(shard), sum(x.nbytes for x in shard)))
            while (
                pending and not p.complete and (len(pending) > 2 * num_proc or pending[0][1].done())
            ):
                append_next()
            if p.complete:  # max_tokens reached
                break
        while pending and not p.complete:
            append_next()
        p.complete = True
        appender.save()
    return reused


# ----------------------------------------------------------------------------- the command


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """The ``inheritune prepare`` command: resolve tokenizer and corpus, then tokenise."""
    from inheritune import models

    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    source = data.resolve_data(cfg.data, cfg.text_field, cfg.lossy_text)
    if source.kind == "tokens":
        raise ConfigError(f"{flag('data')} {cfg.data} is already a token folder")
    default_out = data.token_cache_folder(source, tokenizer, cfg.max_tokens, cfg.val_docs_every)
    out = Path(cfg.out) if cfg.out else default_out
    result = prepare_tokens(
        source,
        tokenizer,
        out,
        num_proc=cfg.num_proc or None,
        max_tokens=cfg.max_tokens,
        val_docs_every=cfg.val_docs_every,
        shard_mb=cfg.shard_mb,
        progress=cfg.progress,
    )
    if result.already_done:
        print(f"{out} is already prepared ({result.num_tokens:,} tokens)", file=sys.stderr)
    else:
        save_resolved(cfg, out / "config.yaml")
    same = cfg.max_tokens is None and not cfg.val_docs_every and out == default_out
    print(f"use it with --data {out}" + (f" (or --data {cfg.data})" if same else ""))
    return result
