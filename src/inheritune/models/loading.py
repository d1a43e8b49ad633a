"""Turn a ``--model`` argument into a loaded Hugging Face causal LM and its tokenizer.

A model argument is one of:

* a default name (``smollm2-135m``), prepared from packages by :mod:`inheritune.models.assets`;
* a local Hugging Face folder (``config.json`` plus safetensors), including folders this tool
  wrote;
* a ``.gguf`` file, de-quantised on load;
* a hub id (``gpt2``, ``Qwen/Qwen2-0.5B``) for users who have a hub; offline this fails with a
  message saying what to use instead.

:func:`load_config`, :func:`load_tokenizer` and :func:`load_model` are the only ways inheritune
reads a model argument, and each checks its input before use: a ``config.json`` that is not a
JSON object, a ``.gguf`` that is not GGUF or is truncated, a safetensors file that is truncated
or corrupt (read from its header, :func:`weight_shapes`), an index naming shards or tensors that
are not there, and weights that do not fit the config (missing, extra or wrongly shaped tensors;
transformers would initialise missing ones randomly and carry on) all raise
:class:`ModelLoadError`, one line naming the path and what is wrong.

Weights are only ever read from safetensors (or GGUF), never through pickle, and
``trust_remote_code`` stays off unless asked for. :func:`check_context` refuses a ``--seq-len``
longer than the model's context before any data is loaded.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from inheritune.models import assets

DEFAULT_MODELS = {assets.DEFAULT_MODEL: assets.ensure_default_model}
WEIGHTS = "model.safetensors"  # the names transformers reads: one file, or shards + index
WEIGHTS_INDEX = "model.safetensors.index.json"
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what the gguf reader transformers uses understands


class ModelLoadError(ValueError):
    """The model argument does not name a loadable causal LM."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: a folder (``gguf_file`` set for GGUF) or a hub id."""

    location: str
    gguf_file: str | None = None
    is_local: bool = True

    @property
    def name(self) -> str:
        return Path(self.location).name if self.is_local else self.location

    @property
    def path(self) -> Path:
        """The folder, or the .gguf file itself."""
        return Path(self.location) / self.gguf_file if self.gguf_file else Path(self.location)


def resolve_model(arg: str) -> ModelSource:
    """Classify a model argument, preparing embedded defaults; raises :class:`ModelLoadError`."""
    if arg in DEFAULT_MODELS:
        return ModelSource(str(DEFAULT_MODELS[arg]()))
    path = Path(arg).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a model folder: it has no config.json. Pass a Hugging Face folder "
                f"(config.json + *.safetensors), a .gguf file, or one of {sorted(DEFAULT_MODELS)}."
            )
        if not (path / WEIGHTS).is_file() and not (path / WEIGHTS_INDEX).is_file():
            pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            hint = f" It has {pickled}; inheritune never loads pickled weights." if pickled else ""
            others = sorted(p.name for p in path.glob("*.safetensors"))
            if others and not pickled:
                hint = f" It has {others}, which are not a model's weights."
            raise ModelLoadError(
                f"{path} has no *.safetensors weights ({WEIGHTS} or {WEIGHTS_INDEX}).{hint}"
            )
        return ModelSource(str(path))
    if path.is_file():
        if path.suffix == ".gguf":
            _check_gguf_header(path)
            return ModelSource(str(path.parent), gguf_file=path.name)
        raise ModelLoadError(
            f"{path} is a file but not a .gguf; pass its folder (with config.json) instead."
        )
    # A hub id is "name" or "org/name"; anything else that does not exist is a bad path.
    if arg.startswith((".", "/", "~")) or arg.count("/") > 1 or arg.endswith(".gguf"):
        raise ModelLoadError(
            f"no such model folder or file: {arg}. Known names: {sorted(DEFAULT_MODELS)}"
        )
    return ModelSource(arg, is_local=False)


def _check_gguf_header(path: Path) -> None:
    """The first 8 bytes: magic and a version the reader handles (cheap; the rest is checked on
    load, where a truncated file makes the reader fail)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file: it does not start with {GGUF_MAGIC!r}")
    (version,) = struct.unpack("<I", head[4:])
    if version not in GGUF_VERSIONS:
        raise ModelLoadError(
            f"{path} is not a readable GGUF file: version {version}, expected one of "
            f"{list(GGUF_VERSIONS)} (corrupt, or written by a newer tool)"
        )


def _reason(err: BaseException) -> str:
    """An exception as one line: libraries' messages span lines and tables."""
    text = " ".join(str(err).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _hub_error(arg: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {arg!r} from the Hugging Face hub ({_reason(err)}). "
        f"If this machine is offline, download the model elsewhere and pass its local folder, "
        f"pass a .gguf file, or use the embedded default {assets.DEFAULT_MODEL!r}."
    )


def _load_error(arg: str, src: ModelSource, what: str, err: Exception) -> ModelLoadError:
    """Any failure reading a local model is a fault of that input: say which file and why."""
    if not src.is_local:
        return _hub_error(arg, err)
    if src.gguf_file:
        return ModelLoadError(
            f"cannot read the {what} of {src.path}: it is truncated or corrupt ({_reason(err)})"
        )
    return ModelLoadError(f"cannot load the {what} in {src.path}: {_reason(err)}")


def _check_config_json(folder: Path) -> None:
    """A config.json that is not a JSON object gets its own message (transformers' is vague)."""
    path = folder / "config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({_reason(e)})") from e
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {_reason(e)}") from e
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(value).__name__}")


