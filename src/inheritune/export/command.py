"""``inheritune export``: a Hugging Face checkpoint as a file another runtime loads.

Usage::

    inheritune export --model runs/demo/final_model --gguf runs/demo/model.gguf
    inheritune export --model runs/demo/final_model --gguf m-q8.gguf --outtype q8_0 --force
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from inheritune.config import ConfigError, validate_numbers
from inheritune.export.gguf import OUTTYPES, write_gguf


@dataclass
class ExportConfig:
    """``inheritune export``: write a checkpoint as a GGUF file for llama.cpp and Ollama."""

    model: str = field(
        default="runs/demo/final_model",
        metadata={"help": "the Hugging Face folder to export (config, safetensors, tokenizer)"},
    )
    gguf: str | None = field(default=None, metadata={"help": "write this GGUF file"})
    outtype: str = field(
        default="f16",
        metadata={
            "help": "tensor type of the matrices (norms and biases stay f32)",
            "choices": OUTTYPES,
        },
    )
    force: bool = field(default=False, metadata={"help": "overwrite an existing output file"})

    def __post_init__(self) -> None:
        validate_numbers(self)
        if not self.gguf:
            raise ConfigError("give the output file: --gguf OUT.gguf")
        if self.outtype not in OUTTYPES:
            raise ConfigError(
                f"--outtype must be one of {', '.join(OUTTYPES)}, got {self.outtype!r}"
            )


def export(cfg: ExportConfig) -> Path:
    """Write ``cfg.gguf`` from ``cfg.model``; returns its path."""
    out = write_gguf(cfg.model, cfg.gguf, cfg.outtype, cfg.force)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({cfg.outtype}, {size:,.1f} MiB) from {cfg.model}")
    return out
