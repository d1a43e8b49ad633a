"""A bridge block: one extra decoder block that carries the inherited stack to the head's input.

The first l blocks of a reference end in a residual stream h_l that the reference's final norm
and head were never trained to read: they read h_L, the stream after all L blocks. On SmolLM2 the
first 15 of 30 layers start at 19.8 nats/token as inherited and 7.4 after refitting the final
norm's gain; an unrestricted linear map h_l -> h_L before the final norm reaches 5.15, but it
cannot be folded into standard weights (the skip path is unnormalised). A bridge gives that map a
body of the reference's own class: one decoder block appended after the l inherited ones
(LLM-Streamline, ICLR 2025, replaces a pruned span by one trained layer), fitted on cached
activations to reproduce h_L from h_l; optionally the final norm's gain is refitted afterwards
(:mod:`inheritune.surgery.calibrate`). The result is a standard checkpoint with l + 1 layers, which on
SmolLM2 starts at 4.95 (reference 3.87), built in ~1 CPU-minute (benchmarks/results/bridge.md).

A selection that keeps other layers than the first (``--select``,
:mod:`inheritune.analysis.selection`) has a seam at every removed span [a, b): each gets its own
bridge block in place of the span, fitted alone from the reference's stream entering block a to
the stream entering block b (the final norm's input when b = L). ``--bridge-spans N`` bridges
only the N longest spans.

Usage::

    ref = models.load_model("smollm2-135m")
    cfg = BridgeConfig(bridge="block")
    ids = calibration_windows(tokens.train, cfg)                       # (64, 128) training
    model, stats = build_bridged(ref, 15, ids, cfg)
    model.save_pretrained("runs/smol15-bridge")                         # 16 layers, plain HF
    model, stats = build_bridged(ref, [0, 1, 2, 5, 6, 7], ids, cfg)     # 2 seams: 8 layers

The pieces are separate functions: :func:`~inheritune.models.hooks.collect_streams` (one
reference forward with hooks), :func:`fit_linear_map` (the closed-form reference point),
:func:`add_bridges` (surgery), :func:`fit_bridge` (AdamW on the bridge block alone, run by
:class:`~inheritune.models.hooks.BlockRunner`; the blocks below never run again).

Fit loss: next-token prediction only sees each token's direction after the final norm, so the
loss is scale-invariant, 1 - cosine between the bridge's output and h_L per token, each first
normalised as the final norm would (mean removed for LayerNorm families) and weighted per channel
by the reference's final-norm gain, so channels count as much as the head reads them. Position 0
is left out: it is the attention sink, whose stream has a huge norm and carries no prediction
that matters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from inheritune.analysis.selection import bridged_spans, check_indices, spans
from inheritune.config import ConfigError, check_positive, validate_numbers
from inheritune.models.arch import get_arch
from inheritune.models.hooks import BlockRunner, collect_streams

BRIDGES = ("none", "block")
# Which reference block the bridge starts as: "last" = block L-1 (it writes h_L, the stream the
# head reads), "next" = block l (the one that followed the inherited stack), "repeat" = block
# l-1 again.
BRIDGE_INITS = ("last", "next", "repeat")
BRIDGE_INPUTS = ("reference", "pruned")


def _h(text: str, **kw: Any) -> dict[str, Any]:
    return {"help": text, **kw}


@dataclass
class BridgeConfig:
    """How the bridge block is built and fitted (``--bridge block``); the configs of
    ``inherit``, ``run`` and ``compare`` hold it as their ``bridging`` field (the same flags)."""

    bridge: str = field(
        default="none",
        metadata=_h(
            "none: the inherited stack as is; block: a decoder block in place of each removed "
            "span of reference layers (for the first l layers: one after them), fitted to "
            "reproduce the reference's residual stream where the span ends (a standard "
            "checkpoint of the reference's class)",
            choices=BRIDGES,
        ),
    )
    bridge_init: str = field(
        default="last",
        metadata=_h(
            "reference block each bridge starts from: last (the span's last block; L-1 for the "
            "top span), next (the span's first), repeat (the kept block below the span)",
            choices=BRIDGE_INITS,
        ),
    )
    bridge_input: str = field(
        default="reference",
        metadata=_h(
            "the stream each bridge is fitted from: reference (the reference's own, where its "
            "span starts) or pruned (the smaller model's own there, earlier bridges fitted "
            "first, so each bridge also corrects the seams below it); the target is always "
            "the reference's stream where the span ends",
            choices=BRIDGE_INPUTS,
        ),
    )
    bridge_spans: int = field(
        default=0,
        metadata=_h(
            "bridge only the N longest removed spans of a selection (0: every span gets one)"
        ),
    )
    # 32K, not 8K: on SmolLM2 at 20 layers the start on Brown's TRAINING-split windows went
    # 4.789 (8K) -> 4.681 (16K) -> 4.627 (32K) with Block Influence + 3 bridges, and the first
    # 19 + top bridge gained 0.21 on held-out Brown, for ~1.7x the build time
    # (benchmarks/results/zero-shot-select.md).
    calib_tokens: int = field(
        default=32768, metadata=_h("training-split tokens whose activations fit the bridge")
    )
    calib_seq_len: int = field(default=128, metadata=_h("tokens per calibration window"))
    # Defaults chosen on held-out TRAINING windows (benchmarks/results/bridge.md): lr 3e-4 /
    # 1e-3 / 3e-3 / 1e-2 / 2e-2 / 4e-2 and batch 4 vs 8 at equal tokens; "last" beat "next" and
    # "repeat"; a final-norm refit on 4-8 windows made the bridged model worse (overfit), on 16
    # windows better by ~0.1 at twice the time, so it is off by default.
    bridge_steps: int = field(default=300, metadata=_h("AdamW steps fitting the bridge block"))
    bridge_lr: float = field(default=2e-2, metadata=_h("peak learning rate of the bridge fit"))
    bridge_batch: int = field(default=4, metadata=_h("calibration windows per bridge step"))
    norm_iters: int = field(
        default=0,
        metadata=_h(
            "L-BFGS iterations refitting the final norm after the bridge (0: off; on few "
            "windows the refit overfits)"
        ),
    )
    norm_windows: int = field(
        default=16, metadata=_h("calibration windows used by the final-norm refit")
    )

    def __post_init__(self) -> None:
        validate_numbers(self)  # finite, in range, of the declared type (config.py)
        if self.bridge not in BRIDGES:
            raise ConfigError(f"--bridge must be one of {', '.join(BRIDGES)}, got {self.bridge!r}")
        if self.bridge_init not in BRIDGE_INITS:
            raise ConfigError(
                f"--bridge-init must be one of {', '.join(BRIDGE_INITS)}, got {self.bridge_init!r}"
            )
        if self.bridge_input not in BRIDGE_INPUTS:
            raise ConfigError(
                f"--bridge-input must be one of {', '.join(BRIDGE_INPUTS)}, got "
                f"{self.bridge_input!r}"
            )
        check_positive("calib_seq_len", self.calib_seq_len)
        if self.calib_seq_len < 2:
            raise ConfigError(f"--calib-seq-len must be >= 2, got {self.calib_seq_len}")
        if self.calib_tokens < 2 * self.calib_seq_len:
            raise ConfigError(
                f"--calib-tokens {self.calib_tokens} gives fewer than 2 windows of "
                f"--calib-seq-len {self.calib_seq_len} (one is held out to check the fit)"
            )
        check_positive("bridge_steps", self.bridge_steps, allow_zero=True)
        check_positive("bridge_lr", self.bridge_lr)
        check_positive("bridge_batch", self.bridge_batch)
        check_positive("norm_iters", self.norm_iters, allow_zero=True)
        check_positive("norm_windows", self.norm_windows)

    @property
    def calib_windows(self) -> int:
        return self.calib_tokens // self.calib_seq_len


# --------------------------------------------------------------------------- the linear map


def _normalise(x: torch.Tensor, center: bool) -> torch.Tensor:
    """Per-token direction as the final norm sees it: mean removed (LayerNorm), unit RMS."""
    if center:
        x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-12)


def _centers(model: nn.Module) -> bool:
    return isinstance(get_arch(model).final_norm, nn.LayerNorm)


def _gain(model: nn.Module) -> torch.Tensor:
    """|final-norm gain| of ``model`` (ones when the norm has no weight): per-channel weights."""
    w = getattr(get_arch(model).final_norm, "weight", None)
    if w is None:
        return torch.ones(get_arch(model).embed.weight.shape[-1])
    return w.detach().float().abs().cpu()


def _rows(h: torch.Tensor, center: bool) -> torch.Tensor:
    """(n, T, D) states -> (n * (T - 1), D) float64 normalised rows, position 0 left out."""
    return _normalise(h[:, 1:].reshape(-1, h.shape[-1]).double(), center)


def fit_linear_map(
    h_l: torch.Tensor, h_L: torch.Tensor, center: bool = False, ridge: float = 1e-4
) -> tuple[torch.Tensor, float]:
    """Least-squares map A (D, D) with ``normalise(h_l) @ A ~ normalise(h_L)``, and its R^2.

    Closed form (normal equations, a tiny ridge for conditioning), position 0 left out. Inputs
    are only RMS-normalised, a per-token scale that the final norm ignores, so ``h_l @ A`` used
    as the final norm's input is the fitted map of the raw stream. A reference point, not a
    standard architecture: it does not fold into the blocks (the skip path is unnormalised).
    ``center``: remove each target row's mean first (LayerNorm families).
    """
    x, y = _rows(h_l, False), _rows(h_L, center)
    gram = x.T @ x  # (D, D)
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    a = torch.linalg.solve(gram, x.T @ y)
    return a.float(), _r2(x @ a, y)


def linear_map_r2(a: torch.Tensor, h_l: torch.Tensor, h_L: torch.Tensor, center: bool) -> float:
    """R^2 of the map ``a`` on other states (e.g. held-out windows)."""
    return _r2(_rows(h_l, False) @ a.double(), _rows(h_L, center))


def _r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    sse = (pred - y).pow(2).sum()
    sst = (y - y.mean(0)).pow(2).sum()
    return float(1.0 - sse / sst)


# --------------------------------------------------------------------------- the bridge block


def add_bridge_block(model: nn.Module, depth: int, init: str = "last", seed: int = 0) -> nn.Module:
    """A new model of ``model``'s embeddings, first ``depth`` blocks, one bridge block, final norm
    and head: a standard model of the same class with depth + 1 layers, built by
    :func:`inheritune.surgery.select_layers` (so tied embeddings stay tied).

    The bridge starts as a copy of ``model``'s block L-1 (``last``), ``depth`` (``next``) or
    ``depth - 1`` (``repeat``).
    """
    from inheritune.surgery import build as surgery

    n = get_arch(model).num_layers
    surgery.check_depth(depth, n)
    if depth == n:
        raise ConfigError(
            f"--bridge-init {init} needs a removed block after the kept ones, but the model has {n}"
        )
    return add_bridges(model, range(depth), [(depth, n)], init, seed)[0]


def bridge_source(span: tuple[int, int], init: str) -> int:
    """The reference block a bridge for the removed ``span`` [a, b) starts as (``--bridge-init``)."""
    a, b = span
    if init not in BRIDGE_INITS:
        raise ConfigError(f"--bridge-init must be one of {', '.join(BRIDGE_INITS)}, got {init!r}")
    if init == "repeat" and a == 0:
        raise ConfigError("--bridge-init repeat needs a kept layer below the span; layer 0 is gone")
    return {"last": b - 1, "next": a, "repeat": a - 1}[init]


def add_bridges(
    model: nn.Module,
    kept: Sequence[int],
    bridged: Sequence[tuple[int, int]],
    init: str = "last",
    seed: int = 0,
) -> tuple[nn.Module, list[int], list[int]]:
    """A new model of ``model``'s embeddings, its ``kept`` blocks and one bridge block in place of
    each span in ``bridged`` (removed spans [a, b)), final norm and head: a standard model of the
    same class, built by :func:`inheritune.surgery.select_layers` (tied embeddings stay tied,
    ``layer_idx`` renumbered). Returns it, each bridge's position in it and its source block."""
    from inheritune.surgery import build as surgery

    L = get_arch(model).num_layers
    have = set(kept)
    for a, b in bridged:
        if not 0 <= a < b <= L or have & set(range(a, b)):
            raise ConfigError(f"span [{a}, {b}) is not a removed span of layers {list(kept)}")
    starts = {a: (a, b) for a, b in bridged}
    indices: list[int] = []
    positions: list[int] = []
    sources: list[int] = []
    for i in range(L):
        if i in starts:
            positions.append(len(indices))
            sources.append(bridge_source(starts[i], init))
            indices.append(sources[-1])
        if i in have:
            indices.append(i)
    return surgery.select_layers(model, indices, allow_repeats=True, seed=seed), positions, sources


