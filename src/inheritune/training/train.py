"""``inheritune train``: one explicit training loop for Hugging Face causal LMs.

Used from the CLI (:func:`train`) and in process by the recipe and the comparison
(:func:`train_model` on an in-memory model). The loop in :func:`train_model` reads top to bottom,
one stage at a time: lr -> eval/checkpoint -> forward/backward with accumulation -> clip ->
step -> log -> stop. :func:`start` checks the inputs, restores a checkpoint when resuming
(weights, optimizer, RNG, data position), freezes (``--freeze``, ``--train-top``), wraps the
model (DDP/FSDP) and builds the optimizer. :class:`Run` holds what the loop needs and one method
per stage: evaluate, save, forward/backward with accumulation, clip, sync across ranks, refuse a
non-finite step, log. :func:`finish` writes the final folder, the plot and ``result.json``.

Its parts live where they belong:

* :class:`~inheritune.training.config.TrainConfig`: the settings;
* :mod:`inheritune.models.losses`: the chunked head + cross-entropy, distillation, the loss
  normalisation under accumulation (:func:`~inheritune.models.losses.micro_loss_scale`),
  evaluation;
* :mod:`inheritune.training.optim`: parameter groups, freezing, AdamW, the lr schedule;
* :mod:`inheritune.data.windows`: the seeded window sampler and the fixed validation windows;
* :mod:`inheritune.training.checkpoint`: atomic, pickle-free checkpoints (model, optimizer, RNG,
  data position) and resuming;
* :mod:`inheritune.training.monitor`: log.jsonl, throughput, stop signals, the loss plot.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from inheritune import data, distributed
from inheritune.config import ConfigError, flag, save_resolved, to_dict
from inheritune.distributed import (
    DistEnv,
    all_reduce_max,
    all_reduce_sum,
    autocast,
    barrier,
    gather_tensors,
    setup,
)
from inheritune.models import losses
from inheritune.models.arch import get_arch
from inheritune.models.folders import full_model_state, save_hf_folder
from inheritune.models.parallel import full_tensor, gradient_sync, wrap
from inheritune.storage import (
    atomic_write_json,
    atomic_write_text,
    remove_stale_temporaries,
    write_folder_atomically,
)
from inheritune.training import checkpoint as ckpt
from inheritune.training import monitor, optim
from inheritune.training.checkpoint import LATEST, checkpoints_root, prune, read_latest, step_name
from inheritune.training.config import TrainConfig
from inheritune.training.distill import Teacher, shared_bottom
from inheritune.training.precision import choose_precision, recorded_choice

PRECISION_FILE = "precision.json"  # what --precision auto chose, reused when resuming


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is intact."""


@dataclass
class TrainResult:
    """What a training run produced."""

    out: Path
    final_dir: Path  # HF folder of the final model (config + safetensors + tokenizer)
    steps: int  # optimizer steps done (cumulative over resumes)
    tokens: int  # training tokens seen (cumulative over resumes)
    wall_s: float  # wall time of this process's run (evaluations and checkpoints included)
    # [{"step", "tokens", "val_loss", "val_ppl"(, "extra": {name: loss})}], step 0 and the end
    evals: list[dict]
    final_val_loss: float
    tokens_per_s: float  # training throughput, evaluation and checkpoint time excluded
    interrupted: bool = False  # stopped by SIGINT/SIGTERM after saving a checkpoint
    stop_signal: int = 0  # the signal that stopped it
    checkpoint: Path | None = None  # the last checkpoint written
    precision: dict | None = None  # --precision auto: the choice, both step timings, why
    mfu: float | None = None  # training tokens/s x model FLOPs/token over the device's peak
    peak_source: str | None = None  # what that peak is (datasheet, or measured here)


