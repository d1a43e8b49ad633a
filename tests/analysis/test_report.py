"""The analysis result and its report (analysis_report.py): per-layer values derived from
per-head means, and a report that states its definitions and its layer numbering. The report
files written from a real analysis are checked in test_analyze.py."""

from __future__ import annotations

import numpy as np

from inheritune.analysis.report import AnalysisResult, summary_table


def test_result_derived_fields():
    rank = np.array([[3.0, 2.0], [1.0, 1.02], [1.0, 5.0], [1.0, 1.0]])
    result = AnalysisResult(
        model="m",
        input_ids=np.zeros((2, 5), dtype=np.int64),
        rank=rank,
        mass=rank + 1,
        top_share=np.full_like(rank, 0.5),
        rank1_frac=np.zeros_like(rank),
    )
    assert result.max_rank.tolist() == [3.0, 1.02, 5.0, 1.0]  # max over heads
    np.testing.assert_allclose(result.avg_mass, [3.5, 2.01, 4.0, 2.0])  # mean over heads
    assert result.lazy_layers == [1, 3]
    assert result.groups == [(1, 1), (3, 3)]
    assert result.half_depth == 2
    assert result.suggested_depth == 2  # no group of >= 2 layers: paper default
    d = result.to_dict()
    assert [layer["lazy"] for layer in d["layers"]] == [False, True, False, True]
    assert "1 + 0.05" in d["rules"]["lazy_layer"]


def test_report_states_definitions_and_numbering():
    result = AnalysisResult(
        model="m",
        input_ids=np.zeros((2, 5), dtype=np.int64),
        rank=np.ones((2, 3)),
        mass=np.ones((2, 3)),
        top_share=np.ones((2, 3)),
        rank1_frac=np.ones((2, 3)),
        tau=0.8,
        eta=0.95,
    )
    d = result.to_dict()
    assert d["layer_numbering"] == "0-based (paper plots number from 1)"
    defs = d["definitions"]
    assert defs["tau"] == 0.8 and defs["eta"] == 0.95
    assert "squared singular values" in defs["spectral_energy"]
    assert "mean over the windows of k*" in defs["rank"]
    assert "squared column norms" in defs["mass"]
    assert "numbered from 0" in summary_table(result)
