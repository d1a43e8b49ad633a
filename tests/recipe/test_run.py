"""The recipe (``inheritune run``): decisions, growth, the end-to-end run, its report and resume.

Runs use a tiny 6-layer Llama and a tiny corpus, a few optimizer steps per round.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from inheritune import cli, data
from inheritune import training as train_mod
from inheritune.config import ConfigError, build, flag_fields, load_yaml, to_dict
from inheritune.models import loading as models
from inheritune.models import losses
from inheritune.models.arch import get_arch
from inheritune.recipe import growth, report
from inheritune.recipe import run as recipe
from inheritune.recipe.config import RecipeConfig
from inheritune.surgery import build as surgery
from inheritune.training import optim


def _spy_training(monkeypatch) -> list[train_mod.TrainConfig]:
    """Record the TrainConfig of every training run the recipe starts."""
    calls: list[train_mod.TrainConfig] = []
    real = train_mod.train_model

    def spy(model, tokenizer, tokens, cfg, teacher=None, desc=None, extra_eval=None):
        calls.append(cfg)
        return real(model, tokenizer, tokens, cfg, teacher, desc, extra_eval)

    monkeypatch.setattr(recipe, "train_model", spy)
    return calls


# --------------------------------------------------------------------------- pure decisions


def test_choose_init_depth():
    analysis = {"suggested_depth": {"paper_half": 15, "analysis": 12, "rule": "r"}}
    assert recipe.choose_init_depth("half", 30, None) == 15
    assert recipe.choose_init_depth("half", 5, None) == 2
    assert recipe.choose_init_depth("half", 1, None) == 1
    assert recipe.choose_init_depth("analysis", 30, analysis) == 12
    assert recipe.choose_init_depth("7", 30, None) == 7
    with pytest.raises(ConfigError, match="--init-depth 31 is out of range"):
        recipe.choose_init_depth("31", 30, None)
    with pytest.raises(ConfigError, match="needs the analysis"):
        recipe.choose_init_depth("analysis", 30, None)


def test_resolve_max_depth():
    assert recipe.resolve_max_depth(None, 30, 15) == 29
    assert recipe.resolve_max_depth(20, 30, 15) == 20
    assert recipe.resolve_max_depth(10, 30, 15) == 15  # never below the start
    with pytest.raises(ConfigError, match="--max-depth 31 exceeds"):
        recipe.resolve_max_depth(31, 30, 15)


def test_matches_uses_tolerance_and_rejects_nan():
    assert recipe.matches(3.60, 3.60, 0.0)
    assert not recipe.matches(3.61, 3.60, 0.0)
    assert recipe.matches(3.61, 3.60, 0.02)
    assert not recipe.matches(float("nan"), 3.60, 1.0)


def test_next_step_schedule():
    cfg = build(RecipeConfig, grow_by=2, max_rounds=4, min_rounds=1, steps=1)
    assert recipe.next_step(1, 15, False, cfg, 29) == (17, "")
    assert recipe.next_step(1, 15, True, cfg, 29)[0] is None
    assert "matched" in recipe.next_step(1, 15, True, cfg, 29)[1]
    assert recipe.next_step(4, 21, False, cfg, 29) == (None, "reached --max-rounds 4")
    assert recipe.next_step(2, 29, False, cfg, 29) == (None, "reached --max-depth 29")
    assert recipe.next_step(2, 28, False, cfg, 29) == (29, "")  # the last step is clamped
    forced = dataclasses.replace(cfg, min_rounds=2)
    assert recipe.next_step(1, 15, True, forced, 29) == (17, "")  # matched, but min_rounds 2


def test_config_validation_names_the_flag():
    with pytest.raises(ConfigError, match="--init-depth"):
        build(RecipeConfig, init_depth="abc")
    with pytest.raises(ConfigError, match="--init-depth"):
        build(RecipeConfig, init_depth="0")
    with pytest.raises(ConfigError, match="--growth"):
        build(RecipeConfig, growth="sideways")
    with pytest.raises(ConfigError, match="--target"):
        build(RecipeConfig, target="best")
    with pytest.raises(ConfigError, match="--min-rounds 3 exceeds --max-rounds 2"):
        build(RecipeConfig, min_rounds=3, max_rounds=2)
    with pytest.raises(ConfigError, match="--tolerance"):
        build(RecipeConfig, tolerance=-0.1)
    with pytest.raises(ConfigError, match="needs the analysis"):
        build(RecipeConfig, init_depth="analysis", analysis=False)
    # Training settings are checked by TrainConfig itself, with its flag names.
    with pytest.raises(ConfigError, match="--batch-size 6 must be a multiple of --grad-accum 4"):
        build(RecipeConfig, batch_size=6, grad_accum=4)
    with pytest.raises(ConfigError, match="--precision"):
        build(RecipeConfig, precision="fp8")


def test_run_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("--init-depth", "--grow-by", "--growth", "--target", "--tolerance", "--lr"):
        assert name in out


def test_training_settings_compose_train_config():
    """The recipe holds one TrainConfig (no field declared twice) and its flags are train's."""
    own = {f.name for f in dataclasses.fields(RecipeConfig)}
    train_names = {f.name for f in dataclasses.fields(train_mod.TrainConfig)}
    assert own & train_names == set()
    flags = set(flag_fields(RecipeConfig))
    assert train_names - flags == {"resume", "teacher"}  # the recipe sets these per round
    cfg = build(RecipeConfig, lr=1e-3, freeze=["embed"], distill_alpha=0.4, grad_accum=2, steps=7)
    tcfg = cfg.round_train_config(Path("/nonexistent/round"))
    assert (tcfg.lr, tcfg.freeze, tcfg.distill_alpha, tcfg.grad_accum, tcfg.steps) == (
        1e-3,
        ["embed"],
        0.4,
        2,
        7,
    )
    assert tcfg.resume is False  # a folder without checkpoints starts fresh