@dataclass
class Run:
    """Everything one training run holds; the loop below only calls its stage methods."""

    cfg: TrainConfig
    env: DistEnv
    model: nn.Module
    tokenizer: Any
    tokens: data.Tokens
    teacher: Teacher | None
    loss_module: nn.Module  # CausalLMLoss, wrapped by DDP/FSDP
    forward: nn.Module  # loss_module, or its torch.compile'd version
    opt: torch.optim.Optimizer
    sampler: data.WindowSampler
    windows: np.ndarray  # fixed validation windows (n, seq_len + 1)
    extra_windows: dict[str, np.ndarray]  # other corpora's fixed windows, scored at each eval
    log: monitor.JsonlLog
    bar: tqdm
    step: int = 0
    tokens_seen: int = 0
    evals: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0  # training time of earlier invocations (resume)
    budget_before: float = 0.0  # --time-budget seconds spent by earlier invocations (resume)
    loop_start: float = 0.0  # perf_counter when this invocation's loop started
    eval_cost: float = 0.0  # seconds of the last evaluation: the final one is reserved
    save_cost: float = 0.0  # seconds of the last checkpoint: the final one is reserved
    last_saved: int = -1
    last_ckpt: Path | None = None
    meter: monitor.Throughput = field(default_factory=monitor.Throughput)
    stop: monitor.StopFlag = field(default_factory=monitor.StopFlag)
    time_up: bool = False  # --time-budget spent (agreed by every rank)
    peak: monitor.Peak | None = None  # the device's peak FLOP/s that MFU is measured against
    flops_per_token: float = 0.0
    data_wait: float = 0.0  # seconds spent building batches since the last train log line
    precision_choice: dict | None = None  # what --precision auto measured and chose
    last_logged: int = 0  # step of the last train log line

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def fsdp(self) -> bool:
        return self.cfg.fsdp and self.env.distributed

    def autocast(self):
        return autocast(self.cfg.precision, self.env.device)

    def budget_spent(self) -> float:
        """Wall seconds charged to ``--time-budget``: the loop so far, evaluations and
        checkpoints included, plus what earlier invocations spent."""
        return self.budget_before + (time.perf_counter() - self.loop_start)

    def time_progress(self) -> float | None:
        """Fraction of ``--time-budget`` spent (None without one): drives the lr decay."""
        if self.cfg.time_budget <= 0:
            return None
        return min(1.0, self.budget_spent() / self.cfg.time_budget)

    def progress(self) -> float:
        """Fraction of the run done (by time under --time-budget, else by steps)."""
        by_time = self.time_progress()
        return by_time if by_time is not None else min(1.0, self.step / self.cfg.steps)

    def evaluate(self) -> None:
        """Validation loss on the fixed windows (and on each extra set), logged and kept in
        ``evals``."""
        t0 = time.perf_counter()
        val = self._loss_on(self.windows)
        rec = {"step": self.step, "tokens": self.tokens_seen, "val_loss": val}
        rec["val_ppl"] = math.exp(val)
        if self.extra_windows:
            rec["extra"] = {k: self._loss_on(w) for k, w in self.extra_windows.items()}
        self.eval_cost = time.perf_counter() - t0
        rec["seconds"] = self.eval_cost
        self.evals.append(rec)
        self.log.write({"kind": "eval", **rec})
        self.bar.set_postfix_str(f"val {val:.3f}", refresh=False)

    def _loss_on(self, windows: np.ndarray) -> float:
        return losses.evaluate_windows(
            self.forward,
            windows,
            self.cfg.eval_batch(self.env.world_size),
            self.env.device,
            self.autocast(),
            self.env,
        )

    def save(self) -> Path:
        """An atomic checkpoint of the current step (a collective: every rank calls it)."""
        cfg, env, root = self.cfg, self.env, checkpoints_root(self.out)
        t0 = time.perf_counter()
        trainer_state = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "data": self.sampler.state_dict(),
            "evals": self.evals,
            "train_seconds": self.train_seconds + self.meter.seconds,
            "budget_seconds": self.budget_spent(),
            "world_size": env.world_size,
            "config": to_dict(cfg),
            "data_fingerprint": ckpt.data_identity(self.tokens),
        }
        model_sd = full_model_state(self.model, self.fsdp)
        optim_sd = ckpt.optimizer_state(self.model, self.opt, self.fsdp)
        # every rank's own CPU and CUDA generator states: each draws its own dropout masks
        rng_cpu = gather_tensors(torch.get_rng_state(), env)
        rng_cuda = None
        if env.device.type == "cuda":
            rng_cuda = gather_tensors(torch.cuda.get_rng_state(env.device), env)
        path = root / step_name(self.step)
        if env.is_main:
            tensors, scalars = ckpt.rng_state(rng_cpu, rng_cuda)

            def populate(tmp: Path) -> None:
                save_hf_folder(self.model, self.tokenizer, tmp, model_sd)
                ckpt.save_training_state(tmp, optim_sd, trainer_state, tensors, scalars)

            write_folder_atomically(path, populate, {"step": self.step})
            atomic_write_text(root / LATEST, path.name + "\n")
            prune(root, cfg.keep_last)
        barrier(env)
        self.last_saved, self.last_ckpt = self.step, path
        self.save_cost = time.perf_counter() - t0
        return path

    def forward_backward(self) -> torch.Tensor:
        """One global batch over ``grad_accum`` micro-batches (this rank's disjoint share);
        returns the batch's mean loss on this rank as a float64 scalar, gradients accumulated."""
        cfg, env = self.cfg, self.env
        micro = cfg.micro_batch(env.world_size)
        t_data = time.perf_counter()
        starts = self.sampler.next_starts(cfg.batch_size).reshape(
            cfg.grad_accum, env.world_size, -1
        )
        batch = data.gather_windows(self.tokens.train, starts[:, env.rank].reshape(-1), cfg.seq_len)
        batch = batch.view(cfg.grad_accum, micro, cfg.seq_len + 1).to(env.device)
        self.data_wait += time.perf_counter() - t_data
        scale = losses.micro_loss_scale(
            micro * cfg.seq_len, cfg.batch_size * cfg.seq_len, env.world_size
        )
        alpha = losses.distill_weight(cfg.distill_alpha, cfg.distill_decay, self.progress())
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        for m in range(cfg.grad_accum):
            x, y = batch[m, :, :-1], batch[m, :, 1:]
            last = m == cfg.grad_accum - 1
            with gradient_sync(self.loss_module, last), self.autocast():
                loss = self.forward(
                    x, y, self.teacher, alpha, cfg.distill_temperature, cfg.distill_hidden
                )
            (loss * scale).backward()
            loss_sum += loss.detach().double() * scale
        return loss_sum

    def clip(self) -> float:
        """Clip to ``--grad-clip`` and return the global gradient norm (inf max = measure only)."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        params = [p for g in self.opt.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(full_tensor(norm))

    def sync(self, loss_sum: torch.Tensor, step_seconds: float) -> tuple[float, bool]:
        """(mean loss over ranks, whether any rank got a stop signal) in one all-reduce; also
        agrees on whether the time budget is spent (any rank's clock decides for all): it is
        when one more step and the final evaluation and checkpoint would not fit."""
        reserve = step_seconds + self.eval_cost + self.save_cost
        time_up = 0 < self.cfg.time_budget <= self.budget_spent() + reserve
        flags = [float(self.stop.signum), float(time_up)]
        both = torch.cat(
            [loss_sum[None], torch.tensor(flags, dtype=loss_sum.dtype, device=loss_sum.device)]
        )
        all_reduce_sum(both, self.env)
        self.time_up = float(both[2]) > 0
        return float(both[0]) / self.env.world_size, float(both[1]) > 0

    def refuse_non_finite(self, loss: float, grad_norm: float) -> None:
        """A NaN/inf loss or gradient stops the run before the update touches the weights."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        self.opt.zero_grad(set_to_none=True)
        good = read_latest(checkpoints_root(self.out))
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
        raise TrainingError(
            f"non-finite {what} ({value}) at step {self.step + 1}; the update was not applied. "
            f"Last good checkpoint: {good or 'none'}. Try a lower {flag('lr')}, "
            f"{flag('precision')} fp32 or {flag('grad_clip')}."
        )

    def write_train_log(self, loss: float, lr: float, grad_norm: float, t_start: float) -> None:
        """A train line (a collective: peak memory and data wait are the worst rank's)."""
        rate = self.meter.window_rate()
        steps = max(1, self.step - self.last_logged)
        worst = torch.tensor(
            [monitor.peak_memory(self.env.device), self.data_wait / steps],
            dtype=torch.float64,
            device=self.env.device,
        )
        all_reduce_max(worst, self.env)
        self.data_wait, self.last_logged = 0.0, self.step
        record = {
            "kind": "train",
            "step": self.step,
            "tokens": self.tokens_seen,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": rate,
            "elapsed_s": time.perf_counter() - t_start,
            "peak_mem_gb": float(worst[0]) / 1e9,
            "data_wait_s": float(worst[1]),  # per step, building the batch before forward
        }
        if self.peak is not None:
            mfu = monitor.mfu(self.flops_per_token, rate, self.peak, self.env.world_size)
            record["mfu"] = mfu
        self.log.write(record)
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)


