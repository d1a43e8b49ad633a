"""Corpora in, token windows out.

A ``--data`` argument is one of:

* a default name (``shakespeare``), prepared from packages by :mod:`inheritune.assets`;
* a ``.txt`` file, or a folder of ``.txt`` files (recursive, sorted; one document per file);
* a ``.jsonl`` file (or a folder of them) whose lines carry a ``text`` field;
* a local ``.parquet``/``.json`` file or a folder of ``.parquet`` files, read through Hugging
  Face ``datasets``; or ``hf:NAME[:CONFIG][@REVISION]``, a parquet-backed hub dataset streamed
  through ``datasets`` (NAME may be a local folder laid out like a hub repository; see the
  presets for OpenWebText and FineWeb-edu);
* a token folder written by ``inheritune prepare`` (``meta.json`` + ``tokens.bin``).

:func:`resolve_data` classifies the argument into a :class:`TextSource`;
:mod:`inheritune.readers` streams its text (and refuses text input that is not text). Text is
tokenised once, in parallel and resumably, by :func:`inheritune.prepare.prepare_tokens`
into a flat memory-mapped token file (uint16 when the vocabulary fits, else uint32);
:func:`load_tokens` caches it under ``$INHERITUNE_CACHE/tokens`` by corpus and tokenizer
fingerprint. Documents are joined with the EOS token. The validation split is the last
``val_fraction`` of the tokens (deterministic, never seen by training), or, in a folder prepared
with ``--val-docs-every N``, every N-th document (stored after the training documents).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inheritune import assets

DEFAULT_CORPORA = {
    assets.DEFAULT_CORPUS: assets.ensure_default_corpus,
    assets.GENERAL_CORPUS: assets.ensure_general_corpus,  # general English, a second val set
}
VAL_FRACTION = 0.05
META_FILE, TOKENS_FILE = "meta.json", "tokens.bin"  # a finished token folder
PLAN_FILE = "prepare.json"  # present while `inheritune prepare` is (or was, if killed) writing
_FILE_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "hf", ".json": "hf"}
_FOLDER_SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataError(ValueError):
    """The data argument is missing, empty, too short, not text or of an unknown kind."""


class TokenizerMismatchError(DataError):
    """Cached tokens were made by a different tokenizer than the model's."""


@dataclass(frozen=True)
class TextSource:
    """A resolved corpus: its kind, its files (or hub name), a display name and how to read it."""

    name: str
    kind: str  # "txt" | "jsonl" | "hf" | "tokens"
    files: tuple[Path, ...] = ()
    hf_name: str | None = None  # NAME[:CONFIG][@REVISION] of a hub (or local repo-layout) dataset
    text_field: str = "text"
    lossy_text: bool = False  # replace undecodable bytes instead of refusing the file

    def fingerprint(self) -> str:
        """Identity of the corpus content: names, sizes and modification times of its files.

        ``lossy_text`` is left out on purpose: a corpus that decodes cleanly gives the same tokens
        either way, so a prepare stopped by one bad file can be finished with ``--lossy-text``.
        """
        h = hashlib.sha256(f"{self.kind}|{self.hf_name}|{self.text_field}".encode())
        for f in self.files or _local_repo_files(self.hf_name):
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()


def parse_hub(spec: str) -> tuple[str, str | None, str | None]:
    """``NAME[:CONFIG][@REVISION]`` -> (name, config, revision)."""
    rest, _, revision = spec.partition("@")
    name, _, config = rest.partition(":")
    if not name:
        raise DataError(f"hf:{spec}: no dataset name (use hf:NAME[:CONFIG][@REVISION])")
    return name, config or None, revision or None


def _local_repo_files(spec: str | None) -> tuple[Path, ...]:
    """The files of ``hf:FOLDER`` when FOLDER is a local repository layout (for the fingerprint)."""
    if not spec:
        return ()
    folder = Path(parse_hub(spec)[0]).expanduser()
    if not folder.is_dir():
        return ()
    return tuple(sorted(p for p in folder.rglob("*") if p.is_file()))


