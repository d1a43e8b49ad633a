"""Bad input, in one place: every case gets one clear line, exit status 2, nothing half-written.

Each case is a command line run through :func:`inheritune.cli.main` in process. The rule checked
for all of them (:func:`check_refused`): status 2, no traceback, one error line starting
``inheritune COMMAND: error:`` and naming the problem (the case's expected text), and ``--out``
exactly as it was before (absent stays absent). Input that can be judged without doing any work
(flags, paths, the model's files and config) must be refused before anything else prints; the
rest (a corpus too short, a torn checkpoint) may follow the progress lines of the work that
found it. Add a row to :data:`CASES`, or to :data:`MODEL_FAULTS` (run against every command that
loads a model), when the CLI grows.

The second half covers faults while writing. A full or read-only disk under a write made with
:mod:`inheritune.checkpoint`'s atomic helpers raises :class:`~inheritune.checkpoint.WriteError`
and leaves the previous state readable; a training run resumes once the fault is gone; any other
refused write still ends in one line. These tests need a folder the OS really refuses to write:
as root (where permission bits do not stop writes) a tiny tmpfs is mounted, read-only or nearly
full; otherwise a read-only folder is made with chmod. They are skipped, with the reason, where
neither works.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CORPUS_TEXT, make_tokenizer, save_tiny
from inheritune import cli
from inheritune.models import loading as models
from inheritune.storage import (
    CheckpointError,
    WriteError,
    atomic_write_text,
    write_folder_atomically,
)
from inheritune.training.checkpoint import LATEST, checkpoints_root, read_latest, verify_checkpoint

LAYERS = 2

# ----------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """One good tiny model and corpus for the module; every bad input is derived from them."""
    root = tmp_path_factory.mktemp("base")
    model = save_tiny("llama", root / "model", make_tokenizer(), layers=LAYERS)
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS_TEXT)
    return {"model": model, "corpus": corpus}


def _copy_model(base: dict[str, Path], tmp: Path, name: str) -> Path:
    return Path(shutil.copytree(base["model"], tmp / name))


def _rewrite_weights(folder: Path, edit: Callable[[dict], None]) -> Path:
    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _rewrite_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))
    return folder


def _spoil(b: dict[str, Path], tmp: Path, name: str, content: str | bytes) -> Path:
    """A copy of the good model with file ``name`` replaced by ``content``."""
    folder = _copy_model(b, tmp, "m")
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def _file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _truncated_weights(b: dict[str, Path], tmp: Path) -> Path:
    data = (b["model"] / "model.safetensors").read_bytes()
    return _spoil(b, tmp, "model.safetensors", data[: len(data) // 2])


def _gguf_truncated(path: Path) -> Path:
    """A GGUF v3 header promising 1 tensor and 5 metadata entries, then the end of the file."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 5) + struct.pack("<Q", 40) + b"gen")
    return path


def _make_empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _make_pickle_only(tmp: Path) -> Path:
    folder = tmp / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    return folder


def _drop_layer_tensor(sd: dict) -> None:
    sd.pop(f"model.layers.{LAYERS - 1}.mlp.up_proj.weight")


def _add_tensor(sd: dict) -> None:
    sd["model.layers.9.mlp.up_proj.weight"] = torch.zeros(4, 4)


def _sharded_missing_shard(folder: Path) -> Path:
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.st"}}
    (folder / models.WEIGHTS_INDEX).write_text(json.dumps(index))
    return folder


