"""Foundation: model and data arguments, the embedded assets' helpers, the CLI's --help."""

from __future__ import annotations

import json

import pytest

from inheritune import cli, data
from inheritune.data import sources as readers
from inheritune.models import assets
from inheritune.models import loading as models


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
    for load in (models.load_config, models.load_model):  # the cheap step already refuses
        with pytest.raises(models.ModelLoadError, match=r"model\.safetensors is truncated"):
            load(str(folder))


def _edit_weights(folder, edit) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def test_weights_that_do_not_fit_the_config_are_refused(tiny_folder):
    """transformers would initialise a missing tensor at random and only log it."""
    folder = tiny_folder("llama", layers=2)
    _edit_weights(folder, lambda sd: sd.pop("model.layers.1.self_attn.q_proj.weight"))
    for load in (models.load_config, models.load_model):
        with pytest.raises(models.ModelLoadError, match=r"1 tensor\(s\) missing \(model\.layers"):
            load(str(folder))


def test_own_comparison_needs_no_loading_report(tiny_folder):
    """The header comparison refuses by itself, without transformers' loading info."""
    import torch

    folder = tiny_folder("llama", layers=2)
    model = models.load_model(str(folder))
    files = models.weight_shapes(folder)
    models.check_weights_fit(model, folder, files, info={})  # fits
    del files["model.norm.weight"]
    with pytest.raises(models.ModelLoadError, match=r"missing \(model\.norm\.weight\)"):
        models.check_weights_fit(model, folder, files, info={})
    files["model.norm.weight"] = (33,)
    with pytest.raises(models.ModelLoadError, match=r"file \(33,\) vs config \(32,\)"):
        models.check_weights_fit(model, folder, files, info={})
    files["model.norm.weight"], files["stray.weight"] = (32,), (2,)
    with pytest.raises(models.ModelLoadError, match=r"no place for \(stray\.weight\)"):
        models.check_weights_fit(model, folder, files, info={})
    assert isinstance(model.lm_head.weight, torch.nn.Parameter)


def test_untied_head_must_be_present_tied_may_be_absent(tmp_path, tokenizer):
    from conftest import save_tiny

    tied = save_tiny("llama", tmp_path / "tied", tokenizer, layers=2)
    assert "lm_head.weight" not in models.weight_shapes(tied)  # tied: saved once
    models.load_config(str(tied))
    untied = save_tiny("gpt_neox", tmp_path / "untied", tokenizer, layers=2)
    models.load_config(str(untied))  # the file says embed_out, the model lm_head: renamed
    _edit_weights(untied, lambda sd: sd.pop("embed_out.weight"))
    for load in (models.load_config, models.load_model):
        with pytest.raises(models.ModelLoadError, match=r"missing \(lm_head\.weight\)"):
            load(str(untied))


def test_checkpoint_with_older_names_still_loads(tmp_path, tokenizer):
    """GPT-2 checkpoints on the hub name tensors without the "transformer." prefix and carry
    the causal-mask buffers; transformers maps them, and so must the checks."""
    import torch

    from conftest import save_tiny

    folder = save_tiny("gpt2", tmp_path / "gpt2", tokenizer, layers=2)
    before = models.load_model(str(folder)).transformer.h[1].mlp.c_fc.weight.clone()

    def hub_style(sd):
        for k in list(sd):
            sd[k.removeprefix("transformer.")] = sd.pop(k)
        for i in range(2):
            sd[f"h.{i}.attn.bias"] = torch.ones(1, 1, 256, 256)

    _edit_weights(folder, hub_style)
    models.load_config(str(folder))
    model = models.load_model(str(folder))
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, before)


def test_sharded_folder_and_its_index(tiny_folder):
    folder = tiny_folder("llama", layers=2)
    model = models.load_model(str(folder))
    sharded = folder.parent / "sharded"
    model.save_pretrained(sharded, max_shard_size="30KB")
    index = json.loads((sharded / models.WEIGHTS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert models.weight_shapes(sharded) == models.weight_shapes(folder)
    models.load_model(str(sharded))
    first = sorted(set(index["weight_map"].values()))[0]
    (sharded / first).unlink()
    with pytest.raises(models.ModelLoadError, match=f"names the shard {first}, which is not"):
        models.load_config(str(sharded))


def test_config_json_must_be_a_json_object(tiny_folder):
    folder = tiny_folder("llama", layers=2)
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(models.ModelLoadError, match=r"config\.json is not valid JSON"):
        models.load_config(str(folder))
    (folder / "config.json").write_text('"llama"')
    with pytest.raises(models.ModelLoadError, match="must hold a JSON object, got str"):
        models.load_model(str(folder))


def test_check_context_names_the_flag_and_the_context():
    from conftest import tiny_config
    from inheritune.config import ConfigError

    for arch in ("llama", "gpt2"):  # max_position_embeddings / n_positions
        cfg = tiny_config(arch)
        assert models.model_context(cfg) == 256
        models.check_context(cfg, 256)
        with pytest.raises(ConfigError, match=r"^--ppl-seq-len 257 is longer than the model's "):
            models.check_context(cfg, 257, "ppl_seq_len")
    assert models.model_context(object()) is None
    models.check_context(object(), 10**9)  # a model that states no context is not refused


def test_data_kinds(tmp_path, tokenizer, corpus_file):
    folder = tmp_path / "txts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("hello world\n")
    (folder / "sub" / "b.txt").write_text("more text\n")
    assert len(data.resolve_data(str(folder)).files) == 2
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "one doc"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert list(readers.iter_documents(data.resolve_data(str(jl)))) == ["one doc", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(data.DataError, match="'text'"):
        list(readers.iter_documents(data.resolve_data(str(bad))))
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
        assert list(readers.iter_documents(source)) == rows["text"]
    toks = data.load_tokens(str(pq), tokenizer)
    expected = [
        *tokenizer(rows["text"][0], add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
        *tokenizer(rows["text"][1], add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
    ]
    assert [int(x) for x in toks.ids] == expected


def test_gguf_argument_resolves_to_its_folder(tmp_path):
    import struct

    f = tmp_path / "model.Q4_1.gguf"
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    src = models.resolve_model(str(f))
    assert src.gguf_file == "model.Q4_1.gguf" and src.location == str(tmp_path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"PK\x03\x04 a zip, not a gguf", "not a GGUF file"),
        (b"GGUF", "not a GGUF file"),  # shorter than magic + version
        (b"GGUF\x07\x00\x00\x00", "version 7"),
        (b"GGUF\x03\x00\x00\x00" + b"\x01" * 10, "truncated or corrupt"),
    ],
)
def test_bad_gguf_is_one_clear_error(tmp_path, content, match):
    f = tmp_path / "m.gguf"
    f.write_bytes(content)
    for load in (models.load_config, models.load_tokenizer, models.load_model):
        with pytest.raises(models.ModelLoadError, match=match) as e:
            load(str(f))
        assert str(f) in str(e.value) and "\n" not in str(e.value)


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
