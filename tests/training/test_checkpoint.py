"""Checkpoints: atomic writes, manifest verification, fallback to the previous good checkpoint
(the optimizer and RNG state inside them: test_train_state.py)."""

from __future__ import annotations

import pytest

from conftest import CORPUS_TEXT, tiny_model
from inheritune import training as T
from inheritune.data import prepare as data
from inheritune.storage import MANIFEST, CheckpointError, atomic_write_text, write_folder_atomically
from inheritune.training import checkpoint as train_state
from inheritune.training.checkpoint import (
    LATEST,
    checkpoints_root,
    find_resume_checkpoint,
    list_checkpoints,
    prune,
    read_latest,
    step_name,
    verify_checkpoint,
)


@pytest.fixture
def run(tmp_path, tokenizer):
    """A finished 6-step run with checkpoints at steps 2, 4 and 6."""
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS_TEXT * 2)
    tokens = data.load_tokens(str(p), tokenizer)
    cfg = T.TrainConfig(
        out=str(tmp_path / "run"),
        steps=6,
        batch_size=2,
        seq_len=16,
        warmup=1,
        eval_every=0,
        eval_tokens=32,
        save_every=2,
        keep_last=0,
    )
    T.train_model(tiny_model("llama"), tokenizer, tokens, cfg)
    return cfg, tokens


def _flip_byte(path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_layout_is_hf_folder_without_pickle(run):
    cfg, _ = run
    root = checkpoints_root(cfg.out)
    names = [p.name for p in list_checkpoints(root)]
    assert names == ["step-00000002", "step-00000004", "step-00000006"]
    assert read_latest(root).name == "step-00000006"
    files = {p.name for p in (root / "step-00000004").iterdir()}
    assert {"config.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors"} <= files
    assert {"trainer_state.json", "manifest.json", "tokenizer.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    manifest = verify_checkpoint(root / "step-00000004")
    assert manifest["step"] == 4 and "model.safetensors" in manifest["files"]


def test_corrupt_checkpoint_refused_and_previous_resumes(run, tokenizer):
    cfg, tokens = run
    root = checkpoints_root(cfg.out)
    latest = root / "step-00000006"
    _flip_byte(latest / "model.safetensors")
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(latest)
    with pytest.warns(UserWarning, match="previous good one.*step-00000004"):
        assert find_resume_checkpoint(cfg.out) == root / "step-00000004"
    # Resuming continues from step 4 and redoes steps 5-6.
    cfg.resume, cfg.steps = True, 6
    with pytest.warns(UserWarning, match="step-00000004"):
        res = T.train_model(tiny_model("llama"), tokenizer, tokens, cfg)
    assert res.steps == 6
    verify_checkpoint(root / "step-00000006")  # rewritten intact


def test_half_written_checkpoint_refused(run):
    cfg, _ = run
    root = checkpoints_root(cfg.out)
    (root / "step-00000006" / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="half-written"):
        verify_checkpoint(root / "step-00000006")
    (root / "step-00000004" / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        train_state.load_training_state(root / "step-00000004")
    with pytest.warns(UserWarning, match="refused 2"):
        assert find_resume_checkpoint(cfg.out).name == "step-00000002"
    _flip_byte(root / "step-00000002" / "trainer_state.json")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        find_resume_checkpoint(cfg.out)


def test_cli_reports_checkpoint_error_cleanly(run, tmp_path, tiny_folder, corpus_file, capsys):
    from inheritune import cli

    model = tiny_folder("llama")
    out = tmp_path / "c"
    args = ["train", "--model", str(model), "--data", str(corpus_file), "--out", str(out)]
    args += ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-tokens", "32"]
    args += ["--save-every", "1"]
    assert cli.main(args) == 0
    for c in list_checkpoints(checkpoints_root(out)):
        _flip_byte(c / "model.safetensors")
    assert cli.main([*args, "--resume"]) == 2
    assert "no intact checkpoint" in capsys.readouterr().err


def test_write_folder_atomically_leaves_nothing_on_failure(tmp_path):
    def populate(tmp):
        (tmp / "a.txt").write_text("a")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_folder_atomically(tmp_path / "x", populate)
    assert list(tmp_path.iterdir()) == []
    write_folder_atomically(tmp_path / "x", lambda t: (t / "b.txt").write_text("b"))
    write_folder_atomically(tmp_path / "x", lambda t: (t / "c.txt").write_text("c"))
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["c.txt", "manifest.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_prune_keeps_last_n_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3, 4):
        write_folder_atomically(root / step_name(s), lambda t: None)
    atomic_write_text(root / LATEST, step_name(4))
    prune(root, 2)
    assert [p.name for p in list_checkpoints(root)] == ["step-00000003", "step-00000004"]


def test_memoized_computes_once_and_recovers_from_a_damaged_entry(tmp_path):
    from inheritune.storage import memoized, spec_fingerprint

    calls = []

    def compute():
        calls.append(1)
        return {"value": 3.5}

    spec = {"what": "x", "n": 1}
    assert memoized(tmp_path, spec, compute) == {"value": 3.5}
    assert memoized(tmp_path, spec, compute) == {"value": 3.5} and len(calls) == 1
    assert memoized(tmp_path, {**spec, "n": 2}, compute) == {"value": 3.5} and len(calls) == 2
    (tmp_path / f"{spec_fingerprint(spec)}.json").write_text("{ damaged")
    assert memoized(tmp_path, spec, compute) == {"value": 3.5} and len(calls) == 3
    assert memoized(tmp_path, spec, compute) == {"value": 3.5} and len(calls) == 3  # rewritten
