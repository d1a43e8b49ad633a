"""One adapter over Hugging Face decoder LMs: where the pieces the recipe needs live.

:func:`get_arch` finds, for any supported causal LM, the token embeddings, the position
embeddings (learned ones, if the model has them), the list of decoder blocks, the final norm and
the LM head. Everything else in inheritune (analysis hooks, surgery, baselines) goes through it,
so supporting a new family means adding one row to :data:`LAYOUTS`.

Supported and tested on tiny random configs: GPT-2, Llama (SmolLM2), Qwen2, Mistral, GPT-NeoX,
OPT. Families with the Llama layout (Qwen3, Gemma, Phi-3, OLMo, ...) usually work through the
``model.layers`` row too.
"""

from __future__ import annotations

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


# model_type -> layout. The Llama row is the default for model types not listed.
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
    "llama": Layout("model.layers", "model.embed_tokens", "model.norm"),
}
SUPPORTED = ("gpt2", "llama", "qwen2", "mistral", "gpt_neox", "opt")


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
    final_norm: nn.Module | None
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


def layout_for(config) -> Layout:
    return LAYOUTS.get(config.model_type, LAYOUTS["llama"])


def _is_causal_lm_class(cls: str) -> bool:
    """``*ForCausalLM``, or a class transformers lists as a causal LM (GPT-2's LMHeadModel)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return cls.endswith("ForCausalLM") or cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def get_arch(model: nn.Module) -> Arch:
    """The :class:`Arch` of a causal LM; a clear error naming the class otherwise."""
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{cls} is not a Hugging Face model (it has no .config)")
    if getattr(config, "is_encoder_decoder", False) or not _is_causal_lm_class(cls):
        raise UnsupportedModelError(
            f"{cls} is not a decoder-only causal LM; inheritune needs a *ForCausalLM model "
            f"(supported families: {', '.join(SUPPORTED)})"
        )
    layout = layout_for(config)
    try:
        layers = get_module(model, layout.layers)
        embed = get_module(model, layout.embed)
        final_norm = get_module(model, layout.final_norm)
        pos = get_module(model, layout.pos_embed) if layout.pos_embed else None
    except AttributeError as e:
        raise UnsupportedModelError(
            f"{cls} (model_type={config.model_type!r}) does not have the expected layout "
            f"({e}); supported families: {', '.join(SUPPORTED)}"
        ) from e
    head = model.get_output_embeddings()
    if not isinstance(layers, nn.ModuleList) or head is None:
        raise UnsupportedModelError(f"{cls}: could not find its decoder blocks or LM head")
    if config.model_type == "opt" and getattr(
        get_module(model, "model.decoder"), "project_in", None
    ):
        raise UnsupportedModelError(
            f"{cls}: OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported"
        )
    return Arch(model, layout, embed, pos, layers, final_norm, head)


@torch.no_grad()
def hidden_after_blocks(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states entering each block and leaving the last one: L + 1 tensors (B, T, D)."""
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    return list(out.hidden_states)