def test_warm_grow_keeps_trained_layers_and_appends_reference_ones():
    from conftest import tiny_model

    ref = tiny_model("llama", layers=6)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    trained = surgery.first_layers(ref, 2)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # stands in for training
    grown = recipe.warm_grow(trained, ref, 4, "block")
    g, t, r = grown.state_dict(), trained.state_dict(), ref.state_dict()
    assert grown.config.num_hidden_layers == 4
    for key in g:
        src = t if key in t else r  # layers 0-1, embeddings, norm from the trained model
        assert torch.equal(g[key], src[key]), key
    assert any(k.startswith("model.layers.3.") for k in g)
    assert not torch.equal(g["model.embed_tokens.weight"], r["model.embed_tokens.weight"])
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k]), f"the reference was modified: {k}"
    with pytest.raises(ValueError, match="cannot grow"):
        recipe.warm_grow(trained, ref, 2, "block")


def test_warm_grow_puts_reference_layers_back_in_their_places():
    """A selection's trained layers 0, 3, 5 grow by layers 1 and 4: each block lands at the
    position of its reference index."""
    from conftest import tiny_model

    ref = tiny_model("llama", layers=6)
    trained = surgery.select_layers(ref, [0, 3, 5])
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    grown = recipe.warm_grow(trained, ref, [0, 1, 3, 4, 5], "block", prev_kept=[0, 3, 5])
    g, t, r = grown.state_dict(), trained.state_dict(), ref.state_dict()
    for pos, (src, idx) in enumerate([(t, 0), (r, 1), (t, 1), (r, 4), (t, 2)]):
        for name in [k for k in g if k.startswith(f"model.layers.{pos}.")]:
            assert torch.equal(g[name], src[name.replace(f"layers.{pos}.", f"layers.{idx}.")])
    assert torch.equal(g["model.norm.weight"], t["model.norm.weight"])
    with pytest.raises(ValueError, match="cannot grow"):
        recipe.warm_grow(trained, ref, [0, 1, 2], "block", prev_kept=[0, 3, 5])


# --------------------------------------------------------------------------- end to end


