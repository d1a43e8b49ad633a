"""inheritune prepare: parallel, resumable tokenisation into token folders, and the refusal of
text input that is not text (invalid UTF-8, missing .jsonl fields and parquet columns)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS_TEXT
from inheritune import cli, data
from inheritune.config import ConfigError
from inheritune.data import sources as readers
from inheritune.data.prepare import PrepareConfig, prepare_tokens

LINES = CORPUS_TEXT.splitlines(keepends=True)[:5]
TINY_SHARD_MB = 0.0004  # ~400 bytes: every test corpus spans many shards


def _docs(n: int = 9) -> list[str]:
    """Documents of different lengths, with non-ASCII text and an empty one."""
    docs = ["".join(LINES[(i + j) % 5] for j in range(2 + 3 * i)) for i in range(n)]
    docs[3] = "Schöne Grüße — naïve café ☕\n" + docs[3]
    docs[5] = ""
    return docs


def _reference(tokenizer, docs: list[str]) -> np.ndarray:
    """What a plain loop makes: each document through tokenizer(...), then EOS."""
    ids: list[int] = []
    for d in docs:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.asarray(ids)


def _txt_folder(root: Path, docs: list[str]) -> Path:
    root.mkdir(parents=True)
    for i, d in enumerate(docs):
        (root / f"doc{i:02d}.txt").write_text(d, encoding="utf-8")
    return root


def _ids(folder: Path) -> np.ndarray:
    return np.asarray(data.open_tokens(folder).ids)


def test_identical_for_any_num_proc(tmp_path, tokenizer):
    docs = _docs()
    corpus = _txt_folder(tmp_path / "corpus", [d for d in docs if d])  # empty files: no document
    source = data.resolve_data(str(corpus))
    runs = {}
    for n in (1, 2, 3):
        r = prepare_tokens(
            source, tokenizer, tmp_path / f"n{n}", num_proc=n, shard_mb=TINY_SHARD_MB
        )
        assert r.num_proc == n and r.num_docs == len(docs) - 1
        runs[n] = (tmp_path / f"n{n}" / "tokens.bin").read_bytes()
    assert runs[1] == runs[2] == runs[3]
    expected = _reference(tokenizer, [d for d in docs if d])
    np.testing.assert_array_equal(_ids(tmp_path / "n2"), expected)
    # the work files are gone: only the token folder remains
    assert sorted(p.name for p in (tmp_path / "n3").iterdir()) == ["meta.json", "tokens.bin"]


def test_jsonl_folder_and_empty_document(tmp_path, tokenizer):
    docs = _docs()
    folder = tmp_path / "jl"
    folder.mkdir()
    for k, part in enumerate((docs[:4], docs[4:])):
        (folder / f"part{k}.jsonl").write_text(
            "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(part))
        )
    source = data.resolve_data(str(folder))
    assert source.kind == "jsonl" and len(source.files) == 2
    prepare_tokens(source, tokenizer, tmp_path / "out", num_proc=2, shard_mb=TINY_SHARD_MB)
    np.testing.assert_array_equal(_ids(tmp_path / "out"), _reference(tokenizer, docs))


def test_long_txt_is_streamed_in_pieces(tmp_path, monkeypatch, tokenizer):
    """A .txt longer than a piece is cut at line ends (or character boundaries), never inside a
    UTF-8 sequence; only its last piece ends the document; nothing is lost or doubled."""
    monkeypatch.setattr(readers, "PIECE_BYTES", 64)
    text = "".join(LINES) * 3 + "ééé" * 40 + "\r\nlast line without newline"
    p = tmp_path / "long.txt"
    p.write_bytes(text.encode("utf-8"))
    pieces = list(readers.iter_pieces(data.resolve_data(str(p))))
    assert len(pieces) > 5
    assert "".join(x.text for x in pieces) == text.replace("\r\n", "\n")
    assert [x.end for x in pieces] == [False] * (len(pieces) - 1) + [True]
    assert sum(x.nbytes for x in pieces) == p.stat().st_size
    # a single EOS, after the whole document
    prepare_tokens(data.resolve_data(str(p)), tokenizer, tmp_path / "t", num_proc=1)
    ids = _ids(tmp_path / "t")
    assert (ids == tokenizer.eos_token_id).sum() == 1 and ids[-1] == tokenizer.eos_token_id


def test_invalid_utf8_txt_refused_unless_lossy(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(readers, "PIECE_BYTES", 64)
    good = ("".join(LINES)).encode()
    p = tmp_path / "bad.txt"
    p.write_bytes(good + b"caf\xe9 au lait\n" + good)
    with pytest.raises(data.DataError) as e:
        list(readers.iter_pieces(data.resolve_data(str(p))))
    msg = str(e.value)
    assert str(p) in msg and f"byte {len(good) + 3}" in msg and "--lossy-text" in msg
    pieces = list(readers.iter_pieces(data.resolve_data(str(p), lossy_text=True)))
    assert "caf\ufffd au lait" in "".join(x.text for x in pieces)


@pytest.mark.parametrize(
    "content",
    [
        "the quick brown fox".encode("utf-16"),  # starts with a BOM: invalid UTF-8
        "the quick brown fox jumps".encode("utf-16-le"),  # valid UTF-8, but half NULs
        ("text " * 20 + "\ufffd" * 5).encode(),  # already lossily decoded
    ],
    ids=["utf16-bom", "utf16-nul", "replacement-chars"],
)
def test_not_text_refused(tmp_path, tokenizer, content):
    p = tmp_path / "x.txt"
    p.write_bytes(content)
    with pytest.raises(data.DataError, match=str(p)):
        data.load_tokens(str(p), tokenizer)
    tokens = data.load_tokens(str(p), tokenizer, lossy_text=True)
    assert len(tokens.ids) > 1


def test_jsonl_lines_without_text_refused(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"body": "x", "id": 3}) + "\n")
    with pytest.raises(data.DataError) as e:
        list(readers.iter_pieces(data.resolve_data(str(p))))
    assert (
        f"{p}:3" in str(e.value) and "'text'" in str(e.value) and "['body', 'id']" in str(e.value)
    )
    p.write_text(json.dumps({"body": "x", "id": 3}) + "\n")
    assert [x.text for x in readers.iter_pieces(data.resolve_data(str(p), text_field="body"))] == [
        "x"
    ]
    p.write_text(json.dumps({"text": None}) + "\n")
    with pytest.raises(data.DataError, match=r":1: field 'text' holds NoneType, not text"):
        list(readers.iter_pieces(data.resolve_data(str(p))))
    p.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match=r"d\.jsonl:1: not valid UTF-8 at byte 13"):
        list(readers.iter_pieces(data.resolve_data(str(p))))
    assert [x.text for x in readers.iter_pieces(data.resolve_data(str(p), lossy_text=True))] == [
        "caf\ufffd"
    ]


def _parquet(path: Path, column: str, texts: list[str]) -> Path:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({column: texts, "n": list(range(len(texts)))}).to_parquet(str(path))
    return path


def test_parquet_without_column_refused(tmp_path):
    pytest.importorskip("datasets")
    pq = _parquet(tmp_path / "p.parquet", "body", ["a", "b"])
    with pytest.raises(data.DataError) as e:
        list(readers.iter_pieces(data.resolve_data(str(pq))))
    assert str(pq) in str(e.value) and "no 'text' column" in str(e.value)
    assert "['body', 'n']" in str(e.value)
    assert [x.text for x in readers.iter_pieces(data.resolve_data(str(pq), text_field="body"))] == [
        "a",
        "b",
    ]


def test_hub_path_on_a_local_repository(tmp_path, tokenizer):
    """hf:NAME goes through datasets.load_dataset(NAME, streaming=True), as for a hub repository;
    here NAME is a local folder with the hub's parquet layout (offline)."""
    pytest.importorskip("datasets")
    docs = [d for d in _docs() if d]
    repo = tmp_path / "repo"
    _parquet(repo / "data" / "train-00000-of-00002.parquet", "text", docs[:5])
    _parquet(repo / "data" / "train-00001-of-00002.parquet", "text", docs[5:])
    source = data.resolve_data(f"hf:{repo}")
    assert source.kind == "hf" and not source.files
    assert [x.text for x in readers.iter_pieces(source)] == docs
    prepare_tokens(source, tokenizer, tmp_path / "t", num_proc=2, shard_mb=TINY_SHARD_MB)
    np.testing.assert_array_equal(_ids(tmp_path / "t"), _reference(tokenizer, docs))
    # the same function refuses a repository without the column, naming what it has
    other = tmp_path / "other"
    _parquet(other / "data" / "train-00000-of-00001.parquet", "content", docs[:2])
    with pytest.raises(data.DataError, match=r"hub dataset .*no 'text' column.*'content'"):
        list(readers.iter_pieces(data.resolve_data(f"hf:{other}")))


