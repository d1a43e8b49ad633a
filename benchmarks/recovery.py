"""How fast does an inherited SmolLM2 recover, per second of CPU compute?

A self-contained experiment script (it does not use inheritune.train or inheritune.surgery, which
are written in parallel): it builds the inherited model itself (embeddings + first K blocks +
final norm + tied head of ``smollm2-135m``), trains it on the Shakespeare train split for a fixed
budget of *training* seconds, and evaluates it on a FIXED set of validation windows (by default
the first 8 x 256 tokens of the validation split) every ``--eval-every`` seconds. Evaluation and
model loading are not counted as training time; a calibration step and an online teacher forward
are (unless ``teacher_cached``, which simulates a precomputed teacher cache).

Each experiment is a named configuration in :data:`EXPERIMENTS`; one run appends one JSON line
to ``benchmarks/results/recovery.jsonl`` with the settings, the per-step cost (median and 10th
percentile of the measured step times, so curves can be replotted as loss vs steps x step cost
when the shared CPU makes wall time noisy) and the loss curve. Usage::

    python benchmarks/recovery.py --list
    python benchmarks/recovery.py --exp baseline --seconds 120
    python benchmarks/recovery.py --exp reference  # the 30-layer model on the same windows
    python benchmarks/recovery.py --exp fast --layers 17 --seconds 420
    python benchmarks/recovery.py --report  # markdown table from the jsonl

Training time is charged as process CPU time / threads, not wall time: the 2 cores are shared
with other jobs, and CPU time is what one's own computation costs whatever else runs (wall
seconds are recorded beside it). The default is 1 thread, which keeps that clock honest (two
threads under contention burn CPU spin-waiting at barriers); on 2 idle cores the same work takes
about 1/1.9 of the charged seconds.

The learning-rate schedule is linear warmup over ``warmup`` steps, then cosine from ``lr`` to
``lr * min_lr_frac`` over the training-time budget (progress = elapsed training seconds /
budget), so every experiment uses its whole budget whatever its step cost.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inheritune import data, models

RESULTS = Path(__file__).parent / "results" / "recovery.jsonl"
MODEL = "smollm2-135m"
CORPUS = "shakespeare"


@dataclass(frozen=True)
class Recipe:
    """One training configuration of the inherited model."""

    layers: int = 15
    lr: float = 3e-4
    warmup: int = 0  # linear warmup steps
    min_lr_frac: float = 0.1  # cosine floor, as a fraction of lr
    batch: int = 8
    seq_len: int = 256
    weight_decay: float = 0.1  # on matrices only
    clip: float = 1.0
    # lr multipliers per parameter group; 0 freezes the group (no grad, not in the optimizer)
    scale_embed: float = 1.0  # tied embeddings + LM head (49152 x 576)
    scale_low: float = 1.0  # blocks 0 .. K-top-1
    scale_top: float = 1.0  # the last `top` inherited blocks
    scale_norm: float = 1.0  # the final norm
    top: int = 2
    calibrate: str = "none"  # "none" | "closed" | "fit" | "closed+fit": see calibrate_norm
    calib_iters: int = 10  # L-BFGS iterations of the "fit" calibration
    calib_windows: int = 4  # windows of seq_len tokens used by the closed-form calibration
    distill_alpha: float = 0.0  # loss = (1 - a) * CE + a * T^2 * KL(teacher || student)
    distill_temp: float = 1.0
    distill_topk: int = 0  # >0: teacher distribution truncated to its top-k (what a cache holds)
    teacher_cached: bool = False  # True: teacher forward time is not charged (simulates a cache)
    ce: str = "full"  # "full": (B,T,V) logits at once | "chunked": fused head+CE in token chunks
    seed: int = 0


BASE = Recipe()
# lr 1e-3 with a short warmup, tied embeddings/head frozen, final norm re-fitted before training
FAST = replace(BASE, lr=1e-3, warmup=2, scale_embed=0.0, calibrate="closed+fit")
EXPERIMENTS: dict[str, Recipe] = {
    # the measured-before plain loop: lr 3e-4 cosine, everything trainable, 8 x 256 tokens
    "baseline": BASE,
    "freeze_lr1e-3": replace(FAST, calibrate="none"),
    "fast": FAST,
    "fast_b4": replace(FAST, batch=4),
    "fast_lr2e-3": replace(FAST, lr=2e-3),
    "fast_seq128": replace(FAST, seq_len=128),
    "fast_b4_lr2e-3": replace(FAST, batch=4, lr=2e-3),
    "fast_b4_seq128": replace(FAST, batch=4, seq_len=128),
    "fast_b2": replace(FAST, batch=2),
    # the recommended default (= fast_b4_seq128): most optimizer updates per CPU second
    "recommended": replace(FAST, batch=4, seq_len=128),
    "fast_groups": replace(FAST, scale_norm=3.0, scale_top=2.0),
    "fast_distill_cached": replace(FAST, distill_alpha=0.5, distill_topk=64, teacher_cached=True),
    "fast_distill_online": replace(FAST, distill_alpha=0.5),
    "top4_only": replace(FAST, scale_low=0.0, top=4),
    "calib_only": replace(BASE, calibrate="closed+fit"),
    "chunked_ce": replace(BASE, ce="chunked"),
}


# ----------------------------------------------------------------------------- model + data


def inherit(reference: torch.nn.Module, k: int) -> torch.nn.Module:
    """Embeddings + first ``k`` blocks + final norm + tied head of ``reference`` (a copy)."""
    model = copy.deepcopy(reference)
    model.model.layers = model.model.layers[:k]
    model.config.num_hidden_layers = k
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:k]
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.use_cache = False
    return model


def hidden(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final-norm output of the decoder stack: (B, T, C)."""
    return model.model(input_ids=x, use_cache=False).last_hidden_state