def test_run_end_to_end_via_cli(tmp_path, tiny_run, capsys):
    """Two rounds (2 -> 4 layers) through the CLI: YAML + flag overrides, every output checked."""
    cfg = tiny_run()
    preset = tmp_path / "preset.yaml"
    values = to_dict(cfg)  # a `train:` section; --out below overrides its out
    values["lr"] = 0.5  # overridden by the flag below
    preset.write_text(yaml.safe_dump(values))
    out = tmp_path / "cli-run"
    assert cli.main(["run", "--config", str(preset), "--out", str(out), "--lr", "0.01"]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out

    rep = json.loads((out / "report.json").read_text())
    assert load_yaml(out / "config.yaml")["train"]["lr"] == 0.01
    assert [r["layers"] for r in rep["rounds"]] == [2, 4]
    assert rep["growth"] == "reinit" and rep["target"]["tolerance"] == 0.0
    assert rep["layer_numbering"].startswith("0-based")

    # The reference's loss is the reference's, on the same fixed windows as the rounds'.
    ref = models.load_model(cfg.train.model)
    tok = models.load_tokenizer(cfg.train.model)
    from inheritune import data

    windows = data.eval_windows(
        data.load_tokens(cfg.train.data, tok), cfg.train.seq_len, cfg.train.eval_tokens
    )
    assert rep["reference"]["val_loss"] == pytest.approx(
        losses.evaluate_loss(ref, windows, batch_size=cfg.train.batch_size), abs=1e-5
    )
    assert rep["target"]["eval_windows"] == len(windows)
    ref_params = models.count_parameters(ref)
    assert rep["reference"]["parameters"] == ref_params

    # Rounds: their own training results, losses and parameter counts.
    for r in rep["rounds"]:
        result = json.loads((out / Path(r["model_dir"]).parent / "result.json").read_text())
        assert r["val_loss"] == pytest.approx(result["final_val_loss"])
        assert r["tokens"] == cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
        assert r["evals"][0]["step"] == 0 and r["evals"][-1]["step"] == cfg.train.steps
        assert r["matched"] == (r["val_loss"] <= rep["target"]["val_loss"])
        assert r["parameters"] == models.count_parameters(surgery.first_layers(ref, r["layers"]))

    # The final model: a loadable 4-layer HF folder equal to round 2's trained weights.
    final = models.load_model(str(out / "final_model"))
    assert final.config.num_hidden_layers == 4
    assert (out / "final_model" / "tokenizer.json").is_file()
    round2 = models.load_model(str(out / rep["rounds"][1]["model_dir"]))
    for (k, a), (_, b) in zip(final.state_dict().items(), round2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    fin = rep["final"]
    assert fin["parameters_saved"] == ref_params - models.count_parameters(final)
    assert fin["parameters_saved_pct"] == pytest.approx(100 * fin["parameters_saved"] / ref_params)
    assert fin["val_loss"] == rep["rounds"][1]["val_loss"]
    speed = fin["speed"]
    assert speed["target_tokens_per_s"] > 0 and speed["reference_tokens_per_s"] > 0
    assert speed["speedup"] == pytest.approx(
        speed["target_tokens_per_s"] / speed["reference_tokens_per_s"]
    )

    # The report's files: analysis plots, the curve plot, the markdown table.
    md = (out / "report.md").read_text()
    assert (out / "curves.png").stat().st_size > 1000
    assert rep["analysis"]["plots"]
    for png in rep["analysis"]["plots"]:
        assert (out / png).is_file() and f"]({png})" in md
    assert "](curves.png)" in md
    assert "| round 1 | 2 |" in md and "| round 2 | 4 |" in md
    assert f"{rep['reference']['val_loss']:.4f}" in md
    assert "tolerance 0.0000" in md


def test_stops_when_matched_and_resume_settings_are_checked(tiny_run, monkeypatch):
    calls = _spy_training(monkeypatch)
    res = recipe.run(tiny_run(min_rounds=1, tolerance=100.0))
    assert len(res.report["rounds"]) == 1 and len(calls) == 1
    assert res.report["final"]["matched"]
    assert res.report["final"]["stop_reason"] == "matched the target loss"

    # Same run again: nothing is retrained; a larger --min-rounds continues with round 2 only.
    recipe.run(tiny_run(min_rounds=1, tolerance=100.0))
    assert len(calls) == 1
    res = recipe.run(tiny_run(min_rounds=2, tolerance=100.0))
    assert [r["layers"] for r in res.report["rounds"]] == [2, 4]
    assert len(calls) == 2 and calls[1].out.endswith("round-02-L4")

    # Settings a finished round depends on may not change under the same --out.
    with pytest.raises(ConfigError, match="--lr"):
        recipe.run(tiny_run(lr=5e-3, tolerance=100.0))


def test_warm_growth_starts_round_two_from_round_one(tiny_run, monkeypatch):
    starts = []
    real = train_mod.train_model

    def spy(model, tokenizer, tokens, cfg, teacher=None, desc=None, extra_eval=None):
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(model, tokenizer, tokens, cfg, teacher, desc, extra_eval)

    monkeypatch.setattr(recipe, "train_model", spy)
    res = recipe.run(tiny_run(growth="warm"))
    assert res.report["growth"] == "warm"
    round1 = models.load_model(str(res.out / res.report["rounds"][0]["model_dir"])).state_dict()
    ref = models.load_model(tiny_run().train.model).state_dict()
    second = starts[1]
    for key, value in second.items():
        expected = round1.get(key, ref[key])  # trained layers 0-1; reference layers 2-3
        assert torch.equal(value, expected), key
    assert "growth mode `warm`" in res.report_md.read_text()


@pytest.mark.parametrize("select", ["first", "bi"])
def test_distillation_uses_the_reference_as_teacher(select, tiny_run, monkeypatch):
    """Distillation from the whole reference works with any selection (and its bridges)."""
    teachers = []
    real = train_mod.train_model

    def spy(model, tokenizer, tokens, cfg, teacher=None, desc=None, extra_eval=None):
        teachers.append(teacher)
        return real(model, tokenizer, tokens, cfg, teacher, desc, extra_eval)

    monkeypatch.setattr(recipe, "train_model", spy)
    knobs = {"select": select, "score_windows": 3, "score_seq_len": 16}
    if select == "bi":
        knobs |= {"bridge": "block", "bridge_steps": 2, "calib_tokens": 64, "calib_seq_len": 16}
    res = recipe.run(tiny_run(distill_alpha=0.4, min_rounds=1, max_rounds=1, **knobs))
    assert len(teachers) == 1 and teachers[0] is not None
    assert teachers[0].config.num_hidden_layers == 6
    assert math.isfinite(res.report["rounds"][0]["val_loss"])


def test_trained_reference_target(tiny_run, monkeypatch):
    calls = _spy_training(monkeypatch)
    res = recipe.run(tiny_run(target="trained-reference", min_rounds=1, max_rounds=1))
    trained = res.report["reference"]["trained"]
    assert calls[0].out.endswith("reference-trained") and calls[0].steps == 3
    assert res.report["target"]["val_loss"] == trained["val_loss"]
    assert trained["val_loss"] != res.report["reference"]["val_loss"]
    assert "reference (trained)" in res.report_md.read_text()


def test_scratch_reference_target(tiny_run, monkeypatch):
    """The paper's protocol: the target is the reference's architecture trained from random
    init with one round's budget on the same data."""
    calls = _spy_training(monkeypatch)
    res = recipe.run(tiny_run(target="scratch-reference", min_rounds=1, max_rounds=1, seed=3))
    scratch = res.report["reference"]["trained"]
    assert scratch["kind"] == "scratch-reference"
    assert calls[0].out.endswith("reference-scratch") and calls[0].steps == 3
    assert res.report["target"]["val_loss"] == scratch["val_loss"]
    # it starts from fresh random weights (seed 3), not from the reference's
    ref = models.load_model(tiny_run().train.model).state_dict()
    got = models.load_model(str(res.out / scratch["model_dir"])).state_dict()
    assert got.keys() == ref.keys() and not torch.equal(got[next(iter(ref))], ref[next(iter(ref))])
    assert abs(scratch["evals"][0]["val_loss"] - res.report["reference"]["val_loss"]) > 1e-4
    assert "reference (from scratch)" in res.report_md.read_text()


def test_interrupted_round_resumes_where_it_stopped(tmp_path, tiny_run, monkeypatch):
    """SIGTERM during round 2's second step: the rerun keeps round 1 and continues round 2 from its
    checkpoint, ending exactly where an uninterrupted run ends."""
    clean = recipe.run(tiny_run(out=str(tmp_path / "clean")))
    calls = _spy_training(monkeypatch)
    real_lr_at = optim.lr_at
    fired = []

    def lr_at(step, cfg, progress=None):
        if "round-02" in cfg.out and step == 1 and not fired:
            fired.append(step)
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop: checkpoint, then stop
        return real_lr_at(step, cfg, progress)

    monkeypatch.setattr(optim, "lr_at", lr_at)
    cfg = tiny_run(out=str(tmp_path / "killed"))
    with pytest.raises(SystemExit) as e:
        recipe.run(cfg)
    assert e.value.code == 128 + signal.SIGTERM
    state = json.loads((tmp_path / "killed" / growth.STATE_FILE).read_text())
    assert [r["round"] for r in state["rounds"]] == [1]  # round 2 is not recorded as finished
    assert not (tmp_path / "killed" / "report.json").exists()

    calls.clear()
    res = recipe.run(cfg)
    assert len(calls) == 1 and calls[0].out.endswith("round-02-L4")  # round 1 not redone
    assert calls[0].resume is True
    log = (tmp_path / "killed" / "rounds" / "round-02-L4" / "log.jsonl").read_text()
    train_steps = [json.loads(x)["step"] for x in log.splitlines() if '"train"' in x]
    assert train_steps == [1, 2, 3]  # step 3 trained once, after the resume; nothing repeated
    for a, b in zip(res.report["rounds"], clean.report["rounds"], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)


@pytest.mark.slow
def test_killed_process_resumes(tmp_path, tiny_run, monkeypatch):
    """A real SIGKILL of `inheritune run` during round 2; the rerun finishes without redoing
    round 1 and resumes round 2 from its last checkpoint."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("INHERITUNE_CACHE", str(cache))
    cfg = tiny_run(steps=40, eval_every=0, save_every=5)  # long enough to be killed mid-round
    preset = tmp_path / "run.yaml"
    preset.write_text(yaml.safe_dump(to_dict(cfg)))
    env = {**os.environ, "INHERITUNE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "inheritune", "run", "--config", str(preset)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = Path(cfg.train.out) / "rounds" / "round-02-L4" / "checkpoints"
    deadline = time.time() + 240
    try:
        while not list(ckpts.glob("step-*")):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "round 2 never wrote a checkpoint"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    assert 0 < killed_at < 40

    calls = _spy_training(monkeypatch)
    res = recipe.run(
        build(RecipeConfig, **{**to_dict(cfg), "save_every": 0})
    )  # finish fast: no more checkpoints
    assert len(calls) == 1 and calls[0].out.endswith("round-02-L4") and calls[0].resume
    assert [r["steps"] for r in res.report["rounds"]] == [40, 40]
    log = (Path(cfg.train.out) / "rounds" / "round-02-L4" / "log.jsonl").read_text()
    steps = [json.loads(x)["step"] for x in log.splitlines() if '"train"' in x]
    assert steps[-1] == 40 and steps == sorted(set(steps))  # resumed, no step logged twice


# --------------------------------------------------------------------------- report helpers


def test_measure_speed_counts_tokens_and_restores_mode():
    from conftest import tiny_model

    model = tiny_model("gpt2", layers=2).train()
    calls = []
    model.register_forward_hook(
        lambda m, a, k, o: calls.append(k["input_ids"].shape), with_kwargs=True
    )
    s = report.measure_speeds({"m": model}, 3, 8, warmup=2, iters=3)["m"]
    assert calls == [(3, 8)] * 5
    assert s["tokens_per_s"] == pytest.approx(24 / s["median_s"])
    assert model.training
    with pytest.raises(ValueError):
        report.measure_speeds({"m": model}, 0, 8)


def test_measure_speeds_interleaves_models():
    """Timed passes alternate between models so that load from other processes hits both."""
    from conftest import tiny_model

    order = []
    a, b = tiny_model("llama", layers=1), tiny_model("llama", layers=3)
    a.register_forward_hook(lambda *_: order.append("a"))
    b.register_forward_hook(lambda *_: order.append("b"))
    s = report.measure_speeds({"a": a, "b": b}, 2, 8, warmup=1, iters=3)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert set(s) == {"a", "b"} and all(v["tokens_per_s"] > 0 for v in s.values())


def test_run_refuses_a_file_as_out(tmp_path, tiny_run):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        recipe.run(tiny_run(out=str(f)))


def test_calibration_runs_before_each_round_and_helps_on_held_out_windows(
    tiny_run, tmp_path, tokenizer
):
    """With a final norm far off its best scale (as after truncation), each round's refit norm
    beats the unrefit one on the VALIDATION windows (the fit sees only training windows)."""
    from conftest import tiny_model

    ref = tiny_model("llama", layers=6)
    with torch.no_grad():
        get_arch(ref).final_norm.weight.mul_(8.0)
    folder = tmp_path / "off-norm"
    ref.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = tiny_run(
        model=str(folder), calibrate_iters=10, calibrate_windows=32, max_rounds=2, min_rounds=2
    )
    res = recipe.run(cfg)
    rounds = json.loads((Path(res.out) / "report.json").read_text())["rounds"]
    assert len(rounds) == 2
    tokens = data.load_tokens(cfg.train.data, tokenizer)
    windows = data.eval_windows(tokens, cfg.train.seq_len, cfg.train.eval_tokens)
    for r in rounds:
        assert "calibration" in r
        unrefit = losses.evaluate_loss(surgery.first_layers(ref, r["layers"]), windows, 4)
        assert r["evals"][0]["val_loss"] < unrefit - 0.05


def test_bridge_block_rounds(tiny_run):
    """--bridge block: each round trains the first l layers + one fitted block (l + 1 layers);
    the fit is recorded and the final model is a plain HF folder of the reference's class."""
    cfg = tiny_run(
        bridge="block", bridge_steps=5, calib_tokens=128, calib_seq_len=16, extra_eval=None
    )
    res = recipe.run(cfg)
    rounds = res.report["rounds"]
    assert [(r["depth"], r["layers"]) for r in rounds] == [(2, 3), (4, 5)]
    for r in rounds:
        assert r["bridge"]["kept_layers"] == r["depth"]
        assert {"fit_loss_before", "fit_loss_after", "linear_map_r2"} <= set(r["bridge"])
    final = models.load_model(str(res.final_model))
    assert type(final).__name__ == "LlamaForCausalLM" and final.config.num_hidden_layers == 5
    md = res.report_md.read_text()
    assert "## The bridge blocks" in md and "## Time per phase" in md
    assert "round 2: build + bridge fit" in md
    with pytest.raises(ConfigError, match="--growth warm needs --bridge none"):
        tiny_run(bridge="block", growth="warm")


def test_scored_selection_grows_by_importance_with_a_bridge_at_every_seam(tiny_run, tokenizer):
    """--select bi: round 1 keeps the 2 layers of highest Block Influence (training-split
    windows), round 2 adds back the 2 dropped layers of highest BI; every removed span gets a
    fitted bridge block, and a changed --select does not resume the run."""
    from inheritune.analysis import selection
    from inheritune.analysis.layer_scores import layer_scores, score_windows

    knobs = {"select": "bi", "score_windows": 3, "score_seq_len": 16, "extra_eval": None}
    knobs |= {"bridge": "block", "bridge_steps": 3, "calib_tokens": 128, "calib_seq_len": 16}
    cfg = tiny_run(**knobs)
    res = recipe.run(cfg)
    ref = models.load_model(cfg.train.model)
    tokens = data.load_tokens(cfg.train.data, tokenizer)
    windows = score_windows(tokens.train, cfg.selection, cfg.train.seed)
    scores = layer_scores(ref, windows, ["block_influence"], cache=False)
    first = selection.kept_layers("bi", 6, 2, scores)
    second = selection.grow(first, 2, selection.importance("bi", 6, scores))
    rounds = res.report["rounds"]
    assert [r["kept"] for r in rounds] == [first, second] and first != [0, 1]
    for r in rounds:
        spans = selection.spans(r["kept"], 6)
        assert [tuple(b["span"]) for b in r["bridge"]["bridges"]] == spans
        assert r["layers"] == len(r["kept"]) + len(spans)
    # round 2 reuses the bridge of every seam round 1 already fitted, and fits the others
    before = {tuple(b["span"]): b for b in rounds[0]["bridge"]["bridges"]}
    for b in rounds[1]["bridge"]["bridges"]:
        old = before.get(tuple(b["span"]))
        assert bool(b.get("reused")) == (old is not None)
        assert old is None or b["fit_loss_after"] == old["fit_loss_after"]
    final = models.load_model(str(res.final_model))
    assert final.config.num_hidden_layers == rounds[-1]["layers"]
    md = res.report_md.read_text()
    assert "## Layers kept" in md and "`--select bi`" in md and "in place of layers" in md
    with pytest.raises(ConfigError, match="different settings"):
        recipe.run(tiny_run(**{**knobs, "select": "lazy"}))


def test_a_growth_round_reuses_the_bridges_of_the_seams_it_keeps(tiny_run, monkeypatch):
    """Round 1 keeps layers 0 and 3 (seams 1-2 and 4-5), round 2 adds 1 and 2 (seam 4-5 only):
    round 2 gets round 1's fitted bridge for 4-5 and fits nothing."""
    from inheritune.surgery import bridge as bridge_mod

    knobs = {"select": "0,3", "extra_eval": None, "bridge": "block"}
    knobs |= {"bridge_steps": 3, "calib_tokens": 128, "calib_seq_len": 16}
    fits: list = []
    real = bridge_mod.fit_bridge
    monkeypatch.setattr(bridge_mod, "fit_bridge", lambda *a, **kw: fits.append(1) or real(*a, **kw))
    res = recipe.run(tiny_run(**knobs))
    r1, r2 = (r["bridge"]["bridges"] for r in res.report["rounds"])
    assert [b["span"] for b in r1] == [[1, 3], [4, 6]] and [b["span"] for b in r2] == [[4, 6]]
    assert len(fits) == 2 and r2[0]["reused"] and not r1[1].get("reused")
    assert r2[0]["fit_loss_after"] == r1[1]["fit_loss_after"]
    model = models.load_model(str(res.final_model))
    assert get_arch(model).num_layers == 5


def test_run_defaults_to_the_study_winner_and_the_paper_is_one_flag_away(tiny_run):
    """run's defaults are benchmarks/results/study.md's winner (Block Influence + a bridge at
    every seam); --recipe paper is the paper's Algorithm 1 (first l, no bridge)."""
    cfg = build(RecipeConfig, model="m", data="d")
    assert (cfg.recipe, cfg.selection.select, cfg.bridging.bridge) == ("inheritune", "bi", "block")
    assert cfg.baseline == "none"
    paper = build(RecipeConfig, model="m", data="d", recipe="paper")
    assert (paper.selection.select, paper.bridging.bridge) == ("first", "none")
    # its own values are accepted again: a resolved config.yaml reloads as written
    again = build(RecipeConfig, **{**to_dict(paper)["train"], **_flat(to_dict(paper))})
    assert (again.selection.select, again.bridging.bridge) == ("first", "none")
    with pytest.raises(ConfigError, match="--recipe paper sets --select first; drop --select lazy"):
        build(RecipeConfig, model="m", data="d", recipe="paper", select="lazy")
    with pytest.raises(ConfigError, match=r"--baseline paper .* already keeps the first layers"):
        build(RecipeConfig, model="m", data="d", recipe="paper", baseline="paper")
    with pytest.raises(ConfigError, match="--recipe must be one of inheritune, paper"):
        build(RecipeConfig, model="m", data="d", recipe="shortgpt")
    with pytest.raises(ConfigError, match="--growth warm needs --bridge none"):
        build(RecipeConfig, model="m", data="d", growth="warm")
    # the flags show run's defaults in --help
    fields = flag_fields(RecipeConfig)
    assert fields["select"][2] == "bi" and fields["bridge"][2] == "block"


def _flat(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v))
        else:
            out[k] = v
    return out


def test_baseline_paper_trains_the_first_layers_beside_the_rounds(tiny_run, monkeypatch):
    """--baseline paper: the first (final size - 1) layers + a top bridge, one round's budget,
    the same windows; in report.json, report.md (named) and curves.png; a rerun reuses it, and
    a finished run without it can add it without retraining its rounds."""
    knobs = {"select": "bi", "score_windows": 3, "score_seq_len": 16}
    knobs |= {"bridge": "block", "bridge_steps": 3, "calib_tokens": 128, "calib_seq_len": 16}
    knobs["extra_eval"] = tiny_run().train.data  # a second set: its curves are labelled too
    res = recipe.run(tiny_run(**knobs))  # without the baseline first
    assert res.report["baseline"] is None and "Against the paper" not in res.report_md.read_text()
    calls = _spy_training(monkeypatch)
    curves: dict = {}
    real_plot = report.plots.plot_curves
    monkeypatch.setattr(
        report.plots,
        "plot_curves",
        lambda c, path, **kw: curves.update(c) or real_plot(c, path, **kw),
    )
    res = recipe.run(tiny_run(**knobs, baseline="paper"))
    assert len(calls) == 1  # the rounds were reused; only the baseline trained
    last, b = res.report["rounds"][-1], res.report["baseline"]
    assert b["kept"] == list(range(last["layers"] - 1)) and b["layers"] == last["layers"]
    assert b["recipe"] == "paper" and b["tokens"] > 0 and b["bridge"]["kept_layers"] == b["depth"]
    assert b["evals"][0]["step"] == 0 and math.isfinite(b["val_loss"])
    assert Path(calls[0].out).name == f"paper-L{last['layers'] - 1}"
    assert calls[0].time_budget == tiny_run(**knobs).train.time_budget  # one round's budget
    md = res.report_md.read_text()
    assert "## Against the paper's recipe" in md
    assert f"| paper | layers 0-{last['layers'] - 2} + 1 bridge(s) ({last['layers']} layers)" in md
    assert "| inheritune (bi + seam bridges) |" in md and "paper's recipe: training" in md
    assert any(k.startswith("paper's recipe: first") for k in curves)
    assert any(k.startswith("round 2 (bi + seam bridges)") for k in curves)
    assert any(k.startswith("paper's recipe: ") and "(held out)" in k for k in curves)
    assert sum("(bi + seam bridges)" in k for k in curves) == 2  # one per round
    calls.clear()
    again = recipe.run(tiny_run(**knobs, baseline="paper"))
    assert calls == [] and again.report["baseline"] == b  # resumed: nothing retrained


def test_warm_growth_of_a_selection(tiny_run):
    """keep-last keeps 0 and 5; warm growth puts layers 1 and 2 back between them."""
    res = recipe.run(tiny_run(select="keep-last", growth="warm", extra_eval=None))
    assert [r["kept"] for r in res.report["rounds"]] == [[0, 5], [0, 1, 2, 5]]


def test_extra_eval_reports_more_held_out_sets(tiny_run, tmp_path, tokenizer):
    """--extra-eval a,b: the reference and each round (start and end) on two wholly held-out
    corpora; the numbers equal an independent evaluation, each with the reference's beside it."""
    other, more = tmp_path / "other.txt", tmp_path / "more.txt"
    other.write_text("A quite different text about ships, storms and the sea.\n" * 60)
    more.write_text("Numbers and ledgers: the accounts of a small trading house.\n" * 60)
    res = recipe.run(tiny_run(extra_eval=f"{other},{more}", min_rounds=1, max_rounds=1))
    rep = res.report
    cfg = tiny_run()
    ref = models.load_model(cfg.train.model)
    end = models.load_model(str(res.out / rep["rounds"][0]["model_dir"]))
    md = res.report_md.read_text()
    for path in (other, more):
        tokens = data.load_tokens(str(path), tokenizer, val_fraction=1.0)
        windows = data.eval_windows(tokens, cfg.train.seq_len, cfg.train.eval_tokens)
        want = losses.evaluate_loss(ref, windows, cfg.train.micro_batch())
        assert rep["reference"]["extra_val_loss"][str(path)] == pytest.approx(want, abs=1e-5)
        got = rep["rounds"][0]["extra_val_loss"][str(path)]["end"]
        assert got == pytest.approx(
            losses.evaluate_loss(end, windows, cfg.train.micro_batch()), abs=1e-5
        )
        assert f"{path.name} (held out)" in md or f"{path} (held out)" in md
        assert f"{want:.4f}" in md  # the reference's loss beside the rounds'
