"""What the training loop optimises and how fast: parameter groups, freezing, AdamW, schedule.

* :func:`apply_freeze`: freeze parameters by name pattern (``--freeze``).
* :func:`param_groups`: AdamW groups with weight decay on matrices only and per-group lr scales
  for embeddings (and a tied head), an untied head and norms.
* :func:`make_optimizer`: fused AdamW (0.9, 0.95); foreach under FSDP2 (DTensor parameters).
* :func:`lr_at`: linear warm-up, then cosine decay to ``--min-lr``.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch
from torch import nn

from inheritune.config import ConfigError, flag
from inheritune.models.arch import get_arch
from inheritune.training.config import TrainConfig

BETAS = (0.9, 0.95)


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine or linear
    decay to min_lr over the remaining steps, or over ``progress`` (the fraction of a time
    budget spent) when given."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if progress is None:
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    if cfg.schedule == "linear":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1.0 - progress)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def _matches(name: str, pattern: str) -> bool:
    return pattern in name or fnmatch.fnmatchcase(name, pattern)


def apply_freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Freeze parameters whose name contains (or glob-matches) a pattern; return their names."""
    names = dict(model.named_parameters())
    frozen = []
    for pattern in patterns:
        hits = [n for n in names if _matches(n, pattern)]
        if not hits:
            raise ConfigError(
                f"{flag('freeze')} pattern {pattern!r} matches no parameter; names look like "
                f"{list(names)[:4]}"
            )
        frozen += hits
    for n in frozen:
        names[n].requires_grad_(False)
    return sorted(set(frozen))


def train_only_top(model: nn.Module, n: int) -> list[str]:
    """``--train-top N``: freeze the embeddings and every block below the top ``n``; return the
    frozen names. Frozen leading layers get no autograd graph at all (their inputs need no
    gradient), so they cost a forward pass only."""
    arch = get_arch(model)
    if not 0 < n <= arch.num_layers:
        raise ConfigError(
            f"{flag('train_top')} {n} must be between 1 and the model's {arch.num_layers} blocks"
        )
    frozen = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    frozen += list(arch.layers[: arch.num_layers - n])
    names = {id(p): name for name, p in model.named_parameters()}
    out = []
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
            out.append(names.get(id(p), ""))
    return sorted(set(out) - {""})


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices only; lr scales for embeddings, untied head, norms.

    Embeddings (token and learned positions) and a tied head (the same tensor) get no weight
    decay and ``embed_lr_scale``; an untied head weight is decayed with ``head_lr_scale``; norm
    weights/biases get no decay and ``norm_lr_scale``; other biases no decay. Frozen parameters
    are left out. Each parameter appears once even when tied.
    """
    arch = get_arch(model)
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head_ids = {id(p) for p in arch.head.parameters()} - embed_ids
    norm_ids = {
        id(p)
        for m in model.modules()
        if "norm" in type(m).__name__.lower()
        for p in m.parameters(recurse=False)
    }
    groups: dict[str, dict[str, Any]] = {}

    def put(kind: str, wd: float, scale: float, p: nn.Parameter) -> None:
        g = groups.setdefault(kind, {"params": [], "weight_decay": wd, "lr_scale": scale})
        g["params"].append(p)

    for p in {id(p): p for p in model.parameters()}.values():  # tied counted once
        if not p.requires_grad:
            continue
        if id(p) in embed_ids:
            put("embed", 0.0, cfg.embed_lr_scale, p)
        elif id(p) in head_ids:
            put("head", cfg.weight_decay if p.ndim >= 2 else 0.0, cfg.head_lr_scale, p)
        elif id(p) in norm_ids:
            put("norm", 0.0, cfg.norm_lr_scale, p)
        elif p.ndim >= 2:
            put("decay", cfg.weight_decay, 1.0, p)
        else:
            put("no_decay", 0.0, 1.0, p)
    if not groups:
        raise ConfigError(f"{flag('freeze')} froze every parameter: nothing left to train")
    return [{"name": k, **g} for k, g in groups.items()]


def make_optimizer(model: nn.Module, cfg: TrainConfig, fsdp: bool) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    # fused AdamW is one kernel per step on CPU and GPU; DTensor (FSDP2) parameters use foreach.
    kind = {"foreach": True} if fsdp else {"fused": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=BETAS, eps=1e-8, **kind)
