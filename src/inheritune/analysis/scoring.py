"""Layer-importance scores used by the pruning-style baselines of ``inheritune compare``.

Published ways to pick which layers of a pretrained model to drop, as pure functions, each as
its paper defines it:

* **Block Influence** (ShortGPT, Men et al. 2024, arXiv 2403.03853): for block ``i`` with input
  hidden state ``x_i`` and output ``x_{i+1}``, ``BI_i = 1 - E_t[cos(x_i[t], x_{i+1}[t])]``
  averaged over every token of the calibration windows (ShortGPT averages over tokens).
  A block that barely changes its input (BI near 0) is the first to drop: :func:`lowest_bi_drop`.
* **Angular distance** (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
  Layers", arXiv 2403.17887): ``d(i, n) = arccos(cos(x_i[T], x_{i+n}[T])) / pi`` between
  the input of block ``i`` and the input of block ``i + n`` (the output of the last block when
  ``i + n = L``) at the **last token** ``T`` of each sequence, averaged over sequences
  (``tokens="last"``, the default; PruneMe does the same). ``tokens="all"`` averages over every
  token instead, as for BI. The contiguous block of ``n`` layers starting at the ``i``
  minimising it is dropped: :func:`best_block_drop`.
* **Keep the last layer** (Gromov et al.'s simpler heuristic): drop the deepest layers but the
  final one, keeping ``0..l-2`` and ``L-1``: :func:`keep_last_drop`.

The scores are computed from hidden states (``*_from_states``, pure and hand-checkable) that
:func:`block_states` captures with hooks on the decoder blocks, so they are exactly what enters
and leaves each block, before any final norm, in every supported family. The calibration windows
are fixed-length token windows (no padding), so the last position is each sequence's last token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from inheritune.config import ConfigError
from inheritune.models.arch import get_arch


def _as_ids(input_ids: np.ndarray | torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(input_ids) if not torch.is_tensor(input_ids) else input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.numel() == 0:
        raise ConfigError(f"calibration input_ids must be (batch, seq_len), got {tuple(ids.shape)}")
    return ids.long()


@torch.no_grad()
def block_states(
    model: nn.Module,
    input_ids: np.ndarray | torch.Tensor,
    batch_size: int = 8,
    desc: str | None = None,
) -> list[torch.Tensor]:
    """The L + 1 hidden states around the blocks: input of each block, then the last output.

    Each entry is (N, T, D) float32 on the CPU, where N, T are the shape of ``input_ids``;
    ``desc`` shows a progress bar with its ETA.
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
        starts = range(0, ids.shape[0], batch_size)
        if desc:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, unit="batch", leave=False)
        for start in starts:
            model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [torch.cat(c) for c in chunks]  # L + 1 of (N, T, D)


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token cosine similarity of two (N, T, D) states: (N, T)."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)


ANGULAR_TOKENS = ("last", "all")


def block_influence_from_states(states: Sequence[torch.Tensor]) -> np.ndarray:
    """ShortGPT Block Influence from the L + 1 states of :func:`block_states`, (L,).

    ``BI_i = 1 - mean over every (sequence, token) of cos(states[i], states[i + 1])``.
    """
    return np.array(
        [1.0 - _mean_cos(states[i], states[i + 1]).mean().item() for i in range(len(states) - 1)]
    )


def angular_distances_from_states(
    states: Sequence[torch.Tensor], n: int, tokens: str = "last"
) -> np.ndarray:
    """Angular distance from states[i] to states[i + n] for every i, (L - n + 1,), in [0, 1].

    Entry ``i`` is ``mean arccos(cos(x_i, x_{i+n})) / pi`` over the sequences at their last token
    (``tokens="last"``, Gromov et al.) or over every (sequence, token) (``tokens="all"``).
    """
    if tokens not in ANGULAR_TOKENS:
        raise ConfigError(
            f"--angular-tokens must be one of {', '.join(ANGULAR_TOKENS)}, got {tokens!r}"
        )
    L = len(states) - 1
    if not 1 <= n <= L:
        raise ConfigError(f"angular distance span n must be in [1, {L}] (the layer count), got {n}")
    pick = (lambda h: h[:, -1:]) if tokens == "last" else (lambda h: h)  # (N, 1, D) or (N, T, D)
    out = []
    for i in range(L - n + 1):
        cos = _mean_cos(pick(states[i]), pick(states[i + n])).clamp(-1.0, 1.0)
        out.append((torch.arccos(cos) / torch.pi).mean().item())
    return np.array(out)


def block_influence(
    model: nn.Module, input_ids: np.ndarray | torch.Tensor, batch_size: int = 8
) -> np.ndarray:
    """ShortGPT Block Influence of every block of ``model``, (L,): 1 - mean token cosine."""
    return block_influence_from_states(block_states(model, input_ids, batch_size))


def angular_distances(
    model: nn.Module,
    input_ids: np.ndarray | torch.Tensor,
    n: int,
    batch_size: int = 8,
    tokens: str = "last",
) -> np.ndarray:
    """Gromov et al. angular distance from the input of block i to that of block i + n, (L-n+1,).

    See :func:`angular_distances_from_states` for ``tokens``.
    """
    L = get_arch(model).num_layers
    if not 1 <= n <= L:  # checked here too so a bad span fails before the forward passes
        raise ConfigError(f"angular distance span n must be in [1, {L}] (the layer count), got {n}")
    return angular_distances_from_states(block_states(model, input_ids, batch_size), n, tokens)


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


def keep_last_drop(num_layers: int, k: int) -> list[int]:
    """Gromov et al.'s heuristic: drop the ``k`` deepest layers but the final one, ascending.

    The kept layers are ``0..L-k-2`` and ``L-1``: e.g. L = 6, k = 2 drops [3, 4].
    """
    if not 0 <= k < num_layers:
        raise ConfigError(f"cannot drop {k} of {num_layers} layers and keep the last one")
    return list(range(num_layers - 1 - k, num_layers - 1))
