"""Downstream zero-shot evaluation (lm-evaluation-harness) and strided perplexity of any model.

``inheritune eval --model M`` scores a checkpoint (the reference, a target, any variant, or the
embedded default ``smollm2-135m``) on the zero-shot tasks the paper reports (ARC-E, PIQA, SciQ,
HellaSwag, LAMBADA; paper section 4) and prints one table: acc, acc_norm where the harness
gives it, and their averages over the tasks. ``--tasks`` takes built-in harness task names or
paths to local task YAML files / folders (so offline machines can run their own tasks).

``--ppl-file FILE.txt`` measures perplexity of the same model on a text file with a sliding
window (the Hugging Face perplexity guide, huggingface.co/docs/transformers/perplexity): windows
of ``--ppl-seq-len`` tokens start every ``--ppl-stride`` tokens and each token is scored exactly
once, in the first window where it falls past the previous window's end, so it sees at least
``seq_len - stride`` tokens of context (fewer only at the start of the file). With
``stride == seq_len`` this is plain chunked loss: the first token of every chunk goes unscored.

Outputs in ``--out``: ``eval.json`` (every number), ``eval.md`` (the table) and ``config.yaml``
(the resolved config). The harness is an optional extra (``pip install 'inheritune[eval]'``)
imported only when tasks are run.
"""

from __future__ import annotations

import difflib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from inheritune import distributed
from inheritune.config import ConfigError, check_positive, flag, save_resolved, validate_numbers
from inheritune.data import inputs
from inheritune.distributed import DEFAULT_TIMEOUT_S
from inheritune.models import loading as models

