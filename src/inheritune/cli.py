"""The ``inheritune`` command line: one subcommand per plain function with a typed config.

Every subcommand is ``module.function(config)`` where ``config`` is a dataclass; its fields are
the flags (see :mod:`inheritune.config`). ``--config FILE.yaml`` supplies the same fields from a
file, and explicit flags override it. User errors (bad flags, bad paths, bad data) print one
clear line and exit with status 2; nothing heavy runs before they are checked.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

from inheritune.config import ConfigError, add_dataclass_args, dataclass_from_args, load_yaml


@dataclass(frozen=True)
class Command:
    module: str
    config: str  # dataclass name in module; "" for none
    function: str
    help: str


COMMANDS: dict[str, Command] = {
    "setup": Command(
        "inheritune.models.assets", "", "setup", "prepare the embedded default model and corpus"
    ),
    "prepare": Command(
        "inheritune.data.prepare",
        "PrepareConfig",
        "prepare",
        "tokenise a corpus once, in parallel and resumably, into a token folder",
    ),
    "analyze": Command(
        "inheritune.analysis.analyze",
        "AnalyzeConfig",
        "analyze",
        "layer-by-layer attention-collapse report",
    ),
    "train": Command(
        "inheritune.training.train",
        "TrainConfig",
        "train",
        "train a model (one process or torchrun)",
    ),
    "inherit": Command(
        "inheritune.surgery.inherit",
        "InheritConfig",
        "inherit",
        "build a target from the reference's first layers",
    ),
    "run": Command(
        "inheritune.recipe.run",
        "RecipeConfig",
        "run",
        "the whole recipe: inherit, train, compare, grow",
    ),
    "compare": Command(
        "inheritune.compare.compare",
        "CompareConfig",
        "compare",
        "baselines and pruning alternatives at equal budget",
    ),
    "eval": Command(
        "inheritune.evaluate", "EvalConfig", "evaluate", "downstream zero-shot tasks and perplexity"
    ),
    "export": Command(
        "inheritune.export.command",
        "ExportConfig",
        "export",
        "write a checkpoint as a GGUF file for llama.cpp and Ollama",
    ),
}


# (module, class) of every exception type that means bad input (or a refused write), not a bug.
# Imported only while an exception is handled: up front they would load every command's libraries.
USER_ERRORS = (
    ("inheritune.models.loading", "ModelLoadError"),
    ("inheritune.data.tokens", "DataError"),
    ("inheritune.models.arch", "UnsupportedModelError"),
    ("inheritune.models.assets", "AssetError"),
    ("inheritune.training.checkpoint", "CheckpointError"),
    ("inheritune.training.train", "TrainingError"),
    ("inheritune.distributed", "PeerError"),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types printed as one line with exit status 2."""
    named = [getattr(importlib.import_module(mod), name) for mod, name in USER_ERRORS]
    return (ConfigError, FileNotFoundError, *named)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2, like every other user error (no usage
    dump: ``--help`` shows it)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand's flags are built (its module imported)."""
    from inheritune import __version__

    parser = _Parser(
        prog="inheritune",
        description="Build smaller, stronger LMs from a larger pretrained one (arXiv 2404.08634).",
    )
    parser.add_argument("--version", action="version", version=f"inheritune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if cmd.config and only in (None, name):
            cls = getattr(importlib.import_module(cmd.module), cmd.config)
            p.add_argument(
                "--config", dest="config_file", default=None, help="YAML file of the same fields"
            )
            add_dataclass_args(p, cls)
    return parser


def _quiet_libraries() -> None:
    """Our own progress bars and messages are the interface; silence the libraries' chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = sys.argv[1:] if argv is None else argv
    # Import only the chosen command's module: the others pull in heavy libraries.
    only = next((a for a in args if a in COMMANDS), None)
    ns = build_parser(only).parse_args(args)
    cmd = COMMANDS[ns.command]
    module = importlib.import_module(cmd.module)
    fn = getattr(module, cmd.function)
    try:
        if not cmd.config:
            fn()
            return 0
        base = load_yaml(ns.config_file) if ns.config_file else {}
        cfg = dataclass_from_args(getattr(module, cmd.config), ns, base)
        fn(cfg)
    except _user_errors() as e:
        print(f"inheritune {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A write the OS refused outside the atomic helpers (which raise WriteError): still
        # the user's disk or permissions, not a bug, so one line too.
        from inheritune.storage import refused_write

        cause = refused_write(e)
        if cause is None:
            raise
        where = f"{e.filename}: {cause}" if e.filename else f"{cause} ({e})"
        print(f"inheritune {ns.command}: error: {where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