def test_hub_spec_parsing():
    assert data.parse_hub("HuggingFaceFW/fineweb-edu:sample-10BT") == (
        "HuggingFaceFW/fineweb-edu",
        "sample-10BT",
        None,
    )
    assert data.parse_hub("Skylion007/openwebtext@refs/convert/parquet") == (
        "Skylion007/openwebtext",
        None,
        "refs/convert/parquet",
    )
    with pytest.raises(data.DataError, match="no dataset name"):
        data.resolve_data("hf::cfg")


def test_resume_after_interruption(tmp_path, tokenizer):
    """A prepare stopped part-way (here by a file that is not UTF-8) keeps its finished shards;
    the rerun (accepting the file) continues and gives the uninterrupted result, ignoring a
    half-written shard and a half-done append."""
    docs = [d for d in _docs() if d]
    corpus = _txt_folder(tmp_path / "corpus", docs)
    (corpus / "doc06.txt").write_bytes(docs[6].encode() + b"\xff trailing\n")
    strict = data.resolve_data(str(corpus))
    lossy = data.resolve_data(str(corpus), lossy_text=True)
    fresh = tmp_path / "fresh"
    prepare_tokens(lossy, tokenizer, fresh, num_proc=1, shard_mb=TINY_SHARD_MB)

    # one process appends every shard before the bad file as soon as it is tokenised
    one = tmp_path / "one"
    with pytest.raises(data.DataError, match=r"doc06\.txt"):
        prepare_tokens(strict, tokenizer, one, num_proc=1, shard_mb=TINY_SHARD_MB)
    before_bad = json.loads((one / "progress.json").read_text())["shards"]
    assert before_bad >= 3 and not (one / "meta.json").exists()
    with pytest.raises(data.DataError, match="unfinished"):
        data.load_tokens(str(one), tokenizer)
    # what a kill could leave: bytes appended after the last recorded shard, a half-written shard
    with open(one / "tokens.bin", "ab") as f:
        f.write(b"\x07" * 10)
    (one / "shards" / "shard-00099.bin.tmp").write_bytes(b"half a shard")
    r = prepare_tokens(lossy, tokenizer, one, num_proc=2, shard_mb=TINY_SHARD_MB)
    assert (r.resumed_shards, r.reused_shards) == (before_bad, 0)

    # two processes: the shards the workers had finished are kept, appended or as shard files
    # (how many depends on timing), and a rerun appends those files without tokenising again
    two = tmp_path / "two"
    with pytest.raises(data.DataError, match=r"doc06\.txt"):
        prepare_tokens(strict, tokenizer, two, num_proc=2, shard_mb=TINY_SHARD_MB)
    appended = json.loads((two / "progress.json").read_text())["shards"]
    written = len(list((two / "shards").glob("shard-*.bin")))
    assert appended + written <= before_bad
    r = prepare_tokens(lossy, tokenizer, two, num_proc=1, shard_mb=TINY_SHARD_MB)
    assert (r.resumed_shards, r.reused_shards) == (appended, written)

    for folder in (one, two):
        assert (folder / "tokens.bin").read_bytes() == (fresh / "tokens.bin").read_bytes()
        meta, fresh_meta = (json.loads((d / "meta.json").read_text()) for d in (folder, fresh))
        assert meta == fresh_meta
    # a different plan in the same folder is refused, naming the difference
    with pytest.raises(data.DataError, match="max_tokens"):
        prepare_tokens(lossy, tokenizer, one, max_tokens=5)


