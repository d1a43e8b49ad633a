"""``inheritune train``: one explicit training loop for Hugging Face causal LMs.

Used from the CLI (:func:`train`) and in process by the recipe and the baselines
(:func:`train_model` on an in-memory model, :func:`evaluate_loss` on fixed windows).

The loop, stage by stage: lr -> eval/checkpoint -> forward/backward with accumulation -> clip ->
step -> log -> stop. Design choices, each tested:

* ``--batch-size`` is the GLOBAL number of sequences per optimizer step. It is split into
  ``--grad-accum`` micro-batches and across the ``torchrun`` processes, so the trajectory does
  not depend on either (up to float summation order). :func:`micro_loss_scale` is the one place
  the loss normalisation is computed.
* Training windows (``seq_len + 1`` tokens) start at multiples of ``seq_len`` in the training
  split, visited in a seeded permutation per epoch; the data position (epoch, cursor) is saved in
  every checkpoint so ``--resume`` continues exactly. Ranks take disjoint windows of each batch.
* Validation uses the same fixed windows from the validation split at every evaluation and in
  every run (:func:`eval_windows`), never random batches.
* AdamW (0.9, 0.95), linear warm-up then cosine decay to ``--min-lr`` (:func:`lr_at`). No
  weight decay on biases, norms and embeddings (a tied head is the embedding matrix); an untied
  head is decayed like any other matrix.
* The LM loss is computed from the final hidden states with a chunked head + cross-entropy that
  never materialises the (B, T, V) logits (:func:`linear_cross_entropy`): with a 49,152-word
  vocabulary the head is the largest single cost of a small model.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from inheritune import checkpoint as ckpt
from inheritune import data, distributed
from inheritune.arch import SUPPORTED, get_arch
from inheritune.config import ConfigError, check_positive, flag, save_resolved, to_dict

BETAS = (0.9, 0.95)
HEAD_CHUNK_ROWS = 512  # rows of the head matmul per chunk: ~100 MB of fp32 logits at V=49,152


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is intact."""


def _h(text: str, **kw: Any) -> dict[str, Any]:
    return {"help": text, **kw}


