"""A command's ``--model`` / ``--data`` / ``--device`` turned into loaded objects, one way.

Every command that needs a model, its tokenizer or a tokenised corpus calls :func:`load`. It
works cheapest-first so that bad input fails before any weights are read: the model's config
(and each ``seq_len`` against the model's context), the tokenizer, the tokens, then the weights.

Under ``torchrun`` exactly one process tokenises a cold corpus (and converts the default model);
the others wait for the finished files, then open them (:func:`inheritune.distributed.run_once`).
With ``fsdp`` each rank reads only its shards of a model folder
(:func:`inheritune.models.parallel.load_sharded_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from inheritune.config import ConfigError, flag
from inheritune.data import prepare
from inheritune.data.sources import resolve_data
from inheritune.data.tokens import META_FILE, VAL_FRACTION, Tokens, token_cache_folder
from inheritune.distributed import DistEnv, run_once, setup
from inheritune.models import loading as models
from inheritune.models.parallel import load_sharded_model


@dataclass
class Inputs:
    """What :func:`load` produced (``None`` where it was not asked for)."""

    config: Any  # the model's transformers config
    tokenizer: Any
    tokens: Tokens | None
    model: nn.Module | None
    device: torch.device


def resolve_device(arg: str = "auto") -> torch.device:
    """``auto`` (this process's GPU under torchrun, else the first GPU, else the CPU) or a name."""
    if arg == "auto":
        return setup().device
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{flag('device')} {arg}: CUDA is not available on this machine")
    try:
        return torch.device(arg)
    except RuntimeError as e:
        raise ConfigError(f"{flag('device')} {arg!r} is not a device ({e})") from e


def load_tokens(
    data_arg: str,
    tokenizer,
    env: DistEnv | None = None,
    val_fraction: float = VAL_FRACTION,
) -> Tokens:
    """The token folder of ``data_arg``, tokenised by one process when it is not cached yet
    (``val_fraction`` 1.0: the whole corpus is a validation set).

    The others wait (up to ``--dist-timeout``) for the folder's ``meta.json``, which
    :func:`inheritune.data.prepare.prepare_tokens` writes last, then open the same folder.
    """
    env = env or setup()
    source = resolve_data(data_arg)  # a default corpus is prepared by one process too
    if source.kind == "tokens":
        return prepare.load_tokens(source, tokenizer, val_fraction)
    folder = token_cache_folder(source, tokenizer, val_docs_every=source.val_docs_every)
    tokens = run_once(
        folder / META_FILE,
        lambda: prepare.load_tokens(source, tokenizer, val_fraction),
        env,
        what=f"the tokens of {data_arg} in {folder}",
        error_dir=folder.parent,  # outside the folder prepare builds
    )
    return tokens if tokens is not None else prepare.load_tokens(source, tokenizer, val_fraction)


def load(
    model: str,
    data_arg: str | None = None,
    *,
    device: str | None = None,
    weights: bool = True,
    tokenizer: bool = True,
    seq_lens: dict[str, int] | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    dist_timeout: float | None = None,
    fsdp: bool = False,
    precision: str = "fp32",
) -> Inputs:
    """Load what a command needs from its ``--model`` and ``--data`` arguments.

    ``device=None`` leaves the model on the CPU (the training loop places it itself);
    ``"auto"`` picks this process's accelerator. ``seq_lens`` are checked against the model's
    context before anything heavy runs (keys: the flag names, e.g. ``{"seq_len": 256}``). ``dist_timeout`` (``--dist-timeout``) bounds how long a
    process waits for the one that prepares. ``fsdp`` under torchrun: the decoder blocks come
    back sharded on this process's device (a model folder; other arguments load whole).
    """
    env = setup(dist_timeout)  # first: starts the process group with that timeout
    config = models.load_config(model, trust_remote_code)
    for name, n in (seq_lens or {}).items():
        models.check_context(config, n, name)
    tok = models.load_tokenizer(model, trust_remote_code) if tokenizer or data_arg else None
    tokens = load_tokens(data_arg, tok, env) if data_arg is not None else None
    target = resolve_device(device) if device is not None else torch.device("cpu")
    net = None
    src = models.resolve_model(model)
    if weights and fsdp and env.distributed and src.is_local and not src.gguf_file:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        net = load_sharded_model(
            src.path, config, env, precision, trust_remote_code=trust_remote_code, **extra
        )
        target = env.device
    elif weights:
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
