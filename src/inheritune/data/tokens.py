"""Token folders: a tokenised corpus as one flat memory-mapped file, and its identity.

A finished folder holds ``tokens.bin`` (uint16 when the vocabulary fits, else uint32:
:func:`token_dtype`) and ``meta.json``, written last by :mod:`inheritune.data.prepare`.
:func:`open_tokens` maps it read-only into :class:`Tokens`, whose validation split is the last
:data:`VAL_FRACTION` of the tokens (deterministic, never seen by training) or, in a folder
prepared with ``--val-docs-every N``, every N-th document (stored after the training ones).
Documents are joined with the EOS token. :func:`token_cache_folder` names the cache entry under
``$INHERITUNE_CACHE/tokens`` by corpus and :func:`tokenizer_fingerprint`; a folder made by
another tokenizer is refused with :class:`TokenizerMismatchError`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inheritune.data.sources import META_FILE, PLAN_FILE, TOKENS_FILE, DataError, TextSource
from inheritune.models import assets

VAL_FRACTION = 0.05


class TokenizerMismatchError(DataError):
    """Cached tokens were made by a different tokenizer than the model's."""


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