def resolve_data(arg: str, text_field: str = "text", lossy_text: bool = False) -> TextSource:
    """Classify a data argument, preparing embedded defaults; raises :class:`DataError`."""
    opts = {"text_field": text_field, "lossy_text": lossy_text}
    if arg in DEFAULT_CORPORA:
        folder = DEFAULT_CORPORA[arg]()
        return TextSource(arg, "txt", tuple(sorted(folder.glob("*.txt"))), **opts)
    if arg.startswith("hf:"):
        parse_hub(arg[3:])
        return TextSource(arg, "hf", hf_name=arg[3:], **opts)
    path = Path(arg).expanduser()
    if path.is_dir():
        if (path / META_FILE).is_file() and (path / TOKENS_FILE).is_file():
            return TextSource(path.name, "tokens", (path,))
        if (path / PLAN_FILE).is_file():  # unfinished: open_tokens says how to finish it
            return TextSource(path.name, "tokens", (path,))
        found: dict[str, list[Path]] = {}
        for p in sorted(path.rglob("*")):
            if p.suffix.lower() in _FOLDER_SUFFIXES and p.is_file():
                found.setdefault(p.suffix.lower(), []).append(p)
        if not found:
            raise DataError(f"folder {path} holds no .txt, .jsonl or .parquet files")
        if len(found) > 1:
            counts = ", ".join(f"{len(v)} {k}" for k, v in found.items())
            raise DataError(f"folder {path} mixes kinds of data files ({counts}); keep one kind")
        ((suffix, files),) = found.items()
        return TextSource(path.name, _FILE_KINDS[suffix], tuple(files), **opts)
    if path.is_file():
        kind = _FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise DataError(
                f"{path}: unsupported data file type {path.suffix!r} "
                f"(use .txt, .jsonl, .parquet, .json)"
            )
        return TextSource(path.stem, kind, (path,), **opts)
    raise DataError(
        f"no such data file, folder or name: {arg!r}. Known names: {sorted(DEFAULT_CORPORA)}"
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer: its full serialised vocabulary and rules."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = (
        backend.to_str()
        if backend is not None
        else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Tokens:
    """A tokenised corpus: a flat memory-mapped array and its split point."""

    path: Path
    ids: np.ndarray  # (N,) uint16 or uint32, memory-mapped
    meta: dict
    val_fraction: float = VAL_FRACTION

    @property
    def split(self) -> int:
        """Where validation starts: recorded by a document-level split (``--val-docs-every``,
        validation documents stored last), else before the last ``val_fraction`` of the tokens."""
        if "split" in self.meta:
            return int(self.meta["split"])
        return len(self.ids) - int(len(self.ids) * self.val_fraction)

    @property
    def train(self) -> np.ndarray:
        return self.ids[: self.split]

    @property
    def val(self) -> np.ndarray:
        return self.ids[self.split :]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def open_tokens(folder: Path, tokenizer=None, val_fraction: float = VAL_FRACTION) -> Tokens:
    """Open a token folder, refusing it if ``tokenizer`` is not the one that made it."""
    folder = Path(folder)
    meta_path, bin_path = folder / META_FILE, folder / TOKENS_FILE
    if not meta_path.is_file() and (folder / PLAN_FILE).is_file():
        raise DataError(
            f"{folder} is an unfinished token folder (its prepare was interrupted); rerun "
            f"`inheritune prepare` with the same arguments to finish it"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(
            f"token cache {folder} is unreadable ({e}); delete it to re-tokenise"
        ) from e
    if tokenizer is not None and meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(
        tokenizer
    ):
        raise TokenizerMismatchError(
            f"the tokens in {folder} were made by a different tokenizer (vocab {meta.get('vocab_size')}) "
            f"than this model's (vocab {len(tokenizer)}); pass the raw text instead so it is "
            f"re-tokenised with the model's tokenizer"
        )
    dtype = np.dtype(meta["dtype"])
    expected = meta["num_tokens"] * dtype.itemsize
    if not bin_path.is_file() or bin_path.stat().st_size != expected:
        raise DataError(f"token cache {folder} is truncated or corrupt; delete it to re-tokenise")
    if meta["num_tokens"] == 0:
        raise DataError(f"corpus {meta.get('corpus')!r} is empty: it has no tokens")
    ids = np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta["num_tokens"],))
    return Tokens(folder, ids, meta, val_fraction)