class ChunkedHeadCE(torch.autograd.Function):
    """Sum of token CE of ``h @ W.T`` without keeping (N, V) logits: recomputed per chunk."""

    CHUNK = 512

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = h.new_zeros(())
        for s in range(0, h.shape[0], ChunkedHeadCE.CHUNK):
            logits = h[s : s + ChunkedHeadCE.CHUNK] @ w.T  # (n, V)
            total += F.cross_entropy(logits, y[s : s + ChunkedHeadCE.CHUNK], reduction="sum")
        ctx.save_for_backward(h, w, y)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, w, y = ctx.saved_tensors
        gh = torch.empty_like(h)
        gw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], ChunkedHeadCE.CHUNK):
            hs = h[s : s + ChunkedHeadCE.CHUNK]
            p = torch.softmax(hs @ w.T, dim=-1)  # (n, V), d CE / d logits = p - onehot
            p[torch.arange(len(hs)), y[s : s + ChunkedHeadCE.CHUNK]] -= 1.0
            p *= grad
            gh[s : s + ChunkedHeadCE.CHUNK] = p @ w
            if gw is not None:
                gw.addmm_(p.T, hs)
        return gh, gw, None


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ce: str) -> tuple:
    """Mean next-token CE and, for ``ce='full'``, the (B, T, V) logits (for distillation)."""
    h = hidden(model, x)  # (B, T, C)
    w = model.lm_head.weight  # (V, C), tied with the embeddings
    if ce == "chunked":
        n = y.numel()
        return ChunkedHeadCE.apply(h.reshape(n, -1), w, y.reshape(n)) / n, None
    logits = h @ w.T  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), logits


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token loss over fixed windows (T-1 predictions per window)."""
    model.eval()
    total, count = 0.0, 0
    w = model.lm_head.weight
    for s in range(0, len(windows), batch):
        x = windows[s : s + batch]
        h = hidden(model, x[:, :-1])
        logits = h @ w.T
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


def calibrate_norm(model, teacher, windows: torch.Tensor, how: str, iters: int) -> None:
    """Re-fit the final norm's per-channel gain g for the truncated stack, the rest frozen.

    ``closed``: least squares, the stack's normalised output n scaled channel by channel to match
    the teacher's final-norm output t (what the tied head was trained to read):
    g_c = sum(n_c * t_c) / sum(n_c^2). ``fit``: L-BFGS on the next-token CE of the calibration
    windows over g alone, on cached n (one stack forward, then only head matmuls).
    ``closed+fit``: the first as the start of the second."""
    captured = {}
    hook = model.model.norm.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    with torch.no_grad():
        model.model(input_ids=windows[:, :-1], use_cache=False)
    hook.remove()
    x = captured["x"].reshape(-1, captured["x"].shape[-1]).float()  # (N, C)
    eps = model.model.norm.variance_epsilon
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    g = model.model.norm.weight
    if how.startswith("closed"):
        with torch.no_grad():
            t = hidden(teacher, windows[:, :-1]).reshape(-1, x.shape[-1]).float()
            g.copy_((n * t).sum(0) / n.pow(2).sum(0).clamp_min(1e-12))
    if how.endswith("fit"):
        w = model.lm_head.weight.detach()
        y = windows[:, 1:].reshape(-1)
        gain = g.detach().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([gain], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy((n * gain) @ w.T, y)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            g.copy_(gain)


def param_groups(model, r: Recipe) -> list[dict]:
    """AdamW groups with per-group lr scales; a 0 scale freezes the group."""
    k = len(model.model.layers)
    parts = {
        "embed": ([model.model.embed_tokens.weight], r.scale_embed),
        "low": (
            [p for layer in model.model.layers[: k - r.top] for p in layer.parameters()],
            r.scale_low,
        ),
        "top": (
            [p for layer in model.model.layers[k - r.top :] for p in layer.parameters()],
            r.scale_top,
        ),
        "norm": ([model.model.norm.weight], r.scale_norm),
    }
    groups = []
    for name, (params, scale) in parts.items():
        for p in params:
            p.requires_grad_(scale > 0)
        if scale <= 0:
            continue
        for decay in (True, False):
            ps = [p for p in params if (p.ndim >= 2) == decay]
            if ps:
                wd = r.weight_decay if decay else 0.0
                groups.append({"params": ps, "scale": scale, "weight_decay": wd, "name": f"{name}"})
    return groups


def lr_at(r: Recipe, step: int, progress: float) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    floor = r.lr * r.min_lr_frac
    return floor + 0.5 * (r.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def distill_loss(student_logits, teacher_logits, r: Recipe) -> torch.Tensor:
    """T^2 * KL(teacher || student) per token; with top-k, CE to the renormalised top-k."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v) / r.distill_temp, dim=-1)
    t = teacher_logits.reshape(-1, v) / r.distill_temp
    if r.distill_topk > 0:
        tv, ti = t.topk(r.distill_topk, dim=-1)
        p = torch.softmax(tv, dim=-1)  # (N, k) renormalised over the cached top-k
        loss = -(p * s.gather(-1, ti)).sum(-1).mean()
    else:
        logp = F.log_softmax(t, dim=-1)
        loss = (logp.exp() * (logp - s)).sum(-1).mean()
    return loss * r.distill_temp**2