def test_max_tokens_is_exact_and_a_prefix(tmp_path, tokenizer):
    corpus = _txt_folder(tmp_path / "corpus", [d for d in _docs() if d])
    source = data.resolve_data(str(corpus))
    prepare_tokens(source, tokenizer, tmp_path / "all", num_proc=1)
    full = _ids(tmp_path / "all")
    for n in (1, 2):
        r = prepare_tokens(
            source,
            tokenizer,
            tmp_path / f"k{n}",
            num_proc=n,
            max_tokens=777,
            shard_mb=TINY_SHARD_MB,
        )
        assert r.num_tokens == 777
        np.testing.assert_array_equal(_ids(tmp_path / f"k{n}"), full[:777])


def test_document_level_validation_split(tmp_path, tokenizer):
    docs = [d for d in _docs() if d]
    corpus = _txt_folder(tmp_path / "corpus", docs)
    source = data.resolve_data(str(corpus))
    for n in (1, 2):
        prepare_tokens(
            source,
            tokenizer,
            tmp_path / f"v{n}",
            num_proc=n,
            val_docs_every=3,
            shard_mb=TINY_SHARD_MB,
        )
    assert (tmp_path / "v1/tokens.bin").read_bytes() == (tmp_path / "v2/tokens.bin").read_bytes()
    tokens = data.open_tokens(tmp_path / "v2")
    val_docs = [d for i, d in enumerate(docs) if i % 3 == 2]
    train_docs = [d for i, d in enumerate(docs) if i % 3 != 2]
    np.testing.assert_array_equal(tokens.train, _reference(tokenizer, train_docs))
    np.testing.assert_array_equal(tokens.val, _reference(tokenizer, val_docs))
    assert tokens.meta["val_docs_every"] == 3 and tokens.meta["val_docs"] == len(val_docs)
    assert tokens.split == tokens.meta["split"] == len(tokens.train)
    # the default stays the token-level split of the last 5%
    plain = prepare_tokens(source, tokenizer, tmp_path / "plain", num_proc=1)
    t = data.open_tokens(plain.folder)
    assert "split" not in t.meta and len(t.val) == int(len(t.ids) * data.VAL_FRACTION)
    with pytest.raises(data.DataError, match="too few"):
        prepare_tokens(
            data.resolve_data(str(corpus / "doc00.txt")),
            tokenizer,
            tmp_path / "one",
            val_docs_every=2,
        )