def token_cache_folder(
    source: TextSource, tokenizer, max_tokens: int | None = None, val_docs_every: int = 0
) -> Path:
    """Where :func:`load_tokens` keeps ``source`` tokenised by ``tokenizer`` (and options)."""
    key = f"{source.fingerprint()}|{tokenizer_fingerprint(tokenizer)}"
    if max_tokens is not None or val_docs_every:  # the defaults keep the keys of older caches
        key += f"|max_tokens={max_tokens}|val_docs_every={val_docs_every}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return assets.cache_dir() / "tokens" / f"{source.name}-{digest}"


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

    The cold path is :func:`inheritune.prepare.prepare_tokens`, the code behind ``inheritune
    prepare``: ``num_proc`` processes (default: every available core), resumable.
    ``text_field`` and ``lossy_text`` apply when ``data`` is a string.
    """
    source = resolve_data(data, text_field, lossy_text) if isinstance(data, str) else data
    if source.kind == "tokens":
        return open_tokens(source.files[0], tokenizer, val_fraction)
    folder = token_cache_folder(source, tokenizer)
    if not (folder / META_FILE).is_file():
        from inheritune.prepare import prepare_tokens  # prepare builds on this module

        prepare_tokens(source, tokenizer, folder, num_proc=num_proc)
    return open_tokens(folder, tokenizer, val_fraction)


def check_length(split: np.ndarray, seq_len: int, what: str, min_windows: int = 1) -> None:
    """Raise unless ``split`` holds ``min_windows`` windows of ``seq_len`` tokens."""
    if len(split) == 0:
        raise DataError(f"the {what} split is empty: the corpus has too little text")
    if len(split) < seq_len * min_windows:
        raise DataError(
            f"the {what} split has {len(split)} tokens, fewer than {min_windows} window(s) of "
            f"--seq-len {seq_len}; use a shorter --seq-len or more data"
        )


def sample_windows(split: np.ndarray, num: int, seq_len: int, seed: int) -> np.ndarray:
    """``num`` windows of ``seq_len`` tokens at random (seeded) start positions: (num, seq_len)."""
    check_length(split, seq_len, "sampled")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(split) - seq_len + 1, size=num)
    return np.stack([np.asarray(split[s : s + seq_len], dtype=np.int64) for s in starts])


def fixed_windows(split: np.ndarray, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows from the start of ``split``: (n, seq_len)."""
    check_length(split, seq_len, "evaluation")
    n = len(split) // seq_len
    if max_tokens is not None:
        n = max(1, min(n, max_tokens // seq_len))
    return np.asarray(split[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


# ----------------------------------------------------------------------------- windows


class WindowSampler:
    """Global batches of window start positions from a seeded per-epoch permutation.

    Window i covers tokens [i*T, i*T + T + 1) of the split. ``(epoch, cursor)`` is the data
    position; a batch that would run past the end of an epoch starts the next epoch instead.
    """

    def __init__(self, num_tokens: int, seq_len: int, seed: int):
        self.seq_len = seq_len
        self.seed = seed
        self.num_windows = (num_tokens - 1) // seq_len
        self.epoch = 0
        self.cursor = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = (self.epoch, rng.permutation(self.num_windows))
        return self._perm[1]

    def next_starts(self, batch: int) -> np.ndarray:
        """Token offsets of the next ``batch`` windows: (batch,)."""
        if self.cursor + batch > self.num_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
        idx = self._permutation()[self.cursor : self.cursor + batch]
        self.cursor += batch
        return idx.astype(np.int64) * self.seq_len

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def gather_windows(split: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """(len(starts), seq_len + 1) int64 token windows."""
    return torch.from_numpy(
        np.stack([np.asarray(split[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    )


def eval_windows(tokens: Tokens, seq_len: int, eval_tokens: int) -> np.ndarray:
    """Fixed validation windows, (n, seq_len + 1) int64: inputs are ``w[:, :-1]``, targets
    ``w[:, 1:]``.

    Consecutive windows from the start of the validation split, each sharing its last token with
    the next one's first, so every validation token is predicted once. n = eval_tokens // seq_len
    (at least 1), capped by the split. The same array at every evaluation and in every run.
    """
    val = tokens.val
    check_length(val, seq_len + 1, "validation")
    n = min((len(val) - 1) // seq_len, max(1, eval_tokens // seq_len))
    return np.stack(
        [np.asarray(val[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64) for i in range(n)]
    )
