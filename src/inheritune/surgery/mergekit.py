"""Layer selections as mergekit ``slices:`` configs, and the layer numbering every output states.

Layer numbering: every layer index inheritune reads or writes counts from 0 (layer 0 is the
first decoder block, as in Hugging Face's ``model.layers[0]``). The paper's plots count from 1,
so the paper's "layer 24" of GPT-2 medium is our layer 23. Each JSON we write says so with the
key ``"layer_numbering": LAYER_NUMBERING``.

A layer selection (the reference layers kept by ``inheritune inherit`` or by a ``compare``
variant, in order) can be written as a mergekit passthrough config (github.com/arcee-ai/mergekit,
``mergekit-yaml FILE OUT``), the format layer-pruning work such as PruneMe shares: each maximal
run of consecutive indices becomes one slice with a half-open ``layer_range: [first, last + 1]``,
so ``[0, 1, 2, 5]`` gives ``[0, 3]`` and ``[5, 6]``; repeated layers (stacking) simply give more
slices. mergekit's passthrough takes the embeddings, final norm and head from the model, as
``--parts block`` does::

    cfg = slices_from_layers("path/to/reference", [0, 1, 2, 5], dtype="bfloat16")
    write_config("prune.yaml", cfg, comments=["dropped layers 3, 4"])
    layers_from_slices(cfg)  # [0, 1, 2, 5]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from inheritune.config import ConfigError
from inheritune.models.arch import LAYER_NUMBERING


def slices_from_layers(
    model_name: str, layers: Sequence[int], dtype: str = "float32"
) -> dict[str, Any]:
    """The mergekit passthrough config that stacks ``layers`` of ``model_name`` in order.

    Consecutive runs ``a, a+1, ..., b`` become one slice ``layer_range: [a, b + 1]``.
    """
    idx = [int(i) for i in layers]
    if not idx:
        raise ConfigError("a mergekit export needs at least one layer")
    if min(idx) < 0:
        raise ConfigError(f"layer indices count from 0; got {min(idx)}")
    runs: list[list[int]] = []
    for i in idx:
        if runs and i == runs[-1][1]:  # extends the current half-open run
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return {
        "slices": [{"sources": [{"model": model_name, "layer_range": r}]} for r in runs],
        "merge_method": "passthrough",
        "dtype": dtype,
    }


def layers_from_slices(config: dict[str, Any]) -> list[int]:
    """The layer indices a passthrough config stacks, in order (inverse of the above)."""
    out: list[int] = []
    for s in config["slices"]:
        (source,) = s["sources"]  # passthrough: one source per slice
        start, end = source["layer_range"]
        out.extend(range(start, end))
    return out


def to_yaml(config: dict[str, Any], comments: Sequence[str] = ()) -> str:
    """The config as mergekit YAML, ``comments`` as ``#`` lines on top; ranges stay inline."""

    class _Dumper(yaml.SafeDumper):
        pass

    def represent_list(dumper, data):
        inline = all(isinstance(x, int) for x in data)  # layer_range: [0, 3]
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=inline)

    _Dumper.add_representer(list, represent_list)
    body = yaml.dump(config, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    head = "".join(f"# {line}\n" for c in comments for line in str(c).splitlines())
    return head + body


def check_path(path: str | Path) -> Path:
    """``--export-mergekit`` names a file; an existing folder is an error (checked up front)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--export-mergekit {p} is a folder; give a file name such as {p}/x.yaml")
    return p


def write_config(path: str | Path, config: dict[str, Any], comments: Sequence[str] = ()) -> Path:
    """Write :func:`to_yaml` to ``path`` atomically; returns the path."""
    from inheritune.storage import atomic_write_text

    p = check_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, to_yaml(config, comments))
    return p


def source_name(model: str) -> str:
    """What mergekit should load for a ``--model`` argument: a hub id as given, else a folder.

    Default names resolve to their prepared Hugging Face folder (absolute path). GGUF files
    cannot be read by mergekit, so they are refused.
    """
    from inheritune.models.loading import resolve_model

    src = resolve_model(model)
    if src.gguf_file:
        raise ConfigError(
            f"--export-mergekit: mergekit cannot read the .gguf file of {model!r}; "
            f"pass a Hugging Face folder as --model"
        )
    return str(Path(src.location).resolve()) if src.is_local else src.location


def config_dtype(config) -> str:
    """The checkpoint's stored dtype from an HF config, as mergekit spells it (e.g. bfloat16)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype or "float32").removeprefix("torch.")


def variant_path(path: str | Path, variant: str) -> Path:
    """``merge.yaml`` -> ``merge.<variant>.yaml``: one file per ``compare`` variant."""
    p = Path(path)
    suffix = p.suffix or ".yaml"
    return p.with_name(f"{p.stem if p.suffix else p.name}.{variant}{suffix}")


def export_selections(
    path: str | Path,
    model_name: str,
    dtype: str,
    selections: dict[str, Sequence[int]],
    descriptions: dict[str, str],
    not_exported: dict[str, str],
) -> dict[str, Path]:
    """One config per named selection at :func:`variant_path` (``compare --export-mergekit``).

    Each file's header names its selection and lists ``not_exported`` (name: why), so a reader
    of any one file learns which variants have no file.
    """
    missing = "; ".join(f"{n}: {why}" for n, why in not_exported.items()) or "none"
    written = {}
    for name, layers in selections.items():
        comments = [
            f"inheritune compare, variant {name}: {descriptions.get(name, '')}",
            "the variant's initial model before training; compare trains it afterwards",
            f"reference layers {list(layers)}, numbered {LAYER_NUMBERING}; layer_range is "
            "half-open [first, last + 1)",
            f"variants without a reference-layer selection (not exported): {missing}",
        ]
        cfg = slices_from_layers(model_name, layers, dtype)
        written[name] = write_config(variant_path(path, name), cfg, comments)
    return written
