"""Tests for inheritune.evaluate: config validation, strided perplexity against brute force, and
the real lm-evaluation-harness end to end on a local multiple-choice task (never the network).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import CORPUS_TEXT, make_tokenizer, tiny_model
from inheritune.config import ConfigError
from inheritune.evaluate import (
    PAPER_TASKS,
    EvalConfig,
    evaluate,
    file_perplexity,
    markdown_table,
    sliding_windows,
    strided_nll,
    summarize,
)

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# ----------------------------------------------------------------------------- config


def test_config_defaults_to_paper_tasks_and_half_stride():
    cfg = EvalConfig(model="m")
    assert cfg.tasks == PAPER_TASKS
    assert cfg.ppl_stride == cfg.ppl_seq_len // 2


def test_config_ppl_only_runs_no_tasks(corpus_file):
    cfg = EvalConfig(model="m", ppl_file=str(corpus_file))
    assert cfg.tasks == ()
    assert EvalConfig(model="m", ppl_file=str(corpus_file), tasks="a,b").tasks == ("a", "b")


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"ppl_seq_len": 64, "ppl_stride": 65}, "--ppl-stride"),
        ({"ppl_seq_len": 64, "ppl_stride": 0}, "--ppl-stride"),
        ({"ppl_seq_len": 1}, "--ppl-seq-len"),
        ({"batch_size": 0}, "--batch-size"),
        ({"limit": 0}, "--limit"),
        ({"dtype": "int8"}, "--dtype"),
        ({"device": "tpu"}, "--device"),
        ({"ppl_file": "/no/such/file.txt"}, "--ppl-file"),
        ({"tasks": ()}, "--tasks"),
    ],
)
def test_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        EvalConfig(model="m", **kwargs)


def test_cli_help_lists_eval_flags(capsys):
    from inheritune.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    for f in ("--tasks", "--ppl-file", "--ppl-stride", "--limit", "--batch-size", "--dtype"):
        assert f in text


# ----------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize(("n", "seq_len", "stride"), [(100, 16, 16), (100, 16, 5), (17, 16, 1)])
def test_windows_score_each_token_once(n, seq_len, stride):
    targets = [t for w in sliding_windows(n, seq_len, stride) for t in range(w.score_from, w.end)]
    assert len(targets) == len(set(targets))
    if stride < seq_len:
        assert sorted(targets) == list(range(1, n))  # every token but the first
    else:
        assert sorted(targets) == [t for t in range(1, n) if t % seq_len]  # chunk starts skipped
    for w in sliding_windows(n, seq_len, stride):
        assert w.end - w.begin <= seq_len
        # each target sees >= seq_len - stride tokens of context (except at the file start)
        assert w.score_from - w.begin >= min(seq_len - stride, w.score_from)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", layers=2, hidden=32, heads=4)


def _ids(n=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n,), generator=g)


def test_stride_equal_seq_len_is_chunked_loss(lm):
    ids, seq_len = _ids(), 16
    total, count = strided_nll(lm, ids, seq_len, seq_len, batch_size=3)
    ref_sum, ref_n = 0.0, 0
    for begin in range(0, len(ids), seq_len):
        chunk = ids[begin : begin + seq_len][None]
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = lm(input_ids=chunk, labels=chunk).loss  # HF's own shifted mean loss
        ref_sum += float(loss) * (chunk.shape[1] - 1)
        ref_n += chunk.shape[1] - 1
    assert count == ref_n
    assert total / count == pytest.approx(ref_sum / ref_n, rel=1e-5)


@pytest.mark.parametrize("stride", [1, 5, 12])
def test_strided_matches_per_token_loop(lm, stride):
    ids, seq_len = _ids(45, seed=1), 16
    total, count = strided_nll(lm, ids, seq_len, stride, batch_size=4)
    ref = 0.0
    for t in range(1, len(ids)):
        # Token t belongs to window k, the first whose end k*stride + seq_len passes t.
        k = max(0, (t - seq_len) // stride + 1)
        ctx = ids[k * stride : t][None]  # the context only: its last logit predicts ids[t]
        assert min(t, seq_len - stride) <= ctx.shape[1] <= seq_len - 1
        with torch.no_grad():
            logits = lm(input_ids=ctx).logits[0, -1]
        ref += float(-F.log_softmax(logits.double(), -1)[ids[t]])
    assert count == len(ids) - 1
    assert total == pytest.approx(ref, rel=1e-5)


def test_more_context_changes_the_number(lm):
    # A guard against a stride that is silently ignored: the tiny random model is
    # context-sensitive, so stride 1 and stride == seq_len must disagree.
    ids = _ids(80, seed=2)
    a = strided_nll(lm, ids, 16, 1)
    b = strided_nll(lm, ids, 16, 16)
    assert a[1] != b[1]
    assert a[0] / a[1] != pytest.approx(b[0] / b[1], rel=1e-6)


def test_file_perplexity_reports_tokens_and_ppl(lm, corpus_file):
    tok = make_tokenizer()
    res = file_perplexity(lm, tok, corpus_file, seq_len=32, stride=16, max_tokens=200)
    assert res["tokens_used"] == 200
    assert res["tokens_in_file"] == len(tok(CORPUS_TEXT, add_special_tokens=False)["input_ids"])
    assert res["tokens_scored"] == 199
    assert res["perplexity"] == pytest.approx(math.exp(res["nats_per_token"]))
    with pytest.raises(ConfigError, match="--ppl-seq-len"):
        file_perplexity(lm, tok, corpus_file, seq_len=1024, stride=16)


def test_eval_ppl_only_writes_outputs(tiny_folder, corpus_file, tmp_path):
    folder = tiny_folder("gpt2", layers=2, hidden=32)
    out = tmp_path / "out"
    cfg = EvalConfig(
        model=str(folder),
        out=str(out),
        ppl_file=str(corpus_file),
        ppl_seq_len=64,
        ppl_stride=32,
        ppl_max_tokens=1000,
    )
    summary = evaluate(cfg)
    saved = json.loads((out / "eval.json").read_text())
    assert saved["perplexity"]["tokens_scored"] == summary["perplexity"]["tokens_scored"]
    assert "tasks" not in saved
    assert yaml.safe_load((out / "config.yaml").read_text())["ppl_stride"] == 32
    assert "nats/token" in (out / "eval.md").read_text()
    # independent: the tokens scored are the first 1000 of the file's tokens minus the first
    n = len(make_tokenizer()(CORPUS_TEXT, add_special_tokens=False)["input_ids"])
    assert n > 1000
    assert saved["perplexity"]["tokens_scored"] == 999


def test_cli_reports_bad_model_as_user_error(capsys, tmp_path, corpus_file):
    from inheritune.cli import main

    rc = main(["eval", "--model", str(tmp_path / "nope"), "--ppl-file", str(corpus_file)])
    assert rc == 2
    assert "no such model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- harness

QUESTIONS = [
    ("What do cats say", ["meow", "woof woof", "moo", "a loud quack"], 0),
    ("What colour is the sky", ["green", "blue", "bright red", "yellow"], 1),
    ("How many legs has a dog", ["two", "three", "four", "none at all"], 2),
    ("Which is a fruit", ["carrot", "a potato", "onion", "apple"], 3),
    ("What is frozen water", ["ice", "steam", "sand", "smoke"], 0),
    ("Where do fish live", ["in trees", "in water", "underground", "in the sky"], 1),
    ("What do bees make", ["milk", "silk", "honey", "wool"], 2),
    ("What follows Monday", ["Sunday", "Friday", "Saturday", "Tuesday"], 3),
    ("To be or not to be", ["that is the question", "whatever", "maybe", "no"], 0),
    ("Which animal is largest", ["mouse", "whale", "ant", "a small cat"], 1),
    ("What do we breathe", ["water", "stone", "air", "fire and smoke"], 2),
    ("Opposite of hot", ["warm", "big", "loud", "cold"], 3),
]
CHOICE_TEMPLATE = "{{choices}}"


def _write_task(folder, name="tiny_qa"):
    """A harness multiple-choice task over a local jsonl file, the way a user would write one."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "qa.jsonl"
    with data.open("w") as f:
        for q, choices, label in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "label": label}) + "\n")
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": CHOICE_TEMPLATE,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


