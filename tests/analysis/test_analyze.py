"""``inheritune analyze``: hooks on every architecture, agreement with an independent
computation (``output_attentions=True`` + numpy SVD), the report files, and bad input refused
before any model is loaded."""

from __future__ import annotations

import contextlib
import csv
import json

import numpy as np
import pytest
import torch

from conftest import ARCHS, tiny_model
from inheritune import cli, data
from inheritune.analysis import report as analysis_report
from inheritune.analysis import scoring, selection
from inheritune.analysis.analyze import AnalyzeConfig, run_analysis
from inheritune.analysis.report import AnalysisResult
from inheritune.config import ConfigError
from inheritune.models import loading as models

TAU, ETA = 0.9, 0.9


def _one_blas_thread():
    """numpy's OpenBLAS on many tiny matrices crawls when other processes share the cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only speed depends on it
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def independent_metrics(
    model, input_ids: np.ndarray, tau: float = TAU, eta: float = ETA, layers=None
):
    """Per-(layer, head) means computed the straightforward way, sharing no code with ours:
    ``output_attentions=True`` and numpy SVD / column norms in float64. Rows of layers not in
    ``layers`` stay zero."""
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(input_ids), output_attentions=True, use_cache=False)
    n_layers, n_heads = len(out.attentions), out.attentions[0].shape[1]
    rank, mass, top = (np.zeros((n_layers, n_heads)) for _ in range(3))
    with _one_blas_thread():
        for layer in range(n_layers) if layers is None else layers:
            a = out.attentions[layer].double().numpy()  # (N, H, T, T)
            s2 = np.linalg.svd(a, compute_uv=False) ** 2  # (N, H, T) descending
            k = (np.cumsum(s2, -1) / s2.sum(-1, keepdims=True) < tau - 1e-9).sum(-1) + 1
            col = (a**2).sum(-2)  # (N, H, T) squared column norms
            p = -np.sort(-col / col.sum(-1, keepdims=True), -1)
            m = (np.cumsum(p, -1) < eta - 1e-9).sum(-1) + 1
            rank[layer], mass[layer], top[layer] = k.mean(0), m.mean(0), p[..., 0].mean(0)
    return rank, mass, top


def sharpened(arch: str, **kw):
    """A tiny model with larger weights so heads range from sharp to flat (varied ranks)."""
    model = tiny_model(arch, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_returns_weights_and_agrees(arch):
    model = sharpened(arch, layers=3)
    ids = np.random.default_rng(0).integers(3, 320, size=(5, 24))
    hooks_before = [len(m._forward_hooks) for m in model.modules()]
    result = run_analysis(model, ids, AnalyzeConfig(batch_size=2), progress=False)
    # Our hooks are gone afterwards: the model is left as it was found.
    assert [len(m._forward_hooks) for m in model.modules()] == hooks_before
    assert result.rank.shape == (3, 4)
    assert np.all(result.rank >= 1) and np.all(result.mass >= 1)
    rank, mass, top = independent_metrics(model, ids)
    np.testing.assert_allclose(result.rank, rank)
    np.testing.assert_allclose(result.mass, mass)
    np.testing.assert_allclose(result.top_share, top, rtol=1e-6)
    assert result.rank.std() > 0  # varied heads: the comparison is not between constants
    # the same pass measures what the --select rules use, as scoring.py defines it
    np.testing.assert_allclose(result.block_influence, scoring.block_influence(model, ids), 1e-5)
    for n in (1, 2, 3):
        np.testing.assert_allclose(
            result.angular[n - 1], scoring.angular_distances(model, ids, n, tokens="last"), 1e-5
        )


def test_sdpa_model_is_switched_to_eager_and_restored():
    eager = sharpened("llama", layers=2)
    sdpa = sharpened("llama", layers=2)
    sdpa.set_attn_implementation("sdpa")
    sdpa.train()
    ids = np.random.default_rng(1).integers(3, 320, size=(3, 16))
    got = run_analysis(sdpa, ids, progress=False)
    want = run_analysis(eager, ids, progress=False)
    np.testing.assert_allclose(got.rank, want.rank)
    assert sdpa.config._attn_implementation == "sdpa"
    assert sdpa.training  # train mode restored too


def test_weights_missing_is_an_error_not_silence():
    model = tiny_model("llama", layers=2)
    for i in range(2):  # an attention module that drops its weights, like a fused kernel
        model.model.layers[i].self_attn.register_forward_hook(lambda m, a, out: (out[0], None))
    with pytest.raises(RuntimeError, match="returned no weights"):
        run_analysis(model, np.ones((2, 8), dtype=np.int64), progress=False)


def test_rank_of_mean_agrees_with_independent_computation(tmp_path):
    model = sharpened("llama", layers=2)
    ids = np.random.default_rng(2).integers(3, 320, size=(5, 16))
    cfg = AnalyzeConfig(batch_size=2, rank_of_mean=True)  # 3 batches: sums across them
    result = run_analysis(model, ids, cfg, progress=False)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), output_attentions=True, use_cache=False)
    want = np.zeros((2, 4))
    for layer in range(2):
        mean = out.attentions[layer].double().numpy().mean(0)  # (H, T, T) mean over windows
        s2 = np.linalg.svd(mean, compute_uv=False) ** 2  # (H, T)
        want[layer] = (np.cumsum(s2, -1) / s2.sum(-1, keepdims=True) < TAU - 1e-9).sum(-1) + 1
    np.testing.assert_array_equal(result.rank_of_mean, want)
    assert not np.allclose(result.rank_of_mean, result.rank)  # a different number here
    d = result.to_dict()
    assert d["layers"][1]["rank_of_mean_per_head"] == want[1].tolist()
    assert d["layers"][1]["max_rank_of_mean"] == want[1].max()
    assert d["layers"][1]["rank_per_head"] == result.rank[1].tolist()  # the paper's stays as is
    assert "mean over the windows of A" in d["definitions"]["rank_of_mean"]
    assert AnalysisResult.from_dict(d).to_dict() == d
    paths = analysis_report.write_report(result, tmp_path / "r")
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank_of_mean"]) for r in rows[4:8]] == want[1].tolist()
    assert "MaxRankOfMean" in paths["summary"].read_text()
    # off by default: no such numbers, and the definitions say so
    plain = run_analysis(model, ids, AnalyzeConfig(batch_size=2), progress=False).to_dict()
    assert "rank_of_mean_per_head" not in plain["layers"][0]
    assert plain["definitions"]["rank_of_mean"].startswith("not computed")
    np.testing.assert_array_equal(
        [layer["rank_per_head"] for layer in plain["layers"]], result.rank
    )


# ---- the command -------------------------------------------------------------------------


def run_cli(*args: str) -> int:
    return cli.main(["analyze", *args])


def test_cli_end_to_end_and_report(tiny_folder, corpus_file, tmp_path, tokenizer, capsys):
    folder = tiny_folder("llama", layers=3)
    out = tmp_path / "report"
    rc = run_cli(
        *("--model", str(folder), "--data", str(corpus_file), "--out", str(out)),
        *("--num-seqs", "6", "--seq-len", "32", "--batch-size", "4", "--seed", "3"),
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "MaxRank" in printed and "suggested initial depth" in printed
    report = json.loads((out / "analysis.json").read_text())
    for key in ("model", "num_layers", "num_heads", "tau", "eta", "input_ids", "layers"):
        assert key in report
    assert report["num_layers"] == 3 and report["num_heads"] == 4
    assert [layer["layer"] for layer in report["layers"]] == [0, 1, 2]
    for layer in report["layers"]:
        assert layer["max_rank"] == max(layer["rank_per_head"])
        assert layer["avg_mass"] == pytest.approx(np.mean(layer["mass_per_head"]))
        assert isinstance(layer["lazy"], bool)
    assert report["suggested_depth"]["paper_half"] == 1
    # The windows are the seeded sample of the validation split.
    ids = np.array(report["input_ids"])
    tokens = data.load_tokens(str(corpus_file), tokenizer)
    np.testing.assert_array_equal(ids, data.sample_windows(tokens.val, 6, 32, 3))
    # Independent recomputation from the saved ids agrees.
    model = models.load_model(str(folder), attn_implementation="eager")
    rank, mass, _ = independent_metrics(model, ids)
    np.testing.assert_allclose([layer["rank_per_head"] for layer in report["layers"]], rank)
    np.testing.assert_allclose([layer["mass_per_head"] for layer in report["layers"]], mass)
    with open(out / "heads.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 4
    assert float(rows[5]["rank"]) == pytest.approx(rank[1, 1], abs=1e-4)
    for name in ("rank_heatmap.png", "layers.png"):
        assert (out / name).stat().st_size > 1000
    assert "num_seqs: 6" in (out / "config.yaml").read_text()
    back = analysis_report.load_report(out)
    np.testing.assert_array_equal(back.input_ids, ids)
    np.testing.assert_allclose(back.rank, rank)
    assert back.to_dict() == report
    # BI, angular distance and MaxRank side by side, and what each rule keeps
    assert [layer["block_influence"] for layer in report["layers"]] == list(back.block_influence)
    table = report["selections"]["1"]
    assert table["first"] == [0] and set(table) == set(selection.RULES)
    want_bi = int(np.argmax([layer["block_influence"] for layer in report["layers"]]))
    assert table["bi"] == [want_bi]
    assert "BI" in printed and "angular" in printed and "keeps at 1 of 3" in printed


def test_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["analyze", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in (
        "--num-seqs",
        "--seq-len",
        "--tau",
        "--eta",
        "--seed",
        "--out",
        "--lazy-tol",
        "--rank-of-mean",
    ):
        assert name in text


@pytest.fixture
def no_model_load(monkeypatch):
    """Bad input must be refused before any weights are loaded."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tau", "0"], "--tau must be in (0, 1]"),
        (["--tau", "1.5"], "--tau must be in (0, 1]"),
        (["--eta", "-0.1"], "--eta must be"),  # config.validate_numbers words it
        (["--num-seqs", "0"], "--num-seqs must be >= 1"),
        (["--seq-len", "0"], "--seq-len must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--seq-len", "300"], "longer than the model's context (256"),
        (["--seq-len", "250"], "--seq-len 250"),  # fits the context, not the 208 val tokens
    ],
)
def test_bad_input_exits_2_before_loading(
    args, message, tiny_folder, corpus_file, tmp_path, capsys, no_model_load
):
    folder = tiny_folder("llama", layers=2)
    base = ["--model", str(folder), "--data", str(corpus_file), "--out", str(tmp_path / "o")]
    assert run_cli(*base, *args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "o").exists()


