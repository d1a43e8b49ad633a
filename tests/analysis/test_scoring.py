"""Layer-importance scores: hand-checkable cases on tiny models and the pure drop rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_model
from inheritune.analysis import scoring
from inheritune.config import ConfigError
from inheritune.models.arch import get_arch

# The projections that write a block's attention and MLP back into the residual stream.
_OUT_PROJ = {
    "llama": ("o_proj", "down_proj"),
    "gpt2": ("c_proj",),
    "gpt_neox": ("dense", "dense_4h_to_h"),
    "opt": ("out_proj", "fc2"),
}


def make_identity(model, i: int) -> None:
    """Zero the output projections of block i: with a pre-norm residual block it returns its input."""
    arch = get_arch(model)
    names = _OUT_PROJ[model.config.model_type]
    with torch.no_grad():
        for name, p in arch.layers[i].named_parameters():
            if any(name.split(".")[-2] == n for n in names):
                p.zero_()


def ids(n: int = 3, t: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 300, size=(n, t))


def test_block_states_are_the_block_inputs():
    model = tiny_model("llama", layers=3)
    x = ids()
    states = scoring.block_states(model, x, batch_size=2)  # two batches: concatenated in order
    assert len(states) == 4 and states[0].shape == (3, 12, 32)
    hf = model(input_ids=torch.as_tensor(x), output_hidden_states=True).hidden_states
    for i in range(3):  # HF's hidden_states[i] is the input of block i
        torch.testing.assert_close(states[i], hf[i])
    # the last entry is the raw output of the last block, not the final-normed state HF returns
    assert not torch.allclose(states[3], hf[3])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "opt"])
def test_identity_block_has_zero_influence_and_is_dropped_first(arch):
    model = tiny_model(arch, layers=4)
    make_identity(model, 2)
    bi = scoring.block_influence(model, ids())
    assert bi.shape == (4,)
    assert abs(bi[2]) < 1e-6
    assert (np.delete(bi, 2) > 1e-3).all()  # the untouched random blocks do move the state
    assert scoring.lowest_bi_drop(bi, 1) == [2]


def test_angular_distance_finds_the_identity_block():
    model = tiny_model("llama", layers=5)
    make_identity(model, 1)
    make_identity(model, 2)
    d = scoring.angular_distances(model, ids(), n=2)
    assert d.shape == (4,)
    assert d[1] < 1e-6  # input of block 1 == input of block 3
    assert (np.delete(d, 1) > 1e-3).all() and (d <= 1).all()
    assert scoring.best_block_drop(d, 2) == [1, 2]


def test_angular_distance_of_opposite_states_is_one_and_n_equals_l():
    # n = L compares the embeddings with the last block's output: one entry
    model = tiny_model("llama", layers=2)
    assert scoring.angular_distances(model, ids(), n=2).shape == (1,)
    with pytest.raises(ConfigError, match="span n"):
        scoring.angular_distances(model, ids(), n=3)
    # the formula itself: antiparallel vectors are distance 1, orthogonal 1/2
    a = torch.tensor([[[1.0, 0.0]]])
    assert math.isclose(
        (torch.arccos(scoring._mean_cos(a, -a)) / math.pi).item(), 1.0, abs_tol=1e-6
    )
    b = torch.tensor([[[0.0, 1.0]]])
    assert math.isclose((torch.arccos(scoring._mean_cos(a, b)) / math.pi).item(), 0.5)


def test_block_influence_matches_hand_computed_cosines():
    model = tiny_model("llama", layers=2)
    x = ids(2, 8)
    states = scoring.block_states(model, x)
    a, b = states[0].reshape(-1, 32).double(), states[1].reshape(-1, 32).double()
    expected = 1 - np.mean(
        [(u @ v / (u.norm() * v.norm())).item() for u, v in zip(a, b, strict=True)]
    )
    assert math.isclose(scoring.block_influence(model, x)[0], expected, rel_tol=1e-9)


def test_drop_rules():
    assert scoring.lowest_bi_drop([0.5, 0.1, 0.3, 0.05], 2) == [1, 3]
    assert scoring.lowest_bi_drop([0.5, 0.1], 0) == []
    assert scoring.best_block_drop([0.3, 0.1, 0.2], 2) == [1, 2]
    assert scoring.best_block_drop([0.1, 0.3, 0.1], 3) == [0, 1, 2]  # first on ties
    # ties: shallow first by default, deep first when asked (MaxRank of collapsed layers)
    assert scoring.lowest_score_drop([1.0, 2.0, 1.0, 1.0], 2) == [0, 2]
    assert scoring.lowest_score_drop([1.0, 2.0, 1.0, 1.0], 2, prefer_deep=True) == [2, 3]
    with pytest.raises(ConfigError, match="cannot drop 5 of 4"):
        scoring.lowest_bi_drop([0.1] * 4, 5)


def test_scores_do_not_change_the_model_mode():
    model = tiny_model("llama", layers=2).train()
    scoring.block_influence(model, ids(1, 4)[0])  # a 1-D window is one sequence
    assert model.training


def hand_states() -> list[torch.Tensor]:
    """Three states (L = 2 blocks) of 2 sequences x 2 tokens of 2-d vectors at known angles.

    Angles from (1, 0), and lengths that must not matter:
      state 0: every token at 0 deg
      state 1: seq 0 at 0, 90 deg; seq 1 at 60, 0 deg
      state 2: seq 0 at 180, 90 deg; seq 1 at 60, 0 deg
    """
    r3 = math.sqrt(3)
    s0 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[2.0, 0.0], [1.0, 0.0]]])
    s1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, r3 / 2], [3.0, 0.0]]])
    s2 = torch.tensor([[[-2.0, 0.0], [0.0, 5.0]], [[1.0, r3], [1.0, 0.0]]])
    return [s0, s1, s2]  # (N=2, T=2, D=2) each


def test_block_influence_by_hand():
    # block 0: cosines 1, 0, 1/2, 1 -> 1 - 2.5/4; block 1: cosines -1, 1, 1, 1 -> 1 - 2/4
    np.testing.assert_allclose(scoring.block_influence_from_states(hand_states()), [0.375, 0.5])
    assert scoring.lowest_bi_drop([0.375, 0.5], 1) == [0]


def test_angular_distance_last_token_by_hand():
    # last tokens: state 0 at 0, 0; state 1 at 90, 0; state 2 at 90, 0 (degrees, seq 0 and 1)
    d1 = scoring.angular_distances_from_states(hand_states(), 1)  # default: last token
    np.testing.assert_allclose(d1, [(0.5 + 0.0) / 2, (0.0 + 0.0) / 2], atol=1e-12)
    d2 = scoring.angular_distances_from_states(hand_states(), 2, tokens="last")
    np.testing.assert_allclose(d2, [(0.5 + 0.0) / 2])
    assert scoring.best_block_drop(d1, 1) == [1]


def test_angular_distance_all_tokens_by_hand():
    # state 0 -> 1: angles 0, 90, 60, 0 deg = 0, 1/2, 1/3, 0 of pi
    # state 1 -> 2: 180, 0, 0, 0 deg = 1, 0, 0, 0;  state 0 -> 2: 180, 90, 60, 0 deg
    d1 = scoring.angular_distances_from_states(hand_states(), 1, tokens="all")
    np.testing.assert_allclose(d1, [(0.5 + 1 / 3) / 4, 1 / 4])
    d2 = scoring.angular_distances_from_states(hand_states(), 2, tokens="all")
    np.testing.assert_allclose(d2, [(1 + 0.5 + 1 / 3) / 4])
    # the two definitions disagree here: all tokens drops block 0, the last token block 1
    assert scoring.best_block_drop(d1, 1) == [0]
    with pytest.raises(ConfigError, match="--angular-tokens must be one of last, all"):
        scoring.angular_distances_from_states(hand_states(), 1, tokens="first")
    with pytest.raises(ConfigError, match="span n"):
        scoring.angular_distances_from_states(hand_states(), 3)


def test_model_scores_are_the_state_scores():
    model = tiny_model("llama", layers=3)
    x = ids()
    states = scoring.block_states(model, x)
    np.testing.assert_array_equal(
        scoring.block_influence(model, x), scoring.block_influence_from_states(states)
    )
    for tokens in ("last", "all"):
        np.testing.assert_array_equal(
            scoring.angular_distances(model, x, 2, tokens=tokens),
            scoring.angular_distances_from_states(states, 2, tokens),
        )
    last = scoring.angular_distances(model, x, 1)
    # the default reads only the last position: changing an earlier token's state leaves it
    assert not np.allclose(last, scoring.angular_distances(model, x, 1, tokens="all"))
    states[1][:, 0] = -states[1][:, 0]
    np.testing.assert_array_equal(scoring.angular_distances_from_states(states, 1), last)


def test_keep_last_drop():
    # L = 6, keep 4: layers 0, 1, 2 and the final layer 5; drop 3, 4
    assert scoring.keep_last_drop(6, 2) == [3, 4]
    assert scoring.keep_last_drop(4, 2) == [1, 2]  # keeps 0 and 3
    assert scoring.keep_last_drop(4, 3) == [0, 1, 2]  # depth 1: only the last layer stays
    assert scoring.keep_last_drop(4, 0) == []
    with pytest.raises(ConfigError, match="cannot drop 4 of 4"):
        scoring.keep_last_drop(4, 4)
