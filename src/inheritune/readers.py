"""Read a resolved corpus's text in input order, as documents or pieces of long documents.

:func:`iter_pieces` streams a :class:`~inheritune.data.TextSource` (what
:func:`inheritune.data.resolve_data` makes of a ``--data`` argument): a ``.txt`` file is one
document, read in ~1 MB pieces cut at line ends so memory stays flat; a ``.jsonl`` line's text
field is one document; a parquet/json row or a streamed hub row (through Hugging Face
``datasets``) is one document. :mod:`inheritune.prepare` tokenises these pieces.

Text input must be text: a ``.txt`` that is not valid UTF-8 (or whose characters are more than
1% U+FFFD/NUL), a ``.jsonl`` line or a parquet/hub row without the text field is refused with a
:class:`~inheritune.data.DataError` naming the file and where; ``lossy_text`` accepts undecodable
bytes on purpose.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from inheritune.data import DataError, TextSource, parse_hub

PIECE_BYTES = 1 << 20  # long .txt files are streamed in ~1 MB pieces cut at line ends
MAX_BAD_CHAR_SHARE = 0.01  # a .txt piece with more U+FFFD/NUL characters than this is not text
_LOSSY_HINT = "pass --lossy-text to replace undecodable bytes on purpose"


class Piece(NamedTuple):
    """A document, or one piece of a long ``.txt`` document; EOS follows a document's last piece."""

    text: str
    end: bool  # the document's last piece
    nbytes: int  # input bytes it stands for (progress, shard sizes)


def _cut_point(buf: bytes) -> int:
    """Where to end a piece of ``buf``: after its last line end, else its last space, else at a
    character boundary (never inside a UTF-8 sequence)."""
    for sep in (b"\n", b" "):
        i = buf.rfind(sep)
        if i >= 0:
            return i + 1
    i = len(buf) - 1
    while i > 0 and buf[i] & 0xC0 == 0x80:  # continuation byte: back up to its lead byte
        i -= 1
    return max(i, 1)


def _decode_txt(raw: bytes, path: Path, offset: int, lossy: bool) -> str:
    try:
        text = raw.decode("utf-8", errors="replace" if lossy else "strict")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid UTF-8 at byte {offset + e.start} ({e.reason}): not a text file, "
            f"or text in another encoding (convert it to UTF-8); {_LOSSY_HINT}"
        ) from None
    if not lossy:
        bad = text.count("\ufffd") + text.count("\x00")
        if bad > MAX_BAD_CHAR_SHARE * len(text):
            raise DataError(
                f"{path}: {bad} of {len(text)} characters from byte {offset} on are U+FFFD or NUL "
                f"(more than {MAX_BAD_CHAR_SHARE:.0%}): binary, UTF-16 or already lossily "
                f"decoded, not text; {_LOSSY_HINT}"
            )
    # Universal newlines, as text-mode reading gives: CR LF and lone CR become LF.
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _iter_txt(path: Path, lossy: bool) -> Iterator[Piece]:
    """One document per file, read in ~1 MB pieces cut at line ends so memory stays flat."""

    def raw_pieces() -> Iterator[bytes]:
        pending = b""
        with open(path, "rb") as f:
            while True:
                block = f.read(PIECE_BYTES)
                if len(block) < PIECE_BYTES:  # end of file
                    if pending or block:
                        yield pending + block
                    return
                buf = pending + block
                cut = _cut_point(buf)
                yield buf[:cut]
                pending = buf[cut:]

    offset, prev = 0, None
    for raw in raw_pieces():
        if prev is not None:
            yield Piece(_decode_txt(prev, path, offset, lossy), False, len(prev))
            offset += len(prev)
        prev = raw
    if prev is not None:
        yield Piece(_decode_txt(prev, path, offset, lossy), True, len(prev))