def test_empty_corpus_and_unknown_names(tiny_folder, tmp_path, capsys, no_model_load):
    folder = tiny_folder("llama", layers=2)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert run_cli("--model", str(folder), "--data", str(empty)) == 2
    assert "empty" in capsys.readouterr().err
    assert run_cli("--model", str(folder), "--data", "no-such-corpus") == 2
    assert "Known names" in capsys.readouterr().err
    assert run_cli("--model", str(tmp_path / "no-such-model"), "--data", str(empty)) == 2
    assert "no such model" in capsys.readouterr().err
    assert run_cli("--model", "no-such-model-name") == 2  # a hub id, offline
    assert "no-such-model-name" in capsys.readouterr().err


def test_config_validation_names_flag():
    with pytest.raises(ConfigError, match="--lazy-tol"):
        AnalyzeConfig(lazy_tol=-1)
    with pytest.raises(ConfigError, match="--num-seqs must be an integer"):
        AnalyzeConfig(num_seqs=2.5)


def test_run_analysis_checks_context():
    model = tiny_model("gpt2", layers=1)  # n_positions = 256
    with pytest.raises(ConfigError, match="context"):
        run_analysis(model, np.ones((1, 300), dtype=np.int64), progress=False)


# ---- the real model ---------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_report_matches_independent_recomputation(tmp_path):
    out = tmp_path / "smol"
    rc = run_cli("--num-seqs", "8", "--out", str(out))
    assert rc == 0
    report = json.loads((out / "analysis.json").read_text())
    assert report["num_layers"] == 30 and report["num_heads"] == 9
    ids = np.array(report["input_ids"])
    assert ids.shape == (8, 100)
    model = models.load_model("smollm2-135m", attn_implementation="eager")
    checked = (0, 11, 23, 29)  # early high-rank, middle, the collapsed one, last
    rank, mass, top = independent_metrics(model, ids, layers=checked)
    for layer in checked:
        got = report["layers"][layer]
        np.testing.assert_allclose(got["rank_per_head"], rank[layer])
        np.testing.assert_allclose(got["mass_per_head"], mass[layer])
        np.testing.assert_allclose(got["top_col_share_per_head"], top[layer], rtol=1e-5)
    # Collapse is real in SmolLM2 (docs/results.md, analyze): its most collapsed layer is far below its
    # least collapsed one.
    max_rank = [layer["max_rank"] for layer in report["layers"]]
    assert min(max_rank) < 2 < 20 < max(max_rank)
