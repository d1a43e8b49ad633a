"""Training checkpoints: what they hold, how they are written, and how a run resumes from one.

A checkpoint is a standard Hugging Face folder that ``AutoModelForCausalLM.from_pretrained``
loads as is (``config.json``, ``model.safetensors``, tokenizer files), plus the training state
(:func:`save_training_state`, read back by :func:`load_training_state`):

* ``optimizer.safetensors``: every optimizer state tensor, keyed ``{param_name}/{state_key}``;
  keyed by parameter NAME, not position, so a resume can check that it optimizes the same
  parameters (:func:`load_optimizer_state`); under FSDP the full state is gathered with
  ``torch.distributed.checkpoint``;
* ``rng.safetensors``: RNG state tensors as uint8 (torch CPU and CUDA of every rank, because
  each rank draws its own dropout masks; numpy keys);
* ``trainer_state.json``: step, tokens seen, data position, optimizer param groups (by
  parameter name), scalar optimizer state, Python/numpy RNG scalars, evaluation history;
* ``manifest.json``: size and sha256 of every other file, written last.

Nothing is pickled. A checkpoint is written with :func:`inheritune.storage.write_folder_atomically`
(temporary sibling, fsync, rename); only then is the ``latest`` pointer (a one-line text file)
replaced with ``os.replace``. A crash at any moment therefore leaves either the previous
checkpoint or the new one, never a half-written ``latest``. A folder whose manifest is missing
or does not match its files is refused with :class:`~inheritune.storage.CheckpointError`
(:func:`verify_checkpoint`), and :func:`find_resume_checkpoint` then falls back to the newest
good one with a warning. Layout: ``OUT/checkpoints/step-00000100/``, ``OUT/checkpoints/latest``.

Resuming: :func:`resume_point` finds the checkpoint to continue from, :func:`check_compatible`
checks that it fits this run (the same data, tokenizer and batch layout, or the data position
would lie), and :func:`restore_or_seed` restores its weights and data position, or seeds every
RNG for a fresh run. The optimizer and RNG states it returns are put back by
:mod:`inheritune.training.train` once the optimizer exists::

    tensors, scalars = rng_state()
    save_training_state(tmp, optimizer_state(model, opt, fsdp), {"step": 100}, tensors, scalars)
    optim_sd, state, rng_tensors, rng_scalars = load_training_state(folder)
    load_optimizer_state(model, opt, optim_sd, fsdp)
    set_rng_state(rng_tensors, rng_scalars)
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from inheritune.config import ConfigError, flag, to_dict
from inheritune.data import tokens as data
from inheritune.distributed import DistEnv
from inheritune.models.folders import OPTIMIZER, RNG, TRAINER_STATE, load_model_weights
from inheritune.models.parallel import is_sharded, load_weights
from inheritune.storage import MANIFEST, CheckpointError, sha256_file, spec_diff
from inheritune.training.config import TrainConfig

LATEST = "latest"


def checkpoints_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


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


def rng_state(
    gathered_cpu: list[torch.Tensor] | None = None,
    gathered_cuda: list[torch.Tensor] | None = None,
) -> tuple[dict, dict]:
    """(tensors, scalars) of the RNG states.

    ``gathered_cpu`` / ``gathered_cuda``: every rank's torch CPU state and the state of the CUDA
    device it trains on, in rank order (dropout draws differ per rank, so each rank resumes its
    own); default: this process's. Python and numpy states are this process's.
    """
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    tensors = {"numpy_keys": torch.from_numpy(np.ascontiguousarray(np_keys).view(np.uint8))}
    for r, t in enumerate(gathered_cpu or [torch.get_rng_state()]):
        tensors[f"torch_cpu_rank{r}"] = t.to("cpu", torch.uint8).contiguous()
    if gathered_cuda is None and torch.cuda.is_available():
        gathered_cuda = [torch.cuda.get_rng_state()]
    for r, t in enumerate(gathered_cuda or []):
        tensors[f"torch_cuda_rank{r}"] = t.to("cpu", torch.uint8).contiguous()
    scalars = {
        "python": [version, list(keys), gauss],
        "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_cached)],
    }
    return tensors, scalars


def set_rng_state(
    tensors: dict[str, torch.Tensor],
    scalars: dict,
    rank: int = 0,
    device: torch.device | None = None,
) -> None:
    """Restore what :func:`rng_state` saved: this ``rank``'s torch CPU state and, when it trains
    on a CUDA ``device``, that device's state (default: the current CUDA device)."""
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
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return
    if f"torch_cuda_rank{rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"torch_cuda_rank{rank}"], device or "cuda")
        return
    legacy = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda")]  # rank 0's devices
    if legacy and len(legacy) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(legacy)


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