# name -> (builder(base, tmp) -> path, expected text). Each is run against every command below.
MODEL_FAULTS: dict[str, tuple[Callable[[dict, Path], Path], str]] = {
    "not-a-model-folder": (lambda b, t: _make_empty(t), "no config.json"),
    "no-such-path": (lambda b, t: t / "nowhere", "no such model folder"),
    "pickle-only": (lambda b, t: _make_pickle_only(t), "never loads pickled"),
    "config-not-json": (
        lambda b, t: _spoil(b, t, "config.json", "{model_type: llama,"),
        "config.json is not valid JSON",
    ),
    "config-not-object": (
        lambda b, t: _spoil(b, t, "config.json", "[1, 2]"),
        "must hold a JSON object",
    ),
    "config-of-no-causal-lm": (
        lambda b, t: _spoil(b, t, "config.json", '{"model_type": "t5"}'),
        "does not describe a causal LM",
    ),
    "truncated-safetensors": (
        _truncated_weights,
        "model.safetensors is truncated or corrupt",
    ),
    "garbage-safetensors": (
        lambda b, t: _spoil(b, t, "model.safetensors", os.urandom(4096)),
        "model.safetensors is truncated or corrupt",
    ),
    "missing-tensor": (
        lambda b, t: _rewrite_weights(_copy_model(b, t, "m"), _drop_layer_tensor),
        "1 tensor(s) missing (model.layers.1.mlp.up_proj.weight)",
    ),
    "extra-tensor": (
        lambda b, t: _rewrite_weights(_copy_model(b, t, "m"), _add_tensor),
        "the config has no place for (model.layers.9.mlp.up_proj.weight)",
    ),
    "wrong-shapes": (
        lambda b, t: _rewrite_config(_copy_model(b, t, "m"), intermediate_size=48),
        "of the wrong shape (model.layers.0.mlp.down_proj.weight: file (32, 64) vs config (32, 48)",
    ),
    "more-layers-than-weights": (
        lambda b, t: _rewrite_config(_copy_model(b, t, "m"), num_hidden_layers=LAYERS + 1),
        "tensor(s) missing (model.layers.2.",
    ),
    "index-names-absent-shard": (
        lambda b, t: _sharded_missing_shard(_copy_model(b, t, "m")),
        "names the shard model-00001-of-00002.st, which is not in",
    ),
    "gguf-random-bytes": (
        lambda b, t: _file(t / "bad.gguf", os.urandom(2048)),
        "bad.gguf is not a GGUF file",
    ),
    "gguf-truncated": (
        lambda b, t: _gguf_truncated(t / "cut.gguf"),
        "cut.gguf: it is truncated or corrupt",
    ),
    "hub-id-offline": (lambda b, t: Path("some-org/not-here"), "local folder"),
}


# ----------------------------------------------------------------------------- commands

SMALL_TRAIN = ["--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-tokens", "32"]


def command_line(command: str, model: str, corpus: str, out: str) -> list[str]:
    """A valid, small command line of each model-loading command (only its inputs vary)."""
    common = ["--model", model, "--out", out]
    return {
        "analyze": ["analyze", *common, "--data", corpus, "--num-seqs", "2", "--seq-len", "16"],
        "train": ["train", *common, "--data", corpus, *SMALL_TRAIN],
        "inherit": ["inherit", *common, "--num-layers", "1"],
        "run": ["run", *common, "--data", corpus, *SMALL_TRAIN, "--no-analysis"],
        "compare": [
            *("compare", *common, "--data", corpus, *SMALL_TRAIN, "--depth", "1"),
            *("--variants", "inheritune", "--calib-seq-len", "16"),
        ],
        "eval": ["eval", *common, "--ppl-file", corpus, "--ppl-seq-len", "16"],
    }[command]


MODEL_COMMANDS = ("analyze", "train", "inherit", "run", "compare", "eval")


def _snapshot(out: Path) -> dict[str, bytes] | None:
    if not out.exists():
        return None
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def check_refused(argv: list[str], expected: str, out: Path, capsys, alone: bool = True) -> str:
    """Run ``argv`` and assert the bad-input rule; returns the error line.

    The error is one line, the last on stderr, and the only one starting with
    ``inheritune COMMAND: error:``; ``alone``: it is all of stderr (nothing ran before it).
    Otherwise the lines before it may only be progress and status output of work done first.
    """
    command = argv[0]
    before = _snapshot(out)
    capsys.readouterr()
    rc = cli.main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, captured.err[-2000:]
    assert "Traceback" not in captured.err + captured.out
    assert lines, "nothing on stderr"
    prefix = f"inheritune {command}: error: "
    assert lines[-1].startswith(prefix), captured.err[-2000:]
    assert expected in lines[-1], lines[-1]
    earlier = lines[:-1]
    if alone:
        assert not earlier, f"output before the error:\n{captured.err[-2000:]}"
    for line in earlier:
        assert "error" not in line.lower() and "warning" not in line.lower(), line
    assert _snapshot(out) == before, f"--out {out} changed"
    return lines[-1]


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize("fault", list(MODEL_FAULTS))
def test_bad_model_refused_by_every_command(fault, command, base, tmp_path, capsys):
    build, expected = MODEL_FAULTS[fault]
    model = build(base, tmp_path)
    out = tmp_path / "out"
    argv = command_line(command, str(model), str(base["corpus"]), str(out))
    check_refused(argv, expected, out, capsys)


