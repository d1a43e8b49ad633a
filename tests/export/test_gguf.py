"""``inheritune export --gguf``: round trips through transformers' own GGUF loader on tiny models
of every written layout, the metadata against the config, and bad input."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tokenizer, tiny_config
from inheritune import cli
from inheritune.config import ConfigError
from inheritune.export import gguf as export

# Max |logit difference| allowed per out-type, on logits of magnitude ~1.
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2, "q8_0": 2e-2}
LAYOUTS = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]


def tiny_folder_for(arch: str, path, tokenizer):
    """A tiny model of ``arch`` as a folder; sized where transformers' GGUF loader assumes
    defaults (Qwen3's head_dim 128, GPT-2's 1024 positions)."""
    cfg = tiny_config(arch, layers=2)
    if arch == "qwen3":
        cfg.head_dim = 128
    if arch == "gpt2":
        cfg.n_positions = cfg.n_ctx = 1024
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norms and biases not at their init values
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    # transformers' GGUF reader takes a name with "mistral" in it for its own arch: keep it out
    folder = path / f"tiny-{arch[:2]}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model.eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.mark.parametrize("outtype", export.OUTTYPES)
@pytest.mark.parametrize("arch", LAYOUTS)
def test_round_trip_through_transformers(arch, outtype, tok, tmp_path):
    folder, model = tiny_folder_for(arch, tmp_path, tok)
    out = export.write_gguf(folder, tmp_path / f"m-{outtype}.gguf", outtype)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    assert back.config.num_hidden_layers == 2
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(ids).logits, back(ids).logits
    diff = float((want - got).abs().max())
    assert diff <= TOLERANCE[outtype], diff
    if outtype == "f32":  # the file is not a copy of nothing: a changed weight shows
        assert float(want.abs().max()) > 100 * TOLERANCE["f32"]


@pytest.mark.parametrize("arch", LAYOUTS)
def test_metadata_and_tokenizer_travel(arch, tok, tmp_path):
    folder, model = tiny_folder_for(arch, tmp_path, tok)
    cfg = model.config
    out = export.write_gguf(folder, tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(out)

    def field(key):
        f = reader.fields[key]
        return f.contents()

    a = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}
    name = a[arch]
    assert field("general.architecture") == name
    assert field(f"{name}.block_count") == cfg.num_hidden_layers
    assert field(f"{name}.embedding_length") == cfg.hidden_size
    assert field(f"{name}.attention.head_count") == cfg.num_attention_heads
    assert field(f"{name}.vocab_size") == cfg.vocab_size
    if arch == "gpt2":
        assert field("gpt2.attention.layer_norm_epsilon") == pytest.approx(cfg.layer_norm_epsilon)
    else:
        assert field(f"{name}.attention.head_count_kv") == cfg.num_key_value_heads
        assert field(f"{name}.rope.freq_base") == pytest.approx(export.rope_theta(cfg))
        eps = field(f"{name}.attention.layer_norm_rms_epsilon")
        assert eps == pytest.approx(cfg.rms_norm_eps)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and tokens[1] == "<bos>"
    assert field("tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert len(field("tokenizer.ggml.merges")) > 0
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    text = "The quick brown fox, 123 times!"
    assert back(text)["input_ids"] == tok(text)["input_ids"]


def test_chat_template_travels(tok, tmp_path):
    folder, _ = tiny_folder_for("llama", tmp_path, tok)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    out = export.write_gguf(folder, tmp_path / "c.gguf", "f32")
    tpl = gguf.GGUFReader(out).fields["tokenizer.chat_template"].contents()
    assert tpl == tc["chat_template"]


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert export.pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}  # fmt: skip
    assert export.pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"
    split = {"type": "Split", "pattern": {"Regex": export._SPLIT_QWEN2}}
    qwen = {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    assert export.pre_tokenizer_name({"pre_tokenizer": qwen}) == "qwen2"
    split3 = {"type": "Split", "pattern": {"Regex": export._SPLIT_LLAMA3}}
    llama3 = {"type": "Sequence", "pretokenizers": [split3, byte_level]}
    assert export.pre_tokenizer_name({"pre_tokenizer": llama3}) == "llama-bpe"
    with pytest.raises(export.ExportError, match="Whitespace"):
        export.pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})


def test_rope_reorder_is_the_rotation_llama_cpp_applies():
    """HF rotates (x_i, x_{i+d/2}) pairs; llama.cpp rotates (x_{2i}, x_{2i+1}): the reordered
    rows of a head put element i and i + d/2 side by side."""
    d, heads = 8, 2
    w = np.arange(heads * d, dtype=np.float32)[:, None].repeat(3, 1)
    out = export._interleave_rope(w, heads)[:, 0].reshape(heads, d)
    assert out[0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert out[1].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]


# --------------------------------------------------------------------------- bad input


def _refused(argv, capsys, expected):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own refusals (a bad choice) exit the same way
        rc = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and err and expected in err[-1], err
    assert err[-1].startswith("inheritune export: error: ")


def test_bad_input_is_one_line_and_leaves_no_file(tok, tmp_path, capsys, monkeypatch):
    folder, _ = tiny_folder_for("llama", tmp_path, tok)
    out = tmp_path / "o.gguf"
    base = ["export", "--model", str(folder), "--gguf", str(out)]
    _refused(["export", "--model", str(tmp_path / "nope"), "--gguf", str(out)], capsys, "nope")
    _refused(["export", "--model", str(folder)], capsys, "--gguf OUT.gguf")
    _refused([*base, "--outtype", "q4"], capsys, "--outtype")
    phi = tmp_path / "phi"
    AutoModelForCausalLM.from_config(tiny_config("phi3", layers=1)).save_pretrained(phi)
    tok.save_pretrained(phi)
    _refused(["export", "--model", str(phi), "--gguf", str(out)], capsys, "Phi3ForCausalLM")
    assert not out.exists()
    assert cli.main(base) == 0 and out.is_file()
    before = out.read_bytes()
    _refused(base, capsys, "exists; pass --force")

    def fail(self, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    _refused([*base, "--force"], capsys, "No space left on device")
    assert out.read_bytes() == before  # the old file stands, no partial one beside it
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.gguf")] == []


def test_run_export_gguf_writes_the_final_model(tiny_run, tmp_path):
    """run --export-gguf: the final model as a GGUF file, named in the report; its logits are
    the final model's."""
    from inheritune.recipe import run as recipe

    out = tmp_path / "gg" / "final.gguf"
    cfg = tiny_run(export_gguf=str(out), export_outtype="f32", extra_eval=None, min_rounds=1,
                   max_rounds=1)  # fmt: skip
    res = recipe.run(cfg)
    assert res.report["final"]["gguf"] == str(out) and str(out) in res.report_md.read_text()
    final = AutoModelForCausalLM.from_pretrained(res.final_model).eval()
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert float((final(ids).logits - back(ids).logits).abs().max()) <= TOLERANCE["f32"]
    with pytest.raises(ConfigError, match="--export-outtype"):
        tiny_run(export_outtype="q2")
