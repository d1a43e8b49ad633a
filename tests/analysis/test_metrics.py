"""Attention-collapse metrics on hand-built matrices whose answers are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from inheritune.analysis import metrics
from inheritune.analysis.analyze import HeadMeans


def sink(t: int) -> torch.Tensor:
    """Every row puts all its mass on column 0 (an "attention sink"): (T, T)."""
    a = torch.zeros(t, t)
    a[:, 0] = 1.0
    return a


def causal_uniform(t: int) -> torch.Tensor:
    """Row i spreads evenly over columns 0..i: (T, T)."""
    return torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1).unsqueeze(-1)


def cyclic_shifts(t: int) -> torch.Tensor:
    """All T cyclic permutation matrices: (T, T, T); each has full rank, their mean has rank 1."""
    eye = torch.eye(t)
    return torch.stack([eye.roll(k, dims=1) for k in range(t)])


def numpy_rank_mass(a: np.ndarray, tau: float, eta: float) -> tuple[int, int, float]:
    """Independent reference: SVD and column norms in float64 numpy."""
    s2 = np.linalg.svd(a.astype(np.float64), compute_uv=False) ** 2
    k = int(np.argmax(np.cumsum(s2) / s2.sum() >= tau - 1e-9)) + 1
    col = (a.astype(np.float64) ** 2).sum(0)
    p = np.sort(col / col.sum())[::-1]
    m = int(np.argmax(np.cumsum(p) >= eta - 1e-9)) + 1
    return k, m, float(p[0])


def test_single_column_is_rank_one_and_mass_one():
    a = sink(50)
    assert metrics.approx_rank(a, 0.9).item() == 1
    assert metrics.dominant_mass(a, 0.9).item() == 1
    assert metrics.top_column_share(a).item() == pytest.approx(1.0)


@pytest.mark.parametrize(("t", "tau"), [(100, 0.9), (10, 0.9), (20, 0.95), (7, 0.9), (30, 0.5)])
def test_identity_rank_is_ceil_tau_t(t, tau):
    eye = torch.eye(t)
    # Equal singular values: exactly ceil(tau * T) of them reach tau (ties at tau count).
    assert metrics.approx_rank(eye, tau).item() == math.ceil(round(tau * t, 9))
    assert metrics.dominant_mass(eye, tau).item() == math.ceil(round(tau * t, 9))
    assert metrics.top_column_share(eye).item() == pytest.approx(1 / t)


def test_tau_one_counts_nonzero_singular_values():
    a = torch.zeros(6, 6)
    a[:, 0] = 0.5
    a[:3, 1] = 0.5
    a[3:, 2] = 0.5  # two distinct rows: rank 2
    assert metrics.approx_rank(a, 1.0).item() == 2


def test_batched_shapes_and_per_matrix_values():
    batch = torch.stack([torch.stack([sink(16), torch.eye(16)]), torch.stack([torch.eye(16)] * 2)])
    assert batch.shape == (2, 2, 16, 16)  # (B, H, T, T)
    stats = metrics.head_stats(batch, tau=0.9, eta=0.9)
    assert stats.rank.tolist() == [[1, 15], [15, 15]]
    assert stats.mass.tolist() == [[1, 15], [15, 15]]
    assert stats.top_share[0, 0].item() == pytest.approx(1.0)


def test_mean_of_ranks_differs_from_rank_of_mean():
    t = 20
    perms = cyclic_shifts(t)  # (N=T, T, T): every sequence full rank
    mean_matrix = perms.mean(0)  # uniform 1/T everywhere: rank 1
    assert metrics.approx_rank(mean_matrix, 0.9).item() == 1
    # The pipeline's accumulator, fed in two uneven batches like two forward passes.
    means = HeadMeans(num_layers=1)
    for part in (perms[:7], perms[7:]):
        means.add(0, metrics.head_stats(part.unsqueeze(1), 0.9, 0.9))  # (B, H=1, T, T)
    assert means.mean("rank")[0, 0] == pytest.approx(18.0)  # ceil(0.9 * 20), not 1
    assert means.mean("rank1")[0, 0] == 0.0


def test_accumulator_means_are_per_sequence_means():
    means = HeadMeans(num_layers=2)
    means.add(1, metrics.head_stats(torch.stack([sink(10), torch.eye(10)]).unsqueeze(1), 0.9, 0.9))
    assert means.mean("rank")[1, 0] == pytest.approx((1 + 9) / 2)
    assert means.mean("rank1")[1, 0] == pytest.approx(0.5)
    assert means.mean("top_share")[1, 0] == pytest.approx((1.0 + 0.1) / 2)


def test_random_causal_softmax_agrees_with_numpy_svd():
    torch.manual_seed(0)
    t = 40
    scores = torch.randn(3, 4, t, t) * torch.linspace(0.5, 6, 4).view(1, 4, 1, 1)
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    attn = scores.softmax(-1)  # (B, H, T, T), sharp to flat heads
    for tau, eta in [(0.9, 0.9), (0.8, 0.95), (0.99, 0.5)]:
        stats = metrics.head_stats(attn, tau, eta)
        for b in range(3):
            for h in range(4):
                k, m, p = numpy_rank_mass(attn[b, h].numpy(), tau, eta)
                assert stats.rank[b, h].item() == k
                assert stats.mass[b, h].item() == m
                assert stats.top_share[b, h].item() == pytest.approx(p, rel=1e-6)
    assert len(set(metrics.approx_rank(attn, 0.9).flatten().tolist())) > 3  # not all the same


def test_causal_uniform_known_values():
    # Column j of the causal-uniform matrix has squared norm sum_{i>=j} 1/(i+1)^2: decreasing in
    # j, so the dominant columns are the first ones.
    t = 12
    a = causal_uniform(t)
    col = np.array([sum(1 / (i + 1) ** 2 for i in range(j, t)) for j in range(t)])
    p = col / col.sum()
    expected = int(np.argmax(np.cumsum(p) >= 0.9)) + 1
    assert metrics.dominant_mass(a, 0.9).item() == expected
    assert metrics.top_column_share(a).item() == pytest.approx(p[0])


def test_lazy_layers_tolerance():
    max_rank = torch.tensor([1.0, 1.04, 1.06, 3.0])
    assert metrics.lazy_layers(max_rank, 0.05).tolist() == [True, True, False, False]
    assert metrics.lazy_layers(max_rank, 0.0).tolist() == [True, False, False, False]


def test_lazy_groups_rule():
    max_rank = torch.tensor([5.0, 1.0, 1.0, 5.0, 1.5, 3.0, 1.0])
    # (1, 2): adding layer 3 (5.0) ends on a high-rank layer, and 4..6 would lift the mean >= 2.
    # (4, 6): mean (1.5 + 3 + 1) / 3 = 1.83 < 2 holds a rank-3 layer inside.
    assert metrics.lazy_groups(max_rank) == [(1, 2), (4, 6)]
    assert metrics.lazy_groups(torch.tensor([2.0, 7.0])) == []
    assert metrics.lazy_groups(torch.tensor([1.9])) == [(0, 0)]
    assert metrics.lazy_groups(torch.ones(4)) == [(0, 3)]


def test_suggest_depth():
    assert metrics.suggest_depth([(1, 2), (4, 6)], 7)[0] == 4
    # Singletons do not drive the suggestion with min_group=2; paper default instead.
    depth, rule = metrics.suggest_depth([(5, 5)], 12)
    assert depth == 6 and "L//2" in rule
    assert metrics.suggest_depth([(5, 5)], 12, min_group=1)[0] == 5
    # Everything lazy: clamp to at least one layer.
    assert metrics.suggest_depth([(0, 9)], 10)[0] == 1
    assert metrics.suggest_depth([], 1)[0] == 1


def test_rank_of_mean_by_hand():
    # Two causal 2 x 2 attention matrices: a sink (rank 1) and the identity (two equal singular
    # values, so k*(tau) = 2 for any tau > 1/2). Their mean M = [[1, 0], [1/2, 1/2]] has
    # M^T M = [[5/4, 1/4], [1/4, 1/4]]: trace 3/2, determinant 1/4, so s_1^2 = (3 + sqrt 5) / 4
    # and the top share is (3 + sqrt 5) / 6 = 0.873: k* of the mean is 2 at tau 0.9, 1 at 0.85.
    a = torch.stack([sink(2), torch.eye(2)])  # (N=2, T, T)
    top_share = (3 + math.sqrt(5)) / 6
    s2 = np.linalg.svd(a.mean(0).double().numpy(), compute_uv=False) ** 2
    assert s2[0] / s2.sum() == pytest.approx(top_share)  # the hand algebra is right
    assert 0.85 < top_share < 0.9
    for tau, want in [(0.9, 2), (0.85, 1)]:
        means = HeadMeans(num_layers=1)
        for part in (a[:1], a[1:]):  # one window per batch, as two forward passes would give
            part = part.unsqueeze(1)  # (B=1, H=1, T, T)
            means.add(0, metrics.head_stats(part, tau, 0.9))
            means.add_matrices(0, part)
        assert means.rank_of_mean(tau).tolist() == [[want]]
        assert means.mean("rank")[0, 0] == pytest.approx(1.5)  # the paper's Rank: (1 + 2) / 2
