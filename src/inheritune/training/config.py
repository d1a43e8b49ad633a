""":class:`TrainConfig`: every training setting, one field each, shared by every command.

``inheritune train`` takes it as flags; ``run`` and ``compare`` compose it into their own
configs, so ``run --lr`` and ``train --lr`` are one field with one default and one validator
(:mod:`inheritune.config`). It lives apart from the loop so that the loop
(:mod:`inheritune.training.train`), the recipe and the comparison import it downward.

Design choices the fields encode, each tested:

* ``--batch-size`` is the GLOBAL number of sequences per optimizer step, split into
  ``--grad-accum`` micro-batches and across the ``torchrun`` processes, so the trajectory does
  not depend on either (up to float summation order).
* Training windows (``seq_len + 1`` tokens) are visited in a seeded permutation per epoch; the
  data position is saved in every checkpoint so ``--resume`` continues exactly.
* Validation uses the same fixed windows at every evaluation and in every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inheritune import distributed
from inheritune.config import ConfigError, check_positive, validate_numbers
from inheritune.training import monitor

SCHEDULES = ("cosine", "linear")
PRECISIONS = ("fp32", "bf16", "auto")  # auto: measured on the machine (training.precision)


def _h(text: str, **kw: Any) -> dict[str, Any]:
    return {"help": text, **kw}


@dataclass
class TrainConfig:
    """Flags of ``inheritune train``."""

    model: str = field(
        default="smollm2-135m",
        metadata=_h("model argument (name, HF folder, .gguf) or a checkpoint folder of this tool"),
    )
    data: str = field(default="shakespeare", metadata=_h("corpus name, text/jsonl file or folder"))
    out: str = field(default="runs/train", metadata=_h("output folder (logs, checkpoints, final)"))
    steps: int = field(default=200, metadata=_h("optimizer steps", min=1))
    batch_size: int = field(
        default=8,
        metadata=_h("global sequences per optimizer step (all processes together)", min=1),
    )
    seq_len: int = field(default=256, metadata=_h("tokens per training sequence", min=1))
    grad_accum: int = field(
        default=1, metadata=_h("micro-batches per step (splits --batch-size)", min=1)
    )
    lr: float = field(default=3e-4, metadata=_h("peak learning rate"))
    min_lr: float = field(default=1e-5, metadata=_h("learning rate at the end of the decay"))
    schedule: str = field(
        default="cosine",
        metadata=_h("decay after warm-up: cosine or linear, to --min-lr", choices=SCHEDULES),
    )
    time_budget: float = field(
        default=0.0,
        metadata=_h(
            "wall-clock seconds of the training loop, evaluations and checkpoints charged "
            "(the final evaluation and save are reserved from it); > 0: stop at whichever of "
            "--steps and this comes first, decaying the lr by time (0 = off)"
        ),
    )
    warmup: int = field(default=20, metadata=_h("linear warm-up steps"))
    weight_decay: float = field(default=0.1, metadata=_h("AdamW weight decay (matrices only)"))
    grad_clip: float = field(default=1.0, metadata=_h("max global gradient norm (0 = off)"))
    eval_every: int = field(default=50, metadata=_h("evaluate every N steps (0 = start/end)"))
    eval_tokens: int = field(default=32768, metadata=_h("validation tokens per evaluation", min=1))
    eval_batch_size: int = field(
        default=0,
        metadata=_h("sequences per evaluation forward pass (0 = the training micro-batch)"),
    )
    save_every: int = field(default=50, metadata=_h("checkpoint every N steps (0 = end only)"))
    keep_last: int = field(default=2, metadata=_h("checkpoints to keep (0 = all)"))
    log_every: int = field(default=5, metadata=_h("log a training line every N steps", min=1))
    precision: str = field(
        default="fp32",
        metadata=_h(
            "fp32, bf16 autocast, or auto: time one training step of each on this machine and "
            "keep the faster (recorded in the output folder)",
            choices=PRECISIONS,
        ),
    )
    compile: bool = field(default=False, metadata=_h("torch.compile the model"))
    seed: int = field(default=0, metadata=_h("seed of the data order and dropout"))
    resume: bool = field(default=False, metadata=_h("continue from the latest checkpoint in --out"))
    fsdp: bool = field(default=False, metadata=_h("shard the model with FSDP2 under torchrun"))
    grad_checkpointing: bool = field(
        default=False,
        metadata=_h("recompute each block's activations in the backward pass (less memory)"),
    )
    dist_timeout: float = field(
        default=distributed.DEFAULT_TIMEOUT_S,
        metadata=_h(
            "seconds a torchrun process waits for the one that prepares data or models (also "
            "the process-group timeout)",
            min=1,
        ),
    )
    tensorboard: str | None = field(
        default=None, metadata=_h("also write the logged scalars to TensorBoard in this folder")
    )
    embed_lr_scale: float = field(
        default=1.0, metadata=_h("lr multiplier of embeddings (and a tied head)")
    )
    head_lr_scale: float = field(default=1.0, metadata=_h("lr multiplier of an untied head"))
    norm_lr_scale: float = field(default=1.0, metadata=_h("lr multiplier of norm parameters"))
    freeze: list[str] = field(
        default_factory=list,
        metadata=_h("comma list of parameter-name substrings or globs to freeze"),
    )
    distill_alpha: float = field(
        default=0.0, metadata=_h("weight of KL(teacher||student); loss = (1-a)*LM + a*KL")
    )
    distill_temperature: float = field(default=1.0, metadata=_h("distillation temperature"))
    distill_decay: bool = field(
        default=False, metadata=_h("decay --distill-alpha linearly to 0 over the run")
    )
    distill_hidden: float = field(
        default=0.0,
        metadata=_h(
            "weight of a loss matching the teacher's final normalised hidden state "
            "(relative squared error; 0 = off)"
        ),
    )
    train_top: int = field(
        default=0,
        metadata=_h(
            "train only the top N blocks (and the final norm, an untied head): the embeddings "
            "and the blocks below are frozen and run without autograd; with a teacher whose "
            "bottom they equal, the teacher runs only its top (0 = train everything)"
        ),
    )
    teacher: str | None = field(default=None, metadata=_h("teacher model for distillation"))
    trust_remote_code: bool = field(
        default=False, metadata=_h("allow models with custom code (off by default)")
    )

    def __post_init__(self) -> None:
        validate_numbers(self)  # finite, in range, of the declared type (config.py)
        # Non-negativity, finiteness and types: validate_numbers; open bounds here.
        check_positive("lr", self.lr)
        check_positive("distill_temperature", self.distill_temperature)
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}"
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.precision == "auto" and self.fsdp:
            raise ConfigError("--precision auto cannot shard with --fsdp: choose fp32 or bf16")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ConfigError(f"--distill-alpha must be in [0, 1], got {self.distill_alpha}")
        if isinstance(self.freeze, str):
            self.freeze = [s for s in self.freeze.split(",") if s]
        if self.tensorboard:
            monitor.check_tensorboard()

    def micro_batch(self, world_size: int = 1) -> int:
        """Sequences per training forward pass on one process."""
        return max(1, self.batch_size // (self.grad_accum * world_size))

    def eval_batch(self, world_size: int = 1) -> int:
        """Sequences per evaluation forward pass on one process (no gradients: it can be
        larger than the training micro-batch)."""
        return self.eval_batch_size or self.micro_batch(world_size)
