"""How a training run resumes: find the checkpoint to continue from (:func:`resume_point`),
check that it fits this run -- the same data, tokenizer and batch layout, or the data position
would lie (:func:`check_compatible`) -- and restore its weights and data position, or seed every
RNG for a fresh run (:func:`restore_or_seed`). The optimizer and RNG states it returns are put
back by :mod:`inheritune.trainer` once the optimizer exists (:mod:`inheritune.train_state`).
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from inheritune import checkpoint as ckpt
from inheritune import data, distributed, train_state
from inheritune.config import ConfigError, flag, to_dict

if TYPE_CHECKING:
    from inheritune.train import TrainConfig


def resume_point(cfg: TrainConfig, env: distributed.DistEnv) -> Path | None:
    out = Path(cfg.out)
    if not cfg.resume and ckpt.list_checkpoints(ckpt.checkpoints_root(out)):
        raise ConfigError(
            f"{out} already holds checkpoints; pass {flag('resume')} to continue that run or "
            f"choose another {flag('out')}"
        )
    found = ckpt.find_resume_checkpoint(out) if cfg.resume else None
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
    optim_sd, state, rng_tensors, rng_scalars = train_state.load_training_state(resume_from)
    check_compatible(state, cfg, tokens, env.world_size)
    if distributed.is_sharded(model):  # built sharded (load_sharded_model): own rows only
        distributed.load_weights(model, resume_from)
    else:
        ckpt.load_model_weights(model, resume_from)
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
    for name in ckpt.spec_diff(
        {k: saved.get(k) for k in _REFUSE_ON_CHANGE}, {k: now[k] for k in _REFUSE_ON_CHANGE}
    ):
        raise ckpt.CheckpointError(
            f"cannot resume: the checkpoint was trained with {flag(name)} {saved.get(name)}, "
            f"this run has {now[name]}"
        )
    if ckpt.spec_diff(state.get("data_fingerprint") or {}, data_identity(tokens)):
        raise ckpt.CheckpointError(
            "cannot resume: the checkpoint was trained on different data or with another tokenizer"
        )
    changed = ckpt.spec_diff(
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
