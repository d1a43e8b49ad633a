"""Typed configs: composition into flat flags, YAML round trips, and the one numeric validator.

The property test feeds random numbers (nan, inf, negatives, zero, huge) to every numeric flag
of every command's config and checks the rule: a clean config, or a one-line ConfigError that
names the flag; never another exception. Constructing a config touches no file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inheritune import cli
from inheritune.config import ConfigError, build, flag, flag_fields, flat_dict, to_dict
from inheritune.recipe.config import RecipeConfig
from inheritune.training.config import TrainConfig

# A valid starting point per command (fields every config needs to be buildable at all).
BASE = {"inherit": {"num_layers": 2}}


def _config_classes() -> dict[str, type]:
    out = {}
    for name, cmd in cli.COMMANDS.items():
        if cmd.config:
            out[name] = getattr(importlib.import_module(cmd.module), cmd.config)
    return out


CLASSES = _config_classes()


def _numeric_type(owner: type, name: str):
    import typing

    from inheritune.config import _base_type

    tp, _ = _base_type(typing.get_type_hints(owner)[name])
    return tp if tp in (int, float) else None


NUMERIC = [
    (command, name, _numeric_type(owner, name))
    for command, cls in CLASSES.items()
    for name, (_f, owner, _d) in flag_fields(cls).items()
    if _numeric_type(owner, name) is not None
]

WEIRD = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0, -1, -1e-9, 2**70, -(2**70), 1e300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**80), max_value=2**80),
)


def test_every_command_has_numeric_flags_to_check():
    assert {c for c, _, _ in NUMERIC} >= {"train", "run", "compare", "analyze", "inherit"}


@pytest.mark.parametrize(
    ("command", "name", "tp"), NUMERIC, ids=[f"{c}-{n}" for c, n, _ in NUMERIC]
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=WEIRD)
def test_numeric_flags_are_validated(command, name, tp, value):
    cls = CLASSES[command]
    try:
        cfg = build(cls, **{**BASE.get(command, {}), name: value})
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg
        assert flag(name) in msg, msg
        return
    got = flat_dict(cfg)[name]
    assert got is None or math.isfinite(got)
    assert got >= 0, f"{flag(name)} accepted {value}"
    if tp is int:
        assert isinstance(getattr_flat(cfg, name), int)


def getattr_flat(cfg, name):
    for f in dataclasses.fields(cfg):
        if f.name == name:
            return getattr(cfg, name)
        if "nested" in f.metadata and hasattr(getattr(cfg, f.name), name):
            return getattr(getattr(cfg, f.name), name)
    raise AttributeError(name)


def test_nan_lr_is_one_line_on_the_cli(capsys):
    assert cli.main(["train", "--lr", "nan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["inheritune train: error: --lr must be a finite number of sane size, got nan"]


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--steps", "1e3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("inheritune train: error: argument --steps")


def test_recipe_composes_train_config_with_visible_overrides():
    cfg = RecipeConfig()
    assert isinstance(cfg.train, TrainConfig)
    assert cfg.train.steps == 1000 and TrainConfig().steps == 200  # one override, one default
    assert cfg.train.out == "runs/run"
    # flat keys and a `train:` section both work; flat keys win
    a = build(RecipeConfig, lr=1e-3, grow_by=4)
    b = build(RecipeConfig, train={"lr": 1e-3}, grow_by=4)
    c = build(RecipeConfig, train={"lr": 0.5}, lr=1e-3, grow_by=4)
    assert a == b == c
    with pytest.raises(ConfigError, match="resume"):
        build(RecipeConfig, resume=True)  # the recipe sets it per round
    with pytest.raises(ConfigError, match="unknown key"):
        build(RecipeConfig, learning_rate=1e-3)


def test_resolved_config_round_trips(tmp_path):
    cfg = build(RecipeConfig, lr=1e-3, freeze=["embed"], init_depth="3")
    assert build(RecipeConfig, **to_dict(cfg)) == cfg


def test_constructing_a_config_touches_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cls in CLASSES.values():
        with contextlib.suppress(ConfigError, TypeError):
            build(cls, out=str(tmp_path / "nowhere"), **BASE.get(cls.__name__, {}))
    assert list(tmp_path.iterdir()) == []
