"""Hugging Face model folders: save, load and copy them, whatever wraps the model.

:func:`save_hf_folder` writes ``config.json``, ``model.safetensors`` and the tokenizer files,
the standard folder ``AutoModelForCausalLM.from_pretrained`` loads; under FSDP the full state
dict is gathered first (:func:`full_model_state`). :func:`load_model_weights` reads the
safetensors of such a folder back into a built model (never through pickle), and
:func:`copy_model_folder` copies one. Writing a folder atomically is
:func:`inheritune.storage.write_folder_atomically`'s job; training checkpoints
(:mod:`inheritune.training.checkpoint`) are these folders plus the training state.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from inheritune.storage import MANIFEST, CheckpointError, write_folder_atomically

TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"


# ----------------------------------------------------------------------------- model folders


def full_model_state(model: nn.Module, fsdp: bool) -> dict[str, torch.Tensor] | None:
    """The full (gathered) state dict under FSDP (a collective), else None (use the model)."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def save_hf_folder(model: nn.Module, tokenizer, folder: Path, state_dict=None) -> None:
    """config.json + model.safetensors (+ tokenizer): loadable by AutoModelForCausalLM."""
    from transformers.utils import logging as hf_logging

    # transformers' own "Writing model shards" bar would tear the training progress bar.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, state_dict=state_dict)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """Load safetensors weights into ``model`` in place; only tied copies may be missing."""
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name not in (OPTIMIZER, RNG):
            sd.update(load_file(str(f)))
    result = model.load_state_dict(sd, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    unique = {n for n, _ in model.named_parameters()}  # tied copies counted once
    missing = [k for k in result.missing_keys if k in params and k in unique]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {folder} does not fit this model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def copy_model_folder(src: Path, dst: Path, tokenizer=None) -> Path:
    """Atomically copy the model files of ``src`` (not its training state) to ``dst``."""
    skip = (OPTIMIZER, RNG, TRAINER_STATE, MANIFEST)

    def populate(tmp: Path) -> None:
        for p in Path(src).iterdir():
            if p.is_file() and p.name not in skip:
                shutil.copy2(p, tmp / p.name)
        if tokenizer is not None and not (tmp / "tokenizer_config.json").is_file():
            tokenizer.save_pretrained(tmp)

    return write_folder_atomically(Path(dst), populate)
