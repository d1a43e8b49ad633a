"""Atomic, pickle-free training checkpoints that resume exactly.

A checkpoint is a standard Hugging Face folder that ``AutoModelForCausalLM.from_pretrained``
loads as is (``config.json``, ``model.safetensors``, tokenizer files), plus the training state:

* ``optimizer.safetensors``: every optimizer state tensor, keyed ``{param_name}/{state_key}``;
* ``rng.safetensors``: RNG state tensors as uint8 (torch CPU/CUDA of every rank, numpy keys);
* ``trainer_state.json``: step, tokens seen, data position, optimizer param groups (by
  parameter name), scalar optimizer state, Python/numpy RNG scalars, evaluation history;
* ``manifest.json``: size and sha256 of every other file, written last.

Nothing is pickled. A checkpoint is written into a temporary sibling folder, every file and the
folder are fsynced, and the folder is renamed into place; only then is the ``latest`` pointer
(a one-line text file) replaced with ``os.replace``. A crash at any moment therefore leaves
either the previous checkpoint or the new one, never a half-written ``latest``. A folder whose
manifest is missing or does not match its files is refused with :class:`CheckpointError`, and
:func:`find_resume_checkpoint` then falls back to the newest good one with a warning.

Layout: ``OUT/checkpoints/step-00000100/``, ``OUT/checkpoints/latest``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
LATEST = "latest"
FORMAT_VERSION = 1
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, half-written or does not fit this run."""


def checkpoints_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


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
    mix of old and new files.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}.", dir=final.parent))
    try:
        populate(tmp)
        write_manifest(tmp, meta)
        _fsync_path(tmp)
        old = None
        if final.exists():
            old = final.parent / f"{_TMP_PREFIX}old-{final.name}.{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_path(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_stale_temporaries(root: Path) -> None:
    """Delete temporary folders a killed run left behind (they never became checkpoints)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(_TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- verification


def verify_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Return the manifest of a complete, intact checkpoint; raise :class:`CheckpointError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(
            f"checkpoint {folder} is half-written: it has no {MANIFEST} (written last)"
        )
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {folder} has an unreadable {MANIFEST}: {e}") from e
    for name, info in files.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} is missing")
        if p.stat().st_size != info["size"]:
            raise CheckpointError(
                f"checkpoint {folder} is corrupt: {name} has {p.stat().st_size} bytes, "
                f"the manifest says {info['size']}"
            )
        if sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} fails its sha256")
    return manifest


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest step first (temporaries excluded)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")]
    return sorted(found, key=lambda p: p.name)


def read_latest(root: Path) -> Path | None:
    ptr = root / LATEST
    if not ptr.is_file():
        return None
    name = ptr.read_text().strip()
    return root / name if name else None


def find_resume_checkpoint(out: str | Path) -> Path | None:
    """The checkpoint to resume from: ``latest`` if intact, else the newest intact one.

    Warns naming each refused folder. Returns None when the run has no checkpoint at all and
    raises :class:`CheckpointError` when checkpoints exist but none is intact.
    """
    root = checkpoints_root(out)
    candidates = list_checkpoints(root)[::-1]
    latest = read_latest(root)
    if latest is not None:
        candidates = [latest] + [c for c in candidates if c != latest]
    if not candidates:
        return None
    refused = []
    for c in candidates:
        try:
            verify_checkpoint(c)
        except CheckpointError as e:
            refused.append(str(e))
            continue
        if refused:
            warnings.warn(
                f"refused {len(refused)} checkpoint(s) ({'; '.join(refused)}); "
                f"resuming from the previous good one, {c}",
                stacklevel=2,
            )
        return c
    raise CheckpointError(f"no intact checkpoint in {root}: {'; '.join(refused)}")


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints (all when <= 0; never the one ``latest`` names)."""
    keep = {read_latest(root)}
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- state <-> files


def rng_state(gathered_torch: list[torch.Tensor] | None = None) -> tuple[dict, dict]:
    """(tensors, scalars) of the RNG states; ``gathered_torch`` = per-rank torch CPU states."""
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    tensors = {"numpy_keys": torch.from_numpy(np.ascontiguousarray(np_keys).view(np.uint8))}
    for r, t in enumerate(gathered_torch or [torch.get_rng_state()]):
        tensors[f"torch_cpu_rank{r}"] = t.to("cpu", torch.uint8).contiguous()
    if torch.cuda.is_available():
        for i, t in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda{i}"] = t.cpu().contiguous()
    scalars = {
        "python": [version, list(keys), gauss],
        "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_cached)],
    }
    return tensors, scalars


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict, rank: int = 0) -> None:
    version, keys, gauss = scalars["python"]
    random.setstate((version, tuple(keys), gauss))
    np_name, np_pos, np_has_gauss, np_cached = scalars["numpy"]
    np_keys = tensors["numpy_keys"].numpy().view(np.uint32)
    np.random.set_state((np_name, np_keys, np_pos, np_has_gauss, np_cached))
    key = f"torch_cpu_rank{rank}"
    if key not in tensors:
        raise CheckpointError(
            f"the checkpoint holds no RNG state for rank {rank}; it was written by a run with "
            f"fewer processes (resume with the same number of processes for an exact resume)"
        )
    torch.set_rng_state(tensors[key])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_training_state(
    folder: Path,
    optim_state: dict[str, Any],
    trainer_state: dict[str, Any],
    rng_tensors: dict[str, torch.Tensor],
    rng_scalars: dict,
) -> None:
    """Write the optimizer (name-keyed, see :func:`flatten_optimizer`), trainer and RNG state."""
    tensors, scalars, groups = flatten_optimizer(optim_state)
    save_file(tensors, str(folder / OPTIMIZER))
    save_file(rng_tensors, str(folder / RNG))
    state = {
        **trainer_state,
        "optimizer": {"param_groups": groups, "scalars": scalars},
        "rng": rng_scalars,
    }
    (folder / TRAINER_STATE).write_text(json.dumps(state, indent=1))


def load_training_state(folder: Path) -> tuple[dict, dict, dict, dict]:
    """(optimizer state, trainer state, rng tensors, rng scalars) of a verified checkpoint."""
    verify_checkpoint(folder)
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
        tensors = load_file(str(folder / OPTIMIZER))
        rng_tensors = load_file(str(folder / RNG))
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {folder} has unreadable training state: {e}") from e
    opt = state.pop("optimizer")
    rng_scalars = state.pop("rng")
    optim_state = unflatten_optimizer(tensors, opt["scalars"], opt["param_groups"])
    return optim_state, state, rng_tensors, rng_scalars


def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict, list]:
    """Split a name-keyed optimizer state dict into safetensors tensors and JSON scalars."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[k] = v
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, scalars, groups


def unflatten_optimizer(tensors: dict[str, torch.Tensor], scalars: dict, groups: list) -> dict:
    state: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, _, k = key.rpartition("/")
        state.setdefault(name, {})[k] = t
    for name, st in scalars.items():
        state.setdefault(name, {}).update(st)
    param_groups = [
        {k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups
    ]  # AdamW keeps betas as a tuple; JSON made it a list
    return {"state": state, "param_groups": param_groups}
