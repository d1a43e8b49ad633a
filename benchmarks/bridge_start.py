"""Where does an inherited SmolLM2 start before any training, with and without a bridge block?

Rows (K inherited layers of the 30-layer reference, Shakespeare):

* the reference itself;
* the first K layers as inherited (embeddings + K blocks + final norm + tied head);
* + the final-norm gain refitted (inheritune.surgery.calibrate on the first ``--norm-windows``
  calibration windows);
* + the closed-form linear map h_K -> h_L applied before the final norm, without and with the
  refit: a non-standard reference point (not savable as a standard checkpoint);
* + a bridge block fitted on cached activations (``bridge.build_bridged`` with its defaults, a
  standard checkpoint with K + 1 layers), without and with the same refit.

Evaluation: ``data.eval_windows`` + ``losses.evaluate_loss`` on the validation split (the
training loop's fixed windows; default 64 x 128 = 8192 tokens, like the demo). Calibration:
``bridge.calibration_windows`` on the training split. Clock: process CPU time (the machine is
shared, so wall time says little).

``--select`` instead chooses the defaults (init, lr, steps, batch) on a held-out portion of the
TRAINING split: calibration windows come from the training split minus its last
``--select-tokens`` tokens, and candidates are scored (after the norm refit) on fixed windows of
those last tokens. The validation split is never looked at.

    .venv/bin/python benchmarks/bridge_start.py --layers 15 --json benchmarks/results/bridge.json
    .venv/bin/python benchmarks/bridge_start.py --select --json /tmp/bridge_select.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import time
from pathlib import Path

import torch

from inheritune import data
from inheritune.models import hooks as activations
from inheritune.models import loading as models
from inheritune.models.arch import get_arch
from inheritune.models.losses import evaluate_loss
from inheritune.surgery import bridge
from inheritune.surgery import build as surgery
from inheritune.surgery.calibrate import calibrate_final_norm


def refit(model, ids, windows: int, iters: int) -> dict:
    """The final-norm refit on the first ``windows`` calibration windows (as build_bridged)."""
    return calibrate_final_norm(model, torch.as_tensor(ids[:windows]), iters)


def with_linear_map(target, reference, ids, depth: int) -> tuple[torch.nn.Module, float]:
    """``target`` (depth layers) with the closed-form map applied to its last block's output,
    i.e. before the final norm; fitted on ``ids`` as build_bridged does (last eighth held out)."""
    hold = max(1, len(ids) // 8)
    h_l, h_L = activations.collect_states(reference, ids, depth)
    a, _ = bridge.fit_linear_map(h_l[:-hold], h_L[:-hold], bridge._centers(reference))
    model = copy.deepcopy(target)
    get_arch(model).layers[-1].register_forward_hook(lambda m, args, out: out @ a)
    return model, bridge.linear_map_r2(a, h_l[-hold:], h_L[-hold:], bridge._centers(reference))


def timed(fn):
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def start_losses(args) -> dict:
    ref = models.load_model(args.model)
    tokens = data.load_tokens(args.data, models.load_tokenizer(args.model))
    cfg = bridge.BridgeConfig(bridge="block", **args.overrides)
    calib = bridge.calibration_windows(tokens.train, cfg, args.seed)
    val = data.eval_windows(tokens, args.eval_seq_len, args.eval_tokens)
    k, nw, ni = args.layers, args.norm_windows, args.norm_iters
    rows: dict[str, dict] = {}

    def row(name: str, model, cpu: float, **extra) -> None:
        rows[name] = {"val_loss": evaluate_loss(model, val), "cpu_seconds": cpu, **extra}
        print(f"{name:<28} {rows[name]['val_loss']:.3f}  ({cpu:.0f} CPU s)", flush=True)

    def refitted(name: str, model, cpu: float, **extra) -> None:
        model = copy.deepcopy(model)
        fit, cpu_fit = timed(lambda: refit(model, calib, nw, ni))
        row(name, model, cpu + cpu_fit, refit=fit, **extra)

    row("reference", ref, 0.0, layers=get_arch(ref).num_layers)
    inherited = surgery.first_layers(ref, k)
    row("inherited", inherited, 0.0, layers=k)
    refitted("norm_refit", inherited, 0.0, layers=k)
    (mapped, r2), cpu = timed(lambda: with_linear_map(inherited, ref, calib, k))
    row("linear_map", mapped, cpu, layers=k, r2_held_out=r2)
    refitted("linear_map_refit", mapped, cpu, layers=k, r2_held_out=r2)
    (model, stats), cpu = timed(lambda: bridge.build_bridged(ref, k, calib, cfg, seed=args.seed))
    row("bridge", model, cpu, layers=k + 1, stats=stats)
    refitted("bridge_refit", model, cpu, layers=k + 1)
    return {
        "model": args.model,
        "data": args.data,
        "layers": k,
        "bridge_config": dataclasses.asdict(cfg),
        "refit": {"windows": nw, "iters": ni},
        "eval": {"windows": len(val), "seq_len": args.eval_seq_len, "split": "validation"},
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }


def select(args) -> dict:
    """Grid over the bridge settings, scored on held-out TRAINING windows (never validation)."""
    ref = models.load_model(args.model)
    tokens = data.load_tokens(args.data, models.load_tokenizer(args.model))
    train = tokens.train[: -args.select_tokens]
    held = data.fixed_windows(tokens.train[-args.select_tokens :], args.eval_seq_len + 1)
    results = []
    grid = itertools.product(args.inits, args.lrs, args.steps, args.batches)
    for init, lr, steps, batch in grid:
        cfg = bridge.BridgeConfig(
            bridge="block",
            bridge_init=init,
            bridge_lr=lr,
            bridge_steps=steps,
            bridge_batch=batch,
            **args.overrides,
        )
        calib = bridge.calibration_windows(train, cfg, args.seed)
        bare = dataclasses.replace(cfg, norm_iters=0)  # refits are scored separately below
        (model, stats), cpu = timed(
            lambda bare=bare, calib=calib: bridge.build_bridged(ref, args.layers, calib, bare)
        )
        res = {
            "init": init,
            "lr": lr,
            "steps": steps,
            "batch": batch,
            "held_train_loss": {"no_refit": evaluate_loss(model, held)},
            "fit_loss_after": stats["fit_loss_after"],
            "linear_map_fit_loss": stats["linear_map_fit_loss"],
            "cpu_seconds": cpu,
        }
        for windows in args.refit_windows:
            normed = copy.deepcopy(model)
            refit(normed, calib, windows, args.norm_iters)
            res["held_train_loss"][f"refit_{windows}"] = evaluate_loss(normed, held)
        results.append(res)
        print(json.dumps(res), flush=True)
    return {"selection_windows": len(held), "select_tokens": args.select_tokens, "grid": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--layers", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--norm-windows", type=int, default=16, help="windows of the refit rows")
    p.add_argument("--norm-iters", type=int, default=20, help="L-BFGS iterations of the refits")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="BridgeConfig overrides, e.g. bridge_steps=300 calib_tokens=8192",
    )
    p.add_argument("--select", action="store_true", help="choose defaults on training windows")
    p.add_argument("--select-tokens", type=int, default=16 * 129)
    p.add_argument("--inits", nargs="+", default=["last"])
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3])
    p.add_argument("--steps", nargs="+", type=int, default=[300])
    p.add_argument("--batches", nargs="+", type=int, default=[8])
    p.add_argument("--refit-windows", nargs="*", type=int, default=[4])
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    types = {f.name: f.type for f in dataclasses.fields(bridge.BridgeConfig)}
    args.overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        args.overrides[key] = {"int": int, "float": float}.get(str(types[key]), str)(value)
    torch.set_num_threads(args.threads)
    result = select(args) if args.select else start_losses(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