def _check_inputs(model: nn.Module, tokenizer, tokens: data.Tokens, cfg: TrainConfig, world: int):
    """Refuse data, batch layouts and teachers that cannot work, before any weight moves."""
    if cfg.batch_size % (cfg.grad_accum * world):
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must be a multiple of --grad-accum x processes "
            f"({cfg.grad_accum} x {world})"
        )
    if tokenizer is not None and tokens.meta.get(
        "tokenizer_fingerprint"
    ) != data.tokenizer_fingerprint(tokenizer):
        raise data.TokenizerMismatchError(
            f"the tokens in {tokens.path} were made by a different tokenizer than the model's; "
            f"pass the raw text so it is re-tokenised"
        )
    vocab = model.get_input_embeddings().weight.shape[0]
    max_id = int(tokens.ids.max())  # one pass over the memmap; cheap next to training
    if max_id >= vocab:
        raise data.DataError(
            f"the tokens hold id {max_id} but the model's embedding has only {vocab} rows "
            f"(tokenizer and model do not belong together)"
        )
    data.check_length(tokens.train, cfg.seq_len + 1, "training")
    if (len(tokens.train) - 1) // cfg.seq_len < cfg.batch_size:
        raise data.DataError(
            f"the training split holds {(len(tokens.train) - 1) // cfg.seq_len} windows of "
            f"--seq-len {cfg.seq_len}, fewer than one batch (--batch-size {cfg.batch_size})"
        )


