"""``inheritune inherit``: build a target from chosen reference layers and save it.

The command behind Inheritune's first step (paper Alg. 1, step 1) as a standalone tool: it
checks the layer selection (``--select``, :mod:`inheritune.analysis.selection`: the first K
layers, a scored rule, or a list) against the reference's config before any weights load,
measures the selection's layer scores if it needs them (training split, cached), builds the
target with :mod:`inheritune.surgery` (``--parts``, ``--fresh``), optionally puts a fitted
bridge block at every seam (``--bridge block``, :mod:`inheritune.surgery.bridge`; ``--num-layers``
then counts the bridges too), and writes a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads as is, with ``inheritune.yaml`` (the
resolved config) and ``provenance.json`` (which layers came from where) beside it. With
``--export-mergekit`` the same selection is also written as mergekit passthrough slices.

Usage::

    inheritune inherit --num-layers 15 --out runs/smol15
    inheritune inherit --num-layers 20 --select bi --out runs/smol20-bi
    inheritune inherit --num-layers 20 --select bi --bridge block --out runs/smol20-bi-b
    inherit(build(InheritConfig, num_layers=16, bridge="block", out="runs/smol15b"))  # 15 + 1
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from inheritune.analysis.layer_scores import choose_layers
from inheritune.analysis.selection import SelectConfig, kept_for_depth, kept_layers, parse_select
from inheritune.config import ConfigError, nested, save_resolved, validate_numbers
from inheritune.models.arch import get_arch
from inheritune.surgery import bridge as _bridge
from inheritune.surgery.auto import choose_auto, format_candidates
from inheritune.surgery.bridge import BridgeConfig
from inheritune.surgery.build import (
    FRESH_PARTS,
    PARTS,
    check_depth,
    fresh_parts,
    parse_fresh,
    select_layers,
)


@dataclass
class InheritConfig:
    """``inheritune inherit``: build a target from chosen reference layers and save it."""

    model: str = field(
        default="smollm2-135m",
        metadata={"help": "reference: default name, HF folder, .gguf file or hub id"},
    )
    num_layers: int | None = field(
        default=None,
        metadata={
            "help": "the output's depth K: K layers chosen by --select, or with --bridge block "
            "K layers in all, bridge blocks included (or list the layers in --select)"
        },
    )
    layers: str | None = field(
        default=None,
        metadata={"help": "explicit layer indices, e.g. 0-13 or 0,1,2,5 (same as --select)"},
    )
    # --select first|bi|angular|lazy|keep-last|LIST and the windows its scores are measured on
    selection: SelectConfig = nested(SelectConfig)  # noqa: RUF009 (nested() returns a field)
    out: str = field(default="runs/inherit", metadata={"help": "output folder (HF format)"})
    parts: str = field(
        default="block",
        metadata={"help": "what each kept block inherits (sub-module ablation)", "choices": PARTS},
    )
    seed: int = field(default=0, metadata={"help": "seed for freshly initialised parts"})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "let transformers run the model repo's own code"}
    )
    export_mergekit: str | None = field(
        default=None,
        metadata={"help": "also write the selection as a mergekit passthrough slices YAML FILE"},
    )
    fresh: list[str] = field(
        default_factory=list,
        metadata={
            "help": "comma list of parts re-initialised (model's own init, --seed) instead of "
            f"inherited: {', '.join(FRESH_PARTS)}; the official code's GPT-2 start is "
            "pos_embed,final_norm. With tied embeddings, embed or head re-initialises the "
            "shared matrix"
        },
    )
    # --bridge block: a fitted block at every seam of the selection, a standard checkpoint
    bridging: BridgeConfig = nested(BridgeConfig)  # noqa: RUF009 (nested() returns a field)
    data: str = field(
        default="shakespeare",
        metadata={
            "help": "corpus for --bridge block and scored --select rules: calibration windows "
            "from its training split, validation loss before/after (provenance.json) on its "
            "validation split"
        },
    )
    eval_tokens: int = field(
        default=8192,
        metadata={"help": "validation tokens scored in provenance.json with --bridge (0: none)"},
    )
    eval_seq_len: int = field(
        default=128, metadata={"help": "tokens per validation window with --bridge", "min": 1}
    )

    def __post_init__(self) -> None:
        validate_numbers(self)  # finite, in range, of the declared type (config.py)
        if self.export_mergekit and self.parts != "block":  # mergekit copies whole layers
            raise ConfigError(f"--export-mergekit needs --parts block, got {self.parts!r}")
        if self.layers is not None:
            if self.selection.select != "first":
                raise ConfigError("give the layers once: --layers SPEC or --select SPEC")
            self.selection.select = self.layers
            self.layers = None
            parse_select(self.selection.select)
        listed = self.selection.rule == "list"
        if listed == (self.num_layers is not None):
            raise ConfigError(
                "give exactly one of --num-layers K (the rule --select picks them by) or a "
                "layer list (--select 0-5,9 or --layers 0-5,9)"
            )
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError(f"--num-layers must be >= 1, got {self.num_layers}")
        if self.parts not in PARTS:
            raise ConfigError(f"--parts must be one of {', '.join(PARTS)}, got {self.parts!r}")
        self.fresh = parse_fresh(self.fresh)
        bridging = self.bridging.bridge != "none"  # BridgeConfig validated its own fields
        if self.export_mergekit and (self.fresh or bridging):
            raise ConfigError("--export-mergekit copies reference layers only: no --fresh/--bridge")
        if self.selection.rule == "auto" and (self.parts != "block" or self.fresh):
            raise ConfigError(
                "--select auto scores the reference's own layers as inherited: it needs "
                "--parts block and no --fresh"
            )
        if bridging and (self.parts != "block" or self.fresh):
            raise ConfigError(
                "--bridge block is fitted to the reference's own blocks, embeddings, final "
                "norm and head: it needs --parts block and no --fresh"
            )


def check_selection(cfg: InheritConfig, num_layers: int) -> None:
    """Fail on a selection the reference cannot give before any weights load."""
    bridging = cfg.bridging.bridge != "none"
    if cfg.num_layers is not None:
        check_depth(int(cfg.num_layers), num_layers)
    if bridging and not cfg.selection.needs_scores:  # the layers follow from the config alone
        _, bridged = kept_for_depth(
            cfg.selection.select, num_layers, cfg.num_layers, None, cfg.bridging.bridge_spans
        )
        if not bridged:
            raise ConfigError(
                f"--bridge block: the selection keeps all {num_layers} layers, so there is no "
                "removed span to bridge"
            )
    elif cfg.selection.rule == "list":
        kept_layers(cfg.selection.select, num_layers, None)


def inherit(cfg: InheritConfig) -> Path:
    """Write the target as an HF folder (+ tokenizer if the reference has one, inheritune.yaml,
    provenance.json). No tokenizer is needed: only weights are copied."""
    from inheritune import __version__
    from inheritune.data import inputs
    from inheritune.models.arch import LAYER_NUMBERING
    from inheritune.models.loading import count_parameters, has_tokenizer, load_config
    from inheritune.surgery.mergekit import (
        check_path,
        config_dtype,
        slices_from_layers,
        source_name,
        write_config,
    )

    # Check the selection against the reference's config before loading any weights.
    ref_config = load_config(cfg.model, cfg.trust_remote_code)
    L = int(ref_config.num_hidden_layers)
    check_selection(cfg, L)
    if cfg.export_mergekit:
        mk_source = source_name(cfg.model)  # a .gguf is refused here, before the work
        check_path(cfg.export_mergekit)
    # Tokens only for the bridge's calibration and the layer scores; a tokenizer only where the
    # reference has one.
    bridging = cfg.bridging.bridge != "none"
    scored = cfg.selection.needs_scores
    seq_lens = {}
    if bridging:
        seq_lens = {"calib_seq_len": cfg.bridging.calib_seq_len, "eval_seq_len": cfg.eval_seq_len}
    if scored:
        seq_lens["score_seq_len"] = cfg.selection.score_seq_len
    loaded = inputs.load(
        cfg.model,
        cfg.data if bridging or scored else None,
        tokenizer=bridging or scored or has_tokenizer(cfg.model),
        seq_lens=seq_lens or None,
        trust_remote_code=cfg.trust_remote_code,
    )
    ref = loaded.model
    auto = None
    if cfg.selection.rule == "auto":  # every rule's start built and scored; the best kept
        auto = choose_auto(
            ref, loaded.tokens, cfg.selection, cfg.num_layers, cfg.bridging, cfg.seed
        )
        print(format_candidates(auto.record()))
        indices, scores, target, bridged = auto.kept, auto.scores, auto.model, auto.bridge_stats
        if bridged is not None and cfg.eval_tokens > 0:
            bridged["validation"] = _bridge.validation_record(
                ref, target, indices, loaded.tokens, cfg.eval_tokens, cfg.eval_seq_len
            )
    else:
        spans = cfg.bridging.bridge_spans if bridging else None
        choice = choose_layers(ref, loaded.tokens, cfg.selection, cfg.num_layers, cfg.seed, spans)
        indices, scores = choice.kept, choice.scores
        bridged = None
        if bridging:
            if not choice.bridged:
                raise ConfigError("--bridge block: the selection leaves no removed span to bridge")
            target, bridged = _bridge.bridge_on_corpus(
                ref,
                indices,
                loaded.tokens,
                cfg.bridging,
                cfg.seed,
                cfg.eval_tokens,
                cfg.eval_seq_len,
                bridged=choice.bridged,
            )
        else:
            target = select_layers(ref, indices, parts=cfg.parts, seed=cfg.seed)
            if cfg.fresh:
                target = fresh_parts(target, cfg.fresh, seed=cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    target.save_pretrained(out)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out)
    save_resolved(cfg, out / "inheritune.yaml")
    provenance = {
        "reference": cfg.model,
        "reference_class": type(ref).__name__,
        "reference_layers": get_arch(ref).num_layers,
        "kept_layers": indices,
        "select": cfg.selection.select,
        "auto": None if auto is None else auto.record(),
        "layer_scores": None if scores is None else asdict(scores),
        "layer_numbering": LAYER_NUMBERING,
        "parts": cfg.parts,
        "fresh": cfg.fresh,
        "bridge": bridged,
        "seed": cfg.seed,
        "parameters": {"reference": count_parameters(ref), "target": count_parameters(target)},
        "inheritune_version": __version__,
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    if cfg.export_mergekit:
        mk = slices_from_layers(mk_source, indices, config_dtype(ref_config))
        note = f"inheritune inherit: reference layers {indices} ({LAYER_NUMBERING})"
        print(f"mergekit config: {write_config(cfg.export_mergekit, mk, [note])}")
    print(
        f"inherited {len(indices)} of {provenance['reference_layers']} layers of {cfg.model}"
        + (f" + {len(bridged['bridges'])} bridge block(s)" if bridged else "")
        + " "
        f"({provenance['parameters']['target']:,} of {provenance['parameters']['reference']:,} "
        f"parameters) -> {out}"
    )
    if bridged is not None and "validation" in bridged:
        v = bridged["validation"]
        print(
            f"bridge block: validation loss {v['inherited']:.3f} (inherited) -> "
            f"{v['bridged']:.3f} (bridged, {bridged['layers']} layers); reference "
            f"{v['reference']:.3f} nats/token on {v['tokens']} tokens"
        )
    return out
