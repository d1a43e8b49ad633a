"""Model surgery on tiny random models of every tested family, and ``inheritune inherit``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml

from conftest import ARCHS, FAMILIES, tiny_model
from inheritune import cli
from inheritune.config import ConfigError, dataclass_from_dict
from inheritune.models.arch import get_arch
from inheritune.surgery import build as surgery
from inheritune.surgery.inherit import InheritConfig, inherit

L = 4  # reference depth used throughout


def reference(arch: str, **kw) -> torch.nn.Module:
    """A tiny model whose every tensor differs from a fresh init (norms are not all ones), so
    "inherited" and "freshly initialised" can be told apart."""
    model = tiny_model(arch, layers=L, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def inputs(seed: int = 0, t: int = 12) -> torch.Tensor:
    return torch.randint(3, 300, (2, t), generator=torch.Generator().manual_seed(seed))


def block_output(model, x) -> torch.Tensor:
    """Output of the model's last block, before the final norm (via a forward hook)."""
    seen = []
    hook = (
        get_arch(model)
        .layers[-1]
        .register_forward_hook(
            lambda mod, args, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
    )
    try:
        with torch.no_grad():
            model(input_ids=x, use_cache=False)
    finally:
        hook.remove()
    return seen[0]


def block_state(model, i: int) -> dict[str, torch.Tensor]:
    return get_arch(model).layers[i].state_dict()


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("arch", FAMILIES)
def test_all_layers_reproduce_reference_logits(arch):
    ref = reference(arch)
    target = surgery.select_layers(ref, range(L))
    x = inputs()
    with torch.no_grad():
        assert torch.equal(ref(x).logits, target(x).logits)


@pytest.mark.parametrize("arch", FAMILIES)
def test_prefix_matches_reference_at_that_depth(arch):
    """For K < L the target's last block output equals the reference's hidden state at depth K.

    HF's ``hidden_states`` has L + 1 entries: [0] the embeddings, [k] the output of block k-1
    for k < L, and [L] the output of the last block AFTER the final norm (all families). So
    the reference's hidden_states[K] (K < L, no norm) is compared with the target's last block
    output taken by a hook -- not with the target's own hidden_states[K], which is post-norm.
    """
    k = 2
    ref = reference(arch)
    target = surgery.first_layers(ref, k)
    x = inputs()
    with torch.no_grad():
        ref_hidden = ref(x, output_hidden_states=True, use_cache=False).hidden_states
        assert len(ref_hidden) == L + 1
        assert torch.equal(block_output(target, x), ref_hidden[k])
        # ... and the inherited final norm + head turn it into the target's logits (Gemma 2
        # softcaps them after the head).
        a = get_arch(ref)
        if a.plain_head:
            assert torch.equal(target(x).logits, a.head(a.final_norm(ref_hidden[k])))
        # guard against a vacuous pass: the depth-K state differs from the full-depth one
        assert not torch.allclose(ref_hidden[k], ref_hidden[k + 1])


@pytest.mark.parametrize("arch", FAMILIES)
def test_selection_config_and_layer_idx(arch):
    ref = reference(arch)
    target = surgery.select_layers(ref, [3, 1])
    a = get_arch(target)
    assert target.config.num_hidden_layers == 2 and a.num_layers == 2
    # KV caches index layers by attention.layer_idx: renumbered 0..K-1 in the new model
    assert [a.attention(j).layer_idx for j in range(2)] == [0, 1]
    for j, i in enumerate([3, 1]):
        new, old = block_state(target, j), block_state(ref, i)
        assert new.keys() == old.keys()
        assert all(torch.equal(new[n], old[n]) for n in new)
    kv = getattr(ref.config, "num_key_value_heads", None)
    assert getattr(target.config, "num_key_value_heads", None) == kv  # GQA untouched
    if arch == "gpt2":
        assert target.config.n_layer == 2  # through GPT-2's attribute_map


@pytest.mark.parametrize("arch", FAMILIES)
def test_reference_not_mutated_and_nothing_shared(arch):
    ref = reference(arch)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    config_before = ref.config.to_dict()
    builds = [
        surgery.first_layers(ref, 2),
        surgery.select_layers(ref, [0, 0], allow_repeats=True),
        surgery.select_layers(ref, [1, 2], parts="attn"),
        *([surgery.half_width(ref)] if arch in ARCHS else []),
        surgery.drop_layers(ref, [1]),
    ]
    ref_ptrs = {p.data_ptr() for p in ref.parameters()}
    for target in builds:
        assert not ref_ptrs & {p.data_ptr() for p in target.parameters()}
    with torch.no_grad():
        for target in builds:
            for p in target.parameters():
                p.add_(1.0)  # would show up in ref if any storage were shared
    after = ref.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ref.config.to_dict() == config_before
    assert ref.config.num_hidden_layers == L


@pytest.mark.parametrize("arch", FAMILIES)
def test_weight_tying_kept(arch):
    ref = reference(arch)
    builds = [surgery.first_layers(ref, 2), *([surgery.half_width(ref)] if arch in ARCHS else [])]
    for target in builds:
        a = get_arch(target)
        assert a.tied == get_arch(ref).tied == bool(ref.config.tie_word_embeddings)
        if a.tied:
            assert a.head.weight is a.embed.weight


# --------------------------------------------------------------------------- ablation, stacking


@pytest.mark.parametrize("parts", ["attn", "mlp", "attn+mlp"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_submodule_ablation_inherits_exactly_those_tensors(arch, parts):
    ref = reference(arch)
    k, seed = 2, 7
    target = surgery.first_layers(ref, k, parts=parts, seed=seed)
    fresh = surgery.random_init(ref.config, k, seed=seed)  # the same init, nothing inherited
    wanted = set(parts.split("+"))
    a = get_arch(target)
    counts = {"inherited": 0, "fresh": 0}
    for j in range(k):
        new, old, init = block_state(target, j), block_state(ref, j), block_state(fresh, j)
        for name, tensor in new.items():
            if a.block_part(name) in wanted:
                assert torch.equal(tensor, old[name]), name
                counts["inherited"] += 1
            else:
                assert not torch.equal(tensor, old[name]), name
                assert torch.equal(tensor, init[name]), name  # the model's own _init_weights
                counts["fresh"] += 1
    assert counts["inherited"] > 0 and counts["fresh"] > 0
    # outside the blocks everything is inherited whatever ``parts`` says
    for part in ("embed", "final_norm", "head"):
        assert torch.equal(getattr(a, part).weight, getattr(get_arch(ref), part).weight)


def test_unknown_parts_refused():
    with pytest.raises(ConfigError, match="--parts"):
        surgery.select_layers(reference("llama"), [0], parts="norms")


@pytest.mark.parametrize("arch", FAMILIES)
def test_stacking_makes_independent_copies(arch):
    ref = reference(arch)
    target = surgery.select_layers(ref, [0, 1, 0, 1], allow_repeats=True)
    blocks = get_arch(target).layers
    for a, b in [(0, 2), (1, 3)]:
        pa, pb = dict(blocks[a].named_parameters()), dict(blocks[b].named_parameters())
        for name in pa:
            assert torch.equal(pa[name], pb[name])
            assert pa[name] is not pb[name] and pa[name].data_ptr() != pb[name].data_ptr()
    w = next(blocks[0].parameters())
    with torch.no_grad():
        w.add_(1.0)
    assert not torch.equal(w, next(blocks[2].parameters()))
    assert len({id(p) for p in target.parameters()}) == len(list(target.parameters()))


def test_repeats_need_allow_repeats():
    with pytest.raises(ConfigError, match=r"duplicate layer indices \[0\]"):
        surgery.select_layers(reference("llama"), [0, 1, 0])


# --------------------------------------------------------------------------- per-layer config


def qwen2_sliding() -> torch.nn.Module:
    """Qwen2 whose layers 2, 3 use a 4-token sliding window (layer_types from max_window_layers)."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    cfg = tiny_config("qwen2", layers=L)
    cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 4, 2
    cfg.layer_types = None
    cfg.__post_init__()  # re-derive layer_types from the sliding-window settings
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def test_qwen2_per_layer_lists_follow_the_selection(tmp_path):
    ref = qwen2_sliding()
    assert ref.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    x = inputs(t=16)  # longer than the window, so the window matters
    full = surgery.select_layers(ref, range(L))
    with torch.no_grad():
        assert torch.equal(full(x).logits, ref(x).logits)
    target = surgery.select_layers(ref, [0, 3])
    assert target.config.layer_types == ["full_attention", "sliding_attention"]
    assert target.config.max_window_layers == 1  # one kept layer lies below the old threshold
    assert [m.sliding_window for m in map(get_arch(target).attention, range(2))] == [None, 4]
    target.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.layer_types == ["full_attention", "sliding_attention"]
    stacked = surgery.select_layers(ref, [3, 0, 3], allow_repeats=True)
    sliding, full_ = "sliding_attention", "full_attention"
    assert stacked.config.layer_types == [sliding, full_, sliding]


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_sliding_pattern_follows_the_selection(arch):
    """Gemma alternates 4-token sliding-window and full layers (conftest); a reordered selection
    carries each block's own kind of attention, so the target equals the reference's blocks
    run in that order."""
    ref = reference(arch)
    assert ref.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    target = surgery.select_layers(ref, [1, 0])
    assert target.config.layer_types == ["full_attention", "sliding_attention"]
    windows = [getattr(m, "sliding_window", None) for m in map(get_arch(target).attention, (0, 1))]
    assert windows == [None, 4]


def test_any_list_as_long_as_the_depth_is_per_layer():
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=3, eos_token_id=[1, 2, 7])
    cfg.window_per_layer = [16, 32, 64]  # a family's own per-layer field, under any name
    new = surgery.resize_config(cfg, [2, 0])
    assert new.window_per_layer == [64, 16] and new.num_hidden_layers == 2
    assert new.eos_token_id == [1, 2, 7]  # token ids only happen to have that length
    one = surgery.resize_config(LlamaConfig(num_hidden_layers=1, architectures=["X"]), [0, 0])
    assert one.architectures == ["X"]


def test_threshold_without_layer_types_refuses_mixed_order():
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=4)
    cfg.first_k_dense_replace = 2  # as in DeepSeek configs: the first k layers are dense
    assert surgery.resize_config(cfg, [0, 3]).first_k_dense_replace == 1
    with pytest.raises(ConfigError, match="first_k_dense_replace"):
        surgery.resize_config(cfg, [3, 0])


def test_gpt2_inverse_layer_scaling_warns_when_blocks_move():
    ref = reference("gpt2")
    ref.config.scale_attn_by_inverse_layer_idx = True
    with pytest.warns(UserWarning, match="scale_attn_by_inverse_layer_idx"):
        surgery.select_layers(ref, [1, 2])


# --------------------------------------------------------------------------- other builders


@pytest.mark.parametrize("arch", ARCHS)
def test_half_width(arch):
    ref = reference(arch, hidden=32, heads=4)
    half = surgery.half_width(ref)
    c, rc = half.config, ref.config
    assert (c.hidden_size, c.num_attention_heads) == (16, 2)
    assert c.num_hidden_layers == L
    if getattr(rc, "num_key_value_heads", None):
        assert c.num_key_value_heads == rc.num_key_value_heads // 2  # GQA ratio kept
    ref_sd = ref.state_dict()
    for name, t in half.state_dict().items():
        src = ref_sd[name]
        assert all(n in (s, s // 2) for n, s in zip(t.shape, src.shape, strict=True)), name
        if name.endswith("attn.c_attn.weight"):  # GPT-2's fused q|k|v: each third sliced
            for piece, whole in zip(t.chunk(3, -1), src.chunk(3, -1), strict=True):
                assert torch.equal(piece, whole[:16, :16])
        elif not name.endswith("c_attn.bias"):
            assert torch.equal(t, src[tuple(slice(0, n) for n in t.shape)]), name
    emb = get_arch(half).embed.weight
    assert emb.shape == (ref.config.vocab_size, 16)
    with torch.no_grad():
        assert half(inputs()).logits.shape == (2, 12, ref.config.vocab_size)


def test_half_width_divisibility_error():
    ref = tiny_model("llama", layers=2, hidden=32, heads=2)  # 1 KV head cannot be halved
    with pytest.raises(ConfigError, match="num_key_value_heads=1"):
        surgery.half_width(ref)


def test_random_init_depth_and_seed():
    ref = reference("qwen2")
    a = surgery.random_init(ref.config, num_layers=2, seed=3)
    b = surgery.random_init(ref.config, num_layers=2, seed=3)
    c = surgery.random_init(ref.config, seed=4)
    assert get_arch(a).num_layers == 2 and len(a.config.layer_types) == 2
    assert get_arch(c).num_layers == L
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sa[w], c.state_dict()[w])
    assert not torch.equal(sa[w], ref.state_dict()[w])
    assert len(surgery.random_init(ref.config, 6).config.layer_types) == 6


def test_drop_layers_keeps_the_complement_in_order():
    ref = reference("llama")
    target = surgery.drop_layers(ref, [1, 2])
    assert get_arch(target).num_layers == 2
    for j, i in enumerate([0, 3]):
        new, old = block_state(target, j), block_state(ref, i)
        assert all(torch.equal(new[n], old[n]) for n in new)
    with pytest.raises(ConfigError, match="leaves no model"):
        surgery.drop_layers(ref, range(L))
    with pytest.raises(ConfigError, match="out of range"):
        surgery.drop_layers(ref, [L])


# --------------------------------------------------------------------------- selections


def test_bad_depths():
    ref = reference("llama")
    with pytest.raises(ConfigError, match="must be >= 1"):
        surgery.first_layers(ref, 0)
    with pytest.raises(ConfigError, match=f"exceeds the reference's {L} layers"):
        surgery.first_layers(ref, L + 1)
    with pytest.raises(ConfigError, match="out of range"):
        surgery.select_layers(ref, [0, L])
    with pytest.raises(ConfigError, match="no layers selected"):
        surgery.select_layers(ref, [])


# --------------------------------------------------------------------------- the command


@pytest.mark.parametrize("arch", FAMILIES)
def test_inherit_cli_writes_a_loadable_folder(arch, tiny_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    ref_dir = tiny_folder(arch, layers=L)
    out = tmp_path / "target"
    rc = cli.main(["inherit", "--model", str(ref_dir), "--num-layers", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert {"config.json", "model.safetensors", "inheritune.yaml", "provenance.json"} <= {
        p.name for p in out.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    a = get_arch(model)
    assert a.num_layers == 2 and a.tied == get_arch(ref).tied
    if a.tied:
        assert a.head.weight is a.embed.weight  # still tied after save/reload
    x = inputs()
    with torch.no_grad():
        ref_hidden = ref(x, output_hidden_states=True).hidden_states
    assert torch.equal(block_output(model, x), ref_hidden[2])
    gen = model.generate(x[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 7)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["kept_layers"] == [0, 1] and prov["reference_layers"] == L
    assert prov["parts"] == "block" and prov["reference"] == str(ref_dir)
    assert prov["parameters"]["target"] < prov["parameters"]["reference"]
    resolved = dataclass_from_dict(
        InheritConfig, yaml.safe_load((out / "inheritune.yaml").read_text())
    )
    assert resolved.num_layers == 2 and resolved.out == str(out)


def test_inherit_explicit_layers_and_parts(tiny_folder, tmp_path):
    ref_dir = tiny_folder("llama", layers=L)
    cfg = InheritConfig(model=str(ref_dir), layers="0,3", parts="attn", out=str(tmp_path / "t"))
    out = inherit(cfg)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["kept_layers"] == [0, 3] and prov["parts"] == "attn"


def test_inherit_scored_selection(tiny_folder, corpus_file, tmp_path):
    """--select bi keeps the layers of highest Block Influence on training-split windows, and
    the saved folder is a plain checkpoint of those layers."""
    from transformers import AutoModelForCausalLM

    from inheritune.analysis import selection
    from inheritune.analysis.layer_scores import layer_scores, score_windows
    from inheritune.data.prepare import load_tokens
    from inheritune.models import loading as models

    ref_dir = tiny_folder("llama", layers=L)
    out = tmp_path / "bi"
    argv = ["inherit", "--model", str(ref_dir), "--data", str(corpus_file), "--out", str(out)]
    assert cli.main([*argv, "--num-layers", "2", "--select", "bi", "--score-windows", "3",
                     "--score-seq-len", "12"]) == 0  # fmt: skip
    prov = json.loads((out / "provenance.json").read_text())
    ref = models.load_model(str(ref_dir))
    tokens = load_tokens(str(corpus_file), models.load_tokenizer(str(ref_dir)))
    windows = score_windows(tokens.train, selection.SelectConfig(score_windows=3,
                                      score_seq_len=12), 0)  # fmt: skip
    bi = layer_scores(ref, windows, ["block_influence"], cache=False).block_influence
    want = sorted(np.argsort(-np.asarray(bi), kind="stable")[:2].tolist())
    assert prov["kept_layers"] == want and prov["select"] == "bi"
    np.testing.assert_allclose(prov["layer_scores"]["block_influence"], bi, rtol=1e-6)
    target = AutoModelForCausalLM.from_pretrained(out)
    assert target.config.num_hidden_layers == 2
    for j, i in enumerate(want):
        new, old = block_state(target, j), block_state(ref, i)
        assert all(torch.equal(new[n], old[n]) for n in new)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--num-layers", "5"], f"--num-layers 5 exceeds the reference's {L} layers"),
        (["--num-layers", "0"], "--num-layers must be >= 1"),
        (["--layers", "0,0"], r"duplicate layer indices \[0\]"),
        (["--layers", "0-9"], "out of range"),
        ([], "exactly one of --num-layers K"),
        (["--num-layers", "2", "--layers", "0-1"], "exactly one of"),
        (["--num-layers", "2", "--select", "best"], "--select must be one of first, bi"),
        (["--select", "0,0"], r"--select: duplicate layer indices \[0\]"),
        (["--select", "2,1"], "ascending"),
        (["--select", "0-4"], "index 4 is out of range"),
        (["--select", "bi"], "exactly one of --num-layers K"),
        (["--layers", "0,1", "--select", "bi"], "give the layers once"),
    ],
)
def test_inherit_cli_errors(args, match, tiny_folder, tmp_path, capsys):
    ref_dir = tiny_folder("llama", layers=L)
    out = tmp_path / "never"
    rc = cli.main(["inherit", "--model", str(ref_dir), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(match, err), err
    assert not out.exists()  # checked before anything was written


def test_inherit_needs_no_tokenizer(tmp_path, capsys):
    """A reference folder without tokenizer files (here Phi-3) is inherited; the target has no
    tokenizer either, and a command that reads text says in one line what is missing."""
    from transformers import AutoModelForCausalLM

    ref_dir = tmp_path / "phi3-no-tokenizer"
    reference("phi3").save_pretrained(ref_dir)
    out = tmp_path / "target"
    rc = cli.main(["inherit", "--model", str(ref_dir), "--num-layers", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert not {"tokenizer.json", "tokenizer_config.json"} & {p.name for p in out.iterdir()}
    assert get_arch(AutoModelForCausalLM.from_pretrained(out)).num_layers == 2

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be " * 200)
    capsys.readouterr()
    rc = cli.main(["analyze", "--model", str(out), "--data", str(corpus), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("inheritune analyze: error: ") and str(out) in err
    assert "has no tokenizer" in err and "inherit does not" in err


@pytest.mark.slow
def test_real_smollm2_first_half():
    """SmolLM2-135M: the first 15 of 30 layers reproduce the reference's depth-15 state."""
    from inheritune.models.loading import count_parameters, load_model

    ref = load_model("smollm2-135m")
    target = surgery.first_layers(ref, 15)
    x = torch.randint(0, ref.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_hidden = ref(x, output_hidden_states=True, use_cache=False).hidden_states
    assert torch.equal(block_output(target, x), ref_hidden[15])
    assert target.lm_head.weight is target.model.embed_tokens.weight
    assert target.config.num_key_value_heads == 3
    assert count_parameters(target) < 0.7 * count_parameters(ref)