@dataclass
class TrainConfig:
    """Flags of ``inheritune train``."""

    model: str = field(
        default="smollm2-135m",
        metadata=_h("model argument (name, HF folder, .gguf) or a checkpoint folder of this tool"),
    )
    data: str = field(default="shakespeare", metadata=_h("corpus name, text/jsonl file or folder"))
    out: str = field(default="runs/train", metadata=_h("output folder (logs, checkpoints, final)"))
    steps: int = field(default=200, metadata=_h("optimizer steps"))
    batch_size: int = field(
        default=8, metadata=_h("global sequences per optimizer step (all processes together)")
    )
    seq_len: int = field(default=256, metadata=_h("tokens per training sequence"))
    grad_accum: int = field(default=1, metadata=_h("micro-batches per step (splits --batch-size)"))
    lr: float = field(default=3e-4, metadata=_h("peak learning rate"))
    min_lr: float = field(default=1e-5, metadata=_h("learning rate at the end of cosine decay"))
    warmup: int = field(default=20, metadata=_h("linear warm-up steps"))
    weight_decay: float = field(default=0.1, metadata=_h("AdamW weight decay (matrices only)"))
    grad_clip: float = field(default=1.0, metadata=_h("max global gradient norm (0 = off)"))
    eval_every: int = field(default=50, metadata=_h("evaluate every N steps (0 = start/end)"))
    eval_tokens: int = field(default=32768, metadata=_h("validation tokens per evaluation"))
    save_every: int = field(default=50, metadata=_h("checkpoint every N steps (0 = end only)"))
    keep_last: int = field(default=2, metadata=_h("checkpoints to keep (0 = all)"))
    log_every: int = field(default=5, metadata=_h("log a training line every N steps"))
    precision: str = field(
        default="fp32", metadata=_h("fp32, or bf16 autocast", choices=("fp32", "bf16"))
    )
    compile: bool = field(default=False, metadata=_h("torch.compile the model"))
    seed: int = field(default=0, metadata=_h("seed of the data order and dropout"))
    resume: bool = field(default=False, metadata=_h("continue from the latest checkpoint in --out"))
    fsdp: bool = field(default=False, metadata=_h("shard the model with FSDP2 under torchrun"))
    embed_lr_scale: float = field(
        default=1.0, metadata=_h("lr multiplier of embeddings (and a tied head)")
    )
    head_lr_scale: float = field(default=1.0, metadata=_h("lr multiplier of an untied head"))
    norm_lr_scale: float = field(default=1.0, metadata=_h("lr multiplier of norm parameters"))
    freeze: list[str] = field(
        default_factory=list,
        metadata=_h("comma list of parameter-name substrings or globs to freeze"),
    )
    distill_alpha: float = field(
        default=0.0, metadata=_h("weight of KL(teacher||student); loss = (1-a)*LM + a*KL")
    )
    distill_temperature: float = field(default=1.0, metadata=_h("distillation temperature"))
    teacher: str | None = field(default=None, metadata=_h("teacher model for distillation"))
    trust_remote_code: bool = field(
        default=False, metadata=_h("allow models with custom code (off by default)")
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_tokens", "log_every"):
            check_positive(name, getattr(self, name))
        for name in ("warmup", "eval_every", "save_every", "keep_last", "weight_decay"):
            check_positive(name, getattr(self, name), allow_zero=True)
        for name in ("grad_clip", "min_lr", "embed_lr_scale", "head_lr_scale", "norm_lr_scale"):
            check_positive(name, getattr(self, name), allow_zero=True)
        check_positive("lr", self.lr)
        check_positive("distill_temperature", self.distill_temperature)
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}"
            )
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ConfigError(f"--distill-alpha must be in [0, 1], got {self.distill_alpha}")
        if isinstance(self.freeze, str):
            self.freeze = [s for s in self.freeze.split(",") if s]


@dataclass
class TrainResult:
    """What a training run produced."""

    out: Path
    final_dir: Path  # HF folder of the final model (config + safetensors + tokenizer)
    steps: int  # optimizer steps done (cumulative over resumes)
    tokens: int  # training tokens seen (cumulative over resumes)
    wall_s: float  # wall time of this process's run (evaluations and checkpoints included)
    evals: list[dict]  # [{"step", "tokens", "val_loss", "val_ppl"}], step 0 and the final step
    final_val_loss: float
    tokens_per_s: float  # training throughput, evaluation and checkpoint time excluded
    interrupted: bool = False  # stopped by SIGINT/SIGTERM after saving a checkpoint
    stop_signal: int = 0  # the signal that stopped it
    checkpoint: Path | None = None  # the last checkpoint written


