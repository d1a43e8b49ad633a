"""Foundation: model and data arguments, the embedded assets' helpers, the CLI's --help."""

from __future__ import annotations

import json

import pytest

from inheritune import assets, cli, data, models


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert command in capsys.readouterr().out


def test_strip_gutenberg():
    text = "junk header\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nbody line\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicense"
    assert assets.strip_gutenberg(text) == "body line\n"
    assert assets.strip_gutenberg("plain text") == "plain text\n"


def test_not_a_model_folder(tmp_path):
    with pytest.raises(models.ModelLoadError, match=r"no config\.json"):
        models.resolve_model(str(tmp_path))


def test_pickle_only_folder_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(models.ModelLoadError, match="never loads pickled"):
        models.resolve_model(str(tmp_path))


def test_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(models.ModelLoadError, match="no such model"):
        models.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(data.DataError, match="Known names"):
        data.resolve_data("no-such-corpus")


def test_hub_id_offline_error_says_what_to_do():
    with pytest.raises(models.ModelLoadError, match="local folder"):
        models.load_model("some-org/some-model-that-is-not-here")


def test_local_folder_roundtrip(tiny_folder):
    folder = tiny_folder("llama")
    m = models.load_model(str(folder))
    assert type(m).__name__ == "LlamaForCausalLM"
    tok = models.load_tokenizer(str(folder))
    assert tok.eos_token_id == 2


def test_corrupt_safetensors_refused(tiny_folder):
    folder = tiny_folder("llama")
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(models.ModelLoadError, match="corrupt"):
        models.load_model(str(folder))


def test_data_kinds(tmp_path, tokenizer, corpus_file):
    folder = tmp_path / "txts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("hello world\n")
    (folder / "sub" / "b.txt").write_text("more text\n")
    assert len(data.resolve_data(str(folder)).files) == 2
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "one doc"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert list(data.iter_documents(data.resolve_data(str(jl)))) == ["one doc", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(data.DataError, match="'text'"):
        list(data.iter_documents(data.resolve_data(str(bad))))
    toks = data.load_tokens(str(corpus_file), tokenizer)
    assert toks.meta["dtype"] == "uint16"
    assert len(toks.train) + len(toks.val) == len(toks.ids)
    # the split is deterministic and validation is disjoint from training (its tail)
    assert toks.split == data.load_tokens(str(corpus_file), tokenizer).split


def test_empty_corpus(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(data.DataError, match="empty"):
        data.load_tokens(str(empty), tokenizer)


def test_tokenizer_mismatch_refused(tmp_path, tokenizer, corpus_file):
    from conftest import make_tokenizer

    toks = data.load_tokens(str(corpus_file), tokenizer)
    other = make_tokenizer(text="a completely different corpus of words\n" * 20)
    with pytest.raises(data.TokenizerMismatchError):
        data.load_tokens(str(toks.path), other)


def test_windows_errors(tokenizer, corpus_file):
    toks = data.load_tokens(str(corpus_file), tokenizer)
    with pytest.raises(data.DataError, match="seq-len"):
        data.sample_windows(toks.val, 2, len(toks.val) + 1, seed=0)
    w = data.sample_windows(toks.val, 3, 8, seed=0)
    assert w.shape == (3, 8)
    assert (w == data.sample_windows(toks.val, 3, 8, seed=0)).all()


def test_hf_datasets_local_files(tmp_path, tokenizer):
    """Local parquet and json files go through Hugging Face `datasets` (the OpenWebText path)."""
    pytest.importorskip("datasets")
    import datasets

    rows = {"text": ["To be, or not to be.", "That is the question."]}
    pq = tmp_path / "shard.parquet"
    datasets.Dataset.from_dict(rows).to_parquet(str(pq))
    js = tmp_path / "shard.json"
    js.write_text("\n".join(json.dumps({"text": t}) for t in rows["text"]) + "\n")
    for path in (pq, js):
        source = data.resolve_data(str(path))
        assert source.kind == "hf"
        assert list(data.iter_documents(source)) == rows["text"]
    toks = data.load_tokens(str(pq), tokenizer)
    expected = [
        *tokenizer(rows["text"][0], add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
        *tokenizer(rows["text"][1], add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
    ]
    assert [int(x) for x in toks.ids] == expected


def test_gguf_argument_resolves_to_its_folder(tmp_path):
    f = tmp_path / "model.Q4_1.gguf"
    f.write_bytes(b"GGUF")
    src = models.resolve_model(str(f))
    assert src.gguf_file == "model.Q4_1.gguf" and src.location == str(tmp_path)


@pytest.mark.slow
def test_real_gguf_config_and_cached_default():
    """The embedded GGUF is found, checksummed and read; the converted default is a plain HF folder."""
    gguf = assets.smollm2_gguf()
    cfg = models.load_config(str(gguf))
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30
    assert cfg.num_key_value_heads == 3 and cfg.vocab_size == 49152
    folder = assets.ensure_default_model()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert models.load_config(str(folder)).num_hidden_layers == 30
