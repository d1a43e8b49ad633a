"""The training state a checkpoint carries beside its weights: RNG, optimizer, trainer state.

:func:`save_training_state` writes ``optimizer.safetensors``, ``rng.safetensors`` and
``trainer_state.json`` (step, tokens seen, the sampler's data position, evaluations, ...) into a
checkpoint folder that :func:`inheritune.checkpoint.write_folder_atomically` is building (the
layout is described in :mod:`inheritune.checkpoint`); :func:`load_training_state` reads them back
from a verified checkpoint. Nothing is pickled: tensors go to safetensors, the rest to JSON.

Optimizer state is keyed by parameter NAME, not by position, so a resume can check that it
optimizes the same parameters (:func:`load_optimizer_state`); under FSDP the full state is
gathered with ``torch.distributed.checkpoint``. Every rank's torch generator states are saved,
because each rank draws its own dropout masks.

Usage (what :mod:`inheritune.trainer` does)::

    tensors, scalars = rng_state()
    save_training_state(tmp, optimizer_state(model, opt, fsdp), {"step": 100}, tensors, scalars)
    optim_sd, state, rng_tensors, rng_scalars = load_training_state(folder)
    load_optimizer_state(model, opt, optim_sd, fsdp)
    set_rng_state(rng_tensors, rng_scalars)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from inheritune.checkpoint import (
    OPTIMIZER,
    RNG,
    TRAINER_STATE,
    CheckpointError,
    verify_checkpoint,
)

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