def load_config(arg: str, trust_remote_code: bool = False):
    """The model's transformers config; raises :class:`ModelLoadError`.

    No weights are read, but a folder's safetensors headers are checked against the config
    (:func:`check_weight_files`), so every command refuses bad weights at its first, cheap step.
    """
    from transformers import AutoConfig

    src = resolve_model(arg)
    if src.is_local and not src.gguf_file:
        _check_config_json(src.path)
    try:
        if src.gguf_file:
            config = AutoConfig.from_pretrained(src.location, gguf_file=src.gguf_file)
        else:
            config = AutoConfig.from_pretrained(src.location, trust_remote_code=trust_remote_code)
    except Exception as e:  # gguf's reader raises struct.error on truncated files, and so on
        raise _load_error(arg, src, "config", e) from e
    if src.is_local and not src.gguf_file:
        check_weight_files(config, src.path, trust_remote_code)
    return config


# ----------------------------------------------------------------------------- weights


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from one safetensors header; the library checks the header and that
    the data it describes covers the file exactly (so truncation is caught without reading it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path} is truncated or corrupt ({_reason(e)})") from e


def weight_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a model folder's weights, read from headers only.

    Reads ``model.safetensors``, or every shard a ``model.safetensors.index.json`` names (each
    must exist and hold the tensors the index assigns to it). Raises :class:`ModelLoadError`.
    """
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX
    if not index.is_file():
        return _header_shapes(folder / WEIGHTS)
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{index} is not a safetensors index ({_reason(e)})") from e
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(set(weight_map.values())):
        path = folder / str(shard)
        if not path.is_file():
            raise ModelLoadError(f"{index} names the shard {shard}, which is not in {folder}")
        found = _header_shapes(path)
        absent = sorted(k for k, s in weight_map.items() if s == shard and k not in found)
        if absent:
            raise ModelLoadError(
                f"{path} lacks {len(absent)} tensor(s) the index assigns to it: {absent[:5]}"
            )
        shapes.update(found)
    return shapes


def _names(keys, limit: int = 5) -> str:
    keys = sorted(str(k) for k in keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _fit_problems(files: dict[str, tuple[int, ...]], model: torch.nn.Module) -> list[str]:
    """What is wrong between a folder's tensors (name -> shape, from the headers) and ``model``
    (a real or a meta-device instance of its config), as phrases; [] when they fit.

    Names are matched as they are, or with the model's base prefix added (older checkpoints
    omit it). Buffers and the class's ignore lists may be in the file or not, tied copies (the
    LM head sharing the embedding) may be absent. A file with both unknown names and missing
    parameters is ambiguous (a checkpoint using older names, which transformers renames on
    load); only the shapes are judged here then, and :func:`load_model` has the last word.
    """
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "")

    def own(name: str) -> str:
        return f"{prefix}.{name}" if name not in state and f"{prefix}.{name}" in state else name

    named = {own(k): s for k, s in files.items()}
    ignore = [*(model._keys_to_ignore_on_load_unexpected or ()), r"rotary_emb\.inv_freq$"]
    ignore += [r"(^|\.)position_ids$"]
    buffers = {n for n, _ in model.named_buffers()}
    unexpected = [
        k
        for k in named
        if k not in state and k not in buffers and not any(re.search(p, k) for p in ignore)
    ]
    params = dict(model.named_parameters(remove_duplicate=False))
    present = {id(params[k]) for k in named if k in params}
    optional = list(model._keys_to_ignore_on_load_missing or ())
    missing = [
        k
        for k, p in params.items()
        if id(p) not in present and not any(re.search(pat, k) for pat in optional)
    ]
    wrong = [(k, s, state[k]) for k, s in named.items() if k in state and s != state[k]]
    problems = []
    if wrong:
        problems.append(_wrong_shapes(wrong))
    if missing and unexpected:
        return problems
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing ({_names(missing)})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) the config has no place for ({_names(unexpected)})"
        )
    return problems


def _wrong_shapes(wrong: list) -> str:
    shapes = "; ".join(
        f"{k}: file {tuple(a)} vs config {tuple(b)}" for k, a, b in sorted(wrong, key=str)[:5]
    )
    return f"{len(wrong)} tensor(s) of the wrong shape ({shapes})"


def _refuse(where: Path, problems: list[str]) -> None:
    if problems:
        raise ModelLoadError(
            f"the weights in {where} do not fit its config.json: {'; '.join(problems)}. "
            f"Was the folder assembled from different models, or edited by hand?"
        )


def check_weight_files(config, folder: str | Path, trust_remote_code: bool = False) -> None:
    """Check a folder's weights against its config before anything is loaded.

    Reads only the safetensors headers (:func:`weight_shapes`) and compares them with an
    instance of the config on the meta device (no memory, no weights), so a truncated file or
    missing, extra or wrongly shaped tensors are refused before a command tokenises its data.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    files = weight_shapes(folder)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # not a causal LM config, or values the model code rejects
        raise ModelLoadError(
            f"{folder / 'config.json'} does not describe a causal LM transformers can build "
            f"({_reason(e)})"
        ) from e
    _refuse(folder, _fit_problems(files, skeleton))


