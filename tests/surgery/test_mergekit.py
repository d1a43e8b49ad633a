"""mergekit export: slices from a selection and back, the YAML mergekit reads, and the commands."""

from __future__ import annotations

import json

import pytest
import yaml

from inheritune import cli
from inheritune.config import ConfigError
from inheritune.models.arch import LAYER_NUMBERING
from inheritune.surgery.mergekit import (
    layers_from_slices,
    slices_from_layers,
    to_yaml,
    variant_path,
)


@pytest.mark.parametrize(
    ("layers", "ranges"),
    [
        ([0, 1, 2, 5], [[0, 3], [5, 6]]),
        (list(range(14)), [[0, 14]]),
        ([0, 1, 2, 29], [[0, 3], [29, 30]]),  # keep-last
        ([0, 2, 4], [[0, 1], [2, 3], [4, 5]]),  # every other layer
        ([0, 1, 0, 1], [[0, 2], [0, 2]]),  # stacking repeats a run
        ([3, 2], [[3, 4], [2, 3]]),  # order is kept, not sorted
    ],
)
def test_slices_round_trip(layers, ranges):
    cfg = slices_from_layers("org/model", layers, dtype="bfloat16")
    assert [s["sources"][0]["layer_range"] for s in cfg["slices"]] == ranges
    assert all(s["sources"][0]["model"] == "org/model" for s in cfg["slices"])
    assert cfg["merge_method"] == "passthrough" and cfg["dtype"] == "bfloat16"
    assert layers_from_slices(cfg) == layers
    # ... and through the YAML text
    assert layers_from_slices(yaml.safe_load(to_yaml(cfg))) == layers


def test_yaml_text_is_mergekit_style():
    cfg = slices_from_layers("/models/ref", [0, 1, 2, 5], dtype="float32")
    text = to_yaml(cfg, comments=["kept layers 0-2, 5", "two\nlines"])
    assert text.startswith("# kept layers 0-2, 5\n# two\n# lines\nslices:\n")
    assert "layer_range: [0, 3]" in text and "layer_range: [5, 6]" in text
    assert "merge_method: passthrough" in text and "dtype: float32" in text
    assert yaml.safe_load(text) == cfg


def test_bad_selections():
    with pytest.raises(ConfigError, match="at least one layer"):
        slices_from_layers("m", [])
    with pytest.raises(ConfigError, match="count from 0"):
        slices_from_layers("m", [-1, 0])


def test_variant_path():
    assert variant_path("out/merge.yaml", "prune-bi").as_posix() == ("out/merge.prune-bi.yaml")
    assert variant_path("merge", "hybrid").as_posix() == "merge.hybrid.yaml"


def test_inherit_exports_its_selection(tiny_folder, tmp_path, capsys):
    folder = tiny_folder("llama", layers=4)
    out, mk = tmp_path / "t", tmp_path / "sel" / "inherit.yaml"
    argv = ["inherit", "--model", str(folder), "--layers", "0,1,3", "--out", str(out)]
    assert cli.main([*argv, "--export-mergekit", str(mk)]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["layer_numbering"] == LAYER_NUMBERING
    cfg = yaml.safe_load(mk.read_text())
    assert layers_from_slices(cfg) == prov["kept_layers"] == [0, 1, 3]
    assert cfg["slices"][0]["sources"][0]["model"] == str(folder.resolve())
    assert cfg["dtype"] == "float32"  # the tiny reference's stored dtype
    assert "0-based" in mk.read_text().splitlines()[0]
    # a sub-module ablation is not a whole-layer selection: refused before any work
    bad = [*argv, "--parts", "attn", "--export-mergekit", str(mk)]
    assert cli.main(bad) == 2
    assert "--export-mergekit needs --parts block" in capsys.readouterr().err
    # a folder is not a file name
    assert cli.main([*argv, "--out", str(tmp_path / "u"), "--export-mergekit", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()
