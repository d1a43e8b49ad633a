"""The architecture adapter: every tested family's parts are found (by the fast-path rows or by
walking the model), the fused-loss decision is right per family, analysis and scoring hooks work
on the walked families, and anything else is refused with the class named."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ARCHS, FAMILIES, VOCAB, tiny_config, tiny_model
from inheritune.models.arch import (
    LAYOUTS,
    SUPPORTED,
    UnsupportedModelError,
    discover_layout,
    get_arch,
)

POSITIONAL = {"gpt2", "opt"}  # families with learned position embeddings
SOFTCAPPED = {"gemma2"}  # final logit softcapping: the head alone does not give the logits


def _losses():
    """The module holding CausalLMLoss and linear_cross_entropy."""
    return importlib.import_module("inheritune.models.losses")


def ids(t: int = 10, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


def test_supported_is_exactly_the_tested_families():
    assert {tiny_config(f, layers=2).model_type for f in FAMILIES} == set(SUPPORTED)
    assert len(FAMILIES) == len(SUPPORTED)


@pytest.mark.parametrize("arch", FAMILIES)
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
        assert "attention" in type(a.attention(i)).__name__.lower()
    assert a.tied == bool(model.config.tie_word_embeddings)


@pytest.mark.parametrize("arch", FAMILIES)
def test_final_norm_takes_the_last_block_output(arch):
    """The norm found is the one a forward pass applies to the last block's output (Bloom has a
    second norm beside its blocks, on the embeddings)."""
    a = get_arch(tiny_model(arch, layers=2))
    seen = {}

    def on_block(_m, _args, out):  # returns None: the output is left as it is
        seen["block"] = out[0] if isinstance(out, tuple) else out

    def on_norm(_m, args):
        seen["norm"] = args[0]

    hooks = [
        a.layers[-1].register_forward_hook(on_block),
        a.final_norm.register_forward_pre_hook(on_norm),
    ]
    with torch.no_grad():
        a.model(input_ids=ids(), use_cache=False)
    for h in hooks:
        h.remove()
    assert torch.equal(seen["norm"], seen["block"])


@pytest.mark.parametrize("arch", ARCHS)
def test_walk_finds_the_fast_path_layout(arch):
    """discover_layout, which knows no family, agrees with every hand-written row."""
    model = tiny_model(arch, layers=2)
    assert discover_layout(model) == LAYOUTS[model.config.model_type]


def test_bloom_final_norm_is_chosen_by_forward_order():
    model = tiny_model("bloom", layers=2)
    norms = [n for n, m in model.transformer.named_children() if "norm" in type(m).__name__.lower()]
    assert norms == ["word_embeddings_layernorm", "ln_f"]  # two candidates beside the blocks
    assert discover_layout(model).final_norm == "transformer.ln_f"


@pytest.mark.parametrize("arch", FAMILIES)
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
    assert {"attn", "mlp"} <= set(parts) and "other" in parts
    # the MLP holds the up and down projections (OPT has no single MLP module: fc1 + fc2)
    assert len([n for n in parts["mlp"] if n.endswith("weight")]) >= 2


# --------------------------------------------------------------------------- the fused loss


@pytest.mark.parametrize("arch", FAMILIES)
def test_fused_loss_only_where_exact(arch):
    """Every family whose logits are head(last hidden state) takes the fused head + CE path,
    and its loss equals the HF logits' cross-entropy; Gemma 2 (softcapped) does not."""
    L = _losses()
    model = tiny_model(arch, layers=2)
    loss_mod = L.CausalLMLoss(model, chunk=7)
    assert get_arch(model).plain_head == (arch not in SOFTCAPPED)
    assert loss_mod.fused == get_arch(model).plain_head
    x = ids(t=12)
    with torch.no_grad():
        logits = model(input_ids=x[:, :-1], use_cache=False).logits
        hf = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        torch.testing.assert_close(loss_mod(x[:, :-1], x[:, 1:]), hf, rtol=1e-5, atol=1e-6)


