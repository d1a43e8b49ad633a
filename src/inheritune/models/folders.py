"""Atomic, pickle-free training checkpoints that resume exactly.

A checkpoint is a standard Hugging Face folder that ``AutoModelForCausalLM.from_pretrained``
loads as is (``config.json``, ``model.safetensors``, tokenizer files), plus the training state
(written and read by :mod:`inheritune.train_state`):

* ``optimizer.safetensors``: every optimizer state tensor, keyed ``{param_name}/{state_key}``;
* ``rng.safetensors``: RNG state tensors as uint8 (torch CPU and CUDA of every rank, numpy
  keys);
* ``trainer_state.json``: step, tokens seen, data position, optimizer param groups (by
  parameter name), scalar optimizer state, Python/numpy RNG scalars, evaluation history;
* ``manifest.json``: size and sha256 of every other file, written last.

Nothing is pickled. A checkpoint is written into a temporary sibling folder, every file and the
folder are fsynced, and the folder is renamed into place; only then is the ``latest`` pointer
(a one-line text file) replaced with ``os.replace``. A crash at any moment therefore leaves
either the previous checkpoint or the new one, never a half-written ``latest``. A folder whose
manifest is missing or does not match its files is refused with :class:`CheckpointError`, and
:func:`find_resume_checkpoint` then falls back to the newest good one with a warning.

Layout: ``OUT/checkpoints/step-00000100/``, ``OUT/checkpoints/latest``.
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