# ----------------------------------------------------------------------------- the table


def _tokens_of_other_tokenizer(b: dict, t: Path) -> Path:
    from inheritune import data

    other = make_tokenizer(vocab=300)
    return data.load_tokens(str(b["corpus"]), other).path


def _half_written_checkpoint(out: Path) -> None:
    root = checkpoints_root(out)
    (root / "step-00000002").mkdir(parents=True)
    (root / "step-00000002" / "model.safetensors").write_bytes(b"x")  # no manifest: torn
    (root / LATEST).write_text("step-00000002\n")


def case(id, command, extra, expected, prepare=None, alone=True, marks=()):
    """One row: ``extra`` flags replace the same flags of the command's valid line (``-FLAG``
    drops one); {model}, {corpus}, {out}, {tmp} and {other_tokens} are filled in. ``prepare``
    names a file builder below. ``alone``: refused before any work, so the error line is all
    of stderr (no progress output of tokenising before it)."""
    return pytest.param(command, extra, expected, prepare, alone, id=id, marks=marks)


CASES = [
    # --- data
    case("empty-data", "analyze", ["--data", "{tmp}/empty.txt"], "empty", "empty_txt", False),
    case("no-such-corpus", "analyze", ["--data", "no-such-corpus"], "Known names"),
    case("data-wrong-suffix", "train", ["--data", "{tmp}/d.csv"], "unsupported data", "csv"),
    case(
        "data-too-short-for-seq-len",
        "analyze",
        ["--data", "{tmp}/short.txt", "--seq-len", "200"],
        "fewer than 1 window(s) of --seq-len 200",
        "short_txt",
        False,
    ),
    case(
        "tokens-of-another-tokenizer",
        "train",
        ["--data", "{other_tokens}"],
        "tokenizer",
        alone=False,
    ),
    case(
        "random-bytes-as-text",
        "analyze",
        ["--data", "{tmp}/x.txt"],
        "not valid UTF-8",
        "random_txt",
        False,
    ),
    # --- --seq-len beyond the model's context (256), in every command that has one
    case("analyze-seq-len", "analyze", ["--seq-len", "300"], "--seq-len 300 is longer than"),
    case(
        "train-seq-len",
        "train",
        ["--seq-len", "300"],
        "--seq-len 300 is longer than the model's context (256 tokens)",
    ),
    case("run-seq-len", "run", ["--seq-len", "300"], "--seq-len 300 is longer than"),
    case(
        "compare-train-seq-len",
        "compare",
        ["--seq-len", "300"],
        "--seq-len 300 is longer than the model's context (256 tokens)",
    ),
    case(
        "compare-calib-seq-len",
        "compare",
        ["--calib-seq-len", "300"],
        "--calib-seq-len 300 is longer than the model's context (256 tokens)",
    ),
    case(
        "eval-ppl-seq-len",
        "eval",
        ["--ppl-seq-len", "300"],
        "--ppl-seq-len 300 is longer than the model's context (256 tokens)",
    ),
    # --- flags
    case("analyze-tau", "analyze", ["--tau", "0"], "--tau must be in (0, 1]"),
    case("analyze-seq-len-zero", "analyze", ["--seq-len", "0"], "--seq-len must be >= 1"),
    case("train-lr-nan", "train", ["--lr", "nan"], "--lr"),
    case(
        "train-batch-vs-accum",
        "train",
        ["--batch-size", "6", "--grad-accum", "4"],
        "must be a multiple of --grad-accum",
    ),
    case("distill-without-teacher", "train", ["--distill-alpha", "0.5"], "--teacher", alone=False),
    case("inherit-k-too-large", "inherit", ["--num-layers", "5"], "exceeds the reference's"),
    case("inherit-duplicate-layers", "inherit", ["-num-layers", "--layers", "0,0"], "duplicate"),
    case("inherit-no-depth", "inherit", ["-num-layers"], "exactly one of --num-layers"),
    # --- --select: an empty, out-of-range or repeating list; a split too short for the bridges
    case("inherit-select-empty", "inherit", ["-num-layers", "--select", ""], "--select must be"),
    case("inherit-select-range", "inherit", ["-num-layers", "--select", "0-9"], "out of range"),
    case("inherit-select-dups", "inherit", ["-num-layers", "--select", "0,1,1"], "duplicate"),
    case(
        "inherit-bridge-calib-too-short",
        "inherit",
        [
            "-num-layers",
            "--select",
            "0",
            "--bridge",
            "block",
            "--data",
            "{tmp}/tiny.txt",
            "--calib-seq-len",
            "250",
            "--eval-seq-len",
            "16",
        ],
        "fewer than 1 window(s) of --calib-seq-len 250",
        "tiny_txt",
        False,
    ),
    case(
        "inherit-select-auto-too-short",
        "inherit",
        ["--select", "auto", "--data", "{tmp}/tiny.txt", "--score-seq-len", "250"],
        "fewer than 1 window(s) of --score-seq-len 250",
        "tiny_txt",
        False,
    ),
    case("compare-unknown-variant", "compare", ["--variants", "nope"], "known: inheritune"),
    case(
        "run-init-depth",
        "run",
        ["--init-depth", "9"],
        "--init-depth 9",
        alone=False,
    ),
    case("eval-no-cuda", "eval", ["--device", "cuda:7"], "--device", "no_cuda"),
    case("eval-bad-device", "eval", ["--device", "nonsense"], "--device must be"),
    # --- files and folders
    case("out-is-a-file", "analyze", ["--out", "{tmp}/file"], "is not a folder", "out_file"),
    case("config-file-missing", "train", ["--config", "{tmp}/none.yaml"], "none.yaml"),
    case("config-unknown-key", "train", ["--config", "{tmp}/c.yaml"], "unknown key", "yaml"),
    case(
        "resume-torn-checkpoint",
        "train",
        ["--resume"],
        "no intact checkpoint",
        "torn_checkpoint",
        False,
    ),
]

