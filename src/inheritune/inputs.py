"""A command's ``--model`` / ``--data`` / ``--device`` turned into loaded objects, one way.

Every command that needs a model, its tokenizer or a tokenised corpus calls :func:`load`. It
works cheapest-first so that bad input fails before any weights are read: the model's config
(and each ``seq_len`` against the model's context), the tokenizer, the tokens, then the weights.

Under ``torchrun`` exactly one process tokenises a cold corpus; the others wait for it and then
open the same token folder (see :func:`inheritune.data.load_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from inheritune import data, distributed, models
from inheritune.config import ConfigError, flag


@dataclass
class Inputs:
    """What :func:`load` produced (``None`` where it was not asked for)."""

    config: Any  # the model's transformers config
    tokenizer: Any
    tokens: data.Tokens | None
    model: nn.Module | None
    device: torch.device


def resolve_device(arg: str = "auto") -> torch.device:
    """``auto`` (this process's GPU under torchrun, else the first GPU, else the CPU) or a name."""
    if arg == "auto":
        return distributed.setup().device
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{flag('device')} {arg}: CUDA is not available on this machine")
    try:
        return torch.device(arg)
    except RuntimeError as e:
        raise ConfigError(f"{flag('device')} {arg!r} is not a device ({e})") from e


def load_tokens(data_arg: str, tokenizer) -> data.Tokens:
    """The token folder of ``data_arg``, tokenised by one process when it is not cached yet."""
    env = distributed.setup()
    if env.is_main:
        tokens = data.load_tokens(data_arg, tokenizer)
    distributed.barrier(env)
    if not env.is_main:
        tokens = data.load_tokens(data_arg, tokenizer)
    return tokens


def load(
    model: str,
    data_arg: str | None = None,
    *,
    device: str | None = None,
    weights: bool = True,
    tokenizer: bool = True,
    seq_lens: list[int] | tuple[int, ...] = (),
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> Inputs:
    """Load what a command needs from its ``--model`` and ``--data`` arguments.

    ``device=None`` leaves the model on the CPU (the training loop places it itself);
    ``"auto"`` picks this process's accelerator. ``seq_lens`` are checked against the model's
    context before anything heavy runs.
    """
    config = models.load_config(model, trust_remote_code)
    for n in seq_lens:
        models.check_context(config, n)
    tok = models.load_tokenizer(model, trust_remote_code) if tokenizer or data_arg else None
    tokens = load_tokens(data_arg, tok) if data_arg is not None else None
    target = resolve_device(device) if device is not None else torch.device("cpu")
    net = None
    if weights:
        net = models.load_model(
            model,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        ).to(target)
    return Inputs(config, tok, tokens, net, target)


def load_teacher(arg: str, student: nn.Module, trust_remote_code: bool = False) -> nn.Module:
    """A distillation teacher whose vocabulary matches the student's."""
    teacher = models.load_model(arg, trust_remote_code=trust_remote_code)
    if (
        teacher.get_output_embeddings().weight.shape[0]
        != student.get_input_embeddings().weight.shape[0]
    ):
        raise ConfigError(f"{flag('teacher')} has a different vocabulary than {flag('model')}")
    return teacher
