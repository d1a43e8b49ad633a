"""Turn a ``--model`` argument into a loaded Hugging Face causal LM and its tokenizer.

A model argument is one of:

* a default name (``smollm2-135m``), prepared from packages by :mod:`inheritune.assets`;
* a local Hugging Face folder (``config.json`` plus safetensors), including folders this tool
  wrote;
* a ``.gguf`` file, de-quantised on load;
* a hub id (``gpt2``, ``Qwen/Qwen2-0.5B``) for users who have a hub; offline this fails with a
  message saying what to use instead.

Weights are only ever read from safetensors (or GGUF), never through pickle, and
``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from inheritune import assets

DEFAULT_MODELS = {assets.DEFAULT_MODEL: assets.ensure_default_model}


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
        weights = list(path.glob("*.safetensors"))
        if not weights:
            pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            hint = f" It has {pickled}; inheritune never loads pickled weights." if pickled else ""
            raise ModelLoadError(f"{path} has no *.safetensors weights.{hint}")
        return ModelSource(str(path))
    if path.is_file():
        if path.suffix == ".gguf":
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


def _hub_error(arg: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {arg!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
        f"If this machine is offline, download the model elsewhere and pass its local folder, "
        f"pass a .gguf file, or use the embedded default {assets.DEFAULT_MODEL!r}."
    )


def load_config(arg: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    src = resolve_model(arg)
    try:
        if src.gguf_file:
            return AutoConfig.from_pretrained(src.location, gguf_file=src.gguf_file)
        return AutoConfig.from_pretrained(src.location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if not src.is_local:
            raise _hub_error(arg, e) from e
        raise ModelLoadError(f"cannot read the config of {arg}: {e}") from e


def load_model(
    arg: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load a causal LM; ``attn_implementation="eager"`` when attention weights are needed."""
    from transformers import AutoModelForCausalLM

    src = resolve_model(arg)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    else:
        kwargs["use_safetensors"] = True  # never fall back to pickle
    try:
        model = AutoModelForCausalLM.from_pretrained(src.location, **kwargs)
    except Exception as e:  # safetensors, json and torch all raise their own types
        if not src.is_local:
            raise _hub_error(arg, e) from e
        raise ModelLoadError(
            f"cannot load the model in {src.location}: {type(e).__name__}: {e}. "
            f"Is the checkpoint complete and not corrupt?"
        ) from e
    if src.gguf_file and getattr(model.config, "quantization_config", None) is not None:
        # De-quantised already; drop the marker so the model can be saved and trained.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    model.eval()
    return model


def load_tokenizer(arg: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    src = resolve_model(arg)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    try:
        return AutoTokenizer.from_pretrained(src.location, **kwargs)
    except (OSError, ValueError) as e:
        if not src.is_local:
            raise _hub_error(arg, e) from e
        raise ModelLoadError(f"cannot load a tokenizer from {src.location}: {e}") from e


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings and head counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
