"""The architecture adapter: every supported family's parts are found; anything else is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import ARCHS, VOCAB, tiny_model
from inheritune.arch import UnsupportedModelError, get_arch

POSITIONAL = {"gpt2", "opt"}  # families with learned position embeddings


@pytest.mark.parametrize("arch", ARCHS)
def test_parts_found(arch):
    model = tiny_model(arch, layers=3, hidden=32, heads=4)
    a = get_arch(model)
    assert a.num_layers == 3
    assert isinstance(a.embed, nn.Embedding) and a.embed.weight.shape == (VOCAB, 32)
    assert a.embed is model.get_input_embeddings()
    assert a.head is model.get_output_embeddings() and a.head.weight.shape == (VOCAB, 32)
    assert (a.pos_embed is not None) == (arch in POSITIONAL)
    if a.pos_embed is not None:
        assert a.pos_embed.weight.shape[1] == 32
    assert "norm" in type(a.final_norm).__name__.lower()
    for i in range(3):
        assert a.attention(i).layer_idx == i  # the attention module, not the whole block
    # conftest ties all families except GPT-NeoX, whose config unties by default
    assert a.tied == (arch != "gpt_neox")


@pytest.mark.parametrize("arch", ARCHS)
def test_block_parts_cover_every_parameter(arch):
    """Each block parameter is attention, MLP or a norm: the sub-module ablation relies on it."""
    a = get_arch(tiny_model(arch, layers=2))
    parts = {}
    for name, _ in a.layers[0].named_parameters():
        part = a.block_part(name)
        parts.setdefault(part, []).append(name)
        if part == "other":
            owner = a.layers[0].get_submodule(name.rsplit(".", 1)[0])
            assert "norm" in type(owner).__name__.lower(), name
    assert set(parts) == {"attn", "mlp", "other"}
    # the MLP holds the up and down projections (OPT has no single MLP module: fc1 + fc2)
    assert len([n for n in parts["mlp"] if n.endswith("weight")]) >= 2


def _bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )


def _unsupported(kind: str) -> nn.Module:
    import transformers as tf

    if kind == "BertForMaskedLM":
        return tf.BertForMaskedLM(_bert_config())
    if kind == "BertModel":
        return tf.BertModel(_bert_config())
    if kind == "T5ForConditionalGeneration":
        cfg = tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        return tf.T5ForConditionalGeneration(cfg)
    if kind == "BloomForCausalLM":  # a causal LM whose layout inheritune does not know
        return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2))
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["BertForMaskedLM", "BertModel", "T5ForConditionalGeneration", "BloomForCausalLM"]
)
def test_unsupported_models_named(kind):
    with pytest.raises(UnsupportedModelError, match=kind):
        get_arch(_unsupported(kind))


def test_non_causal_message_lists_supported_families():
    with pytest.raises(UnsupportedModelError, match=r"decoder-only causal LM.*llama"):
        get_arch(_unsupported("BertForMaskedLM"))


def test_not_a_hf_model():
    with pytest.raises(UnsupportedModelError, match="Linear is not a Hugging Face model"):
        get_arch(nn.Linear(2, 2))


def test_opt_with_projection_refused():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        word_embed_proj_dim=16,
    )
    with pytest.raises(UnsupportedModelError, match="word_embed_proj_dim"):
        get_arch(OPTForCausalLM(cfg))


def test_llama_layout_fallback_for_unlisted_family():
    """Families with the Llama layout (here Qwen3) work through the default row."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    a = get_arch(Qwen3ForCausalLM(cfg))
    assert a.num_layers == 2 and a.final_norm is not None


def test_handles_are_live():
    """Arch holds references, not copies: editing through it edits the model."""
    model = tiny_model("llama", layers=2)
    a = get_arch(model)
    with torch.no_grad():
        a.final_norm.weight.fill_(3.0)
    assert torch.all(model.model.norm.weight == 3.0)