@torch.no_grad()
def _independent_accuracy(model, tok, limit=None):
    """acc and acc_norm computed here: sum log p(choice | question) per choice, argmax.

    acc_norm divides by the choice's length in characters, without the space that joins it to
    the question (the harness's definition, lm_eval/api/task.py process_results).
    """
    right = right_norm = 0
    items = QUESTIONS[:limit] if limit else QUESTIONS
    for q, choices, label in items:
        ctx = f"Question: {q}\nAnswer:"
        scores, norm = [], []
        for c in choices:
            cont = " " + c
            ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
            whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
            n_cont = len(whole) - len(ctx_ids)
            x = torch.tensor([whole])
            logp = F.log_softmax(model(input_ids=x).logits[0].double(), -1)  # (T, V)
            tgt = torch.arange(len(whole) - n_cont, len(whole))
            s = float(logp[tgt - 1, x[0, tgt]].sum())
            scores.append(s)
            norm.append(s / len(c))
        right += int(max(range(len(choices)), key=scores.__getitem__) == label)
        right_norm += int(max(range(len(choices)), key=norm.__getitem__) == label)
    return right / len(items), right_norm / len(items)


def test_harness_end_to_end_matches_independent_accuracy(tiny_folder, tmp_path, corpus_file):
    pytest.importorskip("lm_eval")
    from inheritune.models.loading import load_model, load_tokenizer

    folder = tiny_folder("llama", layers=2, hidden=32, seed=3)
    task_yaml = _write_task(tmp_path / "tasks")
    out = tmp_path / "out"
    cfg = EvalConfig(
        model=str(folder),
        tasks=(str(task_yaml),),
        out=str(out),
        batch_size=4,
        device="cpu",
        ppl_file=str(corpus_file),
        ppl_seq_len=64,
        ppl_stride=64,
        ppl_max_tokens=640,
    )
    summary = evaluate(cfg)

    row = summary["tasks"]["tiny_qa"]
    assert row["n"] == len(QUESTIONS)
    for metric in ("acc", "acc_norm"):
        assert isinstance(row[metric], float)
        assert 0.0 <= row[metric] <= 1.0
    acc, acc_norm = _independent_accuracy(load_model(str(folder)), load_tokenizer(str(folder)))
    assert row["acc"] == pytest.approx(acc)
    assert row["acc_norm"] == pytest.approx(acc_norm)
    assert summary["average"]["acc"] == pytest.approx(acc)
    assert summary["perplexity"]["stride"] == 64
    assert summary["perplexity"]["tokens_scored"] == 640 - 10  # 10 chunks, first token of each

    saved = json.loads((out / "eval.json").read_text())
    assert saved["tasks"]["tiny_qa"]["acc"] == pytest.approx(acc)
    assert saved["lm_eval_version"]
    table = (out / "eval.md").read_text()
    assert f"| tiny_qa | {100 * acc:.2f} |" in table
    assert yaml.safe_load((out / "config.yaml").read_text())["tasks"] == [str(task_yaml)]


