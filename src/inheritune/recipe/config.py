"""The settings of ``inheritune run``: :class:`RecipeConfig`, one
:class:`~inheritune.training.train.TrainConfig` for every round composed with the recipe's own settings
(depths, growth, target, bridge, report), and the configs it derives (each round's training,
the analysis).

A YAML preset (``src/inheritune/presets``) is this dataclass written down; the command line is its
flat flags. :meth:`RecipeConfig.spec` is what a finished round depends on: a rerun with other
values of these is refused, while :data:`RESUMABLE_CHANGES` (when to stop, how to report) may
change between runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from inheritune.analysis import analyze as analyze_mod
from inheritune.analysis.selection import SelectConfig
from inheritune.config import (
    ConfigError,
    check_positive,
    check_unit_interval,
    flag,
    flat_dict,
    nested,
    validate_numbers,
)
from inheritune.export import gguf as gguf_export
from inheritune.surgery import build as surgery
from inheritune.surgery.bridge import BridgeConfig
from inheritune.training import checkpoint as ckpt
from inheritune.training.config import TrainConfig

GROWTH_MODES = ("reinit", "warm")
# --recipe: inheritune (the default: the layers that matter, a bridge at every seam; the winner of
# benchmarks/results/study.md) or paper (arXiv 2404.08634's Algorithm 1: the first l layers, no
# bridge, growth by the next layers).
RECIPES = ("inheritune", "paper")
BASELINES = ("none", "paper")
# What each --recipe sets; the inheritune values are also the flags' defaults.
RECIPE_SETTINGS = {
    "inheritune": {"select": "bi", "bridge": "block"},
    "paper": {"select": "first", "bridge": "none"},
}
TARGETS = ("reference", "trained-reference", "scratch-reference")
# Settings that only decide when the recipe stops or how the report is measured; a finished or
# interrupted run may be continued with different values (e.g. a larger --max-rounds).
RESUMABLE_CHANGES = frozenset(
    {
        "out",
        "export_gguf",
        "export_outtype",
        "max_rounds",
        "max_depth",
        "min_rounds",
        "tolerance",
        "speed_batch_size",
        "speed_seq_len",
        "speed_warmup",
        "speed_iters",
        "eval_every",
        "save_every",
        "keep_last",
        "log_every",
        "dist_timeout",
        "tensorboard",
        "baseline",  # an extra training beside the rounds: a finished run may add it
    }
)


def _h(text: str, **kw: Any) -> dict[str, Any]:
    return {"help": text, **kw}


@dataclass
class RecipeConfig:
    """Settings of ``inheritune run``; a YAML preset is this dataclass written down (flat keys).

    The training settings of every round (``steps`` ... ``distill_temperature``) have the same
    names and meaning as ``inheritune train``'s flags.
    """

    train: TrainConfig = nested(  # noqa: RUF009 (nested() returns a dataclasses.field)
        TrainConfig,
        overrides={
            "out": "runs/run",
            "steps": 1000,
            "warmup": 100,
            "eval_every": 200,
            "eval_tokens": 65536,
            "save_every": 200,
            "log_every": 10,
        },
        owned=("resume", "teacher"),
    )
    # ^ the training settings of every round, the same flat flags as `inheritune train`
    # (--model is the reference, --out the run folder, --steps the paper's T per round, --seed
    # also seeds the analysis windows); only the defaults above differ from train's.

    # -- step 1: analysis
    analysis: bool = field(
        default=True, metadata=_h("analyse the reference's attention collapse first")
    )
    analysis_num_seqs: int = field(
        default=100, metadata=_h("validation windows analysed (paper: 100)")
    )
    analysis_seq_len: int = field(
        default=100, metadata=_h("tokens per analysed window (paper: 100)")
    )
    tau: float = field(
        default=0.9, metadata=_h("spectral energy share for the approximate rank (paper: 0.9)")
    )
    eta: float = field(
        default=0.9, metadata=_h("mass share for the dominant-column count (paper: 0.9)")
    )

    # -- step 2/6: depth schedule
    init_depth: str = field(
        default="half",
        metadata=_h(
            "initial depth: 'half' (L/2, paper), 'analysis' (analysis-based suggestion) or a number"
        ),
    )
    grow_by: int = field(default=2, metadata=_h("layers added per round (paper: 2)"))
    max_depth: int | None = field(
        default=None, metadata=_h("deepest target tried (default: reference layers - 1)")
    )
    max_rounds: int = field(default=5, metadata=_h("most training rounds"))
    min_rounds: int = field(
        default=1, metadata=_h("train at least this many rounds even if matched earlier")
    )
    growth: str = field(
        default="reinit",
        metadata={
            "help": "reinit: each round restarts from the reference's first l layers (paper); "
            "warm: keep the trained layers and add the next reference layers",
            "choices": GROWTH_MODES,
        },
    )
    parts: str = field(
        default="block",
        metadata={
            "help": "what each inherited block brings (paper ablation)",
            "choices": surgery.PARTS,
        },
    )
    # --select: which reference layers a round keeps (first: the paper's first l), and growth
    # adds back the dropped layers the rule ranks highest (inheritune.analysis.selection)
    recipe: str = field(
        default="inheritune",
        metadata={
            "help": "inheritune: keep the layers that matter (--select bi) with a fitted bridge "
            "at every seam (--bridge block), the winner of benchmarks/results/study.md; paper: "
            "the paper's Algorithm 1 (--select first --bridge none: the first l layers, growth "
            "by the next ones)",
            "choices": RECIPES,
        },
    )
    baseline: str = field(
        default="none",
        metadata={
            "help": "paper: also train the paper's choice of layers (the first ones, with this "
            "run's --bridge) at the final round's size and with one round's budget, on the same "
            "windows, and show it beside the rounds in the report and its plot",
            "choices": BASELINES,
        },
    )
    selection: SelectConfig = nested(  # noqa: RUF009 (nested() returns a dataclasses.field)
        SelectConfig, overrides={"select": RECIPE_SETTINGS["inheritune"]["select"]}
    )
    calibrate_iters: int = field(
        default=0,
        metadata=_h(
            "L-BFGS iterations fitting the final norm to each new target before training "
            "(0 = off; see inheritune.surgery.calibrate)"
        ),
    )
    calibrate_windows: int = field(
        default=4, metadata=_h("training windows of --seq-len tokens used by the calibration")
    )
    bridging: BridgeConfig = nested(  # noqa: RUF009 (nested() returns a dataclasses.field)
        BridgeConfig, overrides={"bridge": RECIPE_SETTINGS["inheritune"]["bridge"]}
    )
    # ^ --bridge block: every round's target gets a fitted block in place of each removed span
    # of its l inherited ones (for --select first: one on top, a standard l+1-layer checkpoint;
    # inheritune.surgery.bridge). The bridge's own
    # optional final-norm refit is --norm-iters (off by default: on few windows it overfits,
    # benchmarks/results/bridge.md); --calibrate-iters applies to --bridge none only.

    # -- step 5: the comparison
    target: str = field(
        default="reference",
        metadata={
            "help": "loss to match: the reference's zero-shot validation loss ('reference'), "
            "the reference trained further with one round's budget ('trained-reference'), or "
            "the reference's architecture trained from random init with one round's budget "
            "on the same data ('scratch-reference': the paper's protocol)",
            "choices": TARGETS,
        },
    )
    export_gguf: str | None = field(
        default=None,
        metadata=_h(
            "also write the final model as this GGUF file for llama.cpp and Ollama "
            "(inheritune export; overwritten on a rerun)"
        ),
    )
    export_outtype: str = field(
        default="f16",
        metadata=_h("tensor type of --export-gguf's matrices", choices=gguf_export.OUTTYPES),
    )
    extra_eval: str | None = field(
        default=None,
        metadata=_h(
            "more corpora to evaluate on, comma-separated (e.g. brown,botchan: general "
            "English): their held-out split (brown: its held-out samples; others: all of it) "
            "scores the reference and every round at each of the loop's evaluations, so that "
            "domain adaptation to --data and real recovery can be told apart"
        ),
    )
    tolerance: float = field(
        default=0.0,
        metadata=_h("a round matches when its val loss <= target loss + tolerance (nats/token)"),
    )

    # -- report: inference speed
    speed_batch_size: int = field(default=8, metadata=_h("batch of the timed forward passes"))
    speed_seq_len: int | None = field(
        default=None, metadata=_h("tokens per timed sequence (default: seq_len)")
    )
    speed_warmup: int = field(default=2, metadata=_h("untimed forward passes before timing"))
    speed_iters: int = field(
        default=5, metadata=_h("timed forward passes (the median is reported)")
    )

    def __post_init__(self) -> None:
        validate_numbers(self)  # finite, in range, of the declared type (config.py)
        if self.export_outtype not in gguf_export.OUTTYPES:
            raise ConfigError(
                f"--export-outtype must be one of {', '.join(gguf_export.OUTTYPES)}, got "
                f"{self.export_outtype!r}"
            )
        self.init_depth = str(self.init_depth).strip()
        if self.init_depth not in ("half", "analysis") and (
            not self.init_depth.isdigit() or int(self.init_depth) < 1
        ):
            raise ConfigError(
                f"--init-depth must be 'half', 'analysis' or a positive number of layers, "
                f"got {self.init_depth!r}"
            )
        if self.init_depth == "analysis" and not self.analysis:
            raise ConfigError("--init-depth analysis needs the analysis (drop --no-analysis)")
        for name, choices in (
            ("growth", GROWTH_MODES),
            ("target", TARGETS),
            ("recipe", RECIPES),
            ("baseline", BASELINES),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"{flag(name)} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                )
        self._apply_recipe()
        if self.baseline == "paper" and self.selection.rule == "first":
            raise ConfigError(
                "--baseline paper trains the paper's choice of layers beside the rounds, but "
                "this run already keeps the first layers (--select first / --recipe paper)"
            )
        if self.bridging.bridge != "none" and self.growth == "warm":
            raise ConfigError(
                "--growth warm needs --bridge none (a trained bridge cannot grow; --bridge block "
                "is run's default)"
            )
        if self.parts not in surgery.PARTS:
            raise ConfigError(
                f"--parts must be one of {', '.join(surgery.PARTS)}, got {self.parts!r}"
            )
        for name in ("grow_by", "max_rounds", "min_rounds", "analysis_num_seqs"):
            check_positive(name, getattr(self, name))
        for name in ("analysis_seq_len", "speed_batch_size", "speed_iters"):
            check_positive(name, getattr(self, name))
        check_positive("speed_warmup", self.speed_warmup, allow_zero=True)
        if self.speed_seq_len is not None:
            check_positive("speed_seq_len", self.speed_seq_len)
        if self.max_depth is not None:
            check_positive("max_depth", self.max_depth)
        if self.min_rounds > self.max_rounds:
            raise ConfigError(
                f"--min-rounds {self.min_rounds} exceeds --max-rounds {self.max_rounds}"
            )
        check_positive("tolerance", self.tolerance, allow_zero=True)
        check_unit_interval("tau", self.tau)
        check_unit_interval("eta", self.eta)

    def _apply_recipe(self) -> None:
        """``--recipe paper`` sets --select first --bridge none. The defaults of those flags are
        the inheritune recipe's, so a --select or --bridge other than a recipe's own value
        cannot be told apart from a choice and is refused rather than overridden."""
        if self.recipe == "inheritune":
            return
        own = {
            "select": (self.selection.select, {v["select"] for v in RECIPE_SETTINGS.values()}),
            "bridge": (self.bridging.bridge, {v["bridge"] for v in RECIPE_SETTINGS.values()}),
        }
        for name, (value, allowed) in own.items():
            if value not in allowed:
                raise ConfigError(
                    f"--recipe {self.recipe} sets {flag(name)} "
                    f"{RECIPE_SETTINGS[self.recipe][name]}; drop {flag(name)} {value} or "
                    f"--recipe {self.recipe}"
                )
        settings = RECIPE_SETTINGS[self.recipe]
        self.selection = replace(self.selection, select=settings["select"])
        self.bridging = replace(self.bridging, bridge=settings["bridge"])

    # -- derived configs

    def round_train_config(self, out: Path, model: str | None = None) -> TrainConfig:
        """The TrainConfig of one round (or of the trained reference) written into ``out``.

        An interrupted round continues from its own checkpoints; a new one starts fresh.
        """
        resume = bool(ckpt.list_checkpoints(ckpt.checkpoints_root(out)))
        tb = self.train.tensorboard and str(Path(self.train.tensorboard) / Path(out).name)
        return replace(
            self.train, model=model or self.train.model, out=str(out), resume=resume, tensorboard=tb
        )

    def analyze_config(self, out: Path) -> analyze_mod.AnalyzeConfig:
        return analyze_mod.AnalyzeConfig(
            model=self.train.model,
            data=self.train.data,
            num_seqs=self.analysis_num_seqs,
            seq_len=self.analysis_seq_len,
            tau=self.tau,
            eta=self.eta,
            seed=self.train.seed,
            out=str(out),
            trust_remote_code=self.train.trust_remote_code,
        )

    @property
    def extra_sets(self) -> list[str]:
        """The ``--extra-eval`` corpora, in order."""
        return [x.strip() for x in (self.extra_eval or "").split(",") if x.strip()]

    def spec(self) -> dict[str, Any]:
        """Every setting a finished round depends on (see RESUMABLE_CHANGES)."""
        return {k: v for k, v in flat_dict(self).items() if k not in RESUMABLE_CHANGES}