PREPARE: dict[str, Callable[[Path, Path], None]] = {
    "empty_txt": lambda tmp, out: (tmp / "empty.txt").write_text(""),
    "csv": lambda tmp, out: (tmp / "d.csv").write_text("a,b\n"),
    "short_txt": lambda tmp, out: (tmp / "short.txt").write_text(CORPUS_TEXT[:2000]),
    "tiny_txt": lambda tmp, out: (tmp / "tiny.txt").write_text(CORPUS_TEXT[:400]),
    "random_txt": lambda tmp, out: (tmp / "x.txt").write_bytes(os.urandom(50_000)),
    "out_file": lambda tmp, out: (tmp / "file").write_text("not a folder"),
    "yaml": lambda tmp, out: (tmp / "c.yaml").write_text("no_such_setting: 3\n"),
    "torn_checkpoint": lambda tmp, out: _half_written_checkpoint(out),
    "no_cuda": lambda tmp, out: (
        pytest.skip("this machine has CUDA") if torch.cuda.is_available() else None
    ),
}


def _with_flags(argv: list[str], extra: list[str]) -> list[str]:
    """``argv`` with ``extra``'s flags replacing the same flags (and their values) in it; an
    entry ``-FLAG`` removes ``--FLAG`` and adds nothing."""
    drop = {"-" + a for a in extra if a.startswith("-") and not a.startswith("--")}
    extra = [a for a in extra if "-" + a not in drop]
    drop |= {a for a in extra if a.startswith("--")}
    out, i = [], 0
    while i < len(argv):
        if argv[i] in drop:
            takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            i += 2 if takes_value else 1
            continue
        out.append(argv[i])
        i += 1
    return out + extra


@pytest.mark.parametrize(("command", "extra", "expected", "prepare", "alone"), CASES)
def test_bad_input_table(command, extra, expected, prepare, alone, base, tmp_path, capsys):
    out = tmp_path / "out"
    if prepare:
        PREPARE[prepare](tmp_path, out)
    values = {"model": base["model"], "corpus": base["corpus"], "out": out, "tmp": tmp_path}
    if "{other_tokens}" in extra:
        values["other_tokens"] = _tokens_of_other_tokenizer(base, tmp_path)
    argv = _with_flags(command_line(command, "{model}", "{corpus}", "{out}"), extra)
    check_refused([_fill(a, values) for a in argv], expected, out, capsys, alone)


