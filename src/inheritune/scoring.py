"""Layer-importance scores used by the pruning-style baselines of ``inheritune compare``.

Two published ways to pick which layers of a pretrained model to drop, as pure functions:

* **Block Influence** (ShortGPT, Men et al. 2024, arXiv 2403.03853): for block ``i`` with input
  hidden state ``x_i`` and output ``x_{i+1}``, ``BI_i = 1 - E_t[cos(x_i[t], x_{i+1}[t])]``
  averaged over every token of the calibration windows. A block that barely changes its input
  (BI near 0) is the first to drop: :func:`lowest_bi_drop`.
* **Angular distance** (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
  Layers", arXiv 2403.17887): ``d(i, n) = E_t[arccos(cos(x_i[t], x_{i+n}[t])) / pi]`` between the
  input of block ``i`` and the input of block ``i + n`` (the output of the last block when
  ``i + n = L``). The contiguous block of ``n`` layers starting at the ``i`` minimising it is
  dropped: :func:`best_block_drop`. Gromov et al. measure on the last token only; we average
  over all tokens, as for BI, so both scores see the same calibration data.

Hidden states are captured with hooks on the decoder blocks (:func:`block_states`), so they are
exactly what enters and leaves each block, before any final norm, in every supported family.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from inheritune.arch import get_arch
from inheritune.config import ConfigError


def _as_ids(input_ids: np.ndarray | torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(input_ids) if not torch.is_tensor(input_ids) else input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.numel() == 0:
        raise ConfigError(f"calibration input_ids must be (batch, seq_len), got {tuple(ids.shape)}")
    return ids.long()


@torch.no_grad()
def block_states(
    model: nn.Module, input_ids: np.ndarray | torch.Tensor, batch_size: int = 8
) -> list[torch.Tensor]:
    """The L + 1 hidden states around the blocks: input of each block, then the last output.

    Each entry is (N, T, D) float32 on the CPU, where N, T are the shape of ``input_ids``.
    """
    arch = get_arch(model)
    ids = _as_ids(input_ids)
    device = next(model.parameters()).device
    L = arch.num_layers
    chunks: list[list[torch.Tensor]] = [[] for _ in range(L + 1)]

    def pre_hook(i: int):
        def hook(_mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            chunks[i].append(h.detach().float().cpu())

        return hook

    def last_hook(_mod, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        chunks[L].append(h.detach().float().cpu())

    handles = [
        arch.layers[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i in range(L)
    ]
    handles.append(arch.layers[L - 1].register_forward_hook(last_hook))
    was_training = model.training
    model.eval()  # dropout off: the scores must be deterministic
    try:
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [torch.cat(c) for c in chunks]  # L + 1 of (N, T, D)


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token cosine similarity of two (N, T, D) states: (N, T)."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)


def block_influence(
    model: nn.Module, input_ids: np.ndarray | torch.Tensor, batch_size: int = 8
) -> np.ndarray:
    """ShortGPT Block Influence of every block, (L,): 1 - mean token cosine(input, output)."""
    states = block_states(model, input_ids, batch_size)
    return np.array(
        [1.0 - _mean_cos(states[i], states[i + 1]).mean().item() for i in range(len(states) - 1)]
    )


def angular_distances(
    model: nn.Module, input_ids: np.ndarray | torch.Tensor, n: int, batch_size: int = 8
) -> np.ndarray:
    """Gromov et al. angular distance from the input of block i to that of block i + n, (L-n+1,).

    Entry ``i`` is ``mean_t arccos(cos(x_i[t], x_{i+n}[t])) / pi``, in [0, 1].
    """
    L = get_arch(model).num_layers
    if not 1 <= n <= L:
        raise ConfigError(f"angular distance span n must be in [1, {L}] (the layer count), got {n}")
    states = block_states(model, input_ids, batch_size)
    out = []
    for i in range(L - n + 1):
        cos = _mean_cos(states[i], states[i + n]).clamp(-1.0, 1.0)
        out.append((torch.arccos(cos) / torch.pi).mean().item())
    return np.array(out)


def lowest_score_drop(scores: Sequence[float] | np.ndarray, k: int, prefer_deep: bool = False):
    """Indices of the ``k`` lowest scores, sorted ascending (the layers to drop).

    Ties go to the shallower layer, or to the deeper one with ``prefer_deep`` (used for MaxRank,
    where many deep layers sit exactly at rank 1 and collapse is a property of depth).
    """
    s = np.asarray(scores, dtype=float)
    if not 0 <= k <= len(s):
        raise ConfigError(f"cannot drop {k} of {len(s)} layers")
    idx = np.arange(len(s))
    order = np.lexsort((-idx if prefer_deep else idx, s))  # primary key: score
    return sorted(int(i) for i in order[:k])


def lowest_bi_drop(scores: Sequence[float] | np.ndarray, k: int) -> list[int]:
    """The ``k`` blocks with the lowest Block Influence (ShortGPT's pruning rule), ascending."""
    return lowest_score_drop(scores, k)


def best_block_drop(dist: Sequence[float] | np.ndarray, n: int) -> list[int]:
    """The contiguous block ``[i*, i*+n)`` with the smallest angular distance (first on ties).

    ``dist`` is the output of :func:`angular_distances` for the same ``n``: (L - n + 1,).
    """
    d = np.asarray(dist, dtype=float)
    if n < 1 or len(d) == 0:
        raise ConfigError(f"cannot drop a block of {n} layers from distances of length {len(d)}")
    start = int(np.argmin(d))
    return list(range(start, start + n))