def check_weights_fit(
    model: torch.nn.Module, where: Path, files: dict[str, tuple[int, ...]] | None, info: dict
) -> None:
    """Refuse a loaded model whose weights did not fit; raises :class:`ModelLoadError`.

    Two comparisons, both must pass: transformers' loading report (``info``: missing,
    unexpected and wrongly shaped tensors after its own renaming; it only warns about them and
    initialises missing ones at random), and, for safetensors folders, :func:`_fit_problems`
    of the headers against the loaded model.
    """
    problems = []
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        problems.append(_wrong_shapes(mismatched))
    missing = set(info.get("missing_keys") or ())
    unexpected = set(info.get("unexpected_keys") or ())
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing ({_names(missing)})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) the config has no place for ({_names(unexpected)})"
        )
    if not problems and files is not None:
        problems = _fit_problems(files, model)
    _refuse(where, problems)


def load_model(
    arg: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load a causal LM; ``attn_implementation="eager"`` when attention weights are needed."""
    from transformers import AutoModelForCausalLM

    src = resolve_model(arg)
    files = None
    if src.is_local and not src.gguf_file:
        _check_config_json(src.path)
        files = weight_shapes(src.path)  # truncated or corrupt files fail here, by name
    # Mismatched shapes are reported in the loading info (and refused below) instead of
    # raising transformers' multi-line error.
    kwargs: dict = {
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "output_loading_info": True,
        "ignore_mismatched_sizes": True,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    else:
        kwargs["use_safetensors"] = True  # never fall back to pickle
    try:
        model, info = AutoModelForCausalLM.from_pretrained(src.location, **kwargs)
    except Exception as e:  # safetensors, json, gguf and torch all raise their own types
        raise _load_error(arg, src, "model", e) from e
    if src.is_local:
        check_weights_fit(model, src.path, files, info)
    if src.gguf_file and getattr(model.config, "quantization_config", None) is not None:
        # De-quantised already; drop the marker so the model can be saved and trained.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    model.eval()
    return model


# Files any of which makes a folder carry a tokenizer (fast, sentencepiece, BPE, WordPiece,
# tiktoken). Without them transformers may build an EMPTY tokenizer from the config (GPT-2).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tokenizer.tiktoken",
)


def has_tokenizer(arg: str) -> bool:
    """Whether the model argument carries a tokenizer (a GGUF embeds one; a hub id is assumed
    to)."""
    src = resolve_model(arg)
    if not src.is_local or src.gguf_file:
        return True
    return any((src.path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(arg: str, trust_remote_code: bool = False):
    """The model's tokenizer; raises :class:`ModelLoadError` (also for a folder without one)."""
    from transformers import AutoTokenizer

    src = resolve_model(arg)
    if not has_tokenizer(arg):
        raise ModelLoadError(
            f"{src.path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}), and this "
            f"command needs one to turn text into tokens (analyze, train, run, compare and eval "
            f"do; inherit does not): copy the reference model's tokenizer files into it"
        )
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    try:
        return AutoTokenizer.from_pretrained(src.location, **kwargs)
    except Exception as e:  # tokenizer files are parsed by several libraries
        raise _load_error(arg, src, "tokenizer", e) from e


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings and head counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------- context


def model_context(config) -> int | None:
    """The longest input the model accepts, from its config, or None if it states none."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(config, seq_len: int, name: str = "seq_len") -> None:
    """Refuse a ``--seq-len``-like flag (field ``name``) longer than the model's context.

    Every command calls this right after :func:`load_config`, before any data is loaded, so an
    over-long window is reported as such and not as a split that is too short for it.
    """
    from inheritune.config import ConfigError, flag

    ctx = model_context(config)
    if ctx is not None and seq_len > ctx:
        raise ConfigError(
            f"{flag(name)} {seq_len} is longer than the model's context ({ctx} tokens)"
        )