def test_load_tokens_prepares_cold_cache_and_prepare_fills_it(
    tmp_path, tiny_folder, tokenizer, capsys
):
    """`inheritune prepare` without --out fills the cache entry that --data D of every command
    reads; load_tokens finds it and does not tokenise again."""
    docs = [d for d in _docs() if d]
    corpus = _txt_folder(tmp_path / "corpus", docs)
    folder = tiny_folder("llama")
    argv = ["prepare", "--model", str(folder), "--data", str(corpus), "--num-proc", "2"]
    assert cli.main([*argv, "--shard-mb", str(TINY_SHARD_MB), "--no-progress"]) == 0
    cache = data.token_cache_folder(data.resolve_data(str(corpus)), tokenizer)
    assert f"--data {cache}" in capsys.readouterr().out
    stamp = (cache / "tokens.bin").stat().st_mtime_ns
    tokens = data.load_tokens(str(corpus), tokenizer)
    assert tokens.path == cache and (cache / "tokens.bin").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(np.asarray(tokens.ids), _reference(tokenizer, docs))
    assert cli.main(argv) == 0
    assert "already prepared" in capsys.readouterr().err


def test_cli_errors(tmp_path, tiny_folder, capsys):
    folder = tiny_folder("llama")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    base = ["prepare", "--model", str(folder), "--out", str(tmp_path / "o")]
    assert cli.main([*base, "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "inheritune prepare: error:" in err and "bad.txt" in err and "UTF-8" in err
    for flags, name in [
        (["--num-proc", "-1"], "--num-proc"),
        (["--val-docs-every", "1"], "--val-docs-every"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--shard-mb", "0"], "--shard-mb"),
    ]:
        assert cli.main([*base, "--data", str(bad), *flags]) == 2
        assert name in capsys.readouterr().err
    other = tmp_path / "not-tokens"
    other.mkdir()
    (other / "notes.md").write_text("mine")
    good = tmp_path / "good.txt"
    good.write_text(CORPUS_TEXT)
    assert cli.main([*base[:-1], str(other), "--data", str(good)]) == 2
    assert "not empty and not a token folder" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--text-field"):
        PrepareConfig(text_field=" ")


@pytest.mark.slow
def test_killed_prepare_resumes_identically(tmp_path):
    """SIGKILL a real `inheritune prepare` (SmolLM2 tokenizer, Shakespeare) after a few shards;
    the rerun continues and matches an uninterrupted run byte for byte."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "inheritune", "prepare", "--num-proc", "2", "--shard-mb", "0.1"]
    proc = subprocess.Popen([*argv, "--out", str(out)], env=env, stderr=subprocess.DEVNULL)
    shards = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            shards = json.loads((out / "progress.json").read_text())["shards"]
        except (OSError, ValueError):
            shards = 0
        if shards >= 5:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert shards >= 5 and not (out / "meta.json").exists(), "the prepare ended before the kill"
    subprocess.run([*argv, "--out", str(out)], env=env, check=True, capture_output=True)
    subprocess.run(
        [*argv, "--out", str(tmp_path / "whole")], env=env, check=True, capture_output=True
    )
    assert (out / "tokens.bin").read_bytes() == (tmp_path / "whole" / "tokens.bin").read_bytes()
    assert (
        data.open_tokens(out).meta["num_tokens"]
        == data.open_tokens(tmp_path / "whole").meta["num_tokens"]
    )