def state_loss(
    pred: torch.Tensor, target: torch.Tensor, gain: torch.Tensor, center: bool
) -> torch.Tensor:
    """Mean over tokens (position 0 left out) of 1 - cos(gain * norm(pred), gain * norm(target))."""
    p = _normalise(pred[:, 1:], center) * gain
    y = _normalise(target[:, 1:], center) * gain
    return (1.0 - F.cosine_similarity(p, y, dim=-1)).mean()


def fit_bridge(
    model: nn.Module,
    h_l: torch.Tensor,
    h_L: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    gain: torch.Tensor | None = None,
    seed: int = 0,
    position: int | None = None,
    desc: str | None = None,
) -> dict[str, float]:
    """Fit ``model``'s block ``position`` (default: the last) in place so that it maps ``h_l``
    (n, T, D) to ``h_L`` (``desc``: a progress bar of that name).

    AdamW (betas 0.9/0.95, no weight decay: the start is a trained block), 10% linear warm-up,
    cosine decay to 0, gradient clip 1.0, on random batches of ``batch_size`` cached windows;
    nothing but that block runs or changes. Returns the fit loss before and after on
    ``held_out`` (h_l, h_L) (else on the training windows) and the time taken. A fit that ends
    worse there than it started is undone (``kept_start``): a bridge never makes its seam worse.
    """
    arch = get_arch(model)
    center = _centers(model)
    gain = _gain(model) if gain is None else gain
    runner = BlockRunner(model, arch.num_layers - 1 if position is None else position)
    block = runner.block
    device = next(model.parameters()).device
    check_x, check_y = held_out if held_out is not None else (h_l, h_L)

    def check() -> float:
        total, n = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(check_x), batch_size):
                x = check_x[s : s + batch_size].to(device)
                y = check_y[s : s + batch_size].to(device)
                total += float(state_loss(runner(x), y, gain.to(device), center)) * len(x)
                n += len(x)
        return total / n

    was_training = model.training
    model.eval()  # dropout off: the fit targets a deterministic forward
    cpu = time.process_time()
    before = check()
    params = [p for p in block.parameters()]
    start = [p.detach().clone() for p in params]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 10)
    gen = torch.Generator().manual_seed(seed)
    b = min(batch_size, len(h_l))
    g = gain.to(device)
    for step in tqdm(range(steps), desc=desc, unit="step", leave=False, disable=desc is None):
        scale = (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        )
        for group in opt.param_groups:
            group["lr"] = lr * scale
        idx = torch.randperm(len(h_l), generator=gen)[:b]
        loss = state_loss(runner(h_l[idx].to(device)), h_L[idx].to(device), g, center)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    for p, req in zip(params, saved, strict=True):
        p.grad = None
        p.requires_grad_(req)
    after = check()
    kept_start = after > before  # e.g. a one-layer span whose bridge starts as that very layer
    if kept_start:
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
        after = before
    model.train(was_training)
    return {
        "fit_loss_before": before,
        "fit_loss_after": after,
        "kept_start": kept_start,
        "steps": steps,
        "cpu_seconds": time.process_time() - cpu,
    }