def test_softcapped_head_would_give_a_wrong_fused_loss():
    """Why Gemma 2 must not be fused: with logits large enough for the softcap to bite, the
    head's cross-entropy differs from the model's."""
    L = _losses()
    model = tiny_model("gemma2", layers=2)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(300.0)
    x = ids(t=12)
    with torch.no_grad():
        hidden = model.base_model(input_ids=x[:, :-1], use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        fused = L.linear_cross_entropy(
            hidden.flatten(0, 1), head.weight, head.bias, x[:, 1:].flatten(), 7
        )
        assert abs(L.CausalLMLoss(model)(x[:, :-1], x[:, 1:]).item() - fused.item()) > 0.1
    assert not get_arch(model).plain_head


def test_probe_does_not_change_the_model():
    model = tiny_model("falcon", layers=2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert get_arch(model).plain_head
    assert model.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.transformer.h[0]._forward_hooks and not model.lm_head._forward_hooks


# --------------------------------------------------------------------------- analysis, scoring


@pytest.mark.parametrize("arch", ["falcon", "phi3", "bloom", "gemma2"])
def test_analysis_runs_on_walked_families(arch):
    from inheritune.analysis.analyze import AnalyzeConfig, run_analysis

    model = tiny_model(arch, layers=2, attn="eager")
    cfg = AnalyzeConfig(num_seqs=3, seq_len=8, batch_size=2)
    result = run_analysis(model, ids(t=8, batch=3).numpy(), cfg, progress=False)
    heads = model.config.num_attention_heads
    assert result.rank.shape == (2, heads) and result.mass.shape == (2, heads)
    assert ((result.rank >= 1) & (result.rank <= 8)).all()
    assert ((result.mass >= 1) & (result.mass <= 8)).all()


@pytest.mark.parametrize("arch", ["falcon", "phi3", "gptj", "bloom"])
def test_scoring_block_states_on_walked_families(arch):
    from inheritune.analysis.scoring import block_influence, block_states

    model = tiny_model(arch, layers=3)
    x = ids(t=8)
    states = block_states(model, x)
    with torch.no_grad():
        ref = model(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
    assert len(states) == 4
    for i in range(3):  # the inputs of the blocks are HF's hidden_states 0..L-1
        torch.testing.assert_close(states[i], ref[i])
    bi = block_influence(model, x)
    assert bi.shape == (3,) and ((bi > 0) & (bi < 2)).all()


# --------------------------------------------------------------------------- refusals


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
    if kind == "MambaForCausalLM":  # a causal LM without attention: nothing to analyse
        cfg = tf.MambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, state_size=4)
        return tf.MambaForCausalLM(cfg)
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["BertForMaskedLM", "BertModel", "T5ForConditionalGeneration", "MambaForCausalLM"]
)
def test_unsupported_models_named(kind):
    with pytest.raises(UnsupportedModelError, match=kind):
        get_arch(_unsupported(kind))


def test_walk_says_what_it_could_not_find():
    with pytest.raises(UnsupportedModelError, match="cannot find the attention of a MambaBlock"):
        get_arch(_unsupported("MambaForCausalLM"))
    model = tiny_model("llama", layers=2)
    model.config.num_hidden_layers = 5  # the blocks no longer match the config
    with pytest.raises(UnsupportedModelError, match="no list of num_hidden_layers=5"):
        get_arch(model)


def test_non_causal_message_lists_supported_families():
    with pytest.raises(UnsupportedModelError, match=r"decoder-only causal LM.*falcon"):
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


def test_handles_are_live():
    """Arch holds references, not copies: editing through it edits the model."""
    model = tiny_model("falcon", layers=2)
    a = get_arch(model)
    with torch.no_grad():
        a.final_norm.weight.fill_(3.0)
    assert torch.all(model.transformer.ln_f.weight == 3.0)
