"""``inheritune analyze``: a layer-by-layer attention-collapse report (docs/design/paper.md §1).

Samples ``--num-seqs`` windows of ``--seq-len`` tokens from the validation split, runs the model
with eager attention (fused kernels return no weights) and, for every head of every layer,
computes the approximate rank k*(tau), the dominant-column mass m*(eta) and the largest column's
share, each averaged over the sequences. From those: MaxRank and AvgMass per layer, lazy layers,
contiguous lazy groups and a suggested initial depth for the recipe; in the same pass, hooks on
the blocks measure Block Influence and the angular distance of every span (the scores the
``--select`` rules keep layers by, :mod:`inheritune.analysis.selection`). All of it is written by
:mod:`inheritune.analysis.report` (``analysis.json`` records the exact definitions used); layers
are numbered from 0 there and in every table (the paper's plots number from 1).
``--rank-of-mean`` adds the rank of the mean attention matrix as a second, separately labelled
number.

Memory stays flat in the number of layers: a forward hook on each block's attention module
reduces that layer's ``(B, H, T, T)`` weights to per-(sequence, head) numbers at once and drops
them from the block's output; the LM head is never run (only the base model is called).

In-process use (the recipe calls this)::

    ids = sample_inputs(tokens.val, cfg)                      # (N, T)
    result = run_analysis(model, ids, cfg, model_name="...")  # AnalysisResult
    analysis_report.write_report(result, "runs/analyze")
    result = analysis_report.load_report("runs/analyze")      # the same, read back
    result.suggested_depth, result.half_depth, result.lazy_layers, result.groups
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from inheritune.analysis import metrics, scoring
from inheritune.analysis.report import AnalysisResult, summary_table, write_report
from inheritune.config import (
    ConfigError,
    check_positive,
    check_unit_interval,
    flag,
    save_resolved,
    validate_numbers,
)
from inheritune.data import inputs
from inheritune.distributed import DEFAULT_TIMEOUT_S
from inheritune.models import assets
from inheritune.models import loading as models
from inheritune.models.arch import get_arch


@dataclass
class AnalyzeConfig:
    """Settings of ``inheritune analyze`` (and of the recipe's analysis step)."""

    model: str = field(
        default=assets.DEFAULT_MODEL,
        metadata={"help": "model to analyse: default name, HF folder, .gguf file or hub id"},
    )
    data: str = field(
        default=assets.DEFAULT_CORPUS,
        metadata={"help": "corpus whose validation split supplies the windows"},
    )
    num_seqs: int = field(
        default=100, metadata={"help": "number of random validation windows (paper: 100)"}
    )
    seq_len: int = field(default=100, metadata={"help": "tokens per window (paper: 100)"})
    tau: float = field(
        default=0.9,
        metadata={"help": "spectral energy share for the approximate rank k*, in (0, 1]"},
    )
    eta: float = field(
        default=0.9, metadata={"help": "mass share for the dominant-column count m*, in (0, 1]"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the window sampling"})
    out: str = field(default="runs/analyze", metadata={"help": "output folder"})
    batch_size: int = field(
        default=25, metadata={"help": "windows per forward pass (memory ~ B*H*T*T floats)"}
    )
    lazy_tol: float = field(
        default=0.05, metadata={"help": "a layer is lazy when MaxRank <= 1 + lazy_tol"}
    )
    min_group: int = field(
        default=2,
        metadata={"help": "layers a lazy group needs to drive the suggested depth"},
    )
    rank_of_mean: bool = field(
        default=False,
        metadata={
            "help": "also report k*(tau) of the mean attention matrix over the windows, labelled "
            "rank_of_mean (NOT the paper's Rank, which is the mean of per-window ranks)"
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "allow custom model code from the model folder"}
    )
    device: str = field(
        default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (the GPU if there is one)"}
    )
    dist_timeout: float = field(
        default=DEFAULT_TIMEOUT_S,
        metadata={"help": "seconds a torchrun process waits for the one preparing", "min": 1},
    )

    def __post_init__(self) -> None:
        validate_numbers(self)  # finite, in range, of the declared type (config.py)
        check_unit_interval("tau", self.tau)
        check_unit_interval("eta", self.eta)
        for name in ("num_seqs", "seq_len", "batch_size", "min_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{flag(name)} must be an integer, got {value!r}")
            if value < 1:
                raise ConfigError(f"{flag(name)} must be >= 1, got {value}")
        check_positive("lazy_tol", self.lazy_tol, allow_zero=True)
        if not str(self.model).strip():
            raise ConfigError("--model must not be empty")
        if not str(self.data).strip():
            raise ConfigError("--data must not be empty")


def sample_inputs(val: np.ndarray, cfg: AnalyzeConfig) -> np.ndarray:
    """The analysed windows: ``num_seqs`` seeded random windows of the validation split (N, T)."""
    from inheritune.data import windows as data

    data.check_length(val, cfg.seq_len, "validation")
    return data.sample_windows(val, cfg.num_seqs, cfg.seq_len, cfg.seed)


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode with eager attention, restoring both afterwards.

    Fused kernels (SDPA, flash) return no attention weights, so a model loaded for training
    is switched for the analysis only.
    """
    before = getattr(model.config, "_attn_implementation", None)
    was_training = model.training
    if before != "eager":
        model.set_attn_implementation("eager")
    model.eval()
    try:
        yield
    finally:
        if before not in (None, "eager"):
            model.set_attn_implementation(before)
        model.train(was_training)


class BlockChange:
    """How much each block changes its input, from hooks on the blocks during the same pass:
    Block Influence (:mod:`.scoring`, every token) and the angular distance of every span at
    the last token (Gromov et al.), from the last-token states only (memory (L + 1) x N x D)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.change = [0.0] * num_layers  # sum over tokens of 1 - cos(input, output)
        self.tokens = [0] * num_layers
        self.last: list[list[torch.Tensor]] = [[] for _ in range(num_layers + 1)]  # (B, 1, D)
        self._input: list[torch.Tensor | None] = [None] * num_layers

    def enter(self, i: int, h: torch.Tensor) -> None:
        self._input[i] = h.detach()
        self.last[i].append(h.detach()[:, -1:].float().cpu())

    def leave(self, i: int, h: torch.Tensor) -> None:
        x, self._input[i] = self._input[i], None
        n = x.shape[0] * x.shape[1]
        self.change[i] += float(scoring.block_influence_from_states([x, h.detach()])[0]) * n
        self.tokens[i] += n
        if i == self.num_layers - 1:
            self.last[i + 1].append(h.detach()[:, -1:].float().cpu())

    def block_influence(self) -> np.ndarray:
        return np.array([c / max(1, n) for c, n in zip(self.change, self.tokens, strict=True)])

    def angular(self) -> list[list[float]]:
        states = [torch.cat(chunks) for chunks in self.last]
        return [
            scoring.angular_distances_from_states(states, n, "last").tolist()
            for n in range(1, self.num_layers + 1)
        ]


class HeadMeans:
    """Running per-(layer, head) means over sequences of the per-sequence metrics.

    Batches are added as they come; :meth:`mean` divides by the number of sequences each layer
    has seen, so the result is the mean of per-sequence values (docs/design/paper.md §1), whatever the
    batching.
    """

    KEYS = ("rank", "mass", "top_share", "rank1")

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.sums: dict[str, torch.Tensor] = {}
        self.seqs = [0] * num_layers  # sequences that reached each layer's hook
        self.attn_sums: list[torch.Tensor | None] = [None] * num_layers  # (H, T, T) each

    def add_matrices(self, layer: int, attn: torch.Tensor) -> None:
        """Sum the (B, H, T, T) weights over the batch, for :meth:`rank_of_mean`."""
        total = attn.double().sum(0).cpu()  # (H, T, T)
        prev = self.attn_sums[layer]
        self.attn_sums[layer] = total if prev is None else prev + total

    def rank_of_mean(self, tau: float) -> np.ndarray:
        """(L, H) k*(tau) of each head's mean matrix over the sequences added."""
        means = torch.stack([s / n for s, n in zip(self.attn_sums, self.seqs, strict=True)])
        return metrics.approx_rank(means, tau).numpy().astype(np.float64)  # (L, H, T, T) in

    def add(self, layer: int, stats: metrics.HeadStats) -> None:
        parts = {
            "rank": stats.rank,
            "mass": stats.mass,
            "top_share": stats.top_share,
            "rank1": stats.rank == 1,
        }
        for key, value in parts.items():  # (B, H)
            if key not in self.sums:
                self.sums[key] = torch.zeros(self.num_layers, value.shape[1], dtype=torch.float64)
            self.sums[key][layer] += value.double().sum(0).cpu()
        self.seqs[layer] += stats.rank.shape[0]

    def mean(self, key: str) -> np.ndarray:
        """(L, H) mean over sequences of ``key`` (one of :attr:`KEYS`)."""
        counts = torch.tensor(self.seqs, dtype=torch.float64).clamp_min(1).unsqueeze(-1)
        return (self.sums[key] / counts).numpy()


def run_analysis(
    model: torch.nn.Module,
    input_ids: np.ndarray | torch.Tensor,
    cfg: AnalyzeConfig | None = None,
    *,
    model_name: str | None = None,
    progress: bool = True,
) -> AnalysisResult:
    """Attention-collapse metrics of every head of every layer of ``model`` on ``input_ids``.

    ``input_ids`` are (N, T) token windows; ``cfg`` supplies tau, eta, batch_size, lazy_tol and
    min_group (its model/data fields are not used here). The model is switched to eager
    attention and eval mode for the duration and restored afterwards.
    """
    cfg = cfg or AnalyzeConfig()
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ConfigError(f"input_ids must be a non-empty (N, T) array, got {tuple(ids.shape)}")
    models.check_context(model.config, ids.shape[1])
    arch = get_arch(model)
    acc = HeadMeans(arch.num_layers)

    def make_hook(layer: int):
        def hook(_module, _args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(
                    f"layer {layer}'s attention module returned no weights although the model "
                    f"runs with attn_implementation='eager'; its attention code does not expose "
                    f"them, so it cannot be analysed"
                )
            acc.add(layer, metrics.head_stats(weights, cfg.tau, cfg.eta))  # (B, H, T, T) in
            if cfg.rank_of_mean:
                acc.add_matrices(layer, weights)
            return (output[0], None, *output[2:])  # drop the weights now

        return hook

    change = BlockChange(arch.num_layers)

    def block_hooks(i: int):
        def enter(_mod, args, kwargs):
            change.enter(i, args[0] if args else kwargs["hidden_states"])

        def leave(_mod, _args, output):
            change.leave(i, output[0] if isinstance(output, tuple) else output)

        block = arch.layers[i]
        return [
            block.register_forward_pre_hook(enter, with_kwargs=True),
            block.register_forward_hook(leave),
        ]

    device = next(model.parameters()).device
    start = time.perf_counter()
    handles = [
        arch.attention(i).register_forward_hook(make_hook(i)) for i in range(arch.num_layers)
    ]
    handles += [h for i in range(arch.num_layers) for h in block_hooks(i)]
    try:
        with eager_attention(model), torch.inference_mode():
            body = model.base_model  # the blocks without the LM head: logits are not needed
            batches = range(0, ids.shape[0], cfg.batch_size)
            bar = tqdm(batches, desc="analysing", unit="batch", disable=not progress, leave=False)
            for lo in bar:
                batch = ids[lo : lo + cfg.batch_size].to(device)  # (B, T)
                body(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, n in enumerate(acc.seqs) if n != ids.shape[0]]
    if missing:  # a block that bypasses its attention module would silently report nothing
        raise RuntimeError(f"the attention hooks of layers {missing} did not see every sequence")
    return AnalysisResult(
        model=model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        input_ids=ids.cpu().numpy(),
        rank=acc.mean("rank"),
        mass=acc.mean("mass"),
        top_share=acc.mean("top_share"),
        rank1_frac=acc.mean("rank1"),
        tau=cfg.tau,
        eta=cfg.eta,
        lazy_tol=cfg.lazy_tol,
        min_group=cfg.min_group,
        seconds=time.perf_counter() - start,
        rank_of_mean=acc.rank_of_mean(cfg.tau) if cfg.rank_of_mean else None,
        block_influence=change.block_influence(),
        angular=change.angular(),
    )


def analyze(cfg: AnalyzeConfig) -> AnalysisResult:
    """The ``inheritune analyze`` command: check inputs, sample, analyse, report."""
    from inheritune import distributed

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    # Cheap checks first (the model's config, the data, the windows), then the weights.
    loaded = inputs.load(
        cfg.model,
        cfg.data,
        weights=False,
        seq_lens={"seq_len": cfg.seq_len},
        trust_remote_code=cfg.trust_remote_code,
        dist_timeout=cfg.dist_timeout,
    )
    input_ids = sample_inputs(loaded.tokens.val, cfg)
    model = inputs.load(
        cfg.model,
        device=cfg.device,
        tokenizer=False,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation="eager",
    ).model
    result = run_analysis(model, input_ids, cfg, model_name=cfg.model)
    result.data, result.seed = cfg.data, cfg.seed
    if distributed.setup().is_main:  # under torchrun every process computes the same report
        write_report(result, out)
        save_resolved(cfg, out / "config.yaml")
        print(summary_table(result))
        print(f"report written to {out}/ (analysis.json, heads.csv, *.png)", file=sys.stderr)
    return result