def _teacher(teacher, model, env) -> Teacher | None:
    """The distillation teacher on this device; it shares the student's frozen bottom if any."""
    if teacher is None:
        return None
    out = Teacher(teacher.to(env.device), shared=shared_bottom(model, teacher))
    if env.is_main and out.shared:
        tqdm.write(
            f"distillation: the teacher runs only its blocks {out.shared}.. "
            f"(the bottom {out.shared} are shared with the student)"
        )
    return out


def _resolve_precision(model, tokens, cfg: TrainConfig, env) -> tuple[TrainConfig, dict | None]:
    """``--precision auto``: measure here (or, resuming, reuse what this run measured before)."""
    if cfg.precision != "auto":
        return cfg, None
    micro = cfg.micro_batch(env.world_size)
    choice = recorded_choice(
        Path(cfg.out) / PRECISION_FILE,
        lambda: choose_precision(model, tokens.train, micro, cfg.seq_len, env),
        reuse=cfg.resume,
        is_main=env.is_main,
    )
    return replace(cfg, precision=choice["precision"]), choice


def _enable_grad_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing: works under DDP and FSDP, keeps dropout masks."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' newer name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def start(model, tokenizer, tokens, cfg: TrainConfig, teacher, desc, extra_eval=None) -> Run:
    """Check the inputs, restore a checkpoint if resuming, wrap the model, build the optimizer.
    ``extra_eval``: name -> fixed windows of another corpus, scored at every evaluation."""
    env = setup(cfg.dist_timeout)
    out = Path(cfg.out)
    _check_inputs(model, tokenizer, tokens, cfg, env.world_size)
    if cfg.distill_alpha > 0 and teacher is None:
        raise ConfigError(f"{flag('distill_alpha')} > 0 needs a teacher ({flag('teacher')})")
    sampler = data.WindowSampler(len(tokens.train), cfg.seq_len, cfg.seed)
    windows = data.eval_windows(tokens, cfg.seq_len, cfg.eval_tokens)
    resume_from = ckpt.resume_point(cfg, env)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(checkpoints_root(out))
        save_resolved(cfg, out / "config.yaml")
    barrier(env)

    optim.apply_freeze(model, cfg.freeze)
    if cfg.train_top:
        optim.train_only_top(model, cfg.train_top)
    model.to(env.device).train()
    cfg, choice = _resolve_precision(model, tokens, cfg, env)  # before any RNG is seeded
    state = ckpt.restore_or_seed(model, sampler, resume_from, cfg, tokens, env)
    teacher = _teacher(teacher, model, env)
    fsdp = cfg.fsdp and env.distributed
    if cfg.grad_checkpointing:
        _enable_grad_checkpointing(model)
    flops_per_token = monitor.model_flops_per_token(model, cfg.seq_len)  # before sharding
    loss_module = wrap(losses.CausalLMLoss(model), get_arch(model).layers, env, fsdp, cfg.precision)
    opt = optim.make_optimizer(model, cfg, fsdp)
    if state is not None:
        ckpt.load_optimizer_state(model, opt, state["optimizer_state"], fsdp)
        ckpt.set_rng_state(state["rng_tensors"], state["rng_scalars"], env.rank, env.device)
    step = int(state["step"]) if state is not None else 0
    peak = monitor.device_peak(env.device, cfg.precision) if env.is_main else None
    header = None
    if peak is not None:  # MFU's denominator, stated once at the top of log.jsonl
        header = {"peak_flops": peak.flops, "peak_flops_source": peak.source}
        header.update(flops_per_token=flops_per_token, devices=env.world_size)
        header["device"] = str(env.device)
    run = Run(
        cfg=cfg,
        env=env,
        model=model,
        tokenizer=tokenizer,
        tokens=tokens,
        teacher=teacher,
        loss_module=loss_module,
        forward=torch.compile(loss_module) if cfg.compile else loss_module,
        opt=opt,
        sampler=sampler,
        windows=windows,
        extra_windows=dict(extra_eval or {}),
        log=monitor.JsonlLog(
            out / "log.jsonl",
            env.is_main,
            step if state is not None else None,
            header=header,
            tensorboard=cfg.tensorboard,
        ),
        bar=tqdm(
            total=None if cfg.time_budget > 0 else cfg.steps,  # a time budget: a step count
            initial=min(step, cfg.steps),
            desc=desc or f"train {out.name}",
            disable=not env.is_main,
            dynamic_ncols=True,
            unit="step",
        ),
        step=step,
        last_ckpt=resume_from,
        peak=peak,
        flops_per_token=flops_per_token,
        last_logged=step,
        precision_choice=choice,
    )
    if state is not None:
        run.tokens_seen, run.evals = int(state["tokens"]), list(state["evals"])
        run.train_seconds, run.last_saved = float(state["train_seconds"]), step
        run.budget_before = float(state.get("budget_seconds", run.train_seconds))
    return run