# The zero-shot suite of the paper's FineWeb-edu comparison (docs/design/paper.md §4).
PAPER_TASKS: tuple[str, ...] = ("arc_easy", "piqa", "sciq", "hellaswag", "lambada_openai")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Stderr of mean metrics is closed form; only perplexity-type aggregations (LAMBADA's ppl) are
# bootstrapped. The harness default of 100k resamples takes minutes on CPU for no visible gain.
BOOTSTRAP_ITERS = 1000
METRICS = ("acc", "acc_norm")


@dataclass
class EvalConfig:
    """Zero-shot downstream tasks and/or strided perplexity of one model."""

    model: str = field(
        default="smollm2-135m",
        metadata={"help": "model: a default name, a Hugging Face folder, a .gguf file or a hub id"},
    )
    tasks: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "comma-separated harness task names or paths to task YAML files/folders; "
            f"default: the paper's {','.join(PAPER_TASKS)} unless --ppl-file is given "
            "(then none); pass an empty string for none"
        },
    )
    out: str = field(
        default="",
        metadata={"help": "output folder (default: runs/eval/<model name>)"},
    )
    num_fewshot: int = field(
        default=0, metadata={"help": "in-context examples per question (the paper: 0)"}
    )
    limit: int | None = field(
        default=None, metadata={"help": "score only the first N examples of each task (quick runs)"}
    )
    batch_size: int = field(
        default=8, metadata={"help": "sequences per forward pass (harness and perplexity)"}
    )
    device: str = field(
        default="auto", metadata={"help": "cpu, cuda, cuda:N, mps, or auto (cuda if available)"}
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "weights dtype", "choices": tuple(DTYPES)},
    )
    ppl_file: str | None = field(
        default=None, metadata={"help": "text file whose perplexity to measure"}
    )
    ppl_seq_len: int = field(default=256, metadata={"help": "perplexity window length in tokens"})
    ppl_stride: int | None = field(
        default=None,
        metadata={"help": "tokens between window starts, 1..seq_len (default: seq_len // 2)"},
    )
    ppl_max_tokens: int | None = field(
        default=None, metadata={"help": "use only the first N tokens of --ppl-file"}
    )
    dist_timeout: float = field(
        default=DEFAULT_TIMEOUT_S,
        metadata={"help": "seconds a torchrun process waits for the one preparing", "min": 1},
    )

    def __post_init__(self) -> None:
        validate_numbers(self)  # finite, in range, of the declared type (config.py)
        if isinstance(self.tasks, str):  # from YAML: "a,b"
            self.tasks = tuple(t.strip() for t in self.tasks.split(",") if t.strip())
        if self.tasks is None:
            self.tasks = () if self.ppl_file else PAPER_TASKS
        self.tasks = tuple(self.tasks)
        if not self.model:
            raise ConfigError(f"{flag('model')} is required")
        if not self.tasks and not self.ppl_file:
            raise ConfigError(f"nothing to do: give {flag('tasks')} and/or {flag('ppl_file')}")
        check_positive("batch_size", self.batch_size)
        check_positive("num_fewshot", self.num_fewshot, allow_zero=True)
        if self.limit is not None:
            check_positive("limit", self.limit)
        if self.dtype not in DTYPES:
            raise ConfigError(f"{flag('dtype')} must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ConfigError(
                f"{flag('device')} must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}"
            )
        if self.ppl_seq_len < 2:
            raise ConfigError(f"{flag('ppl_seq_len')} must be >= 2, got {self.ppl_seq_len}")
        if self.ppl_stride is None:
            self.ppl_stride = max(1, self.ppl_seq_len // 2)
        if not 1 <= self.ppl_stride <= self.ppl_seq_len:
            raise ConfigError(
                f"{flag('ppl_stride')} must be in 1..{flag('ppl_seq_len')} "
                f"(1..{self.ppl_seq_len}), got {self.ppl_stride}"
            )
        if self.ppl_max_tokens is not None and self.ppl_max_tokens < 2:
            raise ConfigError(f"{flag('ppl_max_tokens')} must be >= 2, got {self.ppl_max_tokens}")
        if self.ppl_file and not Path(self.ppl_file).expanduser().is_file():
            raise ConfigError(f"{flag('ppl_file')}: no such file: {self.ppl_file}")


# --------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class Window:
    """One forward pass: tokens [begin, end) go in; targets at [score_from, end) are scored."""

    begin: int
    end: int
    score_from: int


def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """The HF-guide windows over ``n_tokens`` tokens; every token is a target at most once.

    Window k covers [k*stride, k*stride + seq_len) and scores what the previous window did not
    reach; a window's first token has no context inside it, so it is never a target there.
    """
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len, got {stride} (seq_len {seq_len})")
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        score_from = max(prev_end, begin + 1)
        if score_from < end:
            windows.append(Window(begin, end, score_from))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@torch.no_grad()
def strided_nll(
    model: torch.nn.Module,
    ids: torch.Tensor,
    seq_len: int,
    stride: int,
    batch_size: int = 8,
) -> tuple[float, int]:
    """Summed next-token NLL (nats) over ``ids`` (1-D) with sliding windows, and tokens scored.

    Windows of equal length are batched together (all but possibly the last one).
    """
    windows = sliding_windows(int(ids.numel()), seq_len, stride)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    by_len: dict[int, list[Window]] = {}
    for w in windows:
        by_len.setdefault(w.end - w.begin, []).append(w)
    for length, group in by_len.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            x = torch.stack([ids[w.begin : w.end] for w in chunk]).to(device)  # (B, T)
            logits = model(input_ids=x).logits[:, :-1].float()  # (B, T-1, V)
            nll = F.cross_entropy(
                logits.transpose(1, 2), x[:, 1:], reduction="none"
            )  # (B, T-1): position j is the loss of token begin + j + 1
            pos = torch.arange(1, length, device=device)  # offsets of the targets
            starts = torch.tensor([w.score_from - w.begin for w in chunk], device=device)
            mask = pos[None, :] >= starts[:, None]  # (B, T-1)
            total += float(nll[mask].double().sum())
            count += int(mask.sum())
    return total, count


def file_perplexity(
    model: torch.nn.Module,
    tokenizer,
    path: str | Path,
    seq_len: int,
    stride: int,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Perplexity of a text file: nats/token, perplexity, tokens scored, and the settings."""
    path = Path(path).expanduser()
    text = path.read_text(encoding="utf-8", errors="replace")
    # No BOS/EOS: the file is scored as running text, like the training token streams.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_file = len(ids)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ConfigError(f"{flag('ppl_file')}: {path} has {len(ids)} token(s); need at least 2")
    models.check_context(model.config, seq_len, "ppl_seq_len")
    t0 = time.perf_counter()
    total, count = strided_nll(
        model, torch.tensor(ids, dtype=torch.long), seq_len, stride, batch_size
    )
    nats = total / count
    return {
        "file": str(path),
        "tokens_in_file": n_file,
        "tokens_used": len(ids),
        "tokens_scored": count,
        "seq_len": seq_len,
        "stride": stride,
        "nats_per_token": nats,
        "perplexity": math.exp(nats),
        "seconds": round(time.perf_counter() - t0, 2),
    }


# --------------------------------------------------------------------------- harness


def _import_harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(
            f"{flag('tasks')} needs lm-evaluation-harness, which is not installed ({e}). "
            "Install it with: pip install 'inheritune[eval]'"
        ) from e
    return lm_eval, HFLM, TaskManager


def _split_task_specs(specs: tuple[str, ...]) -> tuple[list[str], list[Path], list[str]]:
    """Separate task specs into (names, local task folders, local task YAML files)."""
    names, folders, files = [], [], []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            folders.append(path.resolve())
        elif path.is_file() or spec.endswith((".yaml", ".yml")):
            if not path.is_file():
                raise ConfigError(f"{flag('tasks')}: no such task file: {spec}")
            files.append(str(path.resolve()))
        else:
            names.append(spec)
    return names, folders, files


def resolve_tasks(specs: tuple[str, ...]) -> tuple[Any, list[str]]:
    """A harness ``TaskManager`` that knows every spec, and the list of specs to load.

    Raises :class:`ConfigError` for unknown names (with close matches) and empty folders.

    Built-in tasks are indexed only when a task is named, since indexing all ~15k of them takes
    several seconds. Folders become include paths and contribute their leaf tasks.
    """
    _, _, TaskManager = _import_harness()
    from lm_eval.tasks._index import Kind, TaskIndex

    names, folders, files = _split_task_specs(specs)
    tm = TaskManager(include_path=[str(f) for f in folders] or None, include_defaults=bool(names))
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        hints = {n: difflib.get_close_matches(n, tm.all_tasks, n=3) for n in unknown}
        hint = "; ".join(f"{n!r}: did you mean {h}?" for n, h in hints.items() if h)
        raise ConfigError(
            f"{flag('tasks')}: unknown task(s) {unknown}. {hint + '. ' if hint else ''}"
            "List the names with `lm-eval ls tasks`, or pass the path of a task YAML or folder."
        )
    load: list[str] = list(names)
    for folder in folders:
        index = TaskIndex.build([folder])
        leaves = sorted(k for k, e in index.items() if e.kind in (Kind.TASK, Kind.PY_TASK))
        if not leaves:
            raise ConfigError(f"{flag('tasks')}: folder {folder} defines no harness task")
        load += leaves
    return tm, load + files


def run_harness(
    model: torch.nn.Module,
    tokenizer,
    tasks: tuple[str, ...],
    *,
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int = 0,
    resolved: tuple[Any, list[str]] | None = None,
) -> dict[str, Any]:
    """Run the harness on a loaded model; returns its raw results (``results``, ``n-samples``...).

    ``resolved`` is :func:`resolve_tasks` of ``tasks`` when the caller already checked them.
    """
    lm_eval, HFLM, _ = _import_harness()
    tm, load = resolved or resolve_tasks(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=load,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=tm,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
        )
    except (ConnectionError, OSError) as e:
        # Datasets of built-in tasks come from the hub; offline that fails here.
        raise ConfigError(
            f"{flag('tasks')}: could not load a task's dataset ({type(e).__name__}: {e}). "
            "Offline, point --tasks at a local task YAML whose dataset is a local file."
        ) from e


def summarize(raw: dict[str, Any], order: list[str] | None = None) -> dict[str, Any]:
    """Per-task acc/acc_norm (with stderr and sample count) and their averages over tasks.

    Group rows the harness adds (e.g. ``ai2_arc``) are left out so no task counts twice.
    """
    groups = set(raw.get("groups", {}))
    n_samples = raw.get("n-samples", {})
    rows: dict[str, dict[str, Any]] = {}
    names = [t for t in raw["results"] if t not in groups]
    if order:
        names.sort(key=lambda t: order.index(t) if t in order else len(order))
    for task in names:
        res = raw["results"][task]
        row: dict[str, Any] = {}
        for key, value in res.items():
            if "," not in key or not isinstance(value, int | float):
                continue
            metric, _filter = key.split(",", 1)
            row.setdefault(metric, float(value))  # first filter wins ("none" for these tasks)
        row["n"] = int(n_samples.get(task, {}).get("effective", 0))
        rows[task] = row
    average: dict[str, Any] = {}
    for metric in METRICS:
        values = [r[metric] for r in rows.values() if metric in r]
        if values:
            average[metric] = sum(values) / len(values)
            average[f"{metric}_tasks"] = len(values)
    return {"tasks": rows, "average": average}


# --------------------------------------------------------------------------- reporting


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def markdown_table(summary: dict[str, Any], model_name: str) -> str:
    """The paper-style table: accuracies in percent, one row per task and the average."""
    lines: list[str] = [f"# Evaluation of {model_name}", ""]
    tasks = summary.get("tasks") or {}
    if tasks:
        lines += [
            "| task | acc (%) | ± | acc_norm (%) | ± | n |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for task, r in tasks.items():
            lines.append(
                f"| {task} | {_pct(r.get('acc'))} | {_pct(r.get('acc_stderr'))} "
                f"| {_pct(r.get('acc_norm'))} | {_pct(r.get('acc_norm_stderr'))} | {r['n']} |"
            )
        avg = summary["average"]
        lines.append(
            f"| **average** | **{_pct(avg.get('acc'))}** | | **{_pct(avg.get('acc_norm'))}** "
            f"| | {len(tasks)} tasks |"
        )
        if "acc_norm" in avg and avg["acc_norm_tasks"] != len(tasks):
            lines.append("")
            lines.append(
                f"acc_norm average is over the {avg['acc_norm_tasks']} tasks that report it."
            )
        lines.append("")
    ppl = summary.get("perplexity")
    if ppl:
        lines += [
            "| perplexity file | tokens scored | seq_len | stride | nats/token | perplexity |",
            "|---|---:|---:|---:|---:|---:|",
            f"| {Path(ppl['file']).name} | {ppl['tokens_scored']} | {ppl['seq_len']} "
            f"| {ppl['stride']} | {ppl['nats_per_token']:.4f} | {ppl['perplexity']:.2f} |",
            "",
        ]
    return "\n".join(lines)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the configured tasks and/or perplexity; write eval.json, eval.md, config.yaml."""
    # Bad model arguments, task names and devices fail before any weights load.
    main = distributed.setup(cfg.dist_timeout).is_main  # under torchrun: rank 0 writes
    src = models.resolve_model(cfg.model)
    config = models.load_config(cfg.model)  # also checks the weight files, before --out exists
    if cfg.ppl_file:
        models.check_context(config, cfg.ppl_seq_len, "ppl_seq_len")
    resolved = resolve_tasks(cfg.tasks) if cfg.tasks else None
    device = inputs.resolve_device(cfg.device)
    out = Path(cfg.out) if cfg.out else Path("runs") / "eval" / src.name.replace("/", "--")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out / "config.yaml")

    loaded = inputs.load(cfg.model, device=str(device), dtype=DTYPES[cfg.dtype])
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    summary: dict[str, Any] = {
        "model": cfg.model,
        "parameters": models.count_parameters(model),
        "device": str(device),
        "dtype": cfg.dtype,
    }
    if cfg.tasks:
        lm_eval, _, _ = _import_harness()
        t0 = time.perf_counter()
        raw = run_harness(
            model,
            tokenizer,
            cfg.tasks,
            batch_size=cfg.batch_size,
            limit=cfg.limit,
            num_fewshot=cfg.num_fewshot,
            resolved=resolved,
        )
        summary.update(summarize(raw, order=list(cfg.tasks)))
        summary["lm_eval_version"] = lm_eval.__version__
        summary["num_fewshot"] = cfg.num_fewshot
        summary["limit"] = cfg.limit
        summary["harness_seconds"] = round(time.perf_counter() - t0, 2)
    if cfg.ppl_file:
        summary["perplexity"] = file_perplexity(
            model,
            tokenizer,
            cfg.ppl_file,
            cfg.ppl_seq_len,
            int(cfg.ppl_stride or cfg.ppl_seq_len),
            batch_size=cfg.batch_size,
            max_tokens=cfg.ppl_max_tokens,
        )
    table = markdown_table(summary, src.name)
    if main:
        (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "eval.md").write_text(table)
        print(table)
        print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'config.yaml'}")
    return summary