def _fill(arg: str, values: dict[str, Path]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", str(value))
    return arg


def test_bad_flag_values_are_argparse_errors(capsys):
    """A value of the wrong type never reaches our code; argparse says so in one line too."""
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--steps", "many"])
    assert e.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("inheritune train: error: argument --steps")


def test_user_errors_are_one_list():
    """Every error class the CLI treats as bad input, imported from its module once."""
    names = {cls.__name__ for cls in cli._user_errors()}
    assert {"ConfigError", "ModelLoadError", "DataError", "CheckpointError"} <= names
    assert WriteError.__mro__[1] is CheckpointError  # printed as one line too
    assert len(names) == len(cli._user_errors())


# ----------------------------------------------------------------------------- write faults


def _mount_tmpfs(path: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, f"inheritune-test-{uuid.uuid4().hex[:8]}", path],
        capture_output=True,
    )
    return proc.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def refusing_folder(tmp_path: Path, kind: str):
    """A folder whose writes the OS refuses: ``kind`` "readonly" (EROFS or EACCES) or "full"
    (ENOSPC: a 64 KiB tmpfs). Yields ``(folder, remount)``: ``remount()`` lifts the fault."""
    folder = tmp_path / f"{kind}-fs"
    if os.geteuid() == 0:
        options = "ro,size=1m" if kind == "readonly" else "size=64k"
        if not _mount_tmpfs(folder, options):
            pytest.skip(f"running as root but cannot mount a tmpfs to make a {kind} folder")

        def remount() -> None:
            subprocess.run(["mount", "-o", "remount,rw,size=64m", str(folder)], check=True)

        try:
            yield folder, remount
        finally:
            _umount(folder)
        return
    if kind == "full":
        pytest.skip("a full disk needs a small tmpfs, which only root can mount")
    folder.mkdir()
    folder.chmod(0o555)
    try:
        yield folder, lambda: folder.chmod(0o755)
    finally:
        folder.chmod(0o755)


def _probe(folder: Path) -> int | None:
    """The errno a write into ``folder`` gets (None: the write succeeded)."""
    try:
        (folder / "probe").write_bytes(b"x" * 200_000)
    except OSError as e:
        return e.errno
    (folder / "probe").unlink()
    return None


@pytest.mark.parametrize("kind", ["readonly", "full"])
def test_atomic_helpers_map_refused_writes(kind, tmp_path):
    with refusing_folder(tmp_path, kind) as (folder, _):
        code = _probe(folder)
        assert code in (errno.EROFS, errno.EACCES, errno.ENOSPC), code
        target = folder / "checkpoints" / "step-00000001"
        big = torch.zeros(100_000)  # 400 kB: more than the full disk's 64 kB

        def populate(tmp: Path) -> None:
            save_file({"w": big}, str(tmp / "model.safetensors"))  # raises SafetensorError

        with pytest.raises(WriteError) as e:
            write_folder_atomically(target, populate)
        message = str(e.value)
        assert str(target) in message and "last good state is intact" in message
        assert os.strerror(code) in message
        with pytest.raises(WriteError, match=os.strerror(code)):
            atomic_write_text(folder / "note.txt", "x" * 200_000)
        leftovers = [p.name for p in folder.rglob("*") if p.name.startswith((".tmp-", ".note"))]
        assert leftovers == []


def test_replacing_a_folder_on_a_full_disk_keeps_the_old_one(tmp_path):
    with refusing_folder(tmp_path, "full") as (folder, _):
        target = folder / "final"
        write_folder_atomically(target, lambda tmp: (tmp / "a.txt").write_text("old"))
        with pytest.raises(WriteError, match="No space left"):
            write_folder_atomically(target, lambda tmp: (tmp / "a.txt").write_text("new" * 100_000))
        assert (target / "a.txt").read_text() == "old"
        verify_checkpoint(target)
        assert sorted(p.name for p in folder.iterdir()) == ["final"]


