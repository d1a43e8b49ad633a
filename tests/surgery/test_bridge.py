"""The bridge block (bridge.py, its hooks in activations.py) and fresh parts (surgery.fresh_parts)
on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ARCHS, tiny_model
from inheritune import cli
from inheritune.config import ConfigError, build
from inheritune.models import hooks as activations
from inheritune.models.arch import get_arch
from inheritune.surgery import bridge
from inheritune.surgery import build as surgery
from inheritune.surgery.inherit import InheritConfig

L = 4  # reference depth
K = 2  # inherited depth


def reference(arch: str, layers: int = L, **kw) -> torch.nn.Module:
    """A tiny model whose every tensor differs from a fresh init (norms are not all ones)."""
    model = tiny_model(arch, layers=layers, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def windows(n: int = 16, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def final_norm_input(model, ids) -> torch.Tensor:
    seen = []
    hook = get_arch(model).final_norm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        hook.remove()
    return seen[0]


CFG = dict(
    bridge="block",
    calib_tokens=16 * 24,
    calib_seq_len=24,
    bridge_steps=40,
    bridge_lr=3e-3,
    bridge_batch=4,
    norm_iters=3,
    norm_windows=2,
)


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_collect_states_are_the_truncated_and_full_streams(arch):
    ref = reference(arch)
    ids = windows(3, 10)
    h_k, h_full = activations.collect_states(ref, ids, K, batch_size=2)
    assert h_k.shape == h_full.shape == (3, 10, ref.config.hidden_size)
    torch.testing.assert_close(h_k, final_norm_input(surgery.first_layers(ref, K), ids))
    torch.testing.assert_close(h_full, final_norm_input(ref, ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_block_runner_calls_a_block_exactly_as_the_model_does(arch):
    """The last block run alone on the stream entering it gives the model's own final-norm input
    (rotary embeddings, masks and per-layer attention types captured from the model's forward)."""
    ref = reference(arch)
    ids = windows(2, 12)
    entering, _ = activations.collect_states(ref, ids, L - 1)
    runner = activations.BlockRunner(ref, L - 1)
    with torch.no_grad():
        torch.testing.assert_close(runner(entering), final_norm_input(ref, ids))


@pytest.mark.parametrize("init, source", [("last", L - 1), ("next", K), ("repeat", K - 1)])
def test_add_bridge_block_copies_the_chosen_block(init, source):
    ref = reference("llama")
    model = bridge.add_bridge_block(ref, K, init)
    arch = get_arch(model)
    assert type(model) is type(ref) and arch.num_layers == K + 1 and arch.tied
    for j, i in enumerate([*range(K), source]):
        new, old = arch.layers[j].state_dict(), get_arch(ref).layers[i].state_dict()
        assert all(torch.equal(new[k], old[k]) for k in old)


def test_linear_map_recovers_a_known_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 20, 16, generator=g)
    a, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))  # keeps each row's RMS
    a_fit, r2 = bridge.fit_linear_map(x, 3.0 * (x @ a))  # scale is irrelevant
    assert r2 > 0.999
    y = bridge._normalise(x[:, 1:] @ a, False)
    torch.testing.assert_close(bridge._normalise(x[:, 1:] @ a_fit, False), y, atol=1e-3, rtol=0)
    _, r2_noise = bridge.fit_linear_map(x, torch.randn(8, 20, 16, generator=g))
    assert r2_noise < 0.3