def test_harness_folder_spec_and_limit(tiny_folder, tmp_path):
    pytest.importorskip("lm_eval")
    from inheritune.models.loading import load_model, load_tokenizer

    folder = tiny_folder("gpt2", layers=2, hidden=32, seed=5)
    _write_task(tmp_path / "tasks", name="tiny_qa_folder")
    summary = evaluate(
        EvalConfig(
            model=str(folder), tasks=(str(tmp_path / "tasks"),), out=str(tmp_path / "o"), limit=5
        )
    )
    row = summary["tasks"]["tiny_qa_folder"]
    assert row["n"] == 5
    acc, _ = _independent_accuracy(load_model(str(folder)), load_tokenizer(str(folder)), limit=5)
    assert row["acc"] == pytest.approx(acc)


def test_unknown_task_name_is_a_clear_error(tiny_folder, tmp_path):
    pytest.importorskip("lm_eval")
    folder = tiny_folder("llama", layers=1, hidden=16)
    cfg = EvalConfig(model=str(folder), tasks=("arc_eazy",), out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match=r"unknown task.*arc_easy.*lm-eval ls tasks"):
        evaluate(cfg)


def test_missing_harness_says_how_to_install(monkeypatch, tiny_folder, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    folder = tiny_folder("llama", layers=1, hidden=16)
    with pytest.raises(ConfigError, match=r"pip install 'inheritune\[eval\]'"):
        evaluate(EvalConfig(model=str(folder), tasks=("x.yaml",), out=str(tmp_path / "o")))


def test_summarize_skips_groups_and_averages():
    raw = {
        "results": {
            "grp": {"acc,none": 0.9},
            "a": {"alias": "a", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6},
            "b": {"alias": "b", "acc,none": 0.25, "perplexity,none": 12.0},
        },
        "groups": {"grp": {}},
        "n-samples": {"a": {"effective": 10}, "b": {"effective": 4}},
    }
    s = summarize(raw, order=["b", "a"])
    assert list(s["tasks"]) == ["b", "a"]
    assert s["average"]["acc"] == pytest.approx(0.375)
    assert s["average"]["acc_norm"] == pytest.approx(0.6)
    assert s["average"]["acc_norm_tasks"] == 1
    assert "acc_norm average is over the 1 tasks" in markdown_table(s, "m")


@pytest.mark.slow
def test_real_model_harness_and_context_helps(tmp_path):
    """SmolLM2 through the harness (its own tokenizer) and strided perplexity on Shakespeare.

    A real LM predicts better with more context, so stride < seq_len (every token sees >= 32
    tokens) must give a lower loss than chunking (tokens see 0..63) on the same tokens.
    """
    pytest.importorskip("lm_eval")
    from inheritune.evaluate import run_harness
    from inheritune.models import assets
    from inheritune.models.loading import load_model, load_tokenizer

    model, tok = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    raw = run_harness(model, tok, (str(_write_task(tmp_path / "t")),), limit=2, batch_size=4)
    row = summarize(raw)["tasks"]["tiny_qa"]
    assert row["n"] == 2
    acc, acc_norm = _independent_accuracy(model, tok, limit=2)
    assert (row["acc"], row["acc_norm"]) == pytest.approx((acc, acc_norm))

    play = assets.ensure_default_corpus() / "hamlet_gut.txt"
    strided = file_perplexity(model, tok, play, seq_len=64, stride=32, max_tokens=384)
    chunked = file_perplexity(model, tok, play, seq_len=64, stride=64, max_tokens=384)
    assert strided["tokens_scored"] == 383
    assert chunked["tokens_scored"] == 384 - 6
    assert strided["nats_per_token"] < chunked["nats_per_token"]