def finish(run: Run, interrupted: bool, wall: float) -> TrainResult:
    """Final checkpoint, final HF folder, plot and result.json (or the resume hint)."""
    env, out = run.env, run.out
    final_dir = out / "final"
    run.log.close()  # TensorBoard's writer; log.jsonl is appended line by line
    if not interrupted:
        if run.step != run.last_saved:
            run.save()
        model_sd = full_model_state(run.model, run.fsdp)
        if env.is_main:
            write_folder_atomically(
                final_dir, lambda tmp: save_hf_folder(run.model, run.tokenizer, tmp, model_sd)
            )
            monitor.plot_training(out, run.evals, run.log.path)
        barrier(env)
    elif env.is_main:
        tqdm.write(
            f"stopped by signal {run.stop.signum} at step {run.step}; checkpoint "
            f"{run.last_ckpt}. Rerun with {flag('resume')} to continue."
        )
    result = TrainResult(
        out=out,
        final_dir=final_dir,
        steps=run.step,
        tokens=run.tokens_seen,
        wall_s=wall,
        evals=run.evals,
        final_val_loss=run.evals[-1]["val_loss"] if run.evals else float("nan"),
        tokens_per_s=run.meter.rate,
        interrupted=interrupted,
        stop_signal=run.stop.signum,
        checkpoint=run.last_ckpt,
        precision=run.precision_choice,
        mfu=None
        if run.peak is None
        else monitor.mfu(run.flops_per_token, run.meter.rate, run.peak, env.world_size),
        peak_source=None if run.peak is None else run.peak.source,
    )
    if env.is_main and not interrupted:
        summary = {k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}
        atomic_write_json(out / "result.json", summary)
    return result


# ----------------------------------------------------------------------------- the loop


