"""Attention-collapse metrics as pure tensor functions (docs/design/paper.md §1).

Per attention matrix ``A`` (one head, one sequence; ``T x T``, row-stochastic):

* :func:`approx_rank` — k*(tau): the fewest singular values whose squared sum reaches ``tau`` of
  ``||A||_F^2``;
* :func:`dominant_mass` — m*(eta): the fewest columns (largest ``||A[:, j]||^2`` first) that hold
  ``eta`` of ``||A||_F^2``;
* :func:`top_column_share` — p_max, the share of the single largest column.

The paper's Rank is the mean over sequences of the per-sequence k*. The rank of the mean matrix
(``analyze --rank-of-mean``) is a different number: N full-rank permutation matrices can average
to a rank-1 matrix.

Then per layer, from the per-head means over sequences: :func:`layer_max_rank` (MaxRank),
:func:`layer_avg_mass` (AvgMass), :func:`lazy_layers`, :func:`lazy_groups` and
:func:`suggest_depth`. :mod:`inheritune.analysis.analyze` feeds these with attention weights caught layer
by layer; nothing here knows about models.

Shapes: ``N`` sequences, ``B`` sequences in a batch, ``H`` heads, ``L`` layers, ``T`` tokens.
Every matrix function takes any leading batch shape ``(..., T, T)``.

Why eigenvalues and not SVD: the squared singular values of ``A`` are the eigenvalues of the
Gram matrix ``A^T A`` (whose diagonal also holds the squared column norms for m*), and a batched
symmetric eigen-solver on ``(B*H, T, T)`` is several times faster than an SVD per matrix. It
runs in float32 (~3x faster than float64 on CPU); the few matrices whose cumulative share lands
within :data:`REFINE_MARGIN` of the level are decided again in float64, so the integer counts
equal those of a float64 SVD (checked in the tests and the benchmark).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# Cumulative shares are compared with a tolerance: a share that equals tau mathematically (e.g.
# 9 of 10 equal singular values for tau = 0.9) must count as reaching it despite rounding.
SHARE_ATOL = 1e-9
# float32 eigenvalues / column norms carry ~1e-7 relative error each, so a matrix whose
# cumulative share lands within this margin of the level is decided again in float64.
REFINE_MARGIN = 1e-4


def _count_to_reach(shares: torch.Tensor, level: float) -> torch.Tensor:
    """Fewest leading entries of descending ``shares`` (..., T) whose sum reaches ``level``: (...)."""
    cum = shares.cumsum(-1)  # (..., T)
    below = (cum < level - SHARE_ATOL).sum(-1)  # entries still short of the level
    return (below + 1).clamp(max=shares.shape[-1])


def _normalise(values: torch.Tensor) -> torch.Tensor:
    """Descending non-negative values (M, T) -> shares of their sum (M, T)."""
    return values / values.sum(-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)


def _count_refined(values32: torch.Tensor, level: float, exact) -> torch.Tensor:
    """:func:`_count_to_reach` on float32 ``values32`` (M, T), descending; rows within
    :data:`REFINE_MARGIN` of ``level`` are recounted on ``exact(mask)`` (float64, descending)."""
    shares = _normalise(values32)  # (M, T)
    count = _count_to_reach(shares, level)  # (M,)
    cum = shares.cumsum(-1)
    idx = (count - 1).unsqueeze(-1)
    at = cum.gather(-1, idx).squeeze(-1)  # share reached at the chosen count
    before = torch.where(count > 1, cum.gather(-1, (idx - 1).clamp_min(0)).squeeze(-1), 0.0)
    unsure = ((at - level).abs() < REFINE_MARGIN) | ((before - level).abs() < REFINE_MARGIN)
    if unsure.any():
        count[unsure] = _count_to_reach(_normalise(exact(unsure)), level)
    return count


@contextlib.contextmanager
def _one_lapack_thread() -> Iterator[None]:
    """Run batched small eigen-solves on one thread.

    MKL threads each 100 x 100 solve internally; that is slower than one thread even on an idle
    2-core machine, and up to ~90x slower (float64) when other processes share the cores, since
    its threads spin waiting for each other (measured on this project's 2-core machines).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _eigvals_desc(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of symmetric PSD matrices (..., T, T), descending and clamped at 0: (..., T)."""
    with _one_lapack_thread():
        eig = torch.linalg.eigvalsh(gram)  # (..., T) ascending
    return eig.flip(-1).clamp_min(0.0)


def squared_singular_values(attn: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Squared singular values of each matrix, descending: (..., T, T) -> (..., T).

    Computed as eigenvalues of the Gram matrix ``A^T A`` (symmetric PSD).
    """
    a = attn.to(dtype)
    return _eigvals_desc(a.transpose(-1, -2) @ a)  # Gram (..., T, T)


def column_shares(attn: torch.Tensor) -> torch.Tensor:
    """p_j = ||A[:, j]||^2 / ||A||_F^2 for each matrix: (..., T, T) -> (..., T), float64."""
    col = attn.to(torch.float64).square().sum(-2)  # (..., T) squared column norms
    return _normalise(col)


@dataclass
class HeadStats:
    """Per-matrix metrics; for one layer's batch each is (B, H)."""

    rank: torch.Tensor  # int64 k*(tau)
    mass: torch.Tensor  # int64 m*(eta)
    top_share: torch.Tensor  # float64 p_max


def head_stats(attn: torch.Tensor, tau: float = 0.9, eta: float = 0.9) -> HeadStats:
    """k*(tau), m*(eta) and p_max of every matrix: (..., T, T) -> each (...), e.g. (B, H).

    One float32 Gram matrix ``G = A^T A`` per attention matrix serves both metrics: its
    eigenvalues are the squared singular values of ``A`` and its diagonal holds the squared
    column norms. Near-ties are re-decided in float64 (:func:`_count_refined`), so the integer
    counts equal those of a float64 SVD.
    """
    lead, t = attn.shape[:-2], attn.shape[-1]
    a = attn.reshape(-1, t, t).float()  # (M, T, T)
    gram = a.transpose(-1, -2) @ a  # (M, T, T)
    col = gram.diagonal(dim1=-2, dim2=-1).sort(-1, descending=True).values  # (M, T)
    rank = _count_refined(_eigvals_desc(gram), tau, lambda m: squared_singular_values(a[m]))
    mass = _count_refined(col, eta, lambda m: column_shares(a[m]).sort(-1, descending=True).values)
    top = _normalise(col.double())[:, 0]  # (M,)
    return HeadStats(rank.reshape(lead), mass.reshape(lead), top.reshape(lead))


def approx_rank(attn: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """k*(tau): fewest singular values with sum s_i^2 >= tau ||A||_F^2: (..., T, T) -> (...)."""
    return head_stats(attn, tau=tau).rank


def dominant_mass(attn: torch.Tensor, eta: float = 0.9) -> torch.Tensor:
    """m*(eta): fewest columns (largest share first) holding ``eta`` of the mass: (...) int64."""
    return head_stats(attn, eta=eta).mass


def top_column_share(attn: torch.Tensor) -> torch.Tensor:
    """p_max: the share of the largest column of each matrix: (..., T, T) -> (...) float64."""
    return head_stats(attn).top_share


# ---- per-layer aggregation (inputs are per-head means over the N sequences) -----------------


def layer_max_rank(rank: torch.Tensor) -> torch.Tensor:
    """MaxRank(l) = max over heads of the mean rank: (L, H) -> (L,)."""
    return rank.amax(-1)


def layer_avg_mass(mass: torch.Tensor) -> torch.Tensor:
    """AvgMass(l) = mean over heads (not max) of the mean mass: (L, H) -> (L,)."""
    return mass.mean(-1)


def lazy_layers(max_rank: torch.Tensor, tol: float = 0.05) -> torch.Tensor:
    """A layer is lazy when MaxRank == 1, read as MaxRank <= 1 + tol: (L,) -> (L,) bool.

    MaxRank is a mean of integers >= 1, so ``tol`` = 0.05 with N = 100 sequences lets at most 5
    (sequence, head) ranks of the worst head be 2 instead of 1.
    """
    return max_rank <= 1.0 + tol


def lazy_groups(max_rank: torch.Tensor) -> list[tuple[int, int]]:
    """Disjoint contiguous groups of layers with floor(AvgRank) == 1, as (first, last) inclusive.

    AvgRank of a group is the mean MaxRank over its layers (docs/design/paper.md §1). Rule, scanning from
    the first layer to the last: a group starts at a layer whose own MaxRank < 2 and ends at the
    farthest layer j that also has MaxRank < 2 while the group's AvgRank stays < 2 (so
    floor(AvgRank) == 1, since every rank is >= 1); the scan resumes after j. A group can
    therefore hold a high-rank layer in its interior as long as the group's mean stays below 2,
    and every layer with MaxRank < 2 lies in exactly one group (possibly of length 1).
    """
    values = [float(v) for v in max_rank]
    groups: list[tuple[int, int]] = []
    i = 0
    while i < len(values):
        if values[i] >= 2.0:
            i += 1
            continue
        end, total = i, 0.0
        for j in range(i, len(values)):
            total += values[j]
            if values[j] < 2.0 and total / (j - i + 1) < 2.0:
                end = j
        groups.append((i, end))
        i = end + 1
    return groups


def suggest_depth(
    groups: list[tuple[int, int]], num_layers: int, min_group: int = 2
) -> tuple[int, str]:
    """Analysis-based initial depth for the recipe, and the rule that produced it.

    Rule: keep every layer before the deepest lazy group of at least ``min_group`` layers (its
    first layer index, clamped to [1, L]); lazy layers transfer about as much as random weights
    (docs/design/paper.md §1, transfer test), so the student inherits the layers up to the collapsed region.
    With no such group, the paper's default L // 2 is returned.
    """
    long_groups = [g for g in groups if g[1] - g[0] + 1 >= min_group]
    if not long_groups:
        return max(1, num_layers // 2), (
            f"no lazy group of >= {min_group} layers: paper default L//2 = {num_layers // 2}"
        )
    first, last = long_groups[-1]
    depth = min(max(first, 1), num_layers)
    return depth, (
        f"first layer of the deepest lazy group of >= {min_group} layers "
        f"(layers {first}-{last}), clamped to [1, L]"
    )
