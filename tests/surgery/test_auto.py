"""``--select auto`` (surgery.auto): every rule's start built, scored on training-split windows,
the best kept; through ``inherit``, ``run`` and ``compare`` on tiny models."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import tiny_model
from inheritune import cli
from inheritune.analysis import selection
from inheritune.analysis.layer_scores import layer_scores, score_windows
from inheritune.config import build
from inheritune.data import prepare
from inheritune.models import loading as models
from inheritune.models.arch import get_arch
from inheritune.models.losses import evaluate_loss
from inheritune.surgery import auto
from inheritune.surgery import build as surgery
from inheritune.surgery.bridge import BridgeConfig

L = 6


def reference() -> torch.nn.Module:
    model = tiny_model("llama", layers=L)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def train_only(tokens) -> SimpleNamespace:
    """The tokens without a validation split: auto must not need one."""
    return SimpleNamespace(train=tokens.train)


SEL = dict(score_windows=3, score_seq_len=16, auto_windows=4)


def test_every_rule_is_scored_and_the_lowest_kept(tokens):
    """Each candidate's loss is its own start's loss on the auto windows of the TRAINING
    split, rules that keep the same layers are built once, and the lowest wins."""
    ref, cfg = reference(), selection.SelectConfig(select="auto", **SEL)
    choice = auto.choose_auto(ref, train_only(tokens), cfg, depth=3, seed=0)
    windows = auto.auto_windows(tokens.train, cfg, 0)
    assert windows.shape == (4, 17)
    assert not np.array_equal(windows[:, :16], score_windows(tokens.train, cfg, 0)[:4])
    scores = layer_scores(ref, score_windows(tokens.train, cfg, 0), cache=False)
    assert [c["rule"] for c in choice.candidates] == list(selection.RULES)
    by_layers = {}
    for c in choice.candidates:
        want_kept = selection.kept_layers(c["rule"], L, 3, scores)
        assert c["kept"] == want_kept and c["bridged_spans"] == []
        want = evaluate_loss(surgery.select_layers(ref, want_kept), windows)
        assert c["loss"] == pytest.approx(want, abs=1e-5)
        first = by_layers.setdefault(tuple(want_kept), c["rule"])
        assert c["same_as"] == (None if first == c["rule"] else first)
    best = min(choice.candidates, key=lambda c: c["loss"])
    assert choice.kept == best["kept"] and choice.rule == (best["same_as"] or best["rule"])
    assert get_arch(choice.model).num_layers == 3
    assert sum(c["chosen"] for c in choice.candidates) >= 1
    assert "chosen: " + choice.rule in auto.format_candidates(choice.record())
    md = "\n".join(auto.candidates_markdown(choice.record()))
    assert f"**{choice.rule}**" in md and "4 windows of 16 tokens of the training split" in md


def test_a_probe_changes_the_choice(tokens):
    """The score is taken after the probe: a probe that spoils every start but keep-last's
    makes keep-last win."""
    ref, cfg = reference(), selection.SelectConfig(select="auto", **SEL)
    seen = []

    def probe(model, rule):
        seen.append(rule)
        if rule != "keep-last":
            with torch.no_grad():
                get_arch(model).final_norm.weight.mul_(50.0)
        return model

    choice = auto.choose_auto(ref, train_only(tokens), cfg, depth=3, seed=0, probe=probe)
    assert choice.rule == "keep-last" and seen[0] == "first"
    assert len(seen) == len({tuple(c["kept"]) for c in choice.candidates})


def test_bridged_candidates_count_their_bridges(tokens):
    """With --bridge block every candidate is depth layers deep, bridges included; the winner's
    fitted model is returned with its fit."""
    ref, cfg = reference(), selection.SelectConfig(select="auto", **SEL)
    bcfg = BridgeConfig(bridge="block", bridge_steps=2, calib_tokens=96, calib_seq_len=16)
    choice = auto.choose_auto(ref, train_only(tokens), cfg, depth=4, bridging=bcfg, seed=0)
    for c in choice.candidates:
        assert len(c["kept"]) + len(c["bridged_spans"]) == 4
    assert get_arch(choice.model).num_layers == 4
    assert choice.bridge_stats["kept"] == choice.kept
    on_top = auto.choose_auto(
        ref, train_only(tokens), cfg, depth=4, bridging=bcfg, seed=0, count_bridges=False
    )
    assert all(len(c["kept"]) == 4 for c in on_top.candidates)


def test_inherit_select_auto(tiny_folder, corpus_file, tmp_path, capsys):
    """inherit --select auto: the candidates in provenance.json and on stdout, the chosen
    layers saved as a checkpoint plain transformers loads; with --bridge block too."""
    from transformers import AutoModelForCausalLM

    ref_dir = tiny_folder("llama", layers=L)
    base = ["inherit", "--model", str(ref_dir), "--data", str(corpus_file), "--select", "auto",
            "--score-windows", "3", "--score-seq-len", "12", "--auto-windows", "3"]  # fmt: skip
    out = tmp_path / "a"
    assert cli.main([*base, "--num-layers", "3", "--out", str(out)]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    chosen = [c for c in prov["auto"]["candidates"] if c["chosen"]]
    assert chosen and prov["kept_layers"] == chosen[0]["kept"]
    assert prov["select"] == "auto" and prov["auto"]["chosen"] in selection.RULES
    assert "--select auto: every rule's start" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3
    out_b = tmp_path / "b"
    args = ["--num-layers", "4", "--bridge", "block", "--bridge-steps", "2",
            "--calib-tokens", "96", "--calib-seq-len", "12", "--eval-tokens", "48",
            "--eval-seq-len", "12", "--out", str(out_b)]  # fmt: skip
    assert cli.main([*base, *args]) == 0
    prov = json.loads((out_b / "provenance.json").read_text())
    assert prov["bridge"]["layers"] == 4 and "validation" in prov["bridge"]
    model = AutoModelForCausalLM.from_pretrained(out_b)
    assert model.config.num_hidden_layers == 4
    ids = torch.tensor([[5, 6, 7, 8]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_inherit_select_auto_refuses_fresh_parts(tiny_folder, tmp_path, capsys):
    ref_dir = tiny_folder("llama", layers=L)
    argv = ["inherit", "--model", str(ref_dir), "--select", "auto", "--num-layers", "3",
            "--fresh", "final_norm", "--out", str(tmp_path / "x")]  # fmt: skip
    assert cli.main(argv) == 2
    assert "--select auto scores the reference's own layers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_run_select_auto_chooses_once_and_grows_by_the_choice(tiny_run, monkeypatch):
    """run --select auto: the choice is made once (round 1's depth), recorded and reported;
    every round keeps and grows by the chosen rule, and a rerun reuses the recorded choice."""
    from inheritune.recipe import run as recipe
    from inheritune.recipe import run as run_mod

    knobs = {"select": "auto", "extra_eval": None, **SEL}
    res = recipe.run(tiny_run(**knobs))
    rep = res.report
    chosen = rep["auto"]["chosen"]
    assert chosen in selection.RULES and rep["select"] == chosen
    cfg = tiny_run(**knobs)
    ref = models.load_model(cfg.train.model)
    tokens = prepare.load_tokens(cfg.train.data, models.load_tokenizer(cfg.train.model))
    need = sorted(set(selection.SCORE_OF.values()))
    scores = layer_scores(ref, score_windows(tokens.train, cfg.selection, 0), need)
    first = selection.kept_layers(chosen, L, 2, scores)
    second = selection.grow(first, 2, selection.importance(chosen, L, scores))
    assert [r["kept"] for r in rep["rounds"]][:2] == [first, second]
    md = res.report_md.read_text()
    assert "## `--select auto`" in md and f"**{chosen}**" in md

    def boom(*a, **k):
        raise AssertionError("auto was decided again")

    monkeypatch.setattr(run_mod, "choose_auto", boom)
    again = recipe.run(tiny_run(**knobs))
    assert again.report["auto"] == rep["auto"]


def test_run_select_auto_with_a_probe(tiny_run, monkeypatch):
    """--auto-probe-steps: each distinct candidate is trained that many steps before it is
    scored; the probe's folders are removed and round 1 trains its own steps."""
    from inheritune.recipe import run as recipe

    probes, real = [], recipe.train_model

    def spy(model, tokenizer, tokens, cfg, teacher=None, desc=None, extra_eval=None):
        if desc.startswith("auto probe"):
            probes.append(cfg.steps)
        return real(model, tokenizer, tokens, cfg, teacher, desc, extra_eval)

    monkeypatch.setattr(recipe, "train_model", spy)
    cfg = tiny_run(select="auto", auto_probe_steps=2, extra_eval=None, min_rounds=1,
                   max_rounds=1, **SEL)  # fmt: skip
    res = recipe.run(cfg)
    rec = res.report["auto"]
    assert rec["probe_steps"] == 2
    assert probes == [2] * sum(c["same_as"] is None for c in rec["candidates"])
    assert not (res.out / "auto").exists() or not any((res.out / "auto").iterdir())
    assert res.report["rounds"][0]["steps"] == cfg.train.steps
    assert "after 2 probe steps" in res.report_md.read_text()


def test_compare_inheritune_row_select_auto(tiny_folder, corpus_file, tmp_path):
    """compare --select auto: the inheritune row is the best rule's start, with every
    candidate in its record and in compare.md."""
    from inheritune.compare.compare import compare
    from inheritune.compare.config import CompareConfig

    folder = tiny_folder("llama", layers=4)
    train = {"batch_size": 2, "seq_len": 16, "eval_every": 1, "eval_tokens": 64,
             "save_every": 0, "warmup": 0, "lr": 3e-3, "log_every": 1}  # fmt: skip
    cfg = build(
        CompareConfig, model=str(folder), data=str(corpus_file), out=str(tmp_path / "c"),
        depth=2, steps=1, train=train, variants=["inheritune"], select="auto",
        score_windows=3, score_seq_len=16, auto_windows=3,
    )  # fmt: skip
    row = compare(cfg).rows[0]
    rec = row["init"]["auto"]
    assert row["init"]["layers_from"] == next(c["kept"] for c in rec["candidates"] if c["chosen"])
    md = (tmp_path / "c" / "compare.md").read_text()
    assert "## `--select auto`" in md and f"(auto: {rec['chosen']})" in md