# ----------------------------------------------------------------------------- experiment


@dataclass
class Point:
    train_s: float
    steps: int
    tokens: int
    val_loss: float


@dataclass
class Result:
    exp: str
    recipe: dict
    seconds: float
    eval_windows: list
    curve: list = field(default_factory=list)
    step_s_median: float = 0.0
    step_s_p10: float = 0.0
    teacher_s_per_step: float = 0.0
    calib_s: float = 0.0
    start_loss: float = 0.0
    final_loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    train_wall_s: float = 0.0  # wall seconds of the training steps (charged time is CPU time)
    load_avg: list = field(default_factory=list)


def clock() -> float:
    """CPU seconds of this process per thread: compute spent, robust to other jobs' load."""
    return time.process_time() / torch.get_num_threads()


def run(exp: str, r: Recipe, seconds: float, eval_every: float, eval_windows: int) -> Result:
    t_wall = time.perf_counter()
    torch.manual_seed(r.seed)
    tokenizer = models.load_tokenizer(MODEL)
    toks = data.load_tokens(CORPUS, tokenizer)
    reference = models.load_model(MODEL)
    val = torch.from_numpy(data.fixed_windows(toks.val, 256, eval_windows * 256))
    res = Result(exp, asdict(r), seconds, [eval_windows, 256])
    if exp == "reference":
        res.final_loss = res.start_loss = evaluate(reference, val)
        res.curve = [asdict(Point(0.0, 0, 0, res.final_loss))]
        res.wall_s = time.perf_counter() - t_wall
        return res

    model = inherit(reference, r.layers)
    model.train()
    need_teacher = r.distill_alpha > 0 or r.calibrate.startswith("closed")
    teacher = reference if need_teacher else None
    if teacher is not None:
        teacher.requires_grad_(False)
    else:
        del reference
    rng = np.random.default_rng(r.seed)

    def batch() -> torch.Tensor:
        starts = rng.integers(0, len(toks.train) - r.seq_len - 1, size=r.batch)
        return torch.from_numpy(
            np.stack([np.asarray(toks.train[s : s + r.seq_len + 1], np.int64) for s in starts])
        )

    train_s = 0.0
    if r.calibrate != "none":
        # Calibration windows come from the train split; its time counts as training compute.
        t0 = clock()
        cal = torch.from_numpy(
            data.sample_windows(toks.train, r.calib_windows, r.seq_len + 1, seed=r.seed + 1)
        )
        calibrate_norm(model, teacher, cal, r.calibrate, r.calib_iters)
        res.calib_s = clock() - t0
        train_s += res.calib_s

    groups = param_groups(model, r)
    opt = torch.optim.AdamW(groups, lr=r.lr, betas=(0.9, 0.95), foreach=True)
    trainable = [p for g in groups for p in g["params"]]

    res.start_loss = evaluate(model, val)
    res.curve.append(asdict(Point(round(train_s, 2), 0, 0, res.start_loss)))
    print(f"[{exp}] K={r.layers} start val {res.start_loss:.3f} (calib {res.calib_s:.1f}s)")
    step, tokens, next_eval = 0, 0, eval_every
    step_times, teacher_times = [], []
    wall_steps = 0.0
    while train_s < seconds:
        # lr -> forward/backward -> clip -> step -> log -> eval
        lr = lr_at(r, step, train_s / seconds)
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        xy = batch()
        x, y = xy[:, :-1], xy[:, 1:]
        t0, w0 = clock(), time.perf_counter()
        teacher_logits = None
        if r.distill_alpha > 0:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=x, use_cache=False).logits
        t_teacher = clock() - t0
        ce, logits = lm_loss(model, x, y, r.ce if teacher_logits is None else "full")
        loss = ce
        if teacher_logits is not None:
            kd = distill_loss(logits, teacher_logits, r)
            loss = (1 - r.distill_alpha) * ce + r.distill_alpha * kd
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, r.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = clock() - t0
        wall_steps += time.perf_counter() - w0
        charged = dt - t_teacher if r.teacher_cached else dt
        step_times.append(charged)
        teacher_times.append(t_teacher)
        train_s += charged
        step += 1
        tokens += x.numel()
        if step % 5 == 0 or step <= 3:
            print(
                f"[{exp}] step {step} {train_s:6.1f}s loss {ce.item():.3f} lr {lr:.2e} "
                f"step {charged:.2f}s cpu {time.perf_counter() - w0:.2f}s wall",
                flush=True,
            )
        if train_s >= next_eval or train_s >= seconds:
            v = evaluate(model, val)
            res.curve.append(asdict(Point(round(train_s, 2), step, tokens, v)))
            print(f"[{exp}] eval @ {train_s:.1f}s step {step}: val {v:.3f}", flush=True)
            next_eval += eval_every
    res.steps, res.tokens = step, tokens
    res.final_loss = res.curve[-1]["val_loss"]
    times = step_times[1:] or step_times or [0.0]
    res.step_s_median = statistics.median(times)
    res.step_s_p10 = float(np.percentile(times, 10))
    res.teacher_s_per_step = statistics.median(teacher_times) if teacher_times else 0.0
    res.wall_s = time.perf_counter() - t_wall
    res.train_wall_s = wall_steps
    return res


