"""The I/O layer every stage writes through: atomic files and folders, manifests, cached results.

* :func:`atomic_write_text` / :func:`atomic_write_json`: a temporary sibling, fsync, then
  ``os.replace``; a crash leaves the old file or the new one, never half of either.
* :func:`write_folder_atomically`: a folder is populated under a temporary name, every file and
  the folder are fsynced, :func:`write_manifest` records each file's size and sha256 last, and
  the folder is renamed into place. :func:`remove_stale_temporaries` clears what a kill left.
* :func:`read_cached` / :func:`write_cached`: a result file keyed by the settings that shaped it
  (:func:`spec_fingerprint`); reading it under other settings is refused with
  :class:`StaleCacheError` and :func:`spec_diff` says which fields differ.
* Errors: :class:`CheckpointError` for a corrupt or foreign file, :class:`WriteError` for a
  write the disk refused (full, read-only, permissions), printed as one line by the CLI.

Training checkpoints (:mod:`inheritune.training.checkpoint`), model folders
(:mod:`inheritune.models.folders`), token folders, analyses, reports and ``compare``'s cache all
use these, so "written atomically" means the same thing everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, half-written or does not fit this run."""


class WriteError(CheckpointError):
    """The OS refused a write (disk full, read-only, no permission); nothing was replaced."""


# errno values that mean "this place cannot take the write", not a bug in the writer
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def refused_write(err: BaseException) -> str | None:
    """The OS's reason when ``err`` (or an exception it wraps) is a refused write, else None.

    safetensors (Rust) reports the OS error only in its message, ``... (os error 28)``, and
    numpy's ``tofile`` as a short write without an errno.
    """
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = e.errno if isinstance(e, OSError) else None
        if code is None:
            m = re.search(r"\(os error (\d+)\)", str(e))
            code = int(m.group(1)) if m else None
        if code in _WRITE_ERRNOS:
            return os.strerror(code)
        if isinstance(e, OSError) and re.search(r"\d+ requested and \d+ written", str(e)):
            return "short write (is the disk full?)"
        e = e.__cause__ or e.__context__
    return None


def _write_error(path: Path, cause: str) -> WriteError:
    return WriteError(
        f"cannot write {path}: {cause}. Nothing was replaced, so the last good state is intact; "
        f"free space or make {path.parent} writable, then run again"
    )


# ----------------------------------------------------------------------------- atomic file ops


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (folders so that renames inside them are durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems refuse opening folders; durability is best effort there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small file so readers see the old or the new content, never a torn one."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        if cause := refused_write(e):
            raise _write_error(path, cause) from e
        raise
    _fsync_path(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """:func:`atomic_write_text` of ``obj`` as indented JSON (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))
    return path


# ----------------------------------------------------------------------------- cached results
# One scheme for every cache and resumable stage (token folders aside, which data.py keys by
# corpus and tokenizer): a JSON file holds {"spec": <everything the result depends on>, ...};
# it is reused only when the stored spec equals the current one.


def canonical(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` as plain JSON values (paths and tuples become strings and lists)."""
    return json.loads(json.dumps(spec, sort_keys=True, default=str))


def spec_fingerprint(spec: dict[str, Any]) -> str:
    """Short stable hash of a spec."""
    blob = json.dumps(canonical(spec), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def spec_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two specs; nested sections as ``section.key``."""
    old, new = canonical(old), canonical(new)
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += spec_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(prefix + k)
    return out


class StaleCacheError(CheckpointError):
    """A cached result was made with different settings than the current run's."""


def read_cached(path: str | Path, spec: dict[str, Any], strict: bool = True) -> dict | None:
    """The payload stored in ``path`` for ``spec``, or None when there is none.

    A file made for another spec raises :class:`StaleCacheError` naming the differing keys
    (``strict``), or is ignored so the caller recomputes it (``strict=False``).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:  # written atomically: this is outside damage
        raise CheckpointError(f"{path} is corrupt ({e}); delete it to recompute") from e
    diff = spec_diff(stored.get("spec", {}), spec)
    if not diff:
        return stored
    if strict:
        raise StaleCacheError(
            f"{path} was made with different settings (differs in {diff}); use the same "
            f"settings, another --out, or delete it"
        )
    return None


def write_cached(path: str | Path, spec: dict[str, Any], payload: dict[str, Any]) -> Path:
    """Store ``payload`` with its ``spec`` for :func:`read_cached`."""
    return atomic_write_json(path, {"spec": canonical(spec), **payload})


def memoized(folder: str | Path, spec: dict[str, Any], compute: Callable[[], dict]) -> dict:
    """``compute()``'s result, kept in ``folder`` under a name made from ``spec``: a measurement
    or evaluation done once per machine, not once per run. A damaged entry is recomputed and
    rewritten; a cache the disk refuses to write costs a recomputation next time, nothing else."""
    path = Path(folder) / f"{spec_fingerprint(spec)}.json"
    try:
        hit = read_cached(path, spec, strict=False)
    except CheckpointError:
        hit = None
    if hit is not None:
        return {k: v for k, v in hit.items() if k != "spec"}
    result = compute()
    with contextlib.suppress(WriteError):
        write_cached(path, spec, result)
    return result


def write_manifest(folder: Path, meta: dict[str, Any] | None = None) -> None:
    """Record size + sha256 of every file in ``folder``; called last, after everything else."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            _fsync_path(p)
            files[str(p.relative_to(folder))] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format": FORMAT_VERSION, **(meta or {}), "files": files}
    path = folder / MANIFEST
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_folder_atomically(final: Path, populate: Callable[[Path], None], meta=None) -> Path:
    """Build a folder in a temporary sibling, add its manifest, fsync and rename it into place.

    An existing ``final`` is replaced (moved aside first, then deleted), so readers never see a
    mix of old and new files. A write the OS refuses (full disk, read-only or unwritable folder)
    raises :class:`WriteError` with the temporary removed and any previous ``final`` in place.
    """
    final = Path(final)
    tmp = old = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}.", dir=final.parent))
        populate(tmp)
        write_manifest(tmp, meta)
        _fsync_path(tmp)
        if final.exists():
            old = final.parent / f"{_TMP_PREFIX}old-{final.name}.{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException as e:
        if old is not None and not final.exists():
            os.replace(old, final)  # the new one never arrived: put the previous one back
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if cause := refused_write(e):
            raise _write_error(final, cause) from e
        raise
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(root: Path) -> None:
    """Delete temporary folders a killed run left behind (they never became checkpoints)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(_TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
