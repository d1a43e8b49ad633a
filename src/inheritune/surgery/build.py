"""Model surgery: build smaller models out of a pretrained reference, as pure functions.

Every function here takes a Hugging Face causal LM (or its config) and returns a NEW model; the
reference is never modified. A new model is always made the same way (:func:`_build`): copy and
resize the config, construct a fresh model from it, and load a remapped state dict with strict
key and shape checks, so a model built here is exactly what ``from_pretrained`` would give for
the same weights.

* :func:`select_layers` / :func:`first_layers` -- Inheritune's target (paper Alg. 1, step 1):
  token and position embeddings, the chosen blocks in order, the final norm and the LM head
  (weight tying kept). ``parts`` is the paper's sub-module ablation (attention only, MLP only,
  attention + MLP); ``allow_repeats`` gives (hybrid) stacking.
* :func:`drop_layers` -- the complement of a selection (layer pruning baselines).
* :func:`random_init` -- the same architecture with fresh weights at any depth.
* :func:`fresh_parts` -- re-initialise the embeddings, position embeddings, final norm or head
  (what the official code leaves fresh, docs/design/paper.md §2).
* :func:`half_width` -- all layers at half hidden size / heads / MLP width, sliced weights.

The ``inheritune inherit`` command that saves such a target is :mod:`inheritune.surgery.inherit`.

Usage::

    ref = models.load_model("smollm2-135m")
    target = first_layers(ref, 15)                 # layers 0..14
    ablation = select_layers(ref, range(15), parts="attn")
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from inheritune.analysis.selection import check_indices
from inheritune.config import ConfigError
from inheritune.models.arch import UnsupportedModelError, get_arch

PARTS = ("block", "attn", "mlp", "attn+mlp")
# Which block parts each --parts choice inherits; the rest of a kept block is freshly initialised.
_INHERITED = {
    "block": {"attn", "mlp", "other"},
    "attn": {"attn"},
    "mlp": {"mlp"},
    "attn+mlp": {"attn", "mlp"},
}
# Any config list as long as the depth holds one value per layer (``layer_types``,
# ``no_rope_layers``, ...) -- except these, which only happen to have that length.
_NOT_PER_LAYER = frozenset({"architectures", "bad_words_ids", "forced_decoder_ids"})
# Config entries listing layer indices (Qwen2-MoE: dense-MLP layers): remapped to new positions.
_LAYER_INDEX_LISTS = frozenset({"mlp_only_layers"})
# Config thresholds "layers with index < t are special" (Qwen2: layers >= max_window_layers use
# sliding-window attention; DeepSeek: the first k layers are dense).
_LAYER_THRESHOLDS = frozenset({"max_window_layers", "first_k_dense_replace"})
# Width fields that half_width halves (family spellings); None-valued ones are derived.
_WIDTH_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "word_embed_proj_dim")
# Fused q|k|v projections laid out as three consecutive blocks along the last dim (GPT-2 Conv1D).
# GPT-NeoX's query_key_value is interleaved per head instead, so a plain prefix slice is right.
_FUSED_QKV = {"gpt2": re.compile(r"\.attn\.c_attn\.(weight|bias)$")}
# Families whose weight layouts half_width knows how to slice (tested in tests/surgery/test_build.py).
_HALF_WIDTH = ("gpt2", "llama", "qwen2", "mistral", "gpt_neox", "opt")


# --------------------------------------------------------------------------- selections


def check_depth(k: int, num_layers: int) -> None:
    """Raise unless 1 <= k <= num_layers, naming the reference depth."""
    if k < 1:
        raise ConfigError(f"--num-layers must be >= 1, got {k}")
    if k > num_layers:
        raise ConfigError(
            f"--num-layers {k} exceeds the reference's {num_layers} layers (choose 1-{num_layers})"
        )


# --------------------------------------------------------------------------- config resizing


def _num_layers(config) -> int:
    return int(config.num_hidden_layers)  # gpt2's n_layer through its attribute_map


def resize_config(config, indices: Sequence[int]):
    """A copy of ``config`` whose layer j is the reference's layer ``indices[j]``.

    Sets the depth and re-sizes every per-layer entry: any list as long as the depth is taken
    to hold one value per layer and gathered (token-id lists excepted), lists of layer indices
    are renumbered, and "first t layers" thresholds become the number of kept layers below t.
    (Attention modules' ``layer_idx`` is renumbered by :func:`select_layers`.)
    """
    old_n, new = _num_layers(config), copy.deepcopy(config)
    new.num_hidden_layers = len(indices)
    for key, value in vars(config).items():
        if key.startswith("_") or not isinstance(value, list | tuple):
            continue
        if key in _LAYER_INDEX_LISTS:
            setattr(new, key, [j for j, i in enumerate(indices) if i in set(value)])
        elif len(value) == old_n and key not in _NOT_PER_LAYER and "token" not in key:
            setattr(new, key, type(value)(value[i] for i in indices))
    for key in _LAYER_THRESHOLDS:
        t = getattr(config, key, None)
        if isinstance(t, int) and not isinstance(t, bool):
            below = [i < t for i in indices]
            # Only a selection whose "below t" layers come first keeps threshold semantics; for
            # Qwen2 the explicit layer_types list (resized above) is what the model reads anyway.
            if below != sorted(below, reverse=True) and not hasattr(config, "layer_types"):
                raise ConfigError(
                    f"--layers: this selection mixes layers below and above {key}={t}, which "
                    f"the config cannot express; keep the layers in order"
                )
            setattr(new, key, sum(below))
    return new


# --------------------------------------------------------------------------- the one builder


def _build(
    config,
    state: dict[str, torch.Tensor],
    *,
    fresh: frozenset[str] = frozenset(),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    like: nn.Module | None = None,
) -> nn.Module:
    """Fresh model from ``config`` loaded with ``state``; the keys in ``fresh`` stay as initialised.

    Strict: every key of the new model must come from ``state`` or be named in ``fresh``, and
    every tensor must have the new model's shape. Tensors are copied, so nothing is shared with
    ``state``'s owner. ``like`` passes its generation config on.
    """
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=config._attn_implementation
        )
    target = model.state_dict()
    unexpected = sorted(set(state) - set(target))
    missing = sorted(set(target) - set(state) - fresh)
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in target.items()
        if k in state and state[k].shape != v.shape
    ]
    if unexpected or missing or wrong:
        raise UnsupportedModelError(
            f"surgery on {type(model).__name__} produced a state dict that does not fit the new "
            f"model: missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches "
            f"{wrong[:5]}"
        )
    model.load_state_dict({**target, **state}, strict=True)  # copies into the new parameters
    if like is not None and getattr(like, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(like.generation_config)
    return model.eval()


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


# --------------------------------------------------------------------------- layer surgery


def select_layers(
    model: nn.Module,
    indices: Sequence[int],
    parts: str = "block",
    allow_repeats: bool = False,
    seed: int = 0,
) -> nn.Module:
    """A new model of the reference's embeddings, blocks ``indices`` (in order), final norm, head.

    ``parts`` picks what a kept block inherits (the rest is initialised by the model's own
    ``_init_weights`` under ``seed``): ``block`` everything, ``attn`` / ``mlp`` only that
    sub-module, ``attn+mlp`` both but not the norms. ``allow_repeats`` permits stacking
    (``[0, 1, 0, 1]``); each copy is an independent parameter.
    """
    if parts not in PARTS:
        raise ConfigError(f"--parts must be one of {', '.join(PARTS)}, got {parts!r}")
    arch = get_arch(model)
    indices = check_indices(indices, arch.num_layers, allow_repeats)
    if _gpt2_scales_by_layer(model.config) and any(i != j for j, i in enumerate(indices)):
        warnings.warn(
            "this GPT-2 config has scale_attn_by_inverse_layer_idx=True: a block moved to a new "
            "position attends with that position's scale, not its original one",
            stacklevel=2,
        )
    prefix = arch.layout.layers + "."
    state, fresh = {}, set()
    for key, tensor in model.state_dict().items():
        if not key.startswith(prefix):
            state[key] = tensor
            continue
        i, rest = key[len(prefix) :].split(".", 1)
        for j in (j for j, src in enumerate(indices) if src == int(i)):
            if parts == "block" or _part(arch, model, int(i), rest) in _INHERITED[parts]:
                state[f"{prefix}{j}.{rest}"] = tensor
            else:
                fresh.add(f"{prefix}{j}.{rest}")
    config = resize_config(model.config, indices)
    new = _build(config, state, fresh=frozenset(fresh), seed=seed, dtype=_dtype(model), like=model)
    _renumber_layer_idx(new)
    return new


def _renumber_layer_idx(model: nn.Module) -> None:
    """Set ``layer_idx`` (KV caches index layers by it) of every module in block j to j.

    Families build their blocks with ``layer_idx=i``, so a fresh model already counts 0..K-1;
    this makes it hold for any family, whatever module keeps the index.
    """
    for j, block in enumerate(get_arch(model).layers):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = j


def _part(arch, model: nn.Module, i: int, name: str) -> str:
    """Block part of parameter ``name`` of block ``i``; anything not attn/mlp must be a norm."""
    part = arch.block_part(name)
    if part == "other":
        owner = arch.layers[i].get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
        if owner is None or "norm" not in type(owner).__name__.lower():
            raise UnsupportedModelError(
                f"{type(model).__name__}: cannot tell whether {name!r} of a block belongs to the "
                f"attention, the MLP or a norm"
            )
    return part


def _gpt2_scales_by_layer(config) -> bool:
    return config.model_type == "gpt2" and bool(
        getattr(config, "scale_attn_by_inverse_layer_idx", False)
    )


def first_layers(model: nn.Module, k: int, parts: str = "block", seed: int = 0) -> nn.Module:
    """Inheritune's target: the reference's first ``k`` blocks (plus embeddings, norm, head)."""
    check_depth(k, get_arch(model).num_layers)
    return select_layers(model, range(k), parts=parts, seed=seed)


def drop_layers(model: nn.Module, drop: Sequence[int]) -> nn.Module:
    """The reference without blocks ``drop``; the others keep their order."""
    n = get_arch(model).num_layers
    gone = set(check_indices(drop, n, what="drop")) if len(drop) else set()
    keep = [i for i in range(n) if i not in gone]
    if not keep:
        raise ConfigError(f"drop: dropping all {n} layers leaves no model")
    return select_layers(model, keep)


def random_init(
    config, num_layers: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The same architecture with fresh random weights, ``num_layers`` deep (default: same).

    Per-layer config lists follow the reference's first layers; a deeper model repeats them
    cyclically (an alternating local/global pattern stays alternating).
    """
    n = _num_layers(config)
    k = n if num_layers is None else num_layers
    if k < 1:
        raise ConfigError(f"--num-layers must be >= 1, got {k}")
    from transformers import AutoModelForCausalLM

    new = resize_config(config, [i % n for i in range(k)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            new, dtype=dtype, attn_implementation=new._attn_implementation
        )
    return model.eval()


# --------------------------------------------------------------------------- fresh parts

# Non-block parts that ``--fresh`` can re-initialise instead of inheriting.
FRESH_PARTS = ("pos_embed", "final_norm", "embed", "head")


def parse_fresh(parts: str | Sequence[str] | None) -> list[str]:
    """``"pos_embed,final_norm"`` or a list -> validated, de-duplicated, in FRESH_PARTS order."""
    items = parts.split(",") if isinstance(parts, str) else list(parts or [])
    names = {str(p).strip() for p in items if str(p).strip()}
    bad = sorted(names - set(FRESH_PARTS))
    if bad:
        raise ConfigError(
            f"--fresh: unknown part(s) {bad}; choose from {', '.join(FRESH_PARTS)} (comma list)"
        )
    return [p for p in FRESH_PARTS if p in names]


def fresh_parts(model: nn.Module, parts: str | Sequence[str], seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose named non-block ``parts`` are freshly initialised.

    ``parts`` from :data:`FRESH_PARTS`: ``pos_embed`` (learned position embeddings; families with
    rotary ones have none and are refused), ``final_norm``, ``embed`` (token embeddings),
    ``head`` (LM head). Fresh values are the model's own ``_init_weights`` under ``seed``, as in
    a model built from its config. With tied embeddings the head IS the token embedding matrix:
    ``embed`` or ``head`` then re-initialises that one shared matrix (and the tie is kept). So
    the official GPT-2 scripts' start (they inherit lm_head, hence wte through tying) is
    ``pos_embed,final_norm``; their OpenLLaMA start (untied) is ``embed,final_norm``.
    """
    names = parse_fresh(parts)
    arch = get_arch(model)
    modules = {
        "pos_embed": arch.pos_embed,
        "final_norm": arch.final_norm,
        "embed": arch.embed,
        "head": arch.head,
    }
    cls = type(model).__name__
    for name in names:
        if modules[name] is None:
            what = "learned position embeddings" if name == "pos_embed" else "a final norm"
            raise ConfigError(f"--fresh {name}: {cls} has no {what} to re-initialise")
    if arch.tied and {"embed", "head"} & set(names):
        names = sorted({*names, "embed", "head"}, key=FRESH_PARTS.index)
    path = {id(m): n for n, m in model.named_modules()}
    fresh = {
        f"{path[id(modules[name])]}.{key}" for name in names for key in modules[name].state_dict()
    }
    state = {k: v for k, v in model.state_dict().items() if k not in fresh}
    new = _build(
        model.config, state, fresh=frozenset(fresh), seed=seed, dtype=_dtype(model), like=model
    )
    _renumber_layer_idx(new)
    return new


# --------------------------------------------------------------------------- half width


def half_width(model: nn.Module) -> nn.Module:
    """All layers at half hidden size, half heads (query and KV) and half MLP width.

    Each tensor is the leading slice of the reference's (first half of every halved dimension),
    which for per-head projections means the first half of the heads; query head h still reads
    KV head h // (heads / kv_heads). Head size is unchanged.
    """
    get_arch(model)  # a clear error for anything but a causal LM
    config = model.config
    if config.model_type not in _HALF_WIDTH:
        raise UnsupportedModelError(
            f"half_width knows the weight layouts of {', '.join(_HALF_WIDTH)}; "
            f"{type(model).__name__} (model_type={config.model_type!r}) is not one of them"
        )
    new = _half_config(config)
    fused = _FUSED_QKV.get(config.model_type)
    ref = model.state_dict()
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(new).state_dict().items()}
    state = {}
    for key, shape in shapes.items():
        src = ref[key]
        if any(s not in (n, 2 * n) for s, n in zip(src.shape, shape, strict=True)):
            raise UnsupportedModelError(f"half_width: cannot slice {key} {src.shape} to {shape}")
        if fused is not None and fused.search(key):
            q, k, v = src.chunk(3, dim=-1)
            state[key] = torch.cat([_lead(t, (*shape[:-1], shape[-1] // 3)) for t in (q, k, v)], -1)
        else:
            state[key] = _lead(src, shape)
    return _build(new, state, dtype=_dtype(model), like=model)


def _lead(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return t[tuple(slice(0, n) for n in shape)]


def _half_config(config):
    """Copy of ``config`` at half width; ConfigError when a width does not halve evenly."""
    new = copy.deepcopy(config)
    fields = ["hidden_size", "num_attention_heads", "num_key_value_heads", *_WIDTH_FIELDS]
    for name in fields:
        value = getattr(config, name, None)
        if not isinstance(value, int):
            continue  # absent, or None = derived from hidden_size
        if value % 2:
            raise ConfigError(
                f"half_width needs even widths, but {type(config).__name__} has {name}={value}"
            )
        setattr(new, name, value // 2)
    return new