# --------------------------------------------------------------------------- the whole build


def calibration_windows(train: np.ndarray, cfg: BridgeConfig, seed: int = 0) -> np.ndarray:
    """The bridge's calibration windows, (calib_tokens // calib_seq_len, calib_seq_len), drawn
    at seeded random positions of a TRAINING split (never the validation split)."""
    from inheritune.data import windows as data

    return data.sample_windows(
        train, cfg.calib_windows, cfg.calib_seq_len, seed, "training", "--calib-seq-len"
    )


def build_bridged(
    reference: nn.Module,
    kept: int | Sequence[int],
    calib_ids: torch.Tensor | np.ndarray,
    cfg: BridgeConfig,
    seed: int = 0,
    bridged: Sequence[tuple[int, int]] | None = None,
    reuse: dict[tuple[int, int], dict[str, Any]] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The reference's ``kept`` blocks (an int: the first that many) with a fitted bridge block in
    place of each removed span, then (``cfg.norm_iters``) the final norm refitted.

    ``reuse`` (span -> :func:`fitted_bridges`' entry of an earlier build with the same reference,
    ``calib_ids``, ``cfg`` and ``seed``) skips the fit of those spans: with ``--bridge-input
    reference`` a bridge is fitted from the reference's own streams alone, so its fit depends on
    its span and nothing else the selection changes (a growth round keeps most seams). Ignored
    for ``--bridge-input pruned``, where each bridge depends on those below it.

    ``bridged`` are the spans [a, b) that get a bridge (default: every removed span, or the
    ``cfg.bridge_spans`` longest); each bridge is fitted alone on the reference's own streams,
    from the input of block a to the input of block b (the final norm's input when b = L).
    ``calib_ids`` (n, T) are training-split windows (:func:`calibration_windows`); the last
    eighth of them (at least one) is held out to report the fit, the first ``cfg.norm_windows``
    also fit the final norm. Returns the new model (the reference's class, eval mode) and the
    fit statistics that ``provenance.json`` records. The reference is not modified.
    """
    from inheritune.surgery.calibrate import calibrate_final_norm

    L = get_arch(reference).num_layers
    if isinstance(kept, int) and not 1 <= kept < L:
        raise ConfigError(
            f"a bridge needs 1 <= --num-layers < {L} (the reference's depth), got {kept}"
        )
    kept = check_indices(range(kept) if isinstance(kept, int) else kept, L, what="kept layers")
    gaps = list(bridged) if bridged is not None else bridged_spans(kept, L, cfg.bridge_spans)
    if not gaps:
        raise ConfigError(f"the selection keeps all {L} layers: there is no removed span to bridge")
    ids = torch.as_tensor(np.asarray(calib_ids), dtype=torch.long)
    if ids.ndim != 2 or len(ids) < 2 or ids.shape[1] < 2:
        raise ConfigError(
            "the bridge needs at least 2 calibration windows of >= 2 tokens (--calib-tokens, "
            f"--calib-seq-len), got shape {tuple(ids.shape)}"
        )
    wall, cpu = time.perf_counter(), time.process_time()
    hold = max(1, len(ids) // 8)
    pruned = cfg.bridge_input == "pruned"
    reuse = {} if pruned or reuse is None else {tuple(k): v for k, v in reuse.items()}
    todo = [g for g in gaps if tuple(g) not in reuse]
    need = {b for _, b in todo} if pruned else {d for gap in todo for d in gap}
    streams = collect_streams(reference, ids, sorted(need)) if need else {}
    seconds_states = time.process_time() - cpu
    center = _centers(reference)
    gain = _gain(reference)
    model, positions, sources = add_bridges(reference, kept, gaps, cfg.bridge_init, seed=seed)
    bridges = []
    for (a, b), pos, src in zip(gaps, positions, sources, strict=True):
        if (a, b) in reuse:  # fitted by an earlier build: the same block, its numbers kept
            get_arch(model).layers[pos].load_state_dict(reuse[(a, b)]["state"])
            record = reuse[(a, b)]["record"]
            bridges.append({**record, "position": pos, "reused": True, "cpu_seconds": 0.0})
            continue
        # pruned: the smaller model's own stream entering the bridge (the bridges below fitted)
        h_in = collect_streams(model, ids, [pos])[pos] if pruned else streams[a]
        h_out = streams[b]
        lin, r2_fit = fit_linear_map(h_in[:-hold], h_out[:-hold], center)
        fit = fit_bridge(
            model,
            h_in[:-hold],
            h_out[:-hold],
            steps=cfg.bridge_steps,
            lr=cfg.bridge_lr,
            batch_size=cfg.bridge_batch,
            held_out=(h_in[-hold:], h_out[-hold:]),
            gain=gain,
            seed=seed,
            position=pos,
            desc=f"bridge {len(bridges) + 1}/{len(gaps)} (layers {a}-{b - 1})",
        )
        bridges.append(
            {
                "span": [a, b],
                "position": pos,
                "init_from": src,
                "fit_loss_before": fit["fit_loss_before"],
                "fit_loss_after": fit["fit_loss_after"],
                "kept_start": fit["kept_start"],
                # the same loss for the linear map: how close the block gets to it
                "linear_map_fit_loss": float(
                    state_loss(h_in[-hold:] @ lin, h_out[-hold:], gain, center)
                ),
                "linear_map_r2": {
                    "fit": r2_fit,
                    "held_out": linear_map_r2(lin, h_in[-hold:], h_out[-hold:], center),
                },
                "cpu_seconds": fit["cpu_seconds"],
            }
        )
    del streams
    norm_ids = ids[: min(cfg.norm_windows, len(ids) - hold)]
    norm = calibrate_final_norm(model, norm_ids, cfg.norm_iters) if cfg.norm_iters else None

    def mean(key: str) -> float:
        return float(np.mean([br[key] for br in bridges]))

    stats = {
        "bridge": cfg.bridge,
        "bridge_init": cfg.bridge_init,
        "bridge_input": cfg.bridge_input,
        "kept_layers": len(kept),
        "kept": kept,
        "layers": len(kept) + len(bridges),
        "bridges": bridges,
        "unbridged_spans": [list(g) for g in spans(kept, L) if g not in gaps],
        "calib_windows": len(ids),
        "calib_seq_len": int(ids.shape[1]),
        "calib_tokens": int(ids.numel()),
        "held_out_windows": hold,
        "fit_loss": "mean 1 - cos of gain-weighted normalised states, position 0 left out",
        # over the bridges (the one bridge's own numbers when there is one)
        "fit_loss_before": mean("fit_loss_before"),
        "fit_loss_after": mean("fit_loss_after"),
        "linear_map_fit_loss": mean("linear_map_fit_loss"),
        "linear_map_r2": bridges[-1]["linear_map_r2"],
        "steps": cfg.bridge_steps,
        "lr": cfg.bridge_lr,
        "batch_windows": cfg.bridge_batch,
        "final_norm": None
        if norm is None
        else {
            "windows": len(norm_ids),
            "iters": cfg.norm_iters,
            "calib_loss_before": norm["before"],
            "calib_loss_after": norm["after"],
        },
        "cpu_seconds": {
            "states": seconds_states,
            "fit": sum(br["cpu_seconds"] for br in bridges),
            "total": time.process_time() - cpu,
        },
        "wall_seconds": time.perf_counter() - wall,
    }
    return model, stats


def fitted_bridges(model: nn.Module, stats: dict[str, Any]) -> dict[tuple[int, int], dict]:
    """span -> {"state": the fitted block's weights (copies), "record": its fit numbers} of a
    :func:`build_bridged` result: what a later build may ``reuse``."""
    layers = get_arch(model).layers
    out = {}
    for br in stats["bridges"]:
        state = {k: v.detach().clone() for k, v in layers[br["position"]].state_dict().items()}
        record = {k: v for k, v in br.items() if k not in ("position", "reused")}
        out[(int(br["span"][0]), int(br["span"][1]))] = {"state": state, "record": record}
    return out


def bridge_on_corpus(
    reference: nn.Module,
    kept: int | Sequence[int],
    tokens: Any,
    cfg: BridgeConfig,
    seed: int = 0,
    eval_tokens: int = 8192,
    eval_seq_len: int = 128,
    bridged: Sequence[tuple[int, int]] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`build_bridged` on a tokenised corpus (:class:`inheritune.data.Tokens`), plus the
    validation loss of the reference, the ``kept`` layers as they are, and the bridged model, on
    the fixed validation windows the training loop evaluates on
    (:func:`inheritune.data.eval_windows`; ``eval_tokens`` 0 skips them)."""
    ids = calibration_windows(tokens.train, cfg, seed)
    model, stats = build_bridged(reference, kept, ids, cfg, seed=seed, bridged=bridged)
    if eval_tokens > 0:
        stats["validation"] = validation_record(
            reference, model, stats["kept"], tokens, eval_tokens, eval_seq_len
        )
    return model, stats


def validation_record(
    reference: nn.Module,
    model: nn.Module,
    kept: Sequence[int],
    tokens: Any,
    eval_tokens: int = 8192,
    eval_seq_len: int = 128,
) -> dict[str, Any]:
    """The validation loss of the reference, its ``kept`` layers as they are and the bridged
    ``model``, on the fixed validation windows the training loop evaluates on
    (:func:`inheritune.data.eval_windows`)."""
    from inheritune.data import windows as data
    from inheritune.models.losses import evaluate_loss
    from inheritune.surgery import build as surgery

    windows = data.eval_windows(tokens, eval_seq_len, eval_tokens)
    return {
        "windows": len(windows),
        "seq_len": eval_seq_len,
        "tokens": int(windows[:, 1:].size),
        "reference": evaluate_loss(reference, windows),
        "inherited": evaluate_loss(surgery.select_layers(reference, kept), windows),
        "bridged": evaluate_loss(model, windows),
    }
