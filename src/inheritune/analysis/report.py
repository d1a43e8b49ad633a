"""What an attention-collapse analysis found, and its report files (``inheritune analyze``).

:class:`AnalysisResult` holds the per-(layer, head) means measured by
:func:`inheritune.analysis.analyze.run_analysis` and derives the per-layer conclusions from them (MaxRank,
AvgMass, lazy layers, lazy groups, the suggested initial depth) with :mod:`inheritune.analysis.metrics`.
:func:`write_report` writes it as ``analysis.json`` (every number, the exact definitions behind
them and the window token ids), ``heads.csv`` (one row per head), ``summary.txt``
(:func:`summary_table` plus the rules) and two plots; :func:`load_report` reads
``analysis.json`` back into the same result.

Usage::

    paths = write_report(result, "runs/analyze")   # {"json": ..., "csv": ..., "summary": ...}
    print(summary_table(result))
    result = load_report("runs/analyze")           # the same, read back
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inheritune.analysis import metrics, plots, selection
from inheritune.models.arch import LAYER_NUMBERING


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
    block_influence: np.ndarray | None = None  # (L,) ShortGPT's BI, every token
    angular: list[list[float]] | None = None  # angular[n - 1][i]: span n from block i, last token

    def layer_scores(self) -> selection.LayerScores:
        """The per-layer scores the ``--select`` rules use, as measured on these windows."""
        bi = None if self.block_influence is None else [float(x) for x in self.block_influence]
        return selection.LayerScores(
            self.num_layers,
            block_influence=bi,
            angular=self.angular,
            max_rank=[float(x) for x in self.max_rank],
        )

    def selections(self) -> dict[int, dict[str, list[int]]]:
        """What every ``--select`` rule keeps at the paper's and the analysis' depth."""
        depths = sorted({self.half_depth, min(self.suggested_depth, self.num_layers)})
        scores = self.layer_scores()
        return {k: selection.selection_table(self.num_layers, k, scores) for k in depths}

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
        if self.block_influence is not None:
            for i, layer in enumerate(layers):
                layer["block_influence"] = float(self.block_influence[i])
                layer["angular_distance"] = self.angular[0][i]  # span 1, last token
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
            "angular_distance_spans": self.angular,
            "selections": {str(k): v for k, v in self.selections().items()},
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
            block_influence=np.array([layer["block_influence"] for layer in d["layers"]])
            if d["layers"] and "block_influence" in d["layers"][0]
            else None,
            angular=d.get("angular_distance_spans"),
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
        + (f" {'BI':>7} {'angular':>7}" if result.block_influence is not None else "")
        + (f" {'MaxRankOfMean':>13}" if result.rank_of_mean is not None else ""),
    ]
    for i in range(result.num_layers):
        rank1_heads = int((result.rank[i] <= 1.0 + result.lazy_tol).sum())
        lines.append(
            f"{i:>5} {max_rank[i]:>8.2f} {result.rank[i].mean():>8.2f} {avg_mass[i]:>8.2f} "
            f"{top[i]:>6.2f} {f'{rank1_heads}/{result.num_heads}':>11} "
            f"{'yes' if lazy[i] else '':>5} {group_of.get(i, ''):>5}"
            + (
                f" {result.block_influence[i]:>7.4f} {result.angular[0][i]:>7.4f}"
                if result.block_influence is not None
                else ""
            )
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
    if result.block_influence is not None:
        lines.append(
            "BI: Block Influence, 1 - mean cos(input, output) over every token (ShortGPT); "
            "angular: arccos(cos(input, output)) / pi at the last token (Gromov et al.)"
        )
        for k, table in result.selections().items():
            lines.append(
                f"layers each --select rule keeps at {k} of {result.num_layers} (these windows):"
            )
            lines += [
                f"  {rule:>9}: {selection.layer_ranges(kept)}" for rule, kept in table.items()
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