# --------------------------------------------------------------------------- the whole build


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # RMSNorm + Linear; LayerNorm + Conv1D
def test_bridged_model_is_a_standard_checkpoint(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = reference(arch)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    model, stats = bridge.build_bridged(ref, K, windows(), bridge.BridgeConfig(**CFG))
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())  # untouched
    assert stats["layers"] == K + 1 and stats["calib_tokens"] == 16 * 24
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers
    assert type(loaded) is type(ref)
    saved, fitted = loaded.state_dict(), model.state_dict()
    assert set(saved) == set(fitted) and all(torch.equal(saved[k], fitted[k]) for k in saved)
    # same weights and the same attention kernel: bit-identical logits
    loaded.set_attn_implementation(model.config._attn_implementation)
    assert get_arch(loaded).num_layers == K + 1 and loaded.config.num_hidden_layers == K + 1
    assert get_arch(model).tied and get_arch(loaded).tied  # tied embeddings stay tied
    ids = windows(2, 12, seed=5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # the first K blocks are the reference's; the bridge block and the final norm were fitted
    for i in range(K):
        new, old = get_arch(loaded).layers[i].state_dict(), get_arch(ref).layers[i].state_dict()
        assert all(torch.equal(new[k], old[k]) for k in old)
    bridge_now = get_arch(loaded).layers[K].state_dict()
    start = get_arch(ref).layers[L - 1].state_dict()
    assert not all(torch.equal(bridge_now[k], start[k]) for k in start)


def test_collect_streams_at_any_depth():
    ref = reference("llama")
    ids = windows(3, 10)
    streams = activations.collect_streams(ref, ids, [0, 1, 3], batch_size=2)
    assert sorted(streams) == [0, 1, 3]
    for d in (1, 3):  # the input of block d is what the first d blocks leave
        torch.testing.assert_close(streams[d], final_norm_input(surgery.first_layers(ref, d), ids))
    emb = get_arch(ref).embed(ids)
    torch.testing.assert_close(streams[0], emb)
    with pytest.raises(ConfigError, match=r"depths must lie in \[0, 4\]"):
        activations.collect_streams(ref, ids, [5])


@pytest.mark.parametrize(
    ("kept", "spans", "layout"),
    [
        ([0, 3], [(1, 3)], [0, 2, 3]),  # one inner seam: the bridge starts as block 2
        ([1, 2], [(0, 1), (3, 4)], [0, 1, 2, 3]),  # a seam below the first kept layer and on top
    ],
)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # RMSNorm + Linear; LayerNorm + Conv1D
def test_a_bridge_at_every_seam(arch, kept, spans, layout, tmp_path):
    """Each removed span gets one fitted block in its place, fitted on the reference's own
    streams; the result is a plain checkpoint that generates with a KV cache."""
    from transformers import AutoModelForCausalLM

    ref = reference(arch)
    model, stats = bridge.build_bridged(ref, kept, windows(), bridge.BridgeConfig(**CFG))
    assert [tuple(b["span"]) for b in stats["bridges"]] == spans
    assert [b["init_from"] for b in stats["bridges"]] == [b - 1 for _, b in spans]
    assert stats["layers"] == len(layout) == len(kept) + len(spans)
    positions = [b["position"] for b in stats["bridges"]]
    for j, src in enumerate(layout):
        new, old = get_arch(model).layers[j].state_dict(), get_arch(ref).layers[src].state_dict()
        same = all(torch.equal(new[k], old[k]) for k in old)
        fitted = j in positions and not stats["bridges"][positions.index(j)]["kept_start"]
        assert same == (not fitted), (j, src)  # kept blocks as they were, bridges fitted
    for (a, b_end), b in zip(spans, stats["bridges"], strict=True):
        if b_end - a > 1:  # a real gap: the fit closes part of it
            assert b["fit_loss_after"] < b["fit_loss_before"], b
        else:  # a one-layer span's bridge starts as that layer: exact, and kept as it is
            assert b["fit_loss_before"] == pytest.approx(0.0, abs=1e-6) and b["kept_start"]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(ref) and loaded.config.num_hidden_layers == len(layout)
    if arch == "llama":  # every attention knows its new place (the KV cache is indexed by it)
        assert [blk.self_attn.layer_idx for blk in get_arch(loaded).layers] == list(
            range(len(layout))
        )
    prompt = windows(1, 6, seed=9)
    cached = loaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    plain = loaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_bridge_input_pruned_fits_each_bridge_on_the_smaller_models_stream(monkeypatch):
    """--bridge-input pruned: the deeper bridge is fitted from the stream the smaller model
    itself gives there (the bridge below already fitted), not the reference's; the first
    bridge sees the same stream either way."""
    ref = reference("llama", layers=6)
    seen: dict[str, list[torch.Tensor]] = {"reference": [], "pruned": []}
    real = bridge.fit_bridge

    def spy(model, h_l, h_L, **kw):
        seen[mode].append(h_l.clone())
        return real(model, h_l, h_L, **kw)

    monkeypatch.setattr(bridge, "fit_bridge", spy)
    cfg = {**CFG, "norm_iters": 0, "bridge_steps": 5}
    kept = [0, 3]  # spans [1, 3) and [4, 6): two bridges, the second above the first
    for mode in ("reference", "pruned"):
        model, stats = bridge.build_bridged(
            ref, kept, windows(), bridge.BridgeConfig(**cfg, bridge_input=mode)
        )
        assert stats["bridge_input"] == mode
    torch.testing.assert_close(seen["pruned"][0], seen["reference"][0])
    assert not torch.allclose(seen["pruned"][1], seen["reference"][1])
    ids = windows()[:-2]  # the fit windows: the model's own stream entering its block 3
    want = activations.collect_streams(model, ids, [3])[3]
    positions = [b["position"] for b in stats["bridges"]]
    assert positions == [1, 3] and not stats["bridges"][0]["kept_start"]
    # the pruned model's stream with the first bridge as fitted (the second does not change it)
    torch.testing.assert_close(seen["pruned"][1], want)
    with pytest.raises(ConfigError, match="--bridge-input must be one of reference, pruned"):
        bridge.BridgeConfig(bridge_input="own")


def test_a_later_build_reuses_the_bridges_of_seams_it_shares(monkeypatch):
    """reuse: a growth round that keeps a seam gets that seam's fitted block (the same weights
    as a fresh fit, which depends on the span alone with --bridge-input reference) without
    fitting it again; its other seams are fitted; --bridge-input pruned refits everything."""
    ref = reference("llama", layers=6)
    cfg = bridge.BridgeConfig(**{**CFG, "norm_iters": 0, "bridge_steps": 5})
    first, stats1 = bridge.build_bridged(ref, [0, 3], windows(), cfg)  # spans [1, 3), [4, 6)
    fitted = bridge.fitted_bridges(first, stats1)
    assert set(fitted) == {(1, 3), (4, 6)}
    fits: list = []
    real = bridge.fit_bridge
    monkeypatch.setattr(bridge, "fit_bridge", lambda *a, **kw: fits.append(1) or real(*a, **kw))
    grown, stats2 = bridge.build_bridged(ref, [0, 3, 4], windows(), cfg, reuse=fitted)
    assert len(fits) == 1  # only the new seam [5, 6)
    assert [(b["span"], bool(b.get("reused"))) for b in stats2["bridges"]] == [
        ([1, 3], True),
        ([5, 6], False),
    ]
    assert stats2["bridges"][0]["fit_loss_after"] == stats1["bridges"][0]["fit_loss_after"]
    fresh, _ = bridge.build_bridged(ref, [0, 3, 4], windows(), cfg)
    blocks = [get_arch(m).layers[1].state_dict() for m in (grown, fresh, first)]
    for name, t in blocks[0].items():
        torch.testing.assert_close(t, blocks[1][name])  # reused == refitted
        torch.testing.assert_close(t, blocks[2][name])
    pruned = bridge.BridgeConfig(
        **{**CFG, "norm_iters": 0, "bridge_steps": 5, "bridge_input": "pruned"}
    )
    fits.clear()
    _, stats3 = bridge.build_bridged(ref, [0, 3, 4], windows(), pruned, reuse=fitted)
    assert len(fits) == 2 and not any(b.get("reused") for b in stats3["bridges"])


def test_bridge_spans_limits_the_bridges():
    ref = reference("llama")
    cfg = bridge.BridgeConfig(**{**CFG, "bridge_spans": 1, "norm_iters": 0, "bridge_steps": 2})
    model, stats = bridge.build_bridged(ref, [1, 2], windows(), cfg)
    # both spans are one layer long: the deeper is bridged, the other left as a plain cut
    assert [b["span"] for b in stats["bridges"]] == [[3, 4]]
    assert stats["unbridged_spans"] == [[0, 1]] and get_arch(model).num_layers == 3
    with pytest.raises(ConfigError, match="no removed span"):
        bridge.build_bridged(ref, [0, 1, 2, 3], windows(), cfg)
    with pytest.raises(ConfigError, match="repeat needs a kept layer below"):
        bridge.build_bridged(
            ref, [1, 2], windows(), bridge.BridgeConfig(**{**CFG, "bridge_init": "repeat"})
        )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fit_lowers_the_fit_loss_on_held_out_windows(arch):
    """The held-out windows (the last eighth) are never stepped on; the fit keeps whatever it
    reaches, so this can fail. The block also does at least as well as the unrestricted linear
    map fitted in closed form on the same windows."""
    _, stats = bridge.build_bridged(reference(arch), K, windows(), bridge.BridgeConfig(**CFG))
    assert stats["held_out_windows"] == 2
    assert stats["fit_loss_after"] < 0.7 * stats["fit_loss_before"], stats
    assert stats["fit_loss_after"] < stats["linear_map_fit_loss"], stats
    assert stats["final_norm"]["calib_loss_after"] <= stats["final_norm"]["calib_loss_before"]


def test_bridge_config_names_the_flag():
    with pytest.raises(ConfigError, match="--bridge "):
        bridge.BridgeConfig(bridge="mlp")
    with pytest.raises(ConfigError, match="--bridge-init"):
        bridge.BridgeConfig(bridge_init="first")
    with pytest.raises(ConfigError, match="--calib-tokens"):
        bridge.BridgeConfig(calib_tokens=100, calib_seq_len=128)
    with pytest.raises(ConfigError, match="--bridge-lr"):
        bridge.BridgeConfig(bridge_lr=0.0)
    with pytest.raises(ConfigError, match="--num-layers"):
        bridge.build_bridged(reference("llama"), L, windows(), bridge.BridgeConfig(**CFG))


def test_inherit_config_validates_the_bridge_fields():
    block = bridge.BridgeConfig(bridge="block")
    with pytest.raises(ConfigError, match="--bridge-steps"):
        InheritConfig(num_layers=2, bridging=bridge.BridgeConfig(bridge="block", bridge_steps=-1))
    with pytest.raises(ConfigError, match="--bridge-steps"):  # the flat flags reach it too
        build(InheritConfig, num_layers=2, bridge="block", bridge_steps=-1)
    InheritConfig(layers="0,2", bridging=block)  # a list bridges its own seams
    with pytest.raises(ConfigError, match="no --fresh"):
        InheritConfig(num_layers=2, bridging=block, fresh=["final_norm"])
    cfg = InheritConfig(
        num_layers=2, bridging=bridge.BridgeConfig(bridge="block", calib_tokens=512)
    )
    assert cfg.bridging.calib_windows == 4


def test_inherit_cli_with_a_bridge(tiny_folder, corpus_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    ref_dir = tiny_folder("llama", layers=L)
    out = tmp_path / "bridged"
    # --num-layers counts the bridge: K inherited layers + 1 bridge block
    args = ["inherit", "--model", str(ref_dir), "--num-layers", str(K + 1), "--out", str(out)]
    args += ["--bridge", "block", "--data", str(corpus_file), "--calib-tokens", "256"]
    args += ["--calib-seq-len", "16", "--bridge-steps", "10", "--norm-iters", "2"]
    args += ["--eval-tokens", "64", "--eval-seq-len", "16"]
    rc = cli.main(args)
    assert rc == 0, capsys.readouterr().err
    assert "bridge block: validation loss" in capsys.readouterr().out
    prov = json.loads((out / "provenance.json").read_text())
    b = prov["bridge"]
    assert b["calib_tokens"] == 256 and b["steps"] == 10 and b["layers"] == K + 1
    assert prov["kept_layers"] == list(range(K)) and b["bridges"][0]["span"] == [K, L]
    assert {"fit_loss_before", "fit_loss_after", "linear_map_r2"} <= set(b)
    assert set(b["validation"]) >= {"reference", "inherited", "bridged", "tokens"}
    assert b["validation"]["tokens"] == 64
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert get_arch(loaded).num_layers == K + 1 and get_arch(loaded).tied


# --------------------------------------------------------------------------- fresh parts


@pytest.mark.parametrize(
    "arch, parts, keys",
    [
        ("gpt2", "pos_embed,final_norm", {"transformer.wpe.", "transformer.ln_f."}),
        ("gpt2", "embed", {"transformer.wte.", "lm_head."}),  # tied: the shared matrix
        ("llama", "final_norm", {"model.norm."}),
        ("llama", "head", {"model.embed_tokens.", "lm_head."}),  # tied: the shared matrix
        ("gpt_neox", "embed,final_norm", {"gpt_neox.embed_in.", "gpt_neox.final_layer_norm."}),
        ("gpt_neox", "head", {"lm_head."}),  # untied: the head alone
        ("opt", "pos_embed", {"model.decoder.embed_positions."}),
    ],
)
def test_fresh_parts_reinitialise_exactly_the_named_parts(arch, parts, keys):
    ref = reference(arch)
    new = surgery.fresh_parts(ref, parts, seed=3)
    init = surgery.random_init(ref.config, seed=3).state_dict()  # the model's own init, same seed
    old, now = ref.state_dict(), new.state_dict()
    assert set(old) == set(now)
    changed = {k for k in old if not torch.equal(old[k], now[k])}
    expected = {k for k in old if k.startswith(tuple(keys))}
    assert expected and changed == expected
    assert all(torch.equal(now[k], init[k]) for k in expected)
    assert get_arch(new).tied == get_arch(ref).tied


def test_fresh_parts_refuses_what_a_family_lacks():
    with pytest.raises(ConfigError, match="--fresh pos_embed: LlamaForCausalLM has no learned"):
        surgery.fresh_parts(reference("llama"), ["pos_embed"])
    with pytest.raises(ConfigError, match="unknown part"):
        surgery.fresh_parts(reference("gpt2"), "pos_embed,wte")


def test_inherit_cli_fresh(tiny_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    ref_dir = tiny_folder("gpt2", layers=L)
    out = tmp_path / "fresh"
    args = ["inherit", "--model", str(ref_dir), "--num-layers", str(K), "--out", str(out)]
    rc = cli.main([*args, "--fresh", "final_norm,pos_embed", "--seed", "4"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "provenance.json").read_text())["fresh"] == [
        "pos_embed",
        "final_norm",
    ]
    model = AutoModelForCausalLM.from_pretrained(out)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir)
    assert torch.equal(model.transformer.ln_f.weight, torch.ones_like(ref.transformer.ln_f.weight))
    assert not torch.equal(model.transformer.wpe.weight, ref.transformer.wpe.weight)
    assert torch.equal(model.transformer.wte.weight, ref.transformer.wte.weight)

    rc = cli.main([*args, "--fresh", "pos_embed", "--model", str(tiny_folder("llama", layers=L))])
    err = capsys.readouterr().err
    assert rc == 2 and "--fresh pos_embed" in err and "no learned position embeddings" in err