def _iter_jsonl(path: Path, field: str, lossy: bool) -> Iterator[Piece]:
    """One document per line's ``field``; lines without it are refused, naming what they hold."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8", errors="replace" if lossy else "strict")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid UTF-8 at byte {e.start} of the line ({e.reason}); "
                    f"{_LOSSY_HINT}"
                ) from None
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{lineno}: a JSON {type(row).__name__}, not an object with a "
                    f"{field!r} field"
                )
            if field not in row:
                raise DataError(
                    f"{path}:{lineno}: no {field!r} field; this line's fields are "
                    f"{sorted(row)[:20]} (choose one with --text-field)"
                )
            value = row[field]
            if not isinstance(value, str):
                raise DataError(
                    f"{path}:{lineno}: field {field!r} holds {type(value).__name__}, not text"
                )
            yield Piece(value, True, len(raw))


def open_hub_dataset(spec: str):
    """``hf:NAME[:CONFIG][@REVISION]`` as a streaming ``datasets`` train split (parquet-backed
    repositories; ``datasets`` >= 4 runs no dataset scripts). NAME may be a local folder laid
    out like a hub repository."""
    datasets = _import_datasets()
    name, config, revision = parse_hub(spec)
    try:
        return datasets.load_dataset(name, config, split="train", streaming=True, revision=revision)
    except Exception as e:
        if "scripts are no longer supported" in str(e):
            hint = (
                f"this repository needs a dataset script, which `datasets` >= 4 refuses; its "
                f"parquet export may work: hf:{name}{':' + config if config else ''}"
                f"@refs/convert/parquet"
            )
        else:
            hint = "offline, pass local .parquet/.jsonl files of the same corpus instead"
        raise DataError(f"could not open hub dataset {spec!r} ({e}); {hint}") from e


def _import_datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise DataError(
            "Hugging Face datasets inputs need `pip install inheritune[datasets]`"
        ) from e
    return datasets


def _dataset_pieces(ds, field: str, where: str) -> Iterator[Piece]:
    """Rows of a streaming ``datasets`` split, one document per row's ``field``."""
    columns = ds.column_names  # None while the features are unknown (some json files)
    if columns is not None:
        if field not in columns:
            raise DataError(
                f"{where}: no {field!r} column; its columns are {columns} "
                f"(choose one with --text-field)"
            )
        ds = ds.select_columns([field])
    row = 0
    for batch in ds.iter(batch_size=1000):
        values = batch.get(field)
        if values is None:
            raise DataError(
                f"{where}: row {row}: no {field!r} field; its fields are {sorted(batch)}"
            )
        for value in values:
            if not isinstance(value, str):
                raise DataError(
                    f"{where}: row {row}: {field!r} holds {type(value).__name__}, not text"
                )
            yield Piece(value, True, len(value.encode("utf-8")))
            row += 1


def _iter_datasets(source: TextSource) -> Iterator[Piece]:
    if not source.files:
        ds = open_hub_dataset(source.hf_name or "")
        yield from _dataset_pieces(ds, source.text_field, f"hub dataset {source.hf_name!r}")
        return
    datasets = _import_datasets()
    for f in source.files:  # one file at a time, so that errors name the file
        fmt = "parquet" if f.suffix.lower() == ".parquet" else "json"
        try:
            ds = datasets.load_dataset(fmt, data_files=[str(f)], split="train", streaming=True)
        except Exception as e:
            raise DataError(f"{f}: could not be read as {fmt} ({e})") from e
        yield from _dataset_pieces(ds, source.text_field, str(f))


def iter_pieces(source: TextSource) -> Iterator[Piece]:
    """Stream the corpus in input order: documents, long ``.txt`` documents in pieces."""
    if source.kind == "txt":
        for f in source.files:
            yield from _iter_txt(f, source.lossy_text)
    elif source.kind == "jsonl":
        for f in source.files:
            yield from _iter_jsonl(f, source.text_field, source.lossy_text)
    elif source.kind == "hf":
        yield from _iter_datasets(source)
    else:
        raise DataError(f"{source.name} is already tokenised")


def iter_documents(source: TextSource) -> Iterator[str]:
    """The texts of :func:`iter_pieces` (documents, or pieces of very long ones)."""
    for piece in iter_pieces(source):
        yield piece.text
