"""``inheritune analyze``: a layer-by-layer attention-collapse report (PAPER.md §1).

Samples ``--num-seqs`` windows of ``--seq-len`` tokens from the validation split, runs the model
with eager attention (fused kernels return no weights) and, for every head of every layer,
computes the approximate rank k*(tau), the dominant-column mass m*(eta) and the largest column's
share, each averaged over the sequences. From those: MaxRank and AvgMass per layer, lazy layers,
contiguous lazy groups and a suggested initial depth for the recipe. ``analysis.json`` records
the exact definitions used (:func:`definitions`); layers are numbered from 0 there and in every
table (the paper's plots number from 1). ``--rank-of-mean`` adds the rank of the mean attention
matrix as a second, separately labelled number.

Memory stays flat in the number of layers: a forward hook on each block's attention module
reduces that layer's ``(B, H, T, T)`` weights to per-(sequence, head) numbers at once and drops
them from the block's output; the LM head is never run (only the base model is called).

In-process use (the recipe calls this)::

    ids = sample_inputs(tokens.val, cfg)                      # (N, T)
    result = run_analysis(model, ids, cfg, model_name="...")  # AnalysisResult
    write_report(result, "runs/analyze")
    result = load_report("runs/analyze")                      # the same, read back
    result.suggested_depth, result.half_depth, result.lazy_layers, result.groups
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from inheritune import assets, inputs, metrics, models, plots
from inheritune.arch import get_arch
from inheritune.config import (
    ConfigError,
    check_positive,
    check_unit_interval,
    flag,
    save_resolved,
    validate_numbers,
)
from inheritune.distributed import DEFAULT_TIMEOUT_S
from inheritune.mergekit import LAYER_NUMBERING


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


@dataclass
class AnalysisResult:
    """Per-head means over the N sequences, and everything derived from them per layer."""

    model: str
    input_ids: np.ndarray  # (N, T) the exact windows analysed
    rank: np.ndarray  # (L, H) mean k*(tau)
    mass: np.ndarray  # (L, H) mean m*(eta)
    top_share: np.ndarray  # (L, H) mean p_max
    rank1_frac: np.ndarray  # (L, H) share of sequences on which the head has k* == 1
    tau: float = 0.9
    eta: float = 0.9
    lazy_tol: float = 0.05
    min_group: int = 2
    seconds: float = 0.0
    data: str | None = None
    seed: int | None = None
    rank_of_mean: np.ndarray | None = None  # (L, H) k*(tau) of the mean matrix, if asked for

    @property
    def num_layers(self) -> int:
        return int(self.rank.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.rank.shape[1])

    @property
    def max_rank(self) -> np.ndarray:  # (L,)
        return metrics.layer_max_rank(torch.from_numpy(self.rank)).numpy()

    @property
    def avg_mass(self) -> np.ndarray:  # (L,)
        return metrics.layer_avg_mass(torch.from_numpy(self.mass)).numpy()

    @property
    def layer_top_share(self) -> np.ndarray:  # (L,) mean over heads of p_max
        return self.top_share.mean(-1)

    @property
    def lazy(self) -> np.ndarray:  # (L,) bool
        return metrics.lazy_layers(torch.from_numpy(self.max_rank), self.lazy_tol).numpy()

    @property
    def lazy_layers(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.lazy)]

    @property
    def groups(self) -> list[tuple[int, int]]:
        return metrics.lazy_groups(torch.from_numpy(self.max_rank))

    @property
    def half_depth(self) -> int:
        """The paper's default initial depth, L // 2 (at least 1)."""
        return max(1, self.num_layers // 2)

    @property
    def suggestion(self) -> tuple[int, str]:
        """Analysis-based initial depth and the rule that produced it."""
        return metrics.suggest_depth(self.groups, self.num_layers, self.min_group)

    @property
    def suggested_depth(self) -> int:
        return self.suggestion[0]

    def to_dict(self) -> dict:
        """The content of ``analysis.json``."""
        max_rank, avg_mass, lazy = self.max_rank, self.avg_mass, self.lazy
        group_of = {i: g for g, (a, b) in enumerate(self.groups) for i in range(a, b + 1)}
        depth, rule = self.suggestion
        layers = [
            {
                "layer": i,
                "max_rank": float(max_rank[i]),
                "avg_rank": float(self.rank[i].mean()),
                "rank_per_head": self.rank[i].tolist(),
                "rank1_frac_per_head": self.rank1_frac[i].tolist(),
                "avg_mass": float(avg_mass[i]),
                "mass_per_head": self.mass[i].tolist(),
                "top_col_share": float(self.layer_top_share[i]),
                "top_col_share_per_head": self.top_share[i].tolist(),
                "lazy": bool(lazy[i]),
                "lazy_group": group_of.get(i),
            }
            for i in range(self.num_layers)
        ]
        if self.rank_of_mean is not None:  # a different number, under its own name
            for i, layer in enumerate(layers):
                layer["rank_of_mean_per_head"] = self.rank_of_mean[i].tolist()
                layer["max_rank_of_mean"] = float(self.rank_of_mean[i].max())
        return {
            "model": self.model,
            "data": self.data,
            "seed": self.seed,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_seqs": int(self.input_ids.shape[0]),
            "seq_len": int(self.input_ids.shape[1]),
            "tau": self.tau,
            "eta": self.eta,
            "layer_numbering": LAYER_NUMBERING,
            "definitions": definitions(self.tau, self.eta, self.rank_of_mean is not None),
            "rules": RULES | {"lazy_layer": RULES["lazy_layer"].format(tol=self.lazy_tol)},
            "lazy_tol": self.lazy_tol,
            "min_group": self.min_group,
            "lazy_layers": self.lazy_layers,
            "lazy_groups": [list(g) for g in self.groups],
            "suggested_depth": {"paper_half": self.half_depth, "analysis": depth, "rule": rule},
            "seconds": round(self.seconds, 3),
            "layers": layers,
            "input_ids": self.input_ids.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> AnalysisResult:
        """Inverse of :meth:`to_dict` (derived per-layer values are recomputed)."""

        def per_head(key: str) -> np.ndarray:
            return np.array([layer[key] for layer in d["layers"]], dtype=np.float64)  # (L, H)

        has_rom = bool(d["layers"]) and "rank_of_mean_per_head" in d["layers"][0]

        return cls(
            model=d["model"],
            input_ids=np.array(d["input_ids"], dtype=np.int64),
            rank=per_head("rank_per_head"),
            mass=per_head("mass_per_head"),
            top_share=per_head("top_col_share_per_head"),
            rank1_frac=per_head("rank1_frac_per_head"),
            tau=d["tau"],
            eta=d["eta"],
            lazy_tol=d["lazy_tol"],
            min_group=d.get("min_group", 2),
            seconds=d.get("seconds", 0.0),
            data=d.get("data"),
            seed=d.get("seed"),
            rank_of_mean=per_head("rank_of_mean_per_head") if has_rom else None,
        )


def load_report(path: str | Path) -> AnalysisResult:
    """Read a report written by :func:`write_report` (its folder or its analysis.json)."""
    p = Path(path)
    p = p / "analysis.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no analysis report at {p}")
    return AnalysisResult.from_dict(json.loads(p.read_text()))


# Written into analysis.json and the terminal summary, so a report explains its own numbers.
RULES = {
    "rank": "k*(tau) per (sequence, head) = fewest singular values with sum s_i^2 >= tau * "
    "||A||_F^2; rank_per_head = mean of k* over the sequences (not the rank of the mean matrix)",
    "max_rank": "MaxRank(l) = max over heads of rank_per_head",
    "mass": "m*(eta) per (sequence, head) = fewest columns (largest ||A[:,j]||^2 first) holding "
    ">= eta of ||A||_F^2; mass_per_head = mean over sequences; avg_mass = mean over heads",
    "top_col_share": "largest ||A[:,j]||^2 / ||A||_F^2, mean over sequences (and heads per layer)",
    "lazy_layer": "MaxRank <= 1 + {tol} (MaxRank == 1 up to that tolerance)",
    "lazy_group": "scan layers first to last; a group starts at a layer with MaxRank < 2 and "
    "ends at the farthest layer that also has MaxRank < 2 while the group's mean MaxRank "
    "(AvgRank) stays < 2, i.e. floor(AvgRank) == 1; the scan resumes after it",
}


def definitions(tau: float, eta: float, rank_of_mean: bool = False) -> dict:
    """The exact metric definitions behind a report's numbers (``definitions`` in analysis.json)."""
    return {
        "attention": "A = softmax(Q K^T / sqrt(d_head) + causal mask) of one head on one window, "
        "T x T, row-stochastic, from eager attention",
        "spectral_energy": "squared singular values s_1^2 >= ... >= s_T^2 of A; the energy share "
        "of the top k is sum_{i<=k} s_i^2 / sum_j s_j^2 (= / ||A||_F^2)",
        "rank": "k*(tau) = smallest k whose energy share >= tau, per (window, head); "
        "rank_per_head = mean over the windows of k* (mean of per-window ranks)",
        "mass": "column shares p_j = ||A[:, j]||_2^2 / ||A||_F^2 (squared column norms); m*(eta) "
        "= fewest columns, largest p_j first, whose shares sum to >= eta, per (window, head); "
        "mass_per_head = mean over the windows",
        "tau": tau,
        "eta": eta,
        "share_tolerance": f"a share counts as reaching tau or eta within {metrics.SHARE_ATOL}",
        "rank_of_mean": "rank_of_mean_per_head = k*(tau) of the mean over the windows of A (one "
        "matrix per head); a different number from rank_per_head, for comparison with write-ups "
        "that use it"
        if rank_of_mean
        else "not computed (--rank-of-mean off)",
    }


def sample_inputs(val: np.ndarray, cfg: AnalyzeConfig) -> np.ndarray:
    """The analysed windows: ``num_seqs`` seeded random windows of the validation split (N, T)."""
    from inheritune import data

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


class HeadMeans:
    """Running per-(layer, head) means over sequences of the per-sequence metrics.

    Batches are added as they come; :meth:`mean` divides by the number of sequences each layer
    has seen, so the result is the mean of per-sequence values (PAPER.md §1), whatever the
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

    device = next(model.parameters()).device
    start = time.perf_counter()
    handles = [
        arch.attention(i).register_forward_hook(make_hook(i)) for i in range(arch.num_layers)
    ]
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
    )


def summary_table(result: AnalysisResult) -> str:
    """A readable per-layer table plus the lazy layers, groups and depth suggestions."""
    max_rank, avg_mass, lazy, top = (
        result.max_rank,
        result.avg_mass,
        result.lazy,
        result.layer_top_share,
    )
    group_of = {i: g for g, (a, b) in enumerate(result.groups) for i in range(a, b + 1)}
    n, t = result.input_ids.shape
    lines = [
        f"attention collapse of {result.model}: {result.num_layers} layers x "
        f"{result.num_heads} heads, {n} windows x {t} tokens, tau={result.tau}, eta={result.eta}",
        f"{'layer':>5} {'MaxRank':>8} {'AvgRank':>8} {'AvgMass':>8} {'p_max':>6} "
        f"{'rank1 heads':>11} {'lazy':>5} {'group':>5}"
        + (f" {'MaxRankOfMean':>13}" if result.rank_of_mean is not None else ""),
    ]
    for i in range(result.num_layers):
        rank1_heads = int((result.rank[i] <= 1.0 + result.lazy_tol).sum())
        lines.append(
            f"{i:>5} {max_rank[i]:>8.2f} {result.rank[i].mean():>8.2f} {avg_mass[i]:>8.2f} "
            f"{top[i]:>6.2f} {f'{rank1_heads}/{result.num_heads}':>11} "
            f"{'yes' if lazy[i] else '':>5} {group_of.get(i, ''):>5}"
            + (f" {result.rank_of_mean[i].max():>13.0f}" if result.rank_of_mean is not None else "")
        )
    depth, rule = result.suggestion
    groups = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in result.groups) or "none"
    lines += [
        f"lazy layers (MaxRank <= 1 + {result.lazy_tol}): {result.lazy_layers or 'none'}",
        f"lazy groups (floor(AvgRank) == 1): {groups}",
        f"suggested initial depth: paper L/2 = {result.half_depth}; analysis = {depth} ({rule})",
        "layers are numbered from 0 (the paper's plots number from 1)",
    ]
    if result.rank_of_mean is not None:
        lines.append(
            "MaxRankOfMean: max over heads of k*(tau) of the mean attention matrix (--rank-of-mean);"
            " not the paper's MaxRank, which takes the mean of per-window ranks"
        )
    return "\n".join(lines)


def write_report(result: AnalysisResult, out_dir: str | Path) -> dict[str, Path]:
    """Write analysis.json, heads.csv, summary.txt and the plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "analysis.json",
        "csv": out / "heads.csv",
        "summary": out / "summary.txt",
    }
    paths["json"].write_text(json.dumps(result.to_dict()))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        rom = result.rank_of_mean
        w.writerow(
            ["layer", "head", "rank", "rank1_frac", "mass", "top_col_share", "lazy_layer"]
            + (["rank_of_mean"] if rom is not None else [])
        )
        for i in range(result.num_layers):
            for h in range(result.num_heads):
                w.writerow(
                    [
                        i,
                        h,
                        f"{result.rank[i, h]:.4f}",
                        f"{result.rank1_frac[i, h]:.4f}",
                        f"{result.mass[i, h]:.4f}",
                        f"{result.top_share[i, h]:.4f}",
                        int(result.lazy[i]),
                    ]
                    + ([int(rom[i, h])] if rom is not None else [])
                )
    rules = result.to_dict()["rules"]
    paths["summary"].write_text(
        summary_table(result) + "\n\nrules:\n" + "".join(f"  {k}: {v}\n" for k, v in rules.items())
    )
    title = f"{result.model} (tau={result.tau}, N={result.input_ids.shape[0]})"
    paths["heatmap"] = plots.plot_rank_heatmap(result.rank, out / "rank_heatmap.png", title=title)
    paths["layers"] = plots.plot_layer_collapse(
        result.max_rank,
        result.avg_mass,
        result.lazy,
        out / "layers.png",
        groups=result.groups,
        title=title,
    )
    return paths


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