def train_model(
    model: nn.Module,
    tokenizer,
    tokens: data.Tokens,
    cfg: TrainConfig,
    teacher: nn.Module | None = None,
    desc: str | None = None,
    extra_eval: dict[str, np.ndarray] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``tokens`` into ``cfg.out``; see the module docstring.

    With ``cfg.resume`` the model's weights, the optimizer, RNG and data position come from the
    latest intact checkpoint in ``cfg.out``. Under ``--fsdp`` the model is sharded in place:
    reload it from ``result.final_dir``. ``extra_eval`` (name -> fixed windows of another
    corpus, e.g. :func:`inheritune.data.eval_windows` of a held-out text) is scored at every
    evaluation beside the validation windows: ``evals[i]["extra"][name]``.
    """
    t_start = time.perf_counter()
    run = start(model, tokenizer, tokens, cfg, teacher, desc, extra_eval)
    cfg = run.cfg  # with --precision auto resolved
    interrupted = False
    run.loop_start = time.perf_counter()
    with monitor.catch_signals(run.stop), run.bar:
        while True:
            # 1. learning rate
            lr = optim.lr_at(run.step, cfg, run.time_progress())
            for g in run.opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            # 2. evaluation and checkpoint, at the start of a step (the state is consistent)
            periodic = cfg.eval_every and run.step % cfg.eval_every == 0
            last = run.step >= cfg.steps or run.time_up
            if (run.step == 0 or last or periodic) and not _evaluated(run):
                run.evaluate()
            if last:
                break
            periodic = cfg.save_every and run.step % cfg.save_every == 0
            if periodic and 0 < run.step != run.last_saved:
                run.save()
            # 3. forward/backward over the micro-batches
            t0 = time.perf_counter()
            loss_sum = run.forward_backward()
            # 4. clip (and agree across ranks on the loss and on stopping)
            grad_norm = run.clip()
            loss, stop_requested = run.sync(loss_sum, time.perf_counter() - t0)
            run.refuse_non_finite(loss, grad_norm)
            # 5. optimizer step
            run.opt.step()
            run.opt.zero_grad(set_to_none=True)
            run.step += 1
            run.tokens_seen += cfg.batch_size * cfg.seq_len
            run.meter.add(cfg.batch_size * cfg.seq_len, time.perf_counter() - t0)
            # 6. log
            run.bar.update(1)
            if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                run.write_train_log(loss, lr, grad_norm, t_start)
            # 7. stop on SIGINT/SIGTERM (any rank's signal stops every rank at the same step)
            if stop_requested:
                run.save()
                interrupted = True
                break
    return finish(run, interrupted, time.perf_counter() - t_start)


def _evaluated(run: Run) -> bool:
    return bool(run.evals) and run.evals[-1]["step"] == run.step


# ----------------------------------------------------------------------------- the command


def train(cfg: TrainConfig) -> TrainResult:
    """The CLI entry: resolve model, tokenizer, data (and teacher), then :func:`train_model`."""
    from inheritune.data import inputs

    if cfg.distill_alpha > 0 and not cfg.teacher:
        raise ConfigError(f"{flag('distill_alpha')} > 0 needs {flag('teacher')}")
    loaded = inputs.load(
        cfg.model,
        cfg.data,
        seq_lens={"seq_len": cfg.seq_len},
        trust_remote_code=cfg.trust_remote_code,
        dist_timeout=cfg.dist_timeout,
        fsdp=cfg.fsdp,
        precision=cfg.precision,
    )
    teacher = None
    if cfg.distill_alpha > 0:
        teacher = inputs.load_teacher(cfg.teacher, loaded.model, cfg.trust_remote_code)
    result = train_model(loaded.model, loaded.tokenizer, loaded.tokens, cfg, teacher=teacher)
    if distributed.setup().is_main and not result.interrupted:
        print(
            f"trained {result.steps} steps ({result.tokens:,} tokens, "
            f"{result.tokens_per_s:,.0f} tok/s): val loss {result.final_val_loss:.4f} "
            f"(ppl {math.exp(result.final_val_loss):.2f}); final model in {result.final_dir}"
        )
    if result.interrupted:
        raise SystemExit(128 + result.stop_signal)  # the shell convention for "killed by signal"
    return result
