"""benchmarks/study.py's queue and verdict: pure functions of the finished rows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def finished(study, row: dict, loss: float) -> dict:
    ref = {"brown": 3.9, "shakespeare": 3.8, "botchan": 3.8, "train_windows": 3.7}
    end = {"brown": loss + 0.1, "shakespeare": loss, "botchan": loss, "train_windows": loss}
    return {**row, "end": end, "start": end, "reference": ref}


def test_the_queue_grows_from_the_training_split_losses(study):
    done = {}
    rows = study.plan(done)
    assert [r["id"] for r in rows] == [f"{s}-20L-brown" for s in study.FIRST]
    losses = {"first": 5.0, "bi": 4.2, "angular": 4.6, "lazy": 4.9, "auto": 4.3}
    for r in rows:
        done[r["id"]] = finished(study, r, losses[r["select"]])
    done["lazy-20L-brown"]["same_as"] = "first-20L-brown"  # not a start of its own: skipped
    done["lazy-20L-brown"]["end"]["train_windows"] = 1.0
    rows = study.plan(done)
    # the best two on the training-split windows: bi, then auto
    assert [r["id"] for r in rows[5:]] == [
        "bi-20L-brown-kd", "auto-20L-brown-kd", "bi-20L-brown-seed1", "auto-20L-brown-seed1",
        "bi-16L-brown", "auto-16L-brown",
    ]  # fmt: skip
    later = {"bi-20L-brown-kd": 4.4, "auto-20L-brown-kd": 4.0, "bi-20L-brown-seed1": 4.25}
    later |= {"auto-20L-brown-seed1": 4.35, "bi-16L-brown": 4.6, "auto-16L-brown": 4.7}
    for r in rows[5:]:
        done[r["id"]] = finished(study, r, later[r["id"]])
    rows = study.plan(done)
    # winner by its mean over seeds at 20 layers: auto with distillation (4.0)
    assert [r["id"] for r in rows[11:]] == ["auto-20L-shakespeare-kd", "auto-20L-shakespeare"]
    assert len(rows) == 13


def test_the_verdict_says_when_the_top_two_are_within_the_seed_spread(study):
    rows = [
        finished(study, study.spec("bi"), 4.20),
        finished(study, study.spec("auto"), 4.23),
        finished(study, study.spec("first"), 5.0),
        finished(study, study.spec("bi", seed=1), 4.30),
    ]
    text = "\n".join(study.verdict(rows))
    assert "**bi**" in text and "margin 0.030" in text and "**within** it" in text
    assert "The paper's recipe (first 19 + top bridge) ends at 5.100" in text
    rows[3] = finished(study, study.spec("bi", seed=1), 4.21)
    assert "the margin is larger than it" in "\n".join(study.verdict(rows))
    assert study.verdict(rows[:1]) == ["Too few rows for a verdict yet."]


def test_a_longer_row_is_shown_beside_its_study_row_with_the_goal(study, tmp_path):
    def row(loss: float, tokens: int, train_s: float) -> dict:
        return {**finished(study, study.spec("bi"), loss), "tokens": tokens,
                "seconds": {"train": train_s}}  # fmt: skip

    lines = study.longer_rows([row(4.5, 51_200, 97)], [row(4.2, 204_800, 380)], tmp_path / "x")
    table = [x for x in lines if x.startswith("| bi-20L-brown")]
    # brown = loss + 0.1 against 3.9; botchan = loss against 3.8
    assert table[0] == "| bi-20L-brown | 51,200 | 97 | 4.600 / 4.500 | +0.700 / +0.700 | no |"
    assert table[1] == "| bi-20L-brown | 204,800 | 380 | 4.300 / 4.200 | +0.400 / +0.400 | yes |"
