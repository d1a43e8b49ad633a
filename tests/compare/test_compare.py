"""``inheritune compare``: every variant end to end on a tiny model, caching, and bad input."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

from inheritune import cli
from inheritune.analysis import scoring
from inheritune.compare import compare as compare_mod
from inheritune.compare import config as compare_config
from inheritune.compare.compare import compare
from inheritune.compare.config import CompareConfig
from inheritune.compare.variants import (
    VARIANTS,
    default_depth,
    layer_ranges,
    train_top_warning,
    unbuildable_reason,
)
from inheritune.config import ConfigError, build, dataclass_from_args
from inheritune.data.prepare import load_tokens
from inheritune.data.windows import eval_windows
from inheritune.models import loading as models
from inheritune.models.losses import evaluate_loss
from inheritune.surgery import build as surgery

TRAIN = {
    "batch_size": 2,
    "seq_len": 16,
    "eval_every": 1,
    "eval_tokens": 64,
    "save_every": 0,
    "warmup": 0,
    "lr": 3e-3,
    "log_every": 1,
}


def make_cfg(folder, corpus, out, **kw) -> CompareConfig:
    base = {
        "model": str(folder),
        "data": str(corpus),
        "out": str(out),
        "depth": 2,
        "steps": 2,
        "train": dict(TRAIN),
        "score_windows": 4,
        "score_seq_len": 16,
        "calib_seq_len": 16,
    }
    return build(CompareConfig, **{**base, **kw})


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any variant starts training."""

    def boom(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(compare_mod, "train_model", boom)


def test_every_variant_on_a_tiny_model(tiny_folder, corpus_file, tmp_path, capsys):
    folder = tiny_folder("llama", layers=4)
    cfg = make_cfg(folder, corpus_file, tmp_path / "cmp")
    res = compare(cfg)
    rows = {r["variant"]: r for r in res.rows}
    assert list(rows) == list(VARIANTS) and not res.skipped

    # the table and the plot exist and name every variant
    md = res.markdown.read_text()
    for name in VARIANTS:
        assert f"| {name}" in md
    assert res.plot.stat().st_size > 1000
    summary = json.loads(res.json.read_text())
    assert [r["variant"] for r in summary["variants"]] == list(VARIANTS)

    # the reference loss is the reference evaluated on train's own fixed validation windows
    ref = models.load_model(str(folder))
    tokens = load_tokens(str(corpus_file), models.load_tokenizer(str(folder)))
    windows = eval_windows(tokens, 16, 64)
    assert res.reference_loss == pytest.approx(evaluate_loss(ref, windows, 2), abs=1e-6)
    # ... and so is each variant's step-0 loss, for the model that variant starts from
    inh = surgery.first_layers(ref, 2)
    assert rows["inheritune"]["loss_before"] == pytest.approx(
        evaluate_loss(inh, windows, 2), abs=1e-5
    )
    lazy = surgery.select_layers(ref, [2, 3])
    assert rows["lazy-init"]["loss_before"] == pytest.approx(
        evaluate_loss(lazy, windows, 2), abs=1e-5
    )

    # same init for the three random-start students; equal budgets except the 2T ones
    befores = {rows[n]["loss_before"] for n in ("random", "random-2x", "kd-random")}
    assert len(befores) == 1
    t = rows["inheritune"]["tokens"]
    assert t == 2 * 2 * 16  # steps x batch x seq_len
    for name, r in rows.items():
        assert r["tokens"] == (2 * t if name in ("random-2x", "stacking") else t), name
        assert r["layers"] == (4 if name in ("half-width", "scratch-full") else 2), name
        assert r["evals"][0]["step"] == 0 and r["evals"][-1]["tokens"] == r["tokens"]
        assert r["loss_after"] == r["evals"][-1]["val_loss"]
        assert r["tokens_to_reference"] == compare_mod.tokens_to_reach(
            r["evals"], res.reference_loss
        )
    assert "random-2x †" in md and "stacking †" in md and "inheritune †" not in md
    # distillation changes the trajectory of the same initial weights
    assert rows["kd-random"]["loss_after"] != rows["random"]["loss_after"]

    # layer selections
    assert rows["hybrid"]["init"]["layers_from"] == [0, 0]
    assert rows["kd-every-other"]["init"]["layers_from"] == [0, 2]
    assert rows["stacking"]["init"]["stacked"] == [0, 0]
    # stage 2 starts from the stacked stage-1 model, not from scratch
    s1_end = rows["stacking"]["evals"][2]
    assert s1_end["tokens"] == t and rows["stacking"]["evals"][3]["tokens"] == t
    assert rows["half-width"]["parameters"] < summary["reference"]["parameters"]
    scores = json.loads((tmp_path / "cmp" / "scores.json").read_text())["scores"]
    assert rows["prune-bi"]["init"]["dropped"] == scoring.lowest_bi_drop(
        scores["block_influence"], 2
    )
    assert rows["prune-angular"]["init"]["dropped"] == scoring.best_block_drop(
        scores["angular"][1], 2
    )
    assert len(scores["max_rank"]) == 4 and len(rows["prune-lazy"]["init"]["dropped"]) == 2
    # keep-last: layers 0..l-2 and the final one
    assert rows["prune-keep-last"]["init"]["layers_from"] == [0, 3]
    assert rows["prune-keep-last"]["init"]["dropped"] == [1, 2]
    keep_last = surgery.select_layers(ref, [0, 3])
    assert rows["prune-keep-last"]["loss_before"] == pytest.approx(
        evaluate_loss(keep_last, windows, 2), abs=1e-5
    )
    # scratch-full: the reference's architecture, all 4 layers, random init, T steps
    scratch = surgery.random_init(ref.config, 4, seed=0)
    assert rows["scratch-full"]["parameters"] == summary["reference"]["parameters"]
    assert rows["scratch-full"]["loss_before"] == pytest.approx(
        evaluate_loss(scratch, windows, 2), abs=1e-5
    )
    assert summary["layer_numbering"] == "0-based (paper plots number from 1)"
    for name in ("prune-bi", "prune-angular", "prune-lazy"):
        init = rows[name]["init"]
        assert sorted(init["dropped"] + init["layers_from"]) == [0, 1, 2, 3]


def test_cached_variants_are_skipped_and_changes_refused(
    tiny_folder, corpus_file, tmp_path, monkeypatch
):
    folder = tiny_folder("llama", layers=4)
    cfg = make_cfg(folder, corpus_file, tmp_path / "cmp", variants=["inheritune", "random"])
    first = compare(cfg)

    calls = []
    real = compare_mod.train_model
    monkeypatch.setattr(
        compare_mod, "train_model", lambda *a, **k: calls.append(a[3].out) or real(*a, **k)
    )
    again = compare(cfg)
    assert calls == []  # both finished: nothing retrained
    assert [r["loss_after"] for r in again.rows] == [r["loss_after"] for r in first.rows]

    # a variant without its result.json (killed after training) is redone from its cache
    (tmp_path / "cmp" / "random" / "result.json").unlink()
    compare(cfg)
    assert calls == []  # the finished training stage is cached separately
    # adding a variant trains only that one
    compare(make_cfg(folder, corpus_file, tmp_path / "cmp", variants=["inheritune", "lazy-init"]))
    assert [p.split("/")[-2] for p in map(str, calls)] == ["lazy-init"]

    # same --out, different budget: refused before any training
    with pytest.raises(ConfigError, match=r"different settings.*steps"):
        compare(make_cfg(folder, corpus_file, tmp_path / "cmp", variants=["random"], steps=3))


def test_unfinished_variant_resumes_from_its_checkpoint(
    tiny_folder, corpus_file, tmp_path, monkeypatch
):
    from inheritune.data import windows as train

    folder = tiny_folder("llama", layers=4)
    train_cfg = {**TRAIN, "save_every": 2}

    def cfg(out):
        return make_cfg(folder, corpus_file, out, variants=["inheritune"], steps=4, train=train_cfg)

    full = compare(cfg(tmp_path / "full")).rows[0]
    # finished stages keep their final model but not their (large) checkpoints
    assert (tmp_path / "full" / "inheritune" / "train" / "final" / "config.json").is_file()
    assert not (tmp_path / "full" / "inheritune" / "train" / "checkpoints").exists()

    # crash while fetching the batch of step 3, just after the step-2 checkpoint was written
    real_next = train.WindowSampler.next_starts
    calls = []

    def crash(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_next(self, batch)

    monkeypatch.setattr(train.WindowSampler, "next_starts", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        compare(cfg(tmp_path / "a"))
    monkeypatch.setattr(train.WindowSampler, "next_starts", real_next)
    run = tmp_path / "a" / "inheritune"
    assert not (run / "result.json").exists()
    manifest = run / "train" / "checkpoints" / "step-00000002" / "manifest.json"
    assert manifest.is_file()

    seen = []
    real = compare_mod.train_model
    monkeypatch.setattr(
        compare_mod, "train_model", lambda *a, **k: seen.append(a[3].resume) or real(*a, **k)
    )
    resumed = compare(cfg(tmp_path / "a")).rows[0]
    assert seen == [True]
    assert [e["step"] for e in resumed["evals"]] == [0, 1, 2, 3, 4]
    # weights, optimizer and data position restored: the same run as the uninterrupted one
    assert resumed["loss_after"] == pytest.approx(full["loss_after"], abs=1e-5)
    assert resumed["evals"][1]["val_loss"] == pytest.approx(full["evals"][1]["val_loss"], abs=1e-6)


def test_bad_input_is_refused_before_training(tiny_folder, corpus_file, tmp_path, no_training):
    folder = tiny_folder("llama", layers=4)

    def run(**kw):
        compare(make_cfg(folder, corpus_file, tmp_path / "bad", **kw))

    with pytest.raises(ConfigError, match=r"unknown variant.*known: inheritune, random"):
        make_cfg(folder, corpus_file, tmp_path, variants=["inheritune", "distilbert"])
    with pytest.raises(ConfigError, match="smaller than the reference's 4 layers"):
        run(depth=4)
    with pytest.raises(ConfigError, match="stacking: needs an even --depth"):
        run(depth=3, variants=["inheritune", "stacking"])
    with pytest.raises(ConfigError, match="kd-every-other: needs reference layers 0,2,4"):
        run(depth=3, variants=["kd-every-other"])
    with pytest.raises(ConfigError, match=r"\['resume'\] may not be set here"):
        make_cfg(folder, corpus_file, tmp_path, train={"resume": True})
    with pytest.raises(ConfigError, match="unknown key"):
        make_cfg(folder, corpus_file, tmp_path, train={"batch": 5})
    with pytest.raises(ConfigError, match="--kd-alpha"):
        make_cfg(folder, corpus_file, tmp_path, kd_alpha=0)
    assert not (tmp_path / "bad").exists()


def test_half_width_of_odd_heads(tiny_folder, corpus_file, tmp_path, monkeypatch):
    # 3 heads (like SmolLM2's 9): half width cannot be built
    folder = tiny_folder("llama", layers=4, hidden=24, heads=3)
    with pytest.raises(ConfigError, match=r"half-width: .*num_attention_heads=3"):
        compare(make_cfg(folder, corpus_file, tmp_path / "x", variants=["half-width"]))
    # without --variants it is skipped and the report says why
    only = {k: VARIANTS[k] for k in ("inheritune", "half-width")}
    monkeypatch.setattr(compare_mod, "VARIANTS", only)
    monkeypatch.setattr(compare_config, "VARIANTS", only)
    res = compare(make_cfg(folder, corpus_file, tmp_path / "y", depth=3))
    assert [r["variant"] for r in res.rows] == ["inheritune"]
    assert "num_attention_heads=3" in res.skipped["half-width"]
    assert "half-width" in res.markdown.read_text()


def test_odd_default_depth_skips_stacking(tiny_folder, corpus_file, tmp_path, monkeypatch):
    only = {k: VARIANTS[k] for k in ("inheritune", "hybrid")}
    monkeypatch.setattr(compare_mod, "VARIANTS", only)
    monkeypatch.setattr(compare_config, "VARIANTS", only)
    folder = tiny_folder("llama", layers=4)
    res = compare(make_cfg(folder, corpus_file, tmp_path / "z", depth=3))
    assert [r["variant"] for r in res.rows] == ["inheritune"] and "hybrid" in res.skipped


def test_cli(tiny_folder, corpus_file, tmp_path, capsys):
    folder = tiny_folder("llama", layers=4)
    assert cli.main(["compare", "--model", str(folder), "--variants", "nope"]) == 2
    assert "known: inheritune" in capsys.readouterr().err
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        f"model: {folder}\ndata: {corpus_file}\ndepth: 2\nsteps: 1\nscore_windows: 2\n"
        f"calib_seq_len: 16\ntrain: {json.dumps(TRAIN)}\n"
    )
    out = tmp_path / "cli"
    argv = ["compare", "--config", str(cfg_file), "--variants", "inheritune,hybrid"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    rows = json.loads((out / "compare.json").read_text())["variants"]
    assert [r["variant"] for r in rows] == ["inheritune", "hybrid"]
    assert (out / "curves.png").is_file() and (out / "config.yaml").is_file()
    # the training settings are train's own flat flags
    ns = cli.build_parser().parse_args(["compare", "--batch-size", "4"])
    assert dataclass_from_args(CompareConfig, ns).train.batch_size == 4


def test_helpers():
    assert default_depth(30) == 14 and default_depth(24) == 12
    assert default_depth(4) == 2
    assert (
        compare_mod.tokens_to_reach(
            [{"tokens": 0, "val_loss": 5.0}, {"tokens": 10, "val_loss": 3.0}], 3.5
        )
        == 10
    )
    assert compare_mod.tokens_to_reach([{"tokens": 0, "val_loss": 5.0}], 3.5) is None
    assert layer_ranges([0, 1, 2, 5]) == "0-2,5"
    assert layer_ranges([0, 2, 4, 6, 8]) == "0,2,...,8"
    assert layer_ranges([3]) == "3"
    assert unbuildable_reason("kd-every-other", 30, 15) is None
    assert "depth <= 15" in unbuildable_reason("kd-every-other", 30, 16)
    assert unbuildable_reason("random", 30, 15) is None


def test_scores_pick_an_identity_layer_for_pruning(tiny_folder, corpus_file, tmp_path):
    # a reference whose block 1 is the identity: both pruning scores must drop exactly it
    from conftest import make_tokenizer, tiny_model

    model = tiny_model("llama", layers=4)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    folder = tmp_path / "ident"
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    cfg = make_cfg(
        folder, corpus_file, tmp_path / "p", depth=3, variants=["prune-bi", "prune-angular"]
    )
    res = compare(cfg)
    assert [r["init"]["dropped"] for r in res.rows] == [[1], [1]]
    assert np.isclose(
        json.loads((tmp_path / "p" / "scores.json").read_text())["scores"]["block_influence"][1],
        0.0,
        atol=1e-6,
    )


def test_preset_parses_and_builds_at_its_depth():
    from importlib.resources import files

    from inheritune.config import dataclass_from_dict, load_yaml

    preset = files("inheritune") / "presets" / "compare-demo.yaml"
    cfg = dataclass_from_dict(CompareConfig, load_yaml(str(preset)))
    assert cfg.variants is None and cfg.depth == default_depth(30)
    # SmolLM2 has 30 layers: every variant but half-width (9 heads) builds at this depth
    assert all(unbuildable_reason(n, 30, cfg.depth) is None for n in VARIANTS)


def test_angular_tokens_and_mergekit_export(tiny_folder, corpus_file, tmp_path):
    import yaml

    from inheritune.data.windows import sample_windows
    from inheritune.surgery import mergekit

    folder = tiny_folder("llama", layers=4)
    mk = tmp_path / "mk" / "sel.yaml"
    names = ["inheritune", "random", "hybrid", "prune-angular", "prune-keep-last"]
    cfg = make_cfg(
        folder, corpus_file, tmp_path / "a", steps=1, variants=names, export_mergekit=str(mk)
    )
    res = compare(cfg)
    rows = {r["variant"]: r for r in res.rows}
    summary = json.loads(res.json.read_text())
    # every selection built from reference layers round-trips through its mergekit file
    for name in ("inheritune", "hybrid", "prune-angular", "prune-keep-last"):
        text = mergekit.variant_path(mk, name).read_text()
        assert (
            mergekit.layers_from_slices(yaml.safe_load(text)) == rows[name]["init"]["layers_from"]
        )
        assert "random: random init" in text  # the skipped variant is named in the comment
        assert summary["mergekit"]["written"][name] == str(mergekit.variant_path(mk, name))
    assert not mergekit.variant_path(mk, "random").exists()
    assert summary["mergekit"]["not_exported"] == {"random": "random init: no reference layers"}

    # prune-angular's scores are Gromov et al.'s: the last token of each calibration window
    ref = models.load_model(str(folder))
    tokens = load_tokens(str(corpus_file), models.load_tokenizer(str(folder)))
    windows = sample_windows(tokens.train, 4, 16, 0)
    stored = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert stored["spec"]["angular_tokens"] == "last"
    last = scoring.angular_distances(ref, windows, 2, tokens="last")
    np.testing.assert_allclose(stored["scores"]["angular"][1], last, rtol=1e-6)
    assert rows["prune-angular"]["init"]["dropped"] == scoring.best_block_drop(last, 2)
    # switching to all tokens in the same --out is refused for prune-angular ...
    with pytest.raises(ConfigError, match=r"different settings.*calibration"):
        compare(make_cfg(folder, corpus_file, tmp_path / "a", steps=1, angular_tokens="all"))
    # ... and in a fresh one it scores every token
    compare(
        make_cfg(
            folder,
            corpus_file,
            tmp_path / "b",
            steps=1,
            variants=["prune-angular"],
            angular_tokens="all",
        )
    )
    stored = json.loads((tmp_path / "b" / "scores.json").read_text())
    every = scoring.angular_distances(ref, windows, 2, tokens="all")
    np.testing.assert_allclose(stored["scores"]["angular"][1], every, rtol=1e-6)
    assert not np.allclose(every, last)
    with pytest.raises(ConfigError, match="--angular-tokens must be one of last, all"):
        make_cfg(folder, corpus_file, tmp_path, angular_tokens="first")


def test_bridge_block_inheritune_variant(tiny_folder, corpus_file, tmp_path):
    """--bridge block: the inheritune variant is l-1 inherited layers + one fitted block, still
    l layers, and the table says so."""
    folder = tiny_folder("llama", layers=4)
    cfg = make_cfg(
        folder, corpus_file, tmp_path / "b", variants=["inheritune"], depth=3,
        bridge="block", bridge_steps=3, calib_tokens=64,
    )  # fmt: skip
    row = compare(cfg).rows[0]
    assert row["layers"] == 3 and row["init"]["layers_from"] == [0, 1]
    assert row["bridge"]["kept_layers"] == 2
    assert "+ 1 bridge block" in (tmp_path / "b" / "compare.md").read_text()
    final = models.load_model(str(tmp_path / "b" / "inheritune" / "train" / "final"))
    assert final.config.num_hidden_layers == 3


def test_train_top_warns_for_scattered_pruning(tiny_folder, corpus_file, tmp_path):
    assert train_top_warning(0, ["prune-bi"]) is None
    assert train_top_warning(2, ["inheritune", "prune-keep-last"]) is None
    msg = train_top_warning(2, ["inheritune", "prune-bi", "prune-lazy"])
    assert msg.startswith("--train-top 2 freezes the bottom of prune-bi, prune-lazy too")
    folder = tiny_folder("llama", layers=4)
    cfg = make_cfg(folder, corpus_file, tmp_path / "w", variants=["prune-bi"],
                   train={**TRAIN, "train_top": 1})  # fmt: skip
    with pytest.warns(UserWarning, match="freezes the bottom of prune-bi"):
        compare(cfg)
    # a cached variant trains no more: no warning the second time
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compare(cfg)
    assert not [w for w in caught if "freezes the bottom" in str(w.message)]


def test_auto_precision_is_resolved_once_for_every_variant(
    tiny_folder, corpus_file, tmp_path, monkeypatch
):
    """--precision auto is timed once (on the inheritune variant's model) and every variant
    trains and the reference is scored in that precision; a resumed comparison reuses it."""
    from inheritune.training import precision as P

    calls = []
    real = P.choose_precision

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(P, "choose_precision", counted)
    folder = tiny_folder("llama", layers=4)
    cfg = make_cfg(folder, corpus_file, tmp_path / "cmp", variants="inheritune,random")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="auto"))
    compare(cfg)
    record = json.loads((tmp_path / "cmp" / "precision.json").read_text())
    assert len(calls) == 1 and record["precision"] in ("fp32", "bf16")
    written = sorted((tmp_path / "cmp").glob("*/**/config.yaml"))
    assert len(written) >= 2  # one per variant's training stage
    for path in written:
        assert f"precision: {record['precision']}" in path.read_text(), path
    compare(cfg)  # everything cached: nothing measured again
    assert len(calls) == 1
