"""One adapter over Hugging Face decoder LMs: where the pieces the recipe needs live.

:func:`get_arch` finds, for a causal LM, the token embeddings, the position embeddings (learned
ones, if the model has them), the list of decoder blocks, the final norm and the LM head.
Everything else in inheritune (analysis hooks, surgery, baselines, training) goes through it.

Nothing here is specific to one family. The parts are found by walking the model
(:func:`discover_layout`): the blocks are the ``nn.ModuleList`` of ``num_hidden_layers``
modules, the embeddings and head come from ``get_input_embeddings()`` /
``get_output_embeddings()``, and the final norm is the norm beside the block list (when there
are several, the one a forward pass runs after the last block). The families in
:data:`LAYOUTS` skip the walk (fast paths, written down once). :data:`SUPPORTED` lists the
families tested on tiny random configs (tests/models/test_arch.py); the README lists the same.

Usage::

    arch = get_arch(model)
    arch.layers[3], arch.attention(3), arch.final_norm, arch.head, arch.layout.layers

:data:`LAYER_NUMBERING` is the one statement of how layers are numbered (from 0, as in
Hugging Face's ``model.layers[0]``; the paper's plots count from 1), which every JSON
inheritune writes carries; it lives here, at the bottom of the stages, so every stage can
import it. Layer selections as mergekit configs are :mod:`inheritune.surgery.mergekit`'s.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model is not a decoder-only causal LM inheritune knows how to take apart."""


@dataclass(frozen=True)
class Layout:
    """Dotted attribute paths from the ``*ForCausalLM`` object."""

    layers: str
    embed: str
    final_norm: str
    pos_embed: str | None = None
    attn: str = "self_attn"  # the attention submodule inside one block
    mlp: str = "mlp"
    # further MLP submodules of a block that has no single MLP module (OPT: fc1 + fc2)
    mlp_extra: tuple[str, ...] = ()


_LLAMA = Layout("model.layers", "model.embed_tokens", "model.norm")
# model_type -> layout: fast paths that skip the walk. Any other family is discovered.
LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout(
        "transformer.h", "transformer.wte", "transformer.ln_f", "transformer.wpe", "attn"
    ),
    "gpt_neox": Layout(
        "gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm", None, "attention"
    ),
    "opt": Layout(
        "model.decoder.layers",
        "model.decoder.embed_tokens",
        "model.decoder.final_layer_norm",
        "model.decoder.embed_positions",
        "self_attn",
        "fc1",
        ("fc2",),
    ),
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
}
# model_type of every family the test suite checks (parity, reload, loss, analysis).
SUPPORTED = (
    "gpt2",
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma2",
    "gemma3_text",
    "phi3",
    "falcon",
    "gpt_neox",
    "opt",
    "gptj",
    "bloom",
    "stablelm",
)

# Discovered layouts and head probes, per live model (get_arch is called many times per run).
_DISCOVERED: weakref.WeakKeyDictionary[nn.Module, Layout] = weakref.WeakKeyDictionary()
_PLAIN_HEAD: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


@dataclass
class Arch:
    """Handles to the parts of one model (live references, not copies)."""

    model: nn.Module
    layout: Layout
    embed: nn.Embedding
    pos_embed: nn.Module | None
    layers: nn.ModuleList
    final_norm: nn.Module
    head: nn.Module

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attention(self, i: int) -> nn.Module:
        return get_module(self.layers[i], self.layout.attn)

    def block_part(self, name: str) -> str:
        """``"attn"``, ``"mlp"`` or ``"other"`` (norms) for a parameter name inside one block."""
        if name.startswith(self.layout.attn + "."):
            return "attn"
        if any(name.startswith(m + ".") for m in (self.layout.mlp, *self.layout.mlp_extra)):
            return "mlp"
        return "other"

    @property
    def tied(self) -> bool:
        return self.head.weight is self.embed.weight

    @property
    def plain_head(self) -> bool:
        """Whether logits are exactly ``head(base_model(x).last_hidden_state)``.

        Then a loss may run the head itself on the base model's output (the fused head +
        cross-entropy of training). It is False for any model that changes the hidden state
        between the base model and the head, or the logits after the head: Gemma 2's final logit
        softcapping, Cohere's logit scale, Granite's logit divisor, OPT's project_out. Checked
        once per model by a probe forward of two tokens (see :func:`_probe_plain_head`).
        """
        if self.model not in _PLAIN_HEAD:
            _PLAIN_HEAD[self.model] = _probe_plain_head(self.model, self.head)
        return _PLAIN_HEAD[self.model]