def loss_at(curve: list, t: float) -> float | None:
    """Linear interpolation of the val loss at training second ``t`` (None past the end)."""
    for a, b in itertools.pairwise(curve):
        if a["train_s"] <= t <= b["train_s"]:
            f = (t - a["train_s"]) / max(b["train_s"] - a["train_s"], 1e-9)
            return a["val_loss"] + f * (b["val_loss"] - a["val_loss"])
    return None


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    marks = (60, 120, 180, 300, 600)
    head = "| experiment | K | settings | step s (med/p10) | tok/s | start | "
    head += " | ".join(f"@{m}s" for m in marks) + " | final (s, steps, tokens) |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        r = row["recipe"]
        if row["exp"] == "reference":
            out.append(
                f"| reference | 30 | 30-layer SmolLM2, no training | - | - | "
                f"{row['final_loss']:.3f} |" + " |" * len(marks) + f" {row['final_loss']:.3f} |"
            )
            continue
        diff = {k: v for k, v in r.items() if k != "layers" and getattr(BASE, k) != v}
        settings = ", ".join(f"{k}={v}" for k, v in diff.items()) or "plain (lr 3e-4 cosine)"
        tps = row["tokens"] / max(row["curve"][-1]["train_s"], 1e-9)
        cells = []
        for m in marks:
            v = loss_at(row["curve"], m)
            cells.append(f"{v:.2f}" if v is not None else "")
        last = row["curve"][-1]
        out.append(
            f"| {row['exp']} | {r['layers']} | {settings} | {row['step_s_median']:.2f}/"
            f"{row['step_s_p10']:.2f} | {tps:.0f} | {row['start_loss']:.2f} | "
            + " | ".join(cells)
            + f" | {last['val_loss']:.3f} ({last['train_s']:.0f}s, {last['steps']}, "
            f"{last['tokens']}) |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exp", help="experiment name (see --list), or 'reference'")
    ap.add_argument("--seconds", type=float, default=120.0, help="training-time budget")
    ap.add_argument("--eval-every", type=float, default=60.0, help="training seconds per eval")
    ap.add_argument("--eval-windows", type=int, default=8, help="fixed 256-token val windows")
    ap.add_argument("--layers", type=int, help="override the recipe's inherited depth K")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override fields")
    ap.add_argument("--threads", type=int, default=1, help="1: CPU time = own compute")
    ap.add_argument("--name", help="name recorded in the results (default: --exp)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--report", action="store_true", help="print the markdown table of --out")
    args = ap.parse_args(argv)
    if args.list:
        for name, r in EXPERIMENTS.items():
            print(name, {k: v for k, v in asdict(r).items() if getattr(BASE, k) != v})
        return 0
    if args.report:
        print(report(args.out))
        return 0
    if args.exp != "reference" and args.exp not in EXPERIMENTS:
        ap.error(f"--exp must be 'reference' or one of {sorted(EXPERIMENTS)}")
    torch.set_num_threads(args.threads)
    r = EXPERIMENTS.get(args.exp, BASE)
    if args.layers:
        r = replace(r, layers=args.layers)
    for kv in args.set:
        key, _, value = kv.partition("=")
        if key not in Recipe.__dataclass_fields__:
            ap.error(f"--set: unknown field {key!r}")
        kind = type(getattr(BASE, key))
        r = replace(r, **{key: value.lower() in ("1", "true") if kind is bool else kind(value)})
    try:
        import os

        load = list(os.getloadavg())
    except OSError:
        load = []
    res = run(args.exp, r, args.seconds, args.eval_every, args.eval_windows)
    res.exp = args.name or args.exp
    res.load_avg = load
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(asdict(res)) + "\n")
    print(json.dumps({k: v for k, v in asdict(res).items() if k != "curve"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
