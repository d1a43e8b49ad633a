"""One layer-selection mechanism: parsing, every rule by hand, growth order, the score cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_model
from inheritune.analysis import scoring
from inheritune.analysis import selection as sel
from inheritune.analysis.layer_scores import layer_scores
from inheritune.config import ConfigError

# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("0-13", list(range(14))), ("0,1,2,5", [0, 1, 2, 5]), ("0-3,8", [0, 1, 2, 3, 8]),
     (" 7 ", [7]), ("29", [29])],
)  # fmt: skip
def test_parse_layers(spec, expected):
    assert sel.parse_layers(spec, 30) == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "empty"),
        ("0-30", r"index 30 is out of range; the reference has 30 layers"),
        ("0,1,1", r"duplicate layer indices \[1\]"),
        ("5-3", "backwards"),
        ("a-b", "cannot parse 'a-b'"),
        ("0,,1", "cannot parse ''"),
        ("-1", "cannot parse '-1'"),
    ],
)
def test_parse_layers_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        sel.parse_layers(spec, 30)


def test_parse_select():
    assert sel.parse_select("bi") == ("bi", None)
    assert sel.parse_select("0,1,2,5-7") == ("list", [0, 1, 2, 5, 6, 7])
    for bad, match in [
        ("best", "must be one of first, bi, angular, lazy, keep-last"),
        ("", "must be one of"),
        ("0,2,2", r"duplicate layer indices \[2\]"),
        ("3,1", "ascending"),
        ("0-", "cannot parse"),
    ]:
        with pytest.raises(ConfigError, match=match):
            sel.parse_select(bad)
    with pytest.raises(ConfigError, match="out of range"):
        sel.kept_layers("0,4", 4, None)
    with pytest.raises(ConfigError, match="lists 2 layers but 3"):
        sel.kept_layers("0,1", 4, 3)
    with pytest.raises(ConfigError, match="cannot keep 5 of the reference's 4"):
        sel.kept_layers("first", 4, 5)
    with pytest.raises(ConfigError, match="cannot keep 0"):
        sel.kept_layers("bi", 4, 0, sel.LayerScores(4, block_influence=[1, 2, 3, 4]))
    with pytest.raises(ConfigError, match="needs layer scores"):
        sel.kept_layers("bi", 4, 2)
    cfg = sel.SelectConfig(select="lazy")
    assert cfg.rule == "lazy" and cfg.needs_scores
    assert not sel.SelectConfig(select="0-2").needs_scores
    with pytest.raises(ConfigError, match="--angular-tokens"):
        sel.SelectConfig(angular_tokens="first")


# --------------------------------------------------------------------------- the rules


def _scores(L: int = 6) -> sel.LayerScores:
    bi = [0.5, 0.1, 0.3, 0.05, 0.2, 0.4]
    # angular[n-1][i]: the 2-span starting at 2 is the least distant
    angular = [[0.3, 0.1, 0.2, 0.15, 0.05, 0.4]] + [
        [0.5 if i != 2 else 0.01 for i in range(L - n + 1)] for n in range(2, L + 1)
    ]
    return sel.LayerScores(L, block_influence=bi, angular=angular, max_rank=[9, 1, 1, 4, 1, 2])


def test_rules_by_hand():
    s, L = _scores(), 6
    assert sel.kept_layers("first", L, 4) == [0, 1, 2, 3]
    assert sel.kept_layers("keep-last", L, 4) == [0, 1, 2, 5]
    # bi drops the two lowest BI (layers 3 and 1)
    assert sel.kept_layers("bi", L, 4, s) == [0, 2, 4, 5]
    # angular drops the contiguous 2-span of least distance: 2, 3
    assert sel.kept_layers("angular", L, 4, s) == [0, 1, 4, 5]
    # lazy drops lowest MaxRank, the deeper first among equals: 4 and 2 (rank 1), not 1
    assert sel.kept_layers("lazy", L, 4, s) == [0, 1, 3, 5]
    assert sel.kept_layers("0,2,5", L, None) == [0, 2, 5]
    assert sel.kept_layers("bi", L, L, s) == list(range(L))
    assert sel.kept_layers("angular", L, L, s) == list(range(L))
    table = sel.selection_table(L, 4, s)
    assert table["bi"] == [0, 2, 4, 5] and set(table) == set(sel.RULES)
    assert set(sel.selection_table(L, 4, None)) == {"first", "keep-last"}


def test_growth_order():
    s, L = _scores(), 6
    # first grows by depth, exactly the paper's next layers
    w = sel.importance("first", L)
    assert sel.grow([0, 1], 2, w) == [0, 1, 2, 3]
    # bi adds back the dropped layers of highest BI, in their original order
    kept = sel.kept_layers("bi", L, 3, s)  # drops 3, 1, 4 -> keeps 0, 2, 5
    assert kept == [0, 2, 5]
    assert sel.grow(kept, 1, sel.importance("bi", L, s)) == [0, 2, 4, 5]
    assert sel.grow(kept, 2, sel.importance("bi", L, s)) == [0, 1, 2, 4, 5]
    # angular ranks by each layer's own (span-1) distance; lazy by MaxRank, ties shallower
    assert sel.grow([0, 5], 1, sel.importance("angular", L, s)) == [0, 2, 5]
    assert sel.grow([0, 3], 2, sel.importance("lazy", L, s)) == [0, 1, 3, 5]
    # more than is left: everything
    assert sel.grow([0, 3], 10, w) == list(range(L))
    assert sel.spans([0, 2, 5], L) == [(1, 2), (3, 5)]
    assert sel.spans([0, 1, 2], L) == [(3, 6)]
    assert sel.spans(list(range(L)), L) == []


# --------------------------------------------------------------------------- measured scores


def test_scores_match_scoring_and_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("INHERITUNE_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama", layers=4)
    windows = np.random.default_rng(0).integers(0, 100, size=(3, 12))
    s = layer_scores(model, windows, angular_tokens="all")
    np.testing.assert_allclose(s.block_influence, scoring.block_influence(model, windows))
    for n in (1, 2, 4):
        np.testing.assert_allclose(
            s.angular_distance(n), scoring.angular_distances(model, windows, n, tokens="all")
        )
    assert len(s.max_rank) == 4
    entries = sorted((tmp_path / "cache" / "scores").glob("*.json"))
    assert len(entries) == 2  # one forward for BI + angular, one eager pass for MaxRank
    # a second call is served from the cache: tamper with it and see the tampered value
    for e in entries:
        d = json.loads(e.read_text())
        if "block_influence" in d:
            d["block_influence"][0] = 123.0
            e.write_text(json.dumps(d))
    assert layer_scores(model, windows, ["block_influence"], "all").block_influence[0] == 123
    # other weights, other windows or other tokens: measured again
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert layer_scores(model, windows, ["block_influence"], "all").block_influence[0] != 123
    assert len(list((tmp_path / "cache" / "scores").glob("*.json"))) == 3
    only = layer_scores(model, windows, ["max_rank"], cache=False)
    assert only.block_influence is None and only.angular is None
    with pytest.raises(ConfigError, match="not measured"):
        only.require("block_influence")


def test_depth_counts_the_bridges():
    s, L = _scores(), 6
    # first: one top bridge, so --num-layers 4 keeps 3
    assert sel.kept_for_depth("first", L, 4) == ([0, 1, 2], [(3, 6)])
    assert sel.kept_for_depth("keep-last", L, 4) == ([0, 1, 5], [(2, 5)])
    # bi at 4: 1 bridge would keep 3 = [0, 2, 5] with 2 spans; 2 bridges keep 2 = [0, 5] with
    # 1 span: the count jumped past 2, so 3 kept layers bridge their longest span (1 bridge)
    assert sel.kept_layers("bi", L, 3, s) == [0, 2, 5]
    assert sel.kept_layers("bi", L, 2, s) == [0, 5]
    kept, bridged = sel.kept_for_depth("bi", L, 4, s)
    assert kept == [0, 2, 5] and bridged == [(3, 5)] and len(kept) + len(bridged) == 4
    # an exact fit: 1 bridge would keep [0, 2, 4, 5] with 2 spans; 2 bridges keep [0, 2, 5]
    # with 2 spans
    assert sel.kept_for_depth("bi", L, 5, s) == ([0, 2, 5], [(1, 2), (3, 5)])
    # --bridge-spans caps the bridges
    assert sel.kept_for_depth("bi", L, 5, s, max_spans=1) == ([0, 2, 4, 5], [(3, 4)])
    # a list bridges its own spans; --num-layers, if given, must agree
    assert sel.kept_for_depth("0,3", L, None) == ([0, 3], [(1, 3), (4, 6)])
    with pytest.raises(ConfigError, match="make 4 layers, not --num-layers 3"):
        sel.kept_for_depth("0,3", L, 3)
    # nothing removed: nothing to bridge
    assert sel.kept_for_depth("first", L, L) == (list(range(L)), [])
    assert sel.bridged_spans([1, 4], L, 1) == [(2, 4)]  # the longest
    assert sel.bridged_spans([0, 3], L, 1) == [(4, 6)]  # ties: the deeper
