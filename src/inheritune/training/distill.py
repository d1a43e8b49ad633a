"""Distillation from the reference, with the frozen bottom shared between student and teacher.

When the student's bottom ``k`` blocks are frozen, unchanged copies of the reference's (the
inherited model trained with ``--train-top``; :func:`shared_bottom` finds ``k``), the teacher's
activations entering block ``k`` are exactly the student's. :class:`Teacher` then runs only the
teacher's blocks ``k..L-1`` (plus its final norm and head) from the student's own hidden state at
block ``k``, instead of a full teacher forward: a fraction of the cost for the same logits
(docs/design/recovery.md, lever 3).

Used by :class:`inheritune.models.losses.CausalLMLoss`: ``student_forward`` captures the hidden
state entering block ``k`` with a forward pre-hook (:mod:`inheritune.models.hooks`),
:meth:`Teacher.outputs` substitutes it for the input of the teacher's first kept block.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from inheritune.models.arch import get_arch
from inheritune.models.hooks import replace_block_input


def shared_bottom(student: nn.Module, teacher: nn.Module) -> int:
    """How many leading blocks the student shares with the teacher: frozen and equal."""
    s, t = get_arch(student).layers, get_arch(teacher).layers
    k = 0
    for sb, tb in zip(s, t, strict=False):
        ps, pt = dict(sb.named_parameters()), dict(tb.named_parameters())
        if ps.keys() != pt.keys() or any(p.requires_grad for p in ps.values()):
            break
        if not all(ps[n].shape == pt[n].shape and torch.equal(ps[n], pt[n]) for n in ps):
            break
        k += 1
    # The embeddings must be shared too, or the inputs of block 0 already differ.
    se, te = student.get_input_embeddings().weight, teacher.get_input_embeddings().weight
    if k and (se.requires_grad or se.shape != te.shape or not torch.equal(se, te)):
        return 0
    return min(k, len(t) - 1)  # the teacher keeps at least one block to run


class Teacher:
    """The frozen reference as a distillation teacher; ``shared`` > 0 runs only its top."""

    def __init__(self, model: nn.Module, shared: int = 0):
        from inheritune.surgery import build as surgery

        self.model = model.eval().requires_grad_(False)
        self.shared = shared
        n = get_arch(model).num_layers
        # The top as a model of its own (blocks k..L-1, the final norm and the head). Its
        # embedding output is discarded: block k's input is replaced by the student's.
        self.top = surgery.select_layers(model, range(shared, n)) if shared else None
        if self.top is not None:
            self.top.eval().requires_grad_(False)

    def to(self, device: torch.device) -> Teacher:
        self.model.to(device)
        if self.top is not None:
            self.top.to(device)
        return self

    @torch.no_grad()
    def outputs(self, inputs: torch.Tensor, hidden_k: torch.Tensor | None = None):
        """(logits (B, T, V), final normalised hidden state (B, T, D)) of the teacher."""
        if self.top is None or hidden_k is None:
            model, ctx = self.model, contextlib.nullcontext()
        else:
            model = self.top
            ctx = replace_block_input(get_arch(model).layers[0], hidden_k)
        with ctx:
            out = model(input_ids=inputs, use_cache=False, output_hidden_states=True)
        return out.logits, out.hidden_states[-1]
