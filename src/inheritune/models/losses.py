"""The losses the training loop optimises and reports.

* :func:`linear_cross_entropy`: the LM head + cross-entropy computed in row chunks, so the
  (B, T, V) logits never exist at full size (with a 49,152-word vocabulary the head is the largest
  single cost of a small model); no gradient work when grad mode is off.
* :func:`distill_kl`: KL(teacher || student) at a temperature (Hinton et al.).
* :class:`CausalLMLoss`: the module DDP/FSDP wrap: ``forward(inputs, targets)`` -> mean loss.
* :func:`micro_loss_scale`: the one place the loss normalisation under gradient accumulation
  and data parallelism is computed.
* :func:`evaluate_windows` / :func:`evaluate_loss`: mean loss over fixed validation windows
  (:func:`inheritune.data.eval_windows`), identical in every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from contextlib import nullcontext
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inheritune import distributed, storage
from inheritune.models.arch import get_arch
from inheritune.models.assets import cache_dir
from inheritune.models.hooks import capture_block_input


class _Teacher(Protocol):
    """What the loss needs of a distillation teacher (:class:`inheritune.training.distill.Teacher`):
    ``shared`` blocks reused from the student, and its outputs given the student's block input."""

    shared: int

    def outputs(
        self, inputs: torch.Tensor, hidden_k: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


HEAD_CHUNK_ROWS = 512  # rows of the head matmul per chunk: ~100 MB of fp32 logits at V=49,152


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
    def forward(
        ctx, hidden, weight, bias, targets, chunk, grad_enabled
    ):  # hidden (N, D), weight (V, D)
        device_type = hidden.device.type
        dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else hidden.dtype
        )
        # Inside Function.forward grad mode is always off and ctx.needs_input_grad ignores the
        # caller's torch.no_grad(); without ``grad_enabled`` an evaluation would still pay for
        # the two gradient matmuls per chunk.
        want_h = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]
        want_b = grad_enabled and bias is not None and ctx.needs_input_grad[2]
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
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, torch.is_grad_enabled())


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at ``temperature``, times T^2 (Hinton et al.)
    so its gradient scale does not depend on T. Logits (..., V)."""
    t = temperature
    s_logp = F.log_softmax(student.float() / t, dim=-1).flatten(0, -2)
    t_logp = F.log_softmax(teacher.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * t * t


def distill_weight(alpha: float, decay: bool, progress: float) -> float:
    """The KL weight at ``progress`` (0..1) of a run: constant, or decayed linearly to 0."""
    return alpha * (1.0 - progress) if decay else alpha


class CausalLMLoss(nn.Module):
    """Wraps an HF causal LM so that ``forward(inputs, targets)`` returns the mean LM loss.

    DDP and FSDP wrap this module (their hooks run on its forward). When the logits are exactly
    the head applied to the base model's last hidden state (:attr:`inheritune.models.arch.Arch.plain_head`;
    not Gemma 2, which softcaps them), the loss comes from that hidden state through
    :func:`linear_cross_entropy`; other models (and distillation, which needs the student's
    logits) use the HF logits.
    """

    def __init__(self, model: nn.Module, chunk: int = HEAD_CHUNK_ROWS):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.fused = get_arch(model).plain_head  # logits = head(last hidden state), nothing more

    def forward(
        self,
        inputs: torch.Tensor,  # (B, T)
        targets: torch.Tensor,  # (B, T)
        teacher: _Teacher | None = None,
        alpha: float = 0.0,
        temperature: float = 1.0,
        hidden_weight: float = 0.0,
    ) -> torch.Tensor:
        """Mean LM loss; with a teacher, (1 - alpha) LM + alpha KL (+ hidden_weight x the
        relative squared error of the final normalised hidden state against the teacher's)."""
        distilling = teacher is not None and (alpha > 0 or hidden_weight > 0)
        if self.fused and not distilling:
            hidden = self.model.base_model(input_ids=inputs, use_cache=False).last_hidden_state
            head = self.model.get_output_embeddings()
            return linear_cross_entropy(
                hidden.flatten(0, 1), head.weight, head.bias, targets.flatten(), self.chunk
            )
        if not distilling:
            logits = self.model(input_ids=inputs, use_cache=False).logits  # (B, T, V)
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        captured: dict[str, torch.Tensor] = {}
        block = get_arch(self.model).layers[teacher.shared] if teacher.shared else None
        with capture_block_input(block, captured) if block is not None else nullcontext():
            out = self.model(input_ids=inputs, use_cache=False, output_hidden_states=True)
        logits, hidden = out.logits, out.hidden_states[-1]  # (B, T, V), (B, T, D) normalised
        t_logits, t_hidden = teacher.outputs(inputs, captured.get("hidden"))
        lm = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss = (1.0 - alpha) * lm + alpha * distill_kl(logits, t_logits, temperature)
        if hidden_weight > 0:
            err = (hidden.float() - t_hidden.float()).pow(2).mean()
            loss = loss + hidden_weight * err / t_hidden.float().pow(2).mean()
        return loss


# ----------------------------------------------------------------------------- evaluation


def _eval_sums(
    loss_module: nn.Module,
    windows: np.ndarray,
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    env: distributed.DistEnv,
    desc: str | None = None,
) -> tuple[float, int]:
    """(sum of token losses, token count) over this rank's share of ``windows`` (``desc``: a
    progress bar with its ETA on stderr).

    Every rank runs the same number of batches (FSDP needs all ranks in every forward); ranks
    past the end of their share evaluate a repeated batch with weight 0.
    """
    per_rank = math.ceil(len(windows) / env.world_size)
    mine = windows[env.rank * per_rank : (env.rank + 1) * per_rank]
    n_batches = math.ceil(per_rank / batch_size)
    total, count = 0.0, 0
    batches = range(n_batches)
    if desc:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch", leave=False, disable=not env.is_main)
    for b in batches:
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


def evaluate_windows(
    loss_module: nn.Module,
    windows: np.ndarray,
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    env: distributed.DistEnv,
    desc: str | None = None,
) -> float:
    """Mean nats/token over ``windows`` (all ranks together), dropout off, no gradients."""
    was_training = loss_module.training
    loss_module.eval()
    try:
        with torch.no_grad():
            total, count = _eval_sums(loss_module, windows, batch_size, device, autocast, env, desc)
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        distributed.all_reduce_sum(sums, env)
    finally:
        loss_module.train(was_training)
    return float(sums[0] / sums[1])


def evaluate_loss(
    model: nn.Module,
    windows: np.ndarray,
    batch_size: int = 8,
    precision: str = "fp32",
    desc: str | None = None,
) -> float:
    """Mean nats/token of ``model`` on ``windows`` (n, T + 1) from :func:`eval_windows`, one
    process, with ``--precision``'s autocast (pass the training run's micro-batch and precision
    to get the numbers its own evaluations report).

    Deterministic (fixed batches, no sampling, dropout off) and without gradients. ``desc``
    shows a progress bar with its ETA.
    """
    device = next(model.parameters()).device
    env = distributed.DistEnv(0, 1, 0, device)
    autocast = distributed.autocast(precision, device)
    return evaluate_windows(CausalLMLoss(model), windows, batch_size, device, autocast, env, desc)


# --------------------------------------------------------------------------- cached evaluations


def weights_fingerprint(model: nn.Module) -> str:
    """A short identity of ``model``'s weights: every tensor's name, shape and dtype and a
    strided sample of its values (1,024 per tensor), hashed. Cheap next to one forward pass, and
    any trained or differently sliced model gets another fingerprint."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].to("cpu", torch.float32)
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_loss(
    model: nn.Module,
    windows: np.ndarray,
    batch_size: int = 8,
    precision: str = "fp32",
    desc: str | None = None,
) -> float:
    """:func:`evaluate_loss`, remembered in ``$INHERITUNE_CACHE/evals`` by the model's weights,
    the windows, the batch and the precision: a reference's numbers (its zero-shot loss, the
    loss of its first l layers) are computed once per machine, not once per run."""
    spec = {
        "weights": weights_fingerprint(model),
        "windows": hashlib.sha256(np.ascontiguousarray(windows).tobytes()).hexdigest()[:16],
        "shape": list(windows.shape),
        "batch_size": batch_size,
        "precision": precision,
    }

    def compute() -> dict:
        return {"loss": evaluate_loss(model, windows, batch_size, precision, desc)}

    return float(storage.memoized(cache_dir() / "evals", spec, compute)["loss"])