# ----------------------------------------------------------------------------- optimizer state


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, fsdp: bool) -> dict:
    """Optimizer state keyed by parameter name (full tensors, on CPU)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, opt, options=opts)
    names = _param_names(model)
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    sd = opt.state_dict()
    state = {order[i]: st for i, st in sd["state"].items()}
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [order[i] for i in g["params"]]}
        for g in sd["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sd: dict, fsdp: bool):
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            model, opt, sd, options=StateDictOptions(full_state_dict=True, strict=True)
        )
        return
    names = _param_names(model)
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    saved = [n for g in sd["param_groups"] for n in g["params"]]
    if saved != order:
        raise CheckpointError(
            "the checkpoint's optimizer holds different parameters than this run "
            "(different model or --freeze?)"
        )
    index = {n: i for i, n in enumerate(order)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]
    opt.load_state_dict(
        {"state": {index[n]: st for n, st in sd["state"].items()}, "param_groups": groups}
    )


def resume_point(cfg: TrainConfig, env: DistEnv) -> Path | None:
    out = Path(cfg.out)
    if not cfg.resume and list_checkpoints(checkpoints_root(out)):
        raise ConfigError(
            f"{out} already holds checkpoints; pass {flag('resume')} to continue that run or "
            f"choose another {flag('out')}"
        )
    found = find_resume_checkpoint(out) if cfg.resume else None
    if cfg.resume and found is None and env.is_main:
        warnings.warn(
            f"{flag('resume')}: no checkpoint in {out}; starting from step 0", stacklevel=3
        )
    return found


def restore_or_seed(model, sampler, resume_from, cfg, tokens, env) -> dict[str, Any] | None:
    """Resume: the checkpoint's weights and data position (its trainer state is returned, with
    the optimizer and RNG state for after the optimizer exists). Else seed every RNG."""
    if resume_from is None:
        torch.manual_seed(cfg.seed + env.rank)  # distinct dropout per rank
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        return None
    optim_sd, state, rng_tensors, rng_scalars = load_training_state(resume_from)
    check_compatible(state, cfg, tokens, env.world_size)
    if is_sharded(model):  # built sharded (load_sharded_model): own rows only
        load_weights(model, resume_from)
    else:
        load_model_weights(model, resume_from)
    sampler.load_state_dict(state["data"])
    return {**state, "optimizer_state": optim_sd, "rng_tensors": rng_tensors,
            "rng_scalars": rng_scalars}  # fmt: skip


def data_identity(tokens: data.Tokens) -> dict[str, Any]:
    keys = ("corpus_fingerprint", "tokenizer_fingerprint", "num_tokens")
    return {k: tokens.meta.get(k) for k in keys}


# Settings a resumed run may change (with a warning: it will not match an uninterrupted run);
# any other difference in the data or the batch layout would make the data position lie.
_WARN_ON_CHANGE = ("lr", "min_lr", "warmup", "steps", "grad_accum", "weight_decay", "precision")
_REFUSE_ON_CHANGE = ("batch_size", "seq_len", "seed")


def check_compatible(state: dict, cfg: TrainConfig, tokens: data.Tokens, world: int) -> None:
    """Refuse a checkpoint whose data or batch layout differs from this run's."""
    saved, now = state.get("config", {}), to_dict(cfg)
    for name in spec_diff(
        {k: saved.get(k) for k in _REFUSE_ON_CHANGE}, {k: now[k] for k in _REFUSE_ON_CHANGE}
    ):
        raise CheckpointError(
            f"cannot resume: the checkpoint was trained with {flag(name)} {saved.get(name)}, "
            f"this run has {now[name]}"
        )
    if spec_diff(state.get("data_fingerprint") or {}, data_identity(tokens)):
        raise CheckpointError(
            "cannot resume: the checkpoint was trained on different data or with another tokenizer"
        )
    changed = spec_diff(
        {k: saved.get(k) for k in _WARN_ON_CHANGE}, {k: now[k] for k in _WARN_ON_CHANGE}
    )
    if changed:
        warnings.warn(
            f"resuming with changed {', '.join(flag(n) for n in changed)}: the run will not "
            f"match an uninterrupted one",
            stacklevel=3,
        )
    if state.get("world_size") != world:
        warnings.warn(
            f"resuming on {world} process(es) a run saved on {state.get('world_size')}: the data "
            f"order is kept, but float summation order (and dropout) differ",
            stacklevel=3,
        )