# ----------------------------------------------------------------------------- schedule & loss


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, cosine to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_steps = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def micro_loss_scale(micro_tokens: int, global_tokens: int, world_size: int) -> float:
    """Factor on a micro-batch's MEAN loss so the summed, rank-averaged gradient is the gradient
    of the mean loss over the whole global batch.

    Gradients are summed over micro-batches and averaged (divided by ``world_size``) over ranks
    by DDP/FSDP, so each micro-batch contributes ``micro_tokens / global_tokens`` of the mean,
    times ``world_size`` to undo the averaging. The one place this normalisation is computed.
    """
    return micro_tokens * world_size / global_tokens


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets`` in row chunks.

    The gradients w.r.t. hidden and weight are computed chunk by chunk in the forward pass (the
    softmax is at hand there), so neither the logits nor their gradient ever exist at full
    (N, V) size; backward only scales them. Matmuls run in the autocast dtype when autocast is
    on; the softmax, loss and weight gradient are accumulated in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # hidden (N, D), weight (V, D)
        device_type = hidden.device.type
        dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else hidden.dtype
        )
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        n = hidden.shape[0]
        with torch.autocast(device_type, enabled=False):
            w = weight.to(dtype)
            h_all = hidden.to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            for s in range(0, n, chunk):
                h = h_all[s : s + chunk]
                t = targets[s : s + chunk]
                logits = (h @ w.t()).float()  # (c, V)
                if bias is not None:
                    logits += bias.float()
                lse = torch.logsumexp(logits, dim=-1)  # (c,)
                loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (want_h or want_w or want_b):
                    continue
                # d(sum of losses)/d logits = softmax - onehot, computed in place.
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(t), device=g.device), t] -= 1.0
                if want_b:
                    grad_b += g.sum(0)
                g = g.to(dtype)
                if want_h:
                    grad_h[s : s + chunk] = (g @ w).to(hidden.dtype)
                if want_w:
                    grad_w += (g.t() @ h).float()
        ctx.n = n
        ctx.save_for_backward(
            grad_h if want_h else None,
            grad_w.to(weight.dtype) if want_w else None,
            grad_b.to(bias.dtype) if want_b else None,
        )
        return loss / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out / ctx.n
        return (
            grad_h * scale.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * scale.to(grad_w.dtype) if grad_w is not None else None,
            grad_b * scale.to(grad_b.dtype) if grad_b is not None else None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int = HEAD_CHUNK_ROWS,
) -> torch.Tensor:
    """Mean nats/token of the head ``(weight, bias)`` on ``hidden`` (N, D) vs ``targets`` (N,)."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at ``temperature``, times T^2 (Hinton et al.)
    so its gradient scale does not depend on T. Logits (..., V)."""
    t = temperature
    s_logp = F.log_softmax(student.float() / t, dim=-1).flatten(0, -2)
    t_logp = F.log_softmax(teacher.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * t * t


class CausalLMLoss(nn.Module):
    """Wraps an HF causal LM so that ``forward(inputs, targets)`` returns the mean LM loss.

    DDP and FSDP wrap this module (their hooks run on its forward). For the families inheritune
    supports, the loss comes from the final hidden states through :func:`linear_cross_entropy`;
    other models (and distillation, which needs the student's logits) use the HF logits.
    """

    def __init__(self, model: nn.Module, chunk: int = HEAD_CHUNK_ROWS):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.fused = getattr(model.config, "model_type", None) in SUPPORTED

    def forward(
        self,
        inputs: torch.Tensor,  # (B, T)
        targets: torch.Tensor,  # (B, T)
        teacher_logits: torch.Tensor | None = None,  # (B, T, V)
        alpha: float = 0.0,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        if self.fused and teacher_logits is None:
            hidden = self.model.base_model(input_ids=inputs, use_cache=False).last_hidden_state
            head = self.model.get_output_embeddings()
            return linear_cross_entropy(
                hidden.flatten(0, 1), head.weight, head.bias, targets.flatten(), self.chunk
            )
        logits = self.model(input_ids=inputs, use_cache=False).logits  # (B, T, V)
        lm = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        if teacher_logits is None or alpha == 0.0:
            return lm
        return (1.0 - alpha) * lm + alpha * distill_kl(logits, teacher_logits, temperature)


# ----------------------------------------------------------------------------- data


class WindowSampler:
    """Global batches of window start positions from a seeded per-epoch permutation.

    Window i covers tokens [i*T, i*T + T + 1) of the split. ``(epoch, cursor)`` is the data
    position; a batch that would run past the end of an epoch starts the next epoch instead.
    """

    def __init__(self, num_tokens: int, seq_len: int, seed: int):
        self.seq_len = seq_len
        self.seed = seed
        self.num_windows = (num_tokens - 1) // seq_len
        self.epoch = 0
        self.cursor = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = (self.epoch, rng.permutation(self.num_windows))
        return self._perm[1]

    def next_starts(self, batch: int) -> np.ndarray:
        """Token offsets of the next ``batch`` windows: (batch,)."""
        if self.cursor + batch > self.num_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
        idx = self._permutation()[self.cursor : self.cursor + batch]
        self.cursor += batch
        return idx.astype(np.int64) * self.seq_len

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def gather_windows(split: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """(len(starts), seq_len + 1) int64 token windows."""
    return torch.from_numpy(
        np.stack([np.asarray(split[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    )


def eval_windows(tokens: data.Tokens, seq_len: int, eval_tokens: int) -> np.ndarray:
    """Fixed validation windows, (n, seq_len + 1) int64: inputs are ``w[:, :-1]``, targets
    ``w[:, 1:]``.

    Consecutive windows from the start of the validation split, each sharing its last token with
    the next one's first, so every validation token is predicted once. n = eval_tokens // seq_len
    (at least 1), capped by the split. The same array at every evaluation and in every run.
    """
    val = tokens.val
    data.check_length(val, seq_len + 1, "validation")
    n = min((len(val) - 1) // seq_len, max(1, eval_tokens // seq_len))
    return np.stack(
        [np.asarray(val[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64) for i in range(n)]
    )


def _eval_sums(
    loss_module: nn.Module,
    windows: np.ndarray,
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    env: distributed.DistEnv,
) -> tuple[float, int]:
    """(sum of token losses, token count) over this rank's share of ``windows``.

    Every rank runs the same number of batches (FSDP needs all ranks in every forward); ranks
    past the end of their share evaluate a repeated batch with weight 0.
    """
    per_rank = math.ceil(len(windows) / env.world_size)
    mine = windows[env.rank * per_rank : (env.rank + 1) * per_rank]
    n_batches = math.ceil(per_rank / batch_size)
    total, count = 0.0, 0
    for b in range(n_batches):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        weight = 1
        if len(chunk) == 0:
            chunk, weight = windows[:1], 0
        w = torch.from_numpy(chunk).to(device)
        with autocast:
            loss = loss_module(w[:, :-1], w[:, 1:])
        n_tok = w[:, 1:].numel()
        total += float(loss) * n_tok * weight
        count += n_tok * weight
    return total, count


def _evaluate(loss_module, windows, batch_size, device, autocast, env) -> float:
    was_training = loss_module.training
    loss_module.eval()
    try:
        with torch.no_grad():
            total, count = _eval_sums(loss_module, windows, batch_size, device, autocast, env)
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        distributed.all_reduce_sum(sums, env)
    finally:
        loss_module.train(was_training)
    return float(sums[0] / sums[1])


def evaluate_loss(model: nn.Module, windows: np.ndarray, batch_size: int = 8) -> float:
    """Mean nats/token of ``model`` on ``windows`` (n, T + 1) from :func:`eval_windows`.

    Deterministic (fixed batches, no sampling, dropout off) and without gradients.
    """
    device = next(model.parameters()).device
    env = distributed.DistEnv(0, 1, 0, device)
    return _evaluate(
        CausalLMLoss(model), windows, batch_size, device, contextlib.nullcontext(), env
    )


# ----------------------------------------------------------------------------- optimizer


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
        raise ckpt.CheckpointError(
            "the checkpoint's optimizer holds different parameters than this run "
            "(different model or --freeze?)"
        )
    index = {n: i for i, n in enumerate(order)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]
    opt.load_state_dict(
        {"state": {index[n]: st for n, st in sd["state"].items()}, "param_groups": groups}
    )


# ----------------------------------------------------------------------------- model I/O


def _full_model_state(model: nn.Module, fsdp: bool) -> dict[str, torch.Tensor] | None:
    """The full (gathered) state dict under FSDP (a collective), else None (use the model)."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def save_hf_folder(model: nn.Module, tokenizer, folder: Path, state_dict=None) -> None:
    """config.json + model.safetensors (+ tokenizer): loadable by AutoModelForCausalLM."""
    from transformers.utils import logging as hf_logging

    # transformers' own "Writing model shards" bar would tear the training progress bar.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, state_dict=state_dict)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """Load safetensors weights into ``model`` in place; only tied copies may be missing."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name not in (ckpt.OPTIMIZER, ckpt.RNG):
            sd.update(load_file(str(f)))
    result = model.load_state_dict(sd, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    unique = _param_names(model).values()
    missing = [k for k in result.missing_keys if k in params and k in unique]
    if missing or result.unexpected_keys:
        raise ckpt.CheckpointError(
            f"checkpoint {folder} does not fit this model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


# ----------------------------------------------------------------------------- loop helpers


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop saves a checkpoint and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signum = 0

    def handler(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum


@contextlib.contextmanager
def _catch_signals(flag_: _StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    old = {s: signal.signal(s, flag_.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Throughput:
    """Tokens/s over training time only (evaluation and checkpointing excluded)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._win_tokens = 0
        self._win_seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self._win_tokens += tokens
        self._win_seconds += seconds

    def window_rate(self) -> float:
        """Tokens/s since the previous call."""
        rate = self._win_tokens / self._win_seconds if self._win_seconds > 0 else 0.0
        self._win_tokens, self._win_seconds = 0, 0.0
        return rate

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class _Log:
    """log.jsonl writer (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.is_file():  # drop lines of steps the resumed run will redo
            keep = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            ckpt.atomic_write_text(path, "".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            _append_log(self.path, record)


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot(out: Path, evals: list[dict], log_path: Path) -> None:
    from inheritune import plots

    train = [r for r in _read_log(log_path) if r.get("kind") == "train"]
    curves = {
        "train loss": ([r["tokens"] for r in train], [r["loss"] for r in train]),
        "validation loss": ([e["tokens"] for e in evals], [e["val_loss"] for e in evals]),
    }
    plots.plot_curves(curves, out / "loss.png", title="training")


# ----------------------------------------------------------------------------- the loop


def train_model(
    model: nn.Module,
    tokenizer,
    tokens: data.Tokens,
    cfg: TrainConfig,
    teacher: nn.Module | None = None,
    desc: str | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``tokens`` into ``cfg.out``; see the module docstring.

    With ``cfg.resume`` the model's weights, the optimizer, RNG and data position come from the
    latest intact checkpoint in ``cfg.out``. Under ``--fsdp`` the model is sharded in place:
    reload it from ``result.final_dir``.
    """
    t_start = time.perf_counter()
    env = distributed.setup()
    out = Path(cfg.out)
    root = ckpt.checkpoints_root(out)
    world, rank = env.world_size, env.rank
    fsdp = cfg.fsdp and env.distributed
    if cfg.batch_size % (cfg.grad_accum * world):
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must be a multiple of --grad-accum x processes "
            f"({cfg.grad_accum} x {world})"
        )
    micro = cfg.batch_size // (cfg.grad_accum * world)
    if tokenizer is not None and tokens.meta.get(
        "tokenizer_fingerprint"
    ) != data.tokenizer_fingerprint(tokenizer):
        raise data.TokenizerMismatchError(
            f"the tokens in {tokens.path} were made by a different tokenizer than the model's; "
            f"pass the raw text so it is re-tokenised"
        )
    vocab = model.get_input_embeddings().weight.shape[0]
    max_id = int(tokens.ids.max())  # one pass over the memmap; cheap next to training
    if max_id >= vocab:
        raise data.DataError(
            f"the tokens hold id {max_id} but the model's embedding has only {vocab} rows "
            f"(tokenizer and model do not belong together)"
        )
    if cfg.distill_alpha > 0 and teacher is None:
        raise ConfigError(f"{flag('distill_alpha')} > 0 needs a teacher ({flag('teacher')})")
    train_split = tokens.train
    data.check_length(train_split, cfg.seq_len + 1, "training")
    sampler = WindowSampler(len(train_split), cfg.seq_len, cfg.seed)
    if sampler.num_windows < cfg.batch_size:
        raise data.DataError(
            f"the training split holds {sampler.num_windows} windows of --seq-len {cfg.seq_len}, "
            f"fewer than one batch (--batch-size {cfg.batch_size})"
        )
    windows = eval_windows(tokens, cfg.seq_len, cfg.eval_tokens)

    # Resume point (every rank reads the same files).
    resume_from = ckpt.find_resume_checkpoint(out) if cfg.resume else None
    if not cfg.resume and ckpt.list_checkpoints(root):
        raise ConfigError(
            f"{out} already holds checkpoints; pass {flag('resume')} to continue that run or "
            f"choose another {flag('out')}"
        )
    if cfg.resume and resume_from is None and env.is_main:
        warnings.warn(
            f"{flag('resume')}: no checkpoint in {out}; starting from step 0", stacklevel=2
        )

    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(root)
        save_resolved(cfg, out / "config.yaml")
    distributed.barrier(env)

    apply_freeze(model, cfg.freeze)
    model.to(env.device)
    model.train()
    if teacher is not None:
        teacher.to(env.device).eval().requires_grad_(False)

    step, tokens_seen, evals, train_seconds = 0, 0, [], 0.0
    state: dict[str, Any] | None = None
    if resume_from is not None:
        optim_sd, state, rng_tensors, rng_scalars = ckpt.load_training_state(resume_from)
        _check_compatible(state, cfg, tokens, world)
        load_model_weights(model, resume_from)
        step, tokens_seen = int(state["step"]), int(state["tokens"])
        evals, train_seconds = list(state["evals"]), float(state["train_seconds"])
        sampler.load_state_dict(state["data"])
    else:
        torch.manual_seed(cfg.seed + rank)  # distinct dropout per rank
        np.random.seed(cfg.seed)
        import random

        random.seed(cfg.seed)

    loss_module = distributed.wrap(
        CausalLMLoss(model), get_arch(model).layers, env, cfg.fsdp and env.distributed
    )
    opt = make_optimizer(model, cfg, fsdp)
    if resume_from is not None:
        load_optimizer_state(model, opt, optim_sd, fsdp)
        ckpt.set_rng_state(rng_tensors, rng_scalars, rank)
    forward = torch.compile(loss_module) if cfg.compile else loss_module
    autocast = _autocast(cfg.precision, env.device)
    log = _Log(out / "log.jsonl", env.is_main, step if resume_from is not None else None)
    meter = Throughput()
    stop = _StopFlag()
    last_saved = step if resume_from is not None else -1
    last_ckpt: Path | None = resume_from
    tokens_per_step = cfg.batch_size * cfg.seq_len
    scale = micro_loss_scale(micro * cfg.seq_len, tokens_per_step, world)
    eval_bs = max(1, cfg.batch_size // (cfg.grad_accum * world))

    def save(at_step: int) -> Path:
        nonlocal last_saved, last_ckpt
        trainer_state = {
            "step": at_step,
            "tokens": tokens_seen,
            "data": sampler.state_dict(),
            "evals": evals,
            "train_seconds": train_seconds + meter.seconds,
            "world_size": world,
            "config": to_dict(cfg),
            "data_fingerprint": _data_identity(tokens),
        }
        model_sd = _full_model_state(model, fsdp)
        optim_sd = optimizer_state(model, opt, fsdp)
        rng = distributed.gather_tensors(torch.get_rng_state(), env)
        path = root / ckpt.step_name(at_step)
        if env.is_main:
            tensors, scalars = ckpt.rng_state(rng)

            def populate(tmp: Path) -> None:
                save_hf_folder(model, tokenizer, tmp, model_sd)
                ckpt.save_training_state(tmp, optim_sd, trainer_state, tensors, scalars)

            ckpt.write_folder_atomically(path, populate, {"step": at_step})
            ckpt.atomic_write_text(root / ckpt.LATEST, path.name + "\n")
            ckpt.prune(root, cfg.keep_last)
        distributed.barrier(env)
        last_saved, last_ckpt = at_step, path
        return path

    def evaluate() -> None:
        val = _evaluate(forward, windows, eval_bs, env.device, autocast, env)
        rec = {"step": step, "tokens": tokens_seen, "val_loss": val, "val_ppl": math.exp(val)}
        evals.append(rec)
        log.write({"kind": "eval", **rec})
        bar.set_postfix_str(f"val {val:.3f}", refresh=False)

    bar = tqdm(
        total=cfg.steps,
        initial=min(step, cfg.steps),
        desc=desc or f"train {out.name}",
        disable=not env.is_main,
        dynamic_ncols=True,
        unit="step",
    )
    interrupted = False
    with _catch_signals(stop), bar:
        while True:
            # 1. learning rate
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            # 2. evaluation and checkpoint (at the start of the step: state is consistent)
            due_eval = step in (0, cfg.steps) or (cfg.eval_every and step % cfg.eval_every == 0)
            if due_eval and not (evals and evals[-1]["step"] == step):
                evaluate()
            if step >= cfg.steps:
                break
            if cfg.save_every and step % cfg.save_every == 0 and step > 0 and step != last_saved:
                save(step)
            # 3. forward/backward over micro-batches (this rank's disjoint share)
            t0 = time.perf_counter()
            starts = sampler.next_starts(cfg.batch_size).reshape(cfg.grad_accum, world, micro)
            batch = gather_windows(train_split, starts[:, rank].reshape(-1), cfg.seq_len)
            batch = batch.view(cfg.grad_accum, micro, cfg.seq_len + 1).to(env.device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
            for m in range(cfg.grad_accum):
                x, y = batch[m, :, :-1], batch[m, :, 1:]
                teacher_logits = None
                if teacher is not None and cfg.distill_alpha > 0:
                    with torch.no_grad(), autocast:
                        teacher_logits = teacher(input_ids=x, use_cache=False).logits
                with distributed.gradient_sync(loss_module, m == cfg.grad_accum - 1), autocast:
                    loss = forward(x, y, teacher_logits, cfg.distill_alpha, cfg.distill_temperature)
                (loss * scale).backward()
                loss_sum += loss.detach().double() * scale
            # 4. clip (computes the global norm; max_norm inf = measure only)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            params = [p for g in opt.param_groups for p in g["params"]]
            grad_norm = float(
                distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))
            )
            sync = torch.stack([loss_sum, torch.tensor(float(stop.signum), device=env.device)])
            distributed.all_reduce_sum(sync, env)
            step_loss = float(sync[0]) / world
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                opt.zero_grad(set_to_none=True)
                good = ckpt.read_latest(root)
                raise TrainingError(
                    f"non-finite {'loss' if not math.isfinite(step_loss) else 'gradient norm'} "
                    f"({step_loss if not math.isfinite(step_loss) else grad_norm}) at step "
                    f"{step + 1}; the update was not applied. Last good checkpoint: "
                    f"{good or 'none'}. Try a lower {flag('lr')}, {flag('precision')} fp32 or "
                    f"{flag('grad_clip')}."
                )
            # 5. optimizer step
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            meter.add(tokens_per_step, time.perf_counter() - t0)
            # 6. log
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                rate = meter.window_rate()
                log.write(
                    {
                        "kind": "train",
                        "step": step,
                        "tokens": tokens_seen,
                        "loss": step_loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": rate,
                        "elapsed_s": time.perf_counter() - t_start,
                    }
                )
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            # 7. stop on SIGINT/SIGTERM (any rank's signal stops every rank at the same step)
            if float(sync[1]) > 0:
                save(step)
                interrupted = True
                break

    final_dir = out / "final"
    if not interrupted:
        if step != last_saved:
            save(step)
        model_sd = _full_model_state(model, fsdp)
        if env.is_main:
            ckpt.write_folder_atomically(
                final_dir, lambda tmp: save_hf_folder(model, tokenizer, tmp, model_sd)
            )
            _plot(out, evals, log.path)
        distributed.barrier(env)
    elif env.is_main:
        tqdm.write(
            f"stopped by signal {stop.signum} at step {step}; checkpoint {last_ckpt}. "
            f"Rerun with {flag('resume')} to continue."
        )
    wall = time.perf_counter() - t_start
    result = TrainResult(
        out=out,
        final_dir=final_dir,
        steps=step,
        tokens=tokens_seen,
        wall_s=wall,
        evals=evals,
        final_val_loss=evals[-1]["val_loss"] if evals else float("nan"),
        tokens_per_s=meter.rate,
        interrupted=interrupted,
        stop_signal=stop.signum,
        checkpoint=last_ckpt,
    )
    if env.is_main and not interrupted:
        summary = {k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}
        (out / "result.json").write_text(json.dumps(summary, indent=1))
    return result


def _data_identity(tokens: data.Tokens) -> dict[str, Any]:
    keys = ("corpus_fingerprint", "tokenizer_fingerprint", "num_tokens")
    return {k: tokens.meta.get(k) for k in keys}


def _check_compatible(state: dict, cfg: TrainConfig, tokens: data.Tokens, world: int) -> None:
    """Refuse a checkpoint whose data or batch layout differs (the data position would lie)."""
    saved = state.get("config", {})
    for name in ("batch_size", "seq_len", "seed"):
        if saved.get(name) != getattr(cfg, name):
            raise ckpt.CheckpointError(
                f"cannot resume: the checkpoint was trained with {flag(name)} {saved.get(name)}, "
                f"this run has {getattr(cfg, name)}"
            )
    if state.get("data_fingerprint") != _data_identity(tokens):
        raise ckpt.CheckpointError(
            "cannot resume: the checkpoint was trained on different data or with another tokenizer"
        )
    changed = [
        n
        for n in ("lr", "min_lr", "warmup", "steps", "grad_accum", "weight_decay", "precision")
        if saved.get(n) != getattr(cfg, n)
    ]
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


def train(cfg: TrainConfig) -> TrainResult:
    """The CLI entry: resolve model, tokenizer, data (and teacher), then :func:`train_model`."""
    from inheritune import models

    env = distributed.setup()
    model = models.load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    tokenizer = models.load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    # Rank 0 tokenises (and caches) first; the others then open the cache.
    if env.is_main:
        tokens = data.load_tokens(cfg.data, tokenizer)
    distributed.barrier(env)
    if not env.is_main:
        tokens = data.load_tokens(cfg.data, tokenizer)
    teacher = None
    if cfg.distill_alpha > 0:
        if not cfg.teacher:
            raise ConfigError(f"{flag('distill_alpha')} > 0 needs {flag('teacher')}")
        teacher = models.load_model(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
        if (
            teacher.get_output_embeddings().weight.shape[0]
            != model.get_input_embeddings().weight.shape[0]
        ):
            raise ConfigError(f"{flag('teacher')} has a different vocabulary than {flag('model')}")
    result = train_model(model, tokenizer, tokens, cfg, teacher=teacher)
    if env.is_main and not result.interrupted:
        print(
            f"trained {result.steps} steps ({result.tokens:,} tokens, "
            f"{result.tokens_per_s:,.0f} tok/s): val loss {result.final_val_loss:.4f} "
            f"(ppl {math.exp(result.final_val_loss):.2f}); final model in {result.final_dir}"
        )
    if result.interrupted:
        raise SystemExit(128 + result.stop_signal)  # the shell convention for "killed by signal"
    return result