def test_other_errors_are_not_write_errors(tmp_path):
    def populate(tmp: Path) -> None:
        raise RuntimeError("a bug, not the disk")

    with pytest.raises(RuntimeError, match="a bug"):
        write_folder_atomically(tmp_path / "x", populate)
    assert list(tmp_path.iterdir()) == []


def _train_argv(model: Path, corpus: Path, out: Path, steps: int) -> list[str]:
    return [
        *("train", "--model", str(model), "--data", str(corpus), "--out", str(out)),
        *("--steps", str(steps), "--batch-size", "2", "--seq-len", "16", "--eval-tokens", "32"),
        *("--save-every", "2", "--eval-every", "2", "--keep-last", "0"),
    ]


@pytest.mark.filterwarnings("ignore:resuming with changed --steps")
def test_train_on_a_full_disk_keeps_the_last_checkpoint_and_resumes(base, tmp_path, capsys):
    """Run 2 steps, copy the run onto a disk with room for logs but not another checkpoint,
    continue to step 4: refused with one line, step 2 still intact; then free space, resume."""
    first = tmp_path / "first"
    assert cli.main(_train_argv(base["model"], base["corpus"], first, steps=2)) == 0
    used = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    ckpt_size = sum(p.stat().st_size for p in (first / "checkpoints" / "step-00000002").rglob("*"))
    with refusing_folder(tmp_path, "full") as (disk, make_room):
        # Resize the 64 kB tmpfs: the run so far plus half a checkpoint (rounded to pages).
        size = (used + ckpt_size // 2) // 4096 * 4096 + 8 * 4096
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)
        out = disk / "run"
        shutil.copytree(first, out)
        capsys.readouterr()
        rc = cli.main([*_train_argv(base["model"], base["corpus"], out, steps=4), "--resume"])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2, err[-2000:]
        assert "Traceback" not in err
        assert lines[-1].startswith("inheritune train: error: cannot write"), lines[-1]
        assert "No space left on device" in lines[-1] and "intact" in lines[-1]
        root = checkpoints_root(out)
        assert read_latest(root).name == "step-00000002"
        verify_checkpoint(root / "step-00000002")
        assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
        make_room()
        assert (
            cli.main([*_train_argv(base["model"], base["corpus"], out, steps=4), "--resume"]) == 0
        )
        assert read_latest(root).name == "step-00000004"
        assert json.loads((out / "result.json").read_text())["steps"] == 4


def _refused_line(argv: list[str], capsys) -> str:
    """Run ``argv``, expect status 2 and no traceback; the last stderr line."""
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err
    assert lines[-1].startswith(f"inheritune {argv[0]}: error: "), lines[-1]
    return lines[-1]


@pytest.mark.parametrize("command", ["analyze", "inherit", "train"])
def test_read_only_out_is_one_line(command, base, tmp_path, capsys):
    """A command whose --out cannot be written says so in one line, naming the path."""
    with refusing_folder(tmp_path, "readonly") as (folder, _):
        cause = os.strerror(_probe(folder))
        out = folder / "out"
        line = _refused_line(
            command_line(command, str(base["model"]), str(base["corpus"]), str(out)), capsys
        )
        assert str(out) in line and cause in line, line
        assert not out.exists()


def test_token_cache_on_a_full_disk(base, tmp_path, capsys, monkeypatch):
    """Tokenising into a full cache is refused in one line and leaves no token folder that a
    later run would take for finished; with room again the same command works."""
    from inheritune import data

    with refusing_folder(tmp_path, "full") as (disk, make_room):
        monkeypatch.setenv("INHERITUNE_CACHE", str(disk))
        corpus = tmp_path / "big.txt"
        corpus.write_text(CORPUS_TEXT * 40)  # ~340 kB of text, ~160k tokens: more than 64 kB
        argv = command_line("analyze", str(base["model"]), str(corpus), str(tmp_path / "a"))
        line = _refused_line(argv, capsys)
        assert "No space left on device" in line or "disk" in line, line
        assert not list(disk.rglob(data.META_FILE))  # nothing looks finished
        make_room()
        assert cli.main(argv) == 0
        assert len(list(disk.rglob(data.META_FILE))) == 1