def _is_causal_lm_class(cls: str) -> bool:
    """``*ForCausalLM``, or a class transformers lists as a causal LM (GPT-2's LMHeadModel)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return cls.endswith("ForCausalLM") or cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _depth(config) -> int | None:
    """``num_hidden_layers`` (GPT-2, GPT-J, Bloom spell it n_layer through attribute_map)."""
    for cfg in (config, config.get_text_config()):
        n = getattr(cfg, "num_hidden_layers", None)
        if isinstance(n, int):
            return n
    return None


def _is_norm(module: nn.Module) -> bool:
    # LayerNorm, RMSNorm and every family's own spelling of them (Gemma3RMSNorm, ...)
    return "norm" in type(module).__name__.lower()


def _unsupported(model: nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{type(model).__name__} (model_type={model.config.model_type!r}): {why}; "
        f"tested families: {', '.join(SUPPORTED)}"
    )


def get_arch(model: nn.Module) -> Arch:
    """The :class:`Arch` of a causal LM; a clear error naming the class otherwise."""
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{cls} is not a Hugging Face model (it has no .config)")
    if getattr(config, "is_encoder_decoder", False) or not _is_causal_lm_class(cls):
        raise UnsupportedModelError(
            f"{cls} is not a decoder-only causal LM; inheritune needs a *ForCausalLM model "
            f"(tested families: {', '.join(SUPPORTED)})"
        )
    if config.model_type == "opt" and getattr(
        get_module(model, "model.decoder"), "project_in", None
    ):
        raise UnsupportedModelError(
            f"{cls}: OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported"
        )
    layout = _layout(model)
    head = model.get_output_embeddings()
    return Arch(
        model,
        layout,
        embed=get_module(model, layout.embed),
        pos_embed=get_module(model, layout.pos_embed) if layout.pos_embed else None,
        layers=get_module(model, layout.layers),
        final_norm=get_module(model, layout.final_norm),
        head=head,
    )


def _layout(model: nn.Module) -> Layout:
    """The fast-path row when it fits the model, else the discovered (and cached) layout."""
    fast = LAYOUTS.get(model.config.model_type)
    if fast is not None and _fits(model, fast):
        return fast
    if model not in _DISCOVERED:
        _DISCOVERED[model] = discover_layout(model)
    layout = _DISCOVERED[model]
    if not _fits(model, layout):  # the model was restructured since: walk it again
        layout = _DISCOVERED[model] = discover_layout(model)
    return layout


def _fits(model: nn.Module, layout: Layout) -> bool:
    try:
        paths = [layout.layers, layout.embed, layout.final_norm, layout.pos_embed]
        mods = [get_module(model, p) for p in paths if p]
        get_module(mods[0][0], layout.attn)
    except (AttributeError, IndexError, TypeError):
        return False
    n = _depth(model.config)
    return (
        isinstance(mods[0], nn.ModuleList)
        and (n is None or len(mods[0]) == n)
        and model.get_output_embeddings() is not None
    )


def discover_layout(model: nn.Module) -> Layout:
    """Find the parts of a causal LM by walking its modules (no per-family knowledge).

    * blocks: the ``nn.ModuleList`` of ``num_hidden_layers`` modules of one class (the one
      holding the most parameters if there are several);
    * token embeddings / head: ``get_input_embeddings()`` / ``get_output_embeddings()``;
    * position embeddings: the one other ``nn.Embedding`` outside the blocks, if any;
    * final norm: the norm beside the block list; where there are several (Bloom normalises the
      embeddings too), the one a forward pass runs after the last block;
    * attention / MLP of a block: its child whose class name says Attention / MLP.
    """
    n = _depth(model.config)
    names = {id(m): name for name, m in model.named_modules()}
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and n and len(m) == n and len({type(b) for b in m}) == 1
    ]
    if not lists:
        raise _unsupported(model, f"found no list of num_hidden_layers={n} decoder blocks")

    def size(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    lists.sort(key=lambda item: -size(item[1]))
    if len(lists) > 1 and size(lists[0][1]) == size(lists[1][1]):
        raise _unsupported(
            model, f"cannot tell which of {[name for name, _ in lists]} holds the decoder blocks"
        )
    layers_path, layers = lists[0]
    in_blocks = {id(m) for m in layers.modules()}

    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or id(embed) not in names or head is None:
        raise _unsupported(model, "it has no input embeddings or no LM head")

    positions = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding) and m is not embed and id(m) not in in_blocks
    ]
    if len(positions) > 1:  # more than one extra table: only a "pos"-named one is positions
        positions = [p for p in positions if "pos" in p.rsplit(".", 1)[-1]]
        if len(positions) != 1:
            raise _unsupported(model, "it has several embedding tables besides the tokens")

    parent_path = layers_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path)
    norms = [
        (f"{parent_path}.{name}" if parent_path else name, m)
        for name, m in parent.named_children()
        if _is_norm(m)
    ]
    if len(norms) > 1:
        norms = _run_after_last_block(model, layers, norms)
    if len(norms) != 1:
        raise _unsupported(model, f"cannot find the final norm beside {layers_path}")

    block = layers[0]
    attn = _child(block, ("attention",), ("self_attn", "attn", "self_attention"))
    if attn is None:
        raise _unsupported(model, f"cannot find the attention of a {type(block).__name__} block")
    mlp = _child(block, ("mlp", "feedforward", "moe"), ("mlp", "feed_forward", "ffn"))
    # No single MLP module (OPT: fc1, fc2): the MLP is every other child that holds weights.
    rest = [
        name
        for name, c in block.named_children()
        if name != attn and not _is_norm(c) and any(True for _ in c.parameters())
    ]
    if mlp is None and not rest:
        raise _unsupported(model, f"cannot find the MLP of a {type(block).__name__} block")
    return Layout(
        layers=layers_path,
        embed=names[id(embed)],
        final_norm=norms[0][0],
        pos_embed=positions[0] if positions else None,
        attn=attn,
        mlp=mlp or rest[0],
        mlp_extra=() if mlp else tuple(rest[1:]),
    )


def _child(block: nn.Module, kinds: tuple[str, ...], names: tuple[str, ...]) -> str | None:
    """Name of the one child of ``block`` whose class name contains one of ``kinds`` (else the
    one child with one of the usual ``names``); None if there is no single such child."""
    children = list(block.named_children())
    found = [n for n, c in children if any(k in type(c).__name__.lower() for k in kinds)]
    if len(found) != 1:
        found = [n for n, _ in children if n in names]
    return found[0] if len(found) == 1 else None


@torch.no_grad()
def _run_after_last_block(model: nn.Module, layers: nn.ModuleList, norms: list) -> list:
    """The entries of ``norms`` whose module a forward pass runs after the last block."""
    order: list[int] = []
    mods = [layers[-1], *(m for _, m in norms)]
    hooks = [m.register_forward_hook(lambda *_, i=i: order.append(i)) for i, m in enumerate(mods)]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        ids = torch.zeros((1, 2), dtype=torch.long, device=device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except Exception as e:  # a model we cannot run cannot be told apart this way
        raise _unsupported(
            model, f"a probe forward to find the final norm failed ({type(e).__name__}: {e})"
        ) from e
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    last = max((k for k, i in enumerate(order) if i == 0), default=len(order))
    return [norms[i - 1] for i in dict.fromkeys(order[last + 1 :])]


@torch.no_grad()
def _probe_plain_head(model: nn.Module, head: nn.Module) -> bool:
    """Two tokens through ``base_model`` and then through the model with the head's output
    replaced by a marker.

    Plain means the head received exactly the base model's last hidden state and the model
    returned exactly the head's (marker) logits. The marker spans +-100 so that a softcap or any
    rescaling visibly changes it, whatever the model's weights. A model that cannot be run (meta
    tensors) counts as not plain: the unfused loss is always correct.
    """
    if model.base_model is model:
        return False
    seen: dict[str, torch.Tensor] = {}

    def on_head_in(_m, args):
        seen["head_in"] = args[0]  # (B, T, D)

    def on_head_out(_m, _args, out):
        span = torch.linspace(-100.0, 100.0, out.numel(), device=out.device)
        seen["logits"] = span.view_as(out).to(out.dtype)  # (B, T, V)
        return seen["logits"]

    was_training = model.training
    hooks = []
    try:
        model.eval()
        ids = torch.zeros((1, 2), dtype=torch.long, device=next(model.parameters()).device)
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
        hidden = model.base_model(**kw).last_hidden_state
        hooks = [
            head.register_forward_pre_hook(on_head_in),
            head.register_forward_hook(on_head_out),
        ]
        logits = model(**kw).logits
    except Exception:
        return False
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return (
        "head_in" in seen
        and torch.equal(seen["head_in"], hidden)
        and torch.equal(logits, seen["logits"].to(logits.dtype))
    )


LAYER_NUMBERING = "0-based (paper plots number from 1)"
