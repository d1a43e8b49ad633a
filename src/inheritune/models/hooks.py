"""A model's residual stream through hooks: read it at two depths, or run one block on it alone.

:func:`collect_streams` runs the reference once per batch and keeps the residual stream at the
depths asked for (the input of block d; the final norm's input for d = L), stopping the forward
after the deepest (the head never runs); :func:`collect_states` is its two-depth case (h_l, h_L).
:class:`BlockRunner` calls one block on given hidden states exactly as the model's own forward
calls it. :mod:`inheritune.surgery.bridge` fits its bridge block with both.

:func:`capture_block_input` and :func:`replace_block_input` are the two forward pre-hooks of
shared-bottom distillation (:mod:`inheritune.training.distill`): the first keeps the hidden state
entering a block of the student, the second feeds it to the teacher's first kept block instead
of running the teacher's bottom.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from inheritune.config import ConfigError
from inheritune.models.arch import UnsupportedModelError, get_arch


class _Stop(Exception):
    """Raised by a hook to end a forward early once what it needed has been seen."""


def _tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def collect_streams(
    reference: nn.Module,
    windows: torch.Tensor | np.ndarray,
    depths: Sequence[int],
    batch_size: int = 8,
) -> dict[int, torch.Tensor]:
    """The residual stream after the first ``d`` blocks for each ``d`` in ``depths`` (the input
    of block ``d``; ``d = L`` is the final norm's input), each (n, T, D) float32 on the CPU, on
    token ``windows`` (n, T). One forward per batch, stopped after the deepest one needed (the
    head never runs)."""
    arch = get_arch(reference)
    L = arch.num_layers
    wanted = sorted(set(int(d) for d in depths))
    if not wanted or wanted[0] < 0 or wanted[-1] > L:
        raise ConfigError(f"stream depths must lie in [0, {L}], got {list(depths)}")
    if L in wanted and arch.final_norm is None:
        raise UnsupportedModelError(
            f"{type(reference).__name__} has no final norm; a bridge needs one"
        )
    ids = torch.as_tensor(np.asarray(windows), dtype=torch.long)
    device = next(reference.parameters()).device
    got: dict[int, list[torch.Tensor]] = {d: [] for d in wanted}
    deepest = wanted[-1]

    def take(d: int):
        def hook(_mod, args, kwargs=None):
            h = args[0] if args else (kwargs or {})["hidden_states"]
            got[d].append(h.detach().float().cpu())
            if d == deepest:
                raise _Stop  # nothing deeper is needed

        return hook

    hooks = []
    for d in wanted:
        if d == L:
            hooks.append(arch.final_norm.register_forward_pre_hook(take(d)))
        else:
            hooks.append(arch.layers[d].register_forward_pre_hook(take(d), with_kwargs=True))
    was_training = reference.training
    reference.eval()
    try:
        for s in range(0, len(ids), batch_size):
            with contextlib.suppress(_Stop):
                reference.base_model(input_ids=ids[s : s + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        reference.train(was_training)
    return {d: torch.cat(chunks) for d, chunks in got.items()}


def collect_states(
    reference: nn.Module, windows: torch.Tensor | np.ndarray, depth: int, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_l, h_L), each (n, T, D) float32 on the CPU: the residual stream after the reference's
    first ``depth`` blocks and after all of them (the final norm's input), on token ``windows``
    (n, T): :func:`collect_streams` at those two depths."""
    L = get_arch(reference).num_layers
    if not 1 <= depth < L:
        raise ConfigError(
            f"a bridge needs 1 <= --num-layers < {L} (the reference's depth), got {depth}"
        )
    streams = collect_streams(reference, windows, [depth, L], batch_size)
    return streams[depth], streams[L]


class BlockRunner:
    """Calls block ``i`` of ``model`` on given hidden states, alone.

    A block's forward needs what the base model computes once per forward (rotary embeddings,
    the causal mask of its attention type, position ids), whose form differs by family and
    version. They are captured from the model's own forward by a pre-hook (per batch shape; the
    forward stops there), so the block is called exactly as the model calls it.
    """

    def __init__(self, model: nn.Module, i: int):
        self.model = model
        self.block = get_arch(model).layers[i]
        self._inputs: dict[tuple[int, int], tuple[tuple, dict]] = {}

    @torch.no_grad()
    def _capture(self, b: int, t: int) -> tuple[tuple, dict]:
        if (b, t) not in self._inputs:
            seen: list[tuple[tuple, dict]] = []

            def grab(mod, args, kwargs):
                seen.append((args[1:], dict(kwargs)))
                raise _Stop

            hook = self.block.register_forward_pre_hook(grab, with_kwargs=True)
            device = next(self.model.parameters()).device
            # any token will do (the inputs captured depend on the shape only), but not the pad
            # token, which makes some families warn about a missing attention mask
            token = 2 if getattr(self.model.config, "pad_token_id", None) == 1 else 1
            try:
                with contextlib.suppress(_Stop):
                    self.model.base_model(
                        input_ids=torch.full((b, t), token, dtype=torch.long, device=device),
                        use_cache=False,
                    )
            finally:
                hook.remove()
            self._inputs[(b, t)] = seen[0]
        return self._inputs[(b, t)]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D) float32
        args, kwargs = self._capture(*hidden.shape[:2])
        p = next(self.block.parameters())
        return _tensor(self.block(hidden.to(p.device, p.dtype), *args, **kwargs)).float()


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@contextlib.contextmanager
def capture_block_input(block: nn.Module, into: dict[str, Any]) -> Iterator[None]:
    """Record the hidden state entering ``block`` during a forward, as ``into["hidden"]``."""

    def hook(_mod, args, kwargs):
        into["hidden"] = _hidden_arg(args, kwargs).detach()

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def replace_block_input(block: nn.Module, hidden: torch.Tensor) -> Iterator[None]:
    """Make ``block`` receive ``hidden`` instead of what the layers below computed."""

    def hook(_mod, args, kwargs):
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
