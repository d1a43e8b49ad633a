"""The documents stay true to the code: every relative link in the README and ``docs/``
resolves, every ``inheritune.…`` name a docstring, comment or document mentions exists, every
document a docstring cites is in the repository, and the README stays a front door."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SOURCES = sorted((ROOT / "src" / "inheritune").rglob("*.py")) + sorted(
    (ROOT / "benchmarks").glob("*.py")
)

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
DOTTED = re.compile(r"(?<![\w.])inheritune(?:\.\w+)+")
CITED_DOC = re.compile(r"(?<![\w./])((?:docs|benchmarks)/[\w./-]+\.md)")


def resolves(dotted: str) -> bool:
    """Whether ``a.b.c`` names a module or an attribute reachable from one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_resolves_can_fail():
    assert resolves("inheritune.training.train.train_model")
    assert not resolves("inheritune.train.train_model")  # the module before the regrouping
    assert not resolves("inheritune.training.no_such_name")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = [
        target
        for target in LINK.findall(doc.read_text())
        if "://" not in target and not (doc.parent / target).exists()
    ]
    assert not broken, f"{doc.relative_to(ROOT)}: {broken}"


def test_every_named_inheritune_object_exists():
    missing = sorted(
        f"{path.relative_to(ROOT)}: {name}"
        for path in [*SOURCES, *DOCS]
        for name in set(DOTTED.findall(path.read_text()))
        if not name.endswith(("yaml", "egg-info")) and not resolves(name.rstrip("."))
    )
    assert not missing, "\n".join(missing)


def test_docstrings_cite_documents_in_the_repository():
    text = {path: path.read_text() for path in SOURCES}
    outside = [
        str(p.relative_to(ROOT))
        for p, t in text.items()
        if re.search(r"\b(PAPER|RECOVERY|ASSETS|STYLE)\.md\b", t)
    ]
    assert not outside, f"cite documents by their path in the repository: {outside}"
    missing = sorted(
        f"{path.relative_to(ROOT)}: {cited}"
        for path, t in text.items()
        for cited in CITED_DOC.findall(t)
        if not (ROOT / cited).exists()
    )
    assert not missing, "\n".join(missing)


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for command in ("make demo", "make test"):
        assert command in readme
