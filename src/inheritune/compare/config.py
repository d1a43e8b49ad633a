""":class:`CompareConfig`: what ``inheritune compare`` runs, as flags and YAML.

The comparison depth and variants, the layer selection (``--select``, and the calibration windows
the scored selections are measured on),
the distillation temperature and the mergekit export, composed with the one
:class:`~inheritune.training.config.TrainConfig` every variant is trained with (same corpus, data
order, tokens per step, ``T`` steps and validation windows). It lives apart from the command so
that :mod:`inheritune.compare.variants` and :mod:`inheritune.compare.compare` both import it
downward.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from inheritune.analysis.selection import SelectConfig
from inheritune.compare.variants import (
    VARIANTS,
)
from inheritune.config import (
    ConfigError,
    check_unit_interval,
    nested,
    validate_numbers,
)
from inheritune.surgery.bridge import BridgeConfig
from inheritune.training import checkpoint as ckpt
from inheritune.training.config import TrainConfig


@dataclass
class CompareConfig:
    """``inheritune compare``: every baseline at the same depth, data and token budget."""

    train: TrainConfig = nested(  # noqa: RUF009 (nested() returns a dataclasses.field)
        TrainConfig,
        overrides={"out": "runs/compare", "steps": 100},
        owned=("resume", "teacher", "distill_alpha"),
    )
    # ^ the settings every variant trains with, the same flat flags as `inheritune train`
    # (--model is the reference, --out the results folder, --steps the budget T, --seed also
    # seeds the random inits and the calibration windows); only the defaults above differ.
    depth: int | None = field(
        default=None,
        metadata={
            "help": "layers l of every variant (default: half the reference, rounded down to "
            "an even number so stacking can build)",
            "min": 1,
        },
    )
    variants: list[str] | None = field(
        default=None,
        metadata={
            "help": "comma-separated variants (default: all the reference can build): "
            + ",".join(VARIANTS)
        },
    )
    kd_alpha: float = field(
        default=0.4,
        metadata={"help": "the kd-* variants' loss = (1-a) LM + a KL (paper: 0.4)", "max": 1},
    )
    # --select: the inheritune variant's layers (default first, the paper's), and the
    # training-split windows every scored selection (prune-bi, prune-angular, prune-lazy) uses
    selection: SelectConfig = nested(SelectConfig)  # noqa: RUF009 (nested() returns a field)
    bridging: BridgeConfig = nested(BridgeConfig)  # noqa: RUF009 (nested() returns a field)
    # ^ --bridge block: the inheritune variant gets a fitted bridge block at every seam of its
    # selection, l layers in all (for first: l-1 layers + one; inheritune.surgery.bridge).
    export_mergekit: str | None = field(
        default=None,
        metadata={
            "help": "also write each variant's reference-layer selection as a mergekit "
            "passthrough YAML: FILE with the variant inserted (merge.yaml -> merge.prune-bi.yaml)"
        },
    )
    device: str = field(
        default="auto",
        metadata={"help": "device of the reference (its loss, the scores): cpu, cuda[:N] or auto"},
    )

    def __post_init__(self) -> None:
        validate_numbers(self)  # finite, in range, of the declared type (config.py)
        if self.variants is not None:
            if isinstance(self.variants, str):
                self.variants = [v for v in self.variants.split(",") if v]
            unknown = [v for v in self.variants if v not in VARIANTS]
            if unknown:
                raise ConfigError(
                    f"--variants: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}"
                )
            if not self.variants:
                raise ConfigError(f"--variants is empty; known: {', '.join(VARIANTS)}")
            if len(set(self.variants)) != len(self.variants):
                raise ConfigError(f"--variants lists a variant twice: {self.variants}")
        check_unit_interval("kd_alpha", self.kd_alpha)
        if self.bridging.bridge != "none" and self.selection.rule != "first":
            raise ConfigError(
                "--bridge block in compare bridges the first l-1 layers: --select first"
            )

    def train_config(
        self, out: str | Path, steps: int, distill: bool = False, budget: int = 1
    ) -> TrainConfig:
        """The shared training settings for one variant's run in ``out``; it resumes only when
        there is something to resume (finished variants are cached). ``budget``: the stage's
        share in units of T, which scales ``--time-budget`` as it scales the steps."""
        resume = bool(ckpt.list_checkpoints(ckpt.checkpoints_root(out))) if out else False
        alpha = self.kd_alpha if distill else 0.0
        # one TensorBoard run per variant stage: <dir>/<variant>-<stage>
        tb = (
            self.train.tensorboard
            and out
            and str(Path(self.train.tensorboard) / f"{Path(out).parent.name}-{Path(out).name}")
        )
        return replace(
            self.train,
            out=str(out),
            steps=steps,
            resume=resume,
            distill_alpha=alpha,
            tensorboard=tb or None,
            time_budget=self.train.time_budget * budget,
        )

    def selected(self) -> list[str]:
        return list(self.variants) if self.variants is not None else list(VARIANTS)
