"""A Hugging Face checkpoint as one GGUF file that llama.cpp (and Ollama) load.

Built on the ``gguf`` package (llama.cpp's own Python library): its :class:`gguf.GGUFWriter`,
its tensor-name map (:func:`gguf.get_tensor_name_map`), its quantiser and its
:class:`gguf.SpecialVocab` (special tokens, merges, chat template). What is ours is the mapping
from a model's config to llama.cpp's hyper-parameters, the tensor layouts llama.cpp expects, and
the checks. Written layouts (:data:`LAYOUTS`):

* ``LlamaForCausalLM`` and ``MistralForCausalLM`` as llama.cpp's ``llama``: the query and key
  projections are reordered from the Hugging Face rotary layout (first half / second half of
  each head) to the interleaved pairs llama.cpp rotates;
* ``Qwen2ForCausalLM`` (``qwen2``, with its q/k/v biases) and ``Qwen3ForCausalLM`` (``qwen3``,
  with its per-head q/k norms): NeoX rotary, written as is;
* ``GPT2LMHeadModel`` (``gpt2``): Conv1D weights transposed to (out, in), the head written out.

Any other class is refused by name, as are settings llama.cpp would read differently (rope
scaling, a tokenizer that is not byte-level BPE, a pre-tokenizer it would not recognise). The
tokenizer travels as llama.cpp's ``gpt2`` (byte-level BPE) model: every token with its type, the
merges, the special tokens, ``add_bos``, the chat template, and the pre-tokenizer's name.

``--outtype``: ``f32``; ``f16``/``bf16`` (matrices; norms and biases stay f32, as llama.cpp
writes them); ``q8_0`` (matrices whose rows split into 32-value blocks, the rest f16). The file
is written beside its destination under a temporary name and renamed into place only when
complete: a failed write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inheritune.config import ConfigError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class Layout:
    arch: str  # llama.cpp's architecture name
    rope: str | None  # "interleave": Q/K reordered for llama.cpp's rotation; "neox": as is
    transpose: tuple[str, ...] = ()  # tensor name suffixes stored (in, out) (GPT-2's Conv1D)


LAYOUTS = {
    "LlamaForCausalLM": Layout("llama", "interleave"),
    "MistralForCausalLM": Layout("llama", "interleave"),
    "Qwen2ForCausalLM": Layout("qwen2", "neox"),
    "Qwen3ForCausalLM": Layout("qwen3", "neox"),
    "GPT2LMHeadModel": Layout(
        "gpt2",
        None,
        ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
    ),
}

# Byte-level BPE pre-tokenizers llama.cpp knows, by what tokenizer.json says (its name for each).
_SPLIT_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_LLAMA3 = _SPLIT_QWEN2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


class ExportError(ConfigError):
    """A model or tokenizer this exporter will not write (one line, exit status 2)."""


# --------------------------------------------------------------------------- the tokenizer


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer in ``tokenizer.json``, or ExportError."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        known = {_SPLIT_QWEN2: "qwen2", _SPLIT_LLAMA3: "llama-bpe"}
        if regex in known:
            return known[regex]
    raise ExportError(
        f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one "
        "llama.cpp is known to apply alike (GPT-2, SmolLM, Qwen2, Llama 3): not exported"
    )


def tokenizer_entries(folder: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """Every token (by id, padded to the embedding's ``vocab_size``), its llama.cpp token type
    and the pre-tokenizer's name, from ``folder/tokenizer.json``."""
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{folder} has no tokenizer.json: the GGUF file needs the tokenizer")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style (byte-fallback) BPE" if model.get("byte_fallback") else None
        raise ExportError(
            f"the tokenizer is {kind or model.get('type')}, not byte-level BPE: not exported yet"
        )
    pre = pre_tokenizer_name(tj)
    tokens: dict[int, tuple[str, int]] = {
        int(i): (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()
    }
    for added in tj.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        tokens[int(added["id"])] = (added["content"], kind)
    if max(tokens) >= vocab_size:
        raise ExportError(
            f"the tokenizer has token id {max(tokens)} but the model's embedding only "
            f"{vocab_size} rows"
        )
    texts, types = [], []
    for i in range(vocab_size):  # ids the tokenizer never produces: unused padding entries
        text, kind = tokens.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        texts.append(text)
        types.append(int(kind))
    return texts, types, pre


# --------------------------------------------------------------------------- the tensors


def _interleave_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query/key projection (heads * head_dim, ...) from the Hugging Face rotary
    layout (each head: its first halves, then its second halves) to llama.cpp's (pairs)."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(name: str, w: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """The array and GGML type ``name`` is stored as."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if outtype == "f32" or w.ndim < 2:  # norms and biases stay f32
        return w.astype(np.float32), Q.F32
    if outtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
        if w.shape[-1] % block == 0:
            return gguf.quants.quantize(w.astype(np.float32), Q.Q8_0), Q.Q8_0
        return w.astype(np.float16), Q.F16
    if outtype == "bf16":
        return gguf.quants.quantize(w.astype(np.float32), Q.BF16), Q.BF16
    return w.astype(np.float16), Q.F16


def gguf_tensors(model: torch.nn.Module, layout: Layout) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) of every weight llama.cpp reads, in its layout."""
    import gguf

    cfg = model.config
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == layout.arch)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    out, seen = [], set()
    for hf_name, t in model.state_dict().items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # GPT-2's causal-mask buffers, rotary caches: not weights
        if t.data_ptr() in seen and hf_name == "lm_head.weight" and layout.arch != "gpt2":
            continue  # a tied head: llama.cpp reads the token embedding
        seen.add(t.data_ptr())
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for the tensor {hf_name!r} of {layout.arch}")
        w = t.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith(layout.transpose):
            w = np.ascontiguousarray(w.T)
        if layout.rope == "interleave" and hf_name.endswith("self_attn.q_proj.weight"):
            w = _interleave_rope(w, heads)
        elif layout.rope == "interleave" and hf_name.endswith("self_attn.k_proj.weight"):
            w = _interleave_rope(w, kv_heads)
        out.append((name, w))
    if layout.arch == "gpt2" and not any(n == "output.weight" for n, _ in out):
        wte = next(w for n, w in out if n == "token_embd.weight")
        out.append(("output.weight", wte))
    return out


# --------------------------------------------------------------------------- the file


def check_exportable(config: Any) -> Layout:
    """The layout of a model with this config, or ExportError naming why not."""
    archs = list(getattr(config, "architectures", None) or [])
    cls = archs[0] if archs else type(config).__name__
    if cls not in LAYOUTS:
        raise ExportError(
            f"{cls} is not a layout the GGUF export writes (it writes {', '.join(sorted(LAYOUTS))})"
        )
    scaling = getattr(config, "rope_scaling", None)
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise ExportError(f"rope scaling {scaling!r} is not exported yet")
    if getattr(config, "use_sliding_window", False):
        raise ExportError("a sliding-window attention config is not exported yet")
    return LAYOUTS[cls]


def rope_theta(cfg: Any) -> float:
    """The rotary base, wherever this transformers version keeps it."""
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    if theta is None:
        raise ExportError(f"{type(cfg).__name__} states no rope_theta")
    return float(theta)


def _hyper_parameters(writer: Any, cfg: Any, layout: Layout) -> None:
    if layout.arch == "gpt2":
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(cfg))
    writer.add_rope_dimension_count(head_dim)
    if layout.arch == "qwen3" or head_dim * heads != cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def write_gguf(folder: str | Path, out: str | Path, outtype: str = "f16", force: bool = False):
    """Write the checkpoint in ``folder`` (a Hugging Face folder with its tokenizer) to ``out``;
    returns ``out``'s path. Nothing is written when a check fails, and a failed write leaves
    no file behind."""
    import gguf

    from inheritune.models import loading as models

    folder, out = Path(folder), Path(out)
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to overwrite it")
    if out.is_dir():
        raise ExportError(f"{out} is a folder, not a file name")
    config = models.load_config(str(folder))
    layout = check_exportable(config)
    texts, types, pre = tokenizer_entries(folder, int(config.vocab_size))
    model = models.load_model(str(folder))
    tensors = gguf_tensors(model, layout)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, layout.arch)
        writer.add_name(folder.resolve().name)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_vocab_size(int(config.vocab_size))
        _hyper_parameters(writer, config, layout)
        file_type = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[outtype]
        writer.add_file_type(file_type)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(texts)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(texts))
        special.add_to_gguf(writer, quiet=True)
        for name, w in tensors:
            data, qtype = _encode(name, w, outtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except OSError as e:  # a full disk, a vanished folder: one line, and no file left behind
        raise ExportError(f"writing {out} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
