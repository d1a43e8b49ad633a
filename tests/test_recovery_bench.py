"""benchmarks/recovery.py drives the library end to end (tiny Llama, a couple of seconds)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recovery.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("recovery_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture
def argv(tiny_folder, corpus_file, tmp_path):
    general = tmp_path / "general.txt"
    general.write_text("It was the best of times, it was the worst of times.\n" * 60)
    results = tmp_path / "results.jsonl"
    return results, [
        *("--model", str(tiny_folder("llama", layers=4)), "--data", str(corpus_file)),
        *("--general", str(general), "--results", str(results), "--layers", "2"),
        *("--seq-len", "16", "--batch-size", "2", "--eval-seq", "16", "--eval-windows", "4"),
        *("--eval-tokens", "64", "--eval-every", "3"),
    ]


def test_timed_run_with_calibration_frozen_embeddings_and_report(bench, argv, capsys):
    results, args = argv
    assert bench.main([*args, "--exp", "fast", "--seconds", "3"]) == 0
    (rec,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert rec["version"] == bench.VERSION and rec["knobs"]["layers"] == 2
    assert rec["train"]["freeze"] == ["embed_tokens"] and rec["train"]["seq_len"] == 16
    assert set(rec["start"]) == set(rec["final"]) == set(rec["eval"]["windows"])
    assert len(rec["start"]) == 2  # the training corpus's held-out split and the general text
    calib = rec["calibration"]
    assert calib["after"] <= calib["before"]
    # the loop stops once its budget (what the calibration left of the 3 s) is spent; the
    # budget charges the loop's evaluations, so training itself gets part of it
    assert rec["steps"] > 0 and rec["tokens"] == rec["steps"] * 2 * 16
    budget = 3 - calib["seconds"]
    assert 0 < rec["train_s"] <= budget + 2.0
    steps = [p["step"] for p in rec["curve"]]
    assert steps[0] == 0 and steps[-1] == rec["steps"] and len(steps) >= 3
    times = [p["train_s"] for p in rec["curve"]]
    assert times == sorted(times) and times[0] == 0.0
    assert all(math.isfinite(v) for v in rec["final"].values())
    assert rec["final"] != rec["start"]
    capsys.readouterr()
    assert bench.main(["--report", "--results", str(results)]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| fast | 2 |"))
    assert "lr=0.001" in row and "calibrate_iters=10" in row and "corpus.txt" in row


def test_zero_seconds_evaluates_without_training(bench, argv):
    results, args = argv
    assert bench.main([*args, "--exp", "baseline", "--seconds", "0", "--name", "zero"]) == 0
    rec = json.loads(results.read_text())
    assert rec["exp"] == "zero" and rec["steps"] == 0 and rec["calibration"] is None
    assert rec["final"] == rec["start"]


def test_settings_the_driver_owns_are_refused(bench, argv, capsys):
    _, args = argv
    with pytest.raises(SystemExit) as e:
        bench.main([*args, "--exp", "fast", "--steps", "5"])
    assert e.value.code == 2
    assert "--steps is set by this script" in capsys.readouterr().err


def test_distillation_gets_the_reference_as_teacher(bench, argv):
    results, args = argv
    run = [*args, "--exp", "rec_top4_distill", "--train-top", "1", "--seconds", "1"]
    assert bench.main([*run, "--seq-len", "16", "--batch-size", "2"]) == 0
    rec = json.loads(results.read_text())
    assert rec["train"]["distill_alpha"] == 0.5 and rec["train"]["train_top"] == 1
    assert rec["steps"] > 0 and all(math.isfinite(v) for v in rec["final"].values())


def test_bridge_knob_builds_a_bridged_start_and_charges_its_fit(bench, argv):
    results, args = argv
    assert bench.main([*args, "--exp", "+bridge", "--seconds", "8"]) == 0
    rec = json.loads(results.read_text())
    assert rec["knobs"]["bridge"] is True and rec["calibration"] is None
    stats = rec["bridge"]
    assert stats["kept_layers"] == 2 and stats["layers"] == 3  # one block on top of the 2
    assert stats["fit_loss_after"] < stats["fit_loss_before"]
    # the bridge's fit is taken out of the training budget, as the calibration is
    assert rec["setup_s"] == stats["wall_seconds"] > 0
    # (on a loaded machine the fit alone may take the whole budget: then nothing is trained)
    assert rec["train_s"] <= max(0.0, 8 - rec["setup_s"]) + 2.0
    # the selection criteria: fixed training-split windows and the logged loss's last 10%
    assert math.isfinite(rec["start_train_windows"]) and math.isfinite(rec["final_train_windows"])
    assert rec["steps"] == 0 or math.isfinite(rec["train_loss_tail"])


def test_tail_train_loss_averages_the_last_tenth_of_the_steps(bench, tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"kind": "train", "step": s, "loss": float(s)} for s in range(1, 21)]
    lines.insert(5, {"kind": "eval", "step": 5, "val_loss": 99.0})
    log.write_text("\n".join(json.dumps(r) for r in lines))
    assert bench.tail_train_loss(log) == pytest.approx((19 + 20) / 2)  # steps > 18
