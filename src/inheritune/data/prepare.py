"""``inheritune prepare``: tokenise a corpus once, in parallel and resumably, into a token folder.

``inheritune prepare --model M --data D --num-proc N [--out DIR]`` writes a folder that every
command accepts as ``--data DIR`` (and, with the default options, the cache entry that
``--data D`` finds); :func:`load_tokens` runs the same :func:`prepare_tokens` when its cache is
cold. Read it with ``inheritune.data.open_tokens(DIR).ids``.

How it works. The corpus is streamed in input order (:func:`inheritune.data.sources.iter_pieces`)
and cut into shards of about ``shard_mb`` MB of text. :class:`Workers` runs an :class:`Encoder`
in a pool of processes (forked on Linux; one core each, Ctrl-C left to the main process, gone
when the main process dies), or in this process when one is asked for. Each tokenises whole
shards (batched fast-tokenizer calls, EOS after every document) and writes
``shards/shard-NNNNN.bin`` atomically (temporary name, fsync, rename: a half-written shard never
has the final name; :func:`read_shard` reads one back). The main process's :class:`Appender`
appends finished shards to ``tokens.bin`` strictly in shard order, records the appended length
in ``progress.json`` (:class:`Progress`) and deletes the shard, so the result is the same bytes
for any number of processes, memory stays at a few shards, and disk at about one copy.

Resuming: ``prepare.json`` (the plan from :func:`make_plan`: corpus and tokenizer fingerprints,
options, format) marks an unfinished folder. :func:`check_folder` continues one only under the
same plan and refuses foreign folders, and :func:`locked` lets one prepare at a time write it.
A rerun truncates ``tokens.bin`` to the recorded length (dropping a half-done append), reuses the
shard files already written, re-reads the input up to where it stopped and tokenises only the
rest. :func:`finish` puts the validation documents after the training ones, writes
``meta.json`` (its presence means finished) and deletes the work files.

Validation split: by default the last 5% of the tokens (chosen when the folder is opened).
``val_docs_every=N`` instead sends every N-th document to validation; those documents are stored
after all training documents and ``meta.json`` records the split point.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from inheritune import storage as ckpt
from inheritune.config import ConfigError, check_positive, flag, save_resolved, validate_numbers
from inheritune.data import sources as readers
from inheritune.data import tokens as data
from inheritune.data.sources import DataError, Piece, TextSource, resolve_data
from inheritune.data.tokens import (
    META_FILE,
    PLAN_FILE,
    TOKENS_FILE,
    VAL_FRACTION,
    Tokens,
    open_tokens,
    token_cache_folder,
)
from inheritune.models import assets

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
    from inheritune.models import loading as models

    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    source = resolve_data(cfg.data, cfg.text_field, cfg.lossy_text)
    if source.kind == "tokens":
        raise ConfigError(f"{flag('data')} {cfg.data} is already a token folder")
    every = cfg.val_docs_every or source.val_docs_every  # brown: its own held-out samples
    default_out = token_cache_folder(source, tokenizer, cfg.max_tokens, every)
    out = Path(cfg.out) if cfg.out else default_out
    result = prepare_tokens(
        source,
        tokenizer,
        out,
        num_proc=cfg.num_proc or None,
        max_tokens=cfg.max_tokens,
        val_docs_every=every,
        shard_mb=cfg.shard_mb,
        progress=cfg.progress,
    )
    if result.already_done:
        print(f"{out} is already prepared ({result.num_tokens:,} tokens)", file=sys.stderr)
    else:
        save_resolved(cfg, out / "config.yaml")
    same = cfg.max_tokens is None and every == source.val_docs_every and out == default_out
    print(f"use it with --data {out}" + (f" (or --data {cfg.data})" if same else ""))
    return result


def load_tokens(
    data: str | TextSource,
    tokenizer,
    val_fraction: float = VAL_FRACTION,
    *,
    num_proc: int | None = None,
    text_field: str = "text",
    lossy_text: bool = False,
) -> Tokens:
    """Open a corpus tokenised by ``tokenizer``, tokenising it first when the cache is cold.

    The cold path is :func:`inheritune.data.prepare.prepare_tokens`, the code behind ``inheritune
    prepare``: ``num_proc`` processes (default: every available core), resumable.
    ``text_field`` and ``lossy_text`` apply when ``data`` is a string.
    """
    source = resolve_data(data, text_field, lossy_text) if isinstance(data, str) else data
    if source.kind == "tokens":
        return open_tokens(source.files[0], tokenizer, val_fraction)
    every = source.val_docs_every
    folder = token_cache_folder(source, tokenizer, val_docs_every=every)
    if not (folder / META_FILE).is_file():
        prepare_tokens(source, tokenizer, folder, num_proc=num_proc, val_docs_every=every)
    return open_tokens(folder, tokenizer, val_fraction)
