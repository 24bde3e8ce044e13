"""The training loop: a plain, linear step loop (nanoGPT's train.py shape) with exact resume.

    from lmlab.train import TrainConfig, train
    result = train(ModelConfig.preset("gpt2-tiny", vocab_size=len(tok)), tok, dataset,
                   TrainConfig(max_steps=200, batch_size=16), "runs/tiny")

Run directory:
    config.json          resolved TrainConfig + ModelConfig (+ data and tokenizer provenance) as the run
                         started; never rewritten. The dataset path is relative when the data is inside the
                         run directory, so a moved run directory still resumes.
    resumes.jsonl        one line per resume, appended: when, from which step, what changed (only RESUMABLE
                         fields may), the schedule's horizon
    tokenizer.json       the tokenizer, so the run resumes and exports without anything else
    metrics.jsonl        one JSON object per logged step (and per evaluation); each line also goes to the
                         Callback.on_log hooks: TensorBoard (tensorboard/) and a tracker (tracker.json names
                         its run; tracking.py)
    checkpoints/step-N/  model.safetensors, optimizer.pt, state.json (step, tokens, best val, RNG and data
                         position, the schedule's horizon), config.json; written under a temporary name and
                         renamed; last K kept (and, for wsd, the last step of the stable phase)
    final/               a model directory (config.json, model.safetensors, tokenizer.json, training.json)

Resuming with a larger max_steps (or another stop condition) keeps the learning rate continuous: cosine and
linear keep the horizon they were planned for and stay at min_lr past it (re-planning over the new horizon
jumps from min_lr back up, undoing the annealing); wsd moves its decay to the new end, continuing from the
checkpoint at the end of its stable phase when the old decay had begun.

Output: the Trainer prints nothing. It logs INFO records on the `lmlab.train` logger from rank 0: one per
metrics line (the progress line as the message, the line's dict as `record.metrics`) and the resume and stop
messages. A library user sees them only by configuring logging; `lmlab train` renders them with
console.console_progress() (a live line on a terminal), and the labs silence them with console.quiet().

Host synchronisation: the loss and the gradient norm stay on the device (0-dim tensors) and are read back only
on the steps that write a metrics line (log_every, evaluations, a hook's own metric), so between them the host
never waits for the GPU; the logged loss is that step's (the mean over its micro-batches). fp16's overflow
check stays on the device too (the fused AdamW takes GradScaler's found_inf). Under torchrun the processes agree
on stopping every step over CPU tensors (a gloo group beside NCCL): that waits for the others, not for the GPU.

Distributed: run the same command under `torchrun --nproc_per_node N`; RANK/WORLD_SIZE/LOCAL_RANK select
DDP (gloo on CPU, NCCL on CUDA) or, with `fsdp=True`, FSDP2 (`fully_shard` on every block).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..eval.scorer import bits_per_byte
from ..files import atomic_write_text, staged_dir
from ..models import ModelConfig, Transformer, fast
from ..models.io import TRAINING, save_pretrained
from ..models.model import available_memory
from ..models.quant import refuse_quantized
from .checkpoint import (
    StopOnSignal,
    b64,
    checkpoint_step,
    checkpoints,
    latest_checkpoint,
    lock_run,
    mismatch,
    no_checkpoint,
    refuse_existing_run,
    run_folder,
    trim_metrics,
    unb64,
    unlock_run,
    write_checkpoint,
)
from .config import RESUMABLE, TrainConfig, decay_start, lr_at
from .console import log

# Full (unsharded) state dicts keyed by parameter name: the same checkpoint files for 1 process, DDP and
# FSDP, so a run can be resumed on a different number of processes.
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Callback:
    """Hooks the labs and the web app use to observe and steer a run. Every process calls them (under
    torchrun too). Keys a hook adds to `metrics` (a lab's probe accuracy, say) go into that step's
    metrics.jsonl line. Set `trainer.should_stop = True` from any hook to end the run after the current
    step: a checkpoint and `final/` are written, and `--resume` can continue it.

    on_step sees every step; on a step that writes no metrics line, its `loss` and `grad_norm` are 0-dim
    tensors still on the device (reading one makes the host wait for the device, which the loop itself does
    only on logged steps). on_log sees each metrics line as written, numbers only."""

    def on_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...
    # final/ is written in a staging folder renamed into place after this hook: what a hook adds to `folder` (the
    # chat template, LoRA's merged weights) appears with the rest of final/ or not at all (main process only)
    def on_final(self, trainer: Trainer, folder: Path) -> None: ...
    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None: ...


class Objective:
    """What a step minimises when it is not next-token prediction over `(inputs, targets)` batches: preference
    and reward objectives, whose batches are anything the dataset's sample_batch returns (a tensor, a tuple or a
    dict of tensors with one row per example along dim 0; each process keeps its rows of the global batch, as
    for language modelling). Supervised fine-tuning needs none: its targets are -100 where nothing is trained.

    loss(model, batch) -> (the scalar to minimise, metrics): `model` is what the step differentiates (the DDP or
    compiled wrapper); the metrics are 0-dim tensors (rewards, margins, KL), averaged over the micro-batches (one
    named *_total, a running count, keeps its last micro-batch's value) and
    the processes and logged with the loss under their own names. evaluate(trainer) replaces the validation
    loss when it returns a dict. state_dict()/load_state_dict() travel in each checkpoint's state.json (plain
    JSON), so a run with an objective that keeps state resumes exactly. trained_tokens(batch) is the number of
    positions the step runs forward and backward over in a global batch, for tokens_per_s and mfu (None:
    batch_size x seq_len, as for language modelling): a preference batch holds two rows a pair, a GRPO batch
    only the groups with a reward spread."""

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def trained_tokens(self, batch: Any) -> int | None:
        return None

    def evaluate(self, trainer: Trainer) -> dict[str, float] | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _rows(batch: Any, lo: int, hi: int, device: torch.device) -> Any:
    """This process's rows [lo, hi) of a global batch (a tensor, or tuples, lists and dicts of them; anything
    else passes as it is), on the device."""
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi].to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_rows(b, lo, hi, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _rows(v, lo, hi, device) for k, v in batch.items()}
    return batch


@dataclass
class TrainResult:
    steps: int
    tokens: int
    stop_reason: str    # max_steps | max_tokens | epochs | time_budget | early_stopping | stopped | interrupted
    final_loss: float | None
    best_val_loss: float | None
    out_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)


def dist_env() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


_OWN_PROCESS_GROUP = False  # set when lmlab started the process group (and so ends it after training)


def init_distributed(device: torch.device) -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) once; returns this process's device."""
    global _OWN_PROCESS_GROUP
    if device.type == "cuda":
        device = torch.device("cuda", dist_env()[2])
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _OWN_PROCESS_GROUP = True
    return device


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for TrainConfig.dtype on `device` (None: fp32). auto is bf16 on a GPU that has it
    (compute capability 8 and later), fp16 with a gradient scaler on older ones (T4, V100 only emulate bf16,
    slowly), and fp32 on a CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:  # torch's message lists every device type it knows
        raise ValueError(f"{name!r} is not a device: give cpu, cuda, cuda:N or auto") from None


@functools.cache
def measured_peak_flops(device_type: str) -> float:
    """Dense matmul FLOP/s measured here (fp32 on CPU, bf16 on CUDA): the MFU denominator when no
    peak_flops is given. ~0.2 s on a 2-core CPU; measured once per process."""
    n, dtype, reps = (1024, torch.float32, 5) if device_type == "cpu" else (8192, torch.bfloat16, 20)
    a = torch.randn(n, n, device=device_type, dtype=dtype)
    b = torch.randn(n, n, device=device_type, dtype=dtype)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def check_fits(model_config: ModelConfig, config: TrainConfig, device: torch.device | None = None,
               world: int = 1) -> None:
    """ValueError before anything is built or written if the sequence is longer than the model's context
    or the model, optimizer and activations (ModelConfig.memory_estimate) exceed the free memory."""
    seq_len = config.seq_len or model_config.block_size
    if seq_len > model_config.block_size:
        raise ValueError(f"seq_len ({seq_len}) exceeds the model's block_size ({model_config.block_size})")
    device = device or resolve_device(config.device)
    est = model_config.memory_estimate(config.batch_size // world, seq_len, training=True)
    # FSDP keeps 1/world of the weights, gradients and optimizer moments on each device
    need = est["total"] - (est["weights"] + est["grads_and_optimizer"]) * (1 - 1 / world) * config.fsdp
    have = available_memory(device)
    if have is not None and need > have:
        raise ValueError(f"this model and batch need ~{need / 2**30:.1f} GiB but only {have / 2**30:.1f} GiB is "
                         f"available on {device}; lower --batch-size or --seq-len, or pick a smaller preset")


class Trainer:
    def __init__(self, model: Transformer, tokenizer: Any, dataset: Any, config: TrainConfig,
                 out_dir: str | Path, callbacks: Sequence[Callback] = (), *, provenance: dict[str, Any] | None = None,
                 objective: Objective | None = None):
        self.config, self.tokenizer, self.dataset = config, tokenizer, dataset
        self.objective = objective
        self._step_metrics: dict[str, torch.Tensor] = {}
        self._step_tokens = 0
        self.out_dir = run_folder(out_dir)
        self.callbacks = list(callbacks)
        self.provenance = dict(provenance or {})
        if getattr(dataset, "path", None) is not None:
            self.provenance.setdefault("dataset", str(Path(dataset.path).resolve()))
        if callable(getattr(dataset, "stats", None)) and "data_stats" not in self.provenance:  # a resume checks it
            self.provenance["data_stats"] = dataset.stats()
        if "dataset" in self.provenance:
            self.provenance["dataset"] = dataset_ref(self.provenance["dataset"], self.out_dir)
        self.rank, self.world, _ = dist_env()
        self.is_main = self.rank == 0
        self.device = resolve_device(config.device)
        self._cpu_group: Any = None
        if self.world > 1:
            if config.batch_size % self.world:
                raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the {self.world} processes")
            self.device = init_distributed(self.device)
            # the processes agree every step on whether to stop: over CPU tensors, which NCCL cannot carry, so
            # that agreeing never waits for the GPU's queue to drain
            self._cpu_group = dist.new_group(backend="gloo") if self.device.type == "cuda" else None
        refuse_quantized(model)  # every command trains through here: train, tune sft/dpo/grpo, self-play
        self.model_config: ModelConfig = model.config
        self.seq_len = config.seq_len or self.model_config.block_size
        check_fits(self.model_config, config, self.device, self.world)
        from . import tracking  # (it imports this module)
        tracking.check_installed(config)
        self.model = model.to(self.device).train()  # (a model from load_pretrained arrives in eval mode)
        if self.device.type == "cpu":
            fast.for_training(self.model)  # fused head + loss, RMSNorm's gradient: same numbers, less time
        self.amp_dtype = autocast_dtype(config.dtype, self.device)
        # fp16's narrow range underflows small gradients: scale the loss up and the gradients back (Micikevicius
        # et al. 2018, "Mixed Precision Training"); a no-op unless fp16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.sharded = config.fsdp and self.world > 1
        self.train_model: torch.nn.Module = self.model
        if self.sharded:
            from torch.distributed.fsdp import fully_shard
            for block in self.model.blocks:  # one all-gather per block, freed after use (FSDP2 recipe)
                fully_shard(block)
            fully_shard(self.model)
        elif self.world > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # built after sharding, so the optimizer holds the sharded parameters
        self.optimizer = self.model.configure_optimizer(config.lr, config.weight_decay, config.betas)
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        self.generator = torch.Generator().manual_seed(config.seed)  # the data order, and nothing else
        self.tokens_per_step = config.batch_size * self.seq_len * config.grad_accum_steps
        self.total_steps = self._planned_steps(config)  # where the stop conditions end the run
        self.schedule_steps = self.total_steps          # the LR schedule's horizon (kept on resume)
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.best_val: float | None = None
        self.bad_evals = 0
        self.should_stop = False
        self.history: list[dict[str, Any]] = []
        self.peak_flops = config.peak_flops or (measured_peak_flops(self.device.type) if self.is_main else 0.0)
        # Ctrl-C / SIGTERM: checkpoint after this step and return
        self._signals = StopOnSignal(lambda text: self._say(text.strip()))
        self._torch_rng: torch.Tensor | None = None

    # ---- planning ----------------------------------------------------------------------------------

    def _planned_steps(self, c: TrainConfig) -> int | None:
        """The schedule's horizon: the earliest of the step-countable stop conditions (a wall-clock
        budget alone leaves it open, and the learning rate stays at its peak after warm-up)."""
        candidates = [c.max_steps] if c.max_steps else []
        if c.max_tokens:
            candidates.append(math.ceil(c.max_tokens / self.tokens_per_step))
        if c.epochs:
            candidates.append(math.ceil(c.epochs * self.dataset.train_tokens / self.tokens_per_step))
        return min(candidates) if candidates else None

    # ---- the loop ----------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainResult:
        self._lock: tuple[Path, int] | None = None
        try:
            return self._fit(resume)
        finally:
            unlock_run(self._lock)

    def _fit(self, resume: bool) -> TrainResult:
        c = self.config
        self._check_early_stopping()
        if resume:
            if self.is_main and self.out_dir.is_dir():
                self._lock = lock_run(self.out_dir)  # before the checkpoint is read: no other process trains it
            self.load_checkpoint(self._plan_resume())
        else:
            refuse_existing_run(self.out_dir)  # every rank, before anything is written: none waits for rank 0
            if self.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self._lock = lock_run(self.out_dir)
                refuse_existing_run(self.out_dir)  # a second process may have started it meanwhile
                os.close(_own_fd(self.out_dir / "metrics.jsonl", os.O_TRUNC))  # resumes.jsonl: refused above
        if self.is_main:
            self._write_run_files(new=not resume)
        if not resume and c.warmup_steps and self.total_steps and c.warmup_steps >= self.total_steps:
            self._say(f"note: the warm-up ({c.warmup_steps} steps) is as long as the run ({self.total_steps} steps): "
                      "the learning rate climbs all run and never decays; give fewer warm-up steps")
        from . import drift, progress, tracking
        self.callbacks += tracking.attach(self, resume)  # TensorBoard, a tracker: rank 0, after the run files
        self.callbacks += progress.attach(self)  # generations at fixed prompts: samples.jsonl
        self.callbacks += drift.attach(self, resume)  # embedding drift from step 0: drift.json
        # The torch RNG drives dropout only (data comes from self.generator, the same on every rank); seeded per
        # rank, or every rank of DDP would drop the same units of its own rows. Restored per rank on resume.
        if self._torch_rng is not None:
            torch.set_rng_state(self._torch_rng)
        else:
            torch.manual_seed(c.seed + self.rank)
        stop_reason = (self._limit_reached() or self._stopped_early()) if resume else None  # a finished run: nothing
        last_loss = next((m["loss"] for m in reversed(self.history) if "loss" in m), None)
        t_start = time.perf_counter() - self.elapsed
        t_window, tokens_window = time.perf_counter(), 0
        in_step = False
        final_val: float | None = None  # the stop step's off-schedule evaluation, reported in the best val loss
        self._signals.install()
        self._phase("training")
        try:
            while stop_reason is None:
                lr = lr_at(self.step, c, self.schedule_steps)  # every optimizer step, never per epoch
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                in_step = True
                loss, grad_norm = self.train_step()
                self.step += 1
                self.tokens += self.tokens_per_step
                tokens_window += self._step_tokens
                log_now = self.step % c.log_every == 0 or self.step == 1
                self.elapsed = time.perf_counter() - t_start
                metrics: dict[str, Any] = {"step": self.step, "tokens": self.tokens,
                                           "elapsed_s": round(self.elapsed, 3), "loss": loss, "lr": lr,
                                           "grad_norm": grad_norm, **self._step_metrics}
                if log_now:  # reading a tensor waits for the device: only on the steps that write a line
                    to_host(metrics)
                    self.require_finite(metrics)
                    now = time.perf_counter()
                    tps = tokens_window / max(now - t_window, 1e-9)
                    t_window, tokens_window = now, 0
                    metrics.update(tokens_per_s=round(tps, 1), mfu=self._mfu(tps))
                last_loss = metrics["loss"]
                stop_reason = self._limit_reached()
                scheduled = bool(c.eval_every and self.step % c.eval_every == 0)
                evaluated = scheduled or stop_reason is not None
                if evaluated:
                    to_host(metrics)
                    self.require_finite(metrics)
                    t_eval = time.perf_counter()
                    self._phase("evaluating")
                    metrics.update(self.evaluate())
                    if scheduled:  # the last step's extra evaluation is not one of the schedule's: a run extended
                        # from here must count as one that never stopped (early stopping's state unchanged)
                        early = self._early_stop(metrics.get("val_loss"))  # also tracks the best val loss
                        stop_reason = stop_reason or early
                    elif metrics.get("val_loss") is not None:
                        final_val = metrics["val_loss"]
                    t_window += time.perf_counter() - t_eval  # tokens/s counts training time only
                keys = len(metrics)
                if evaluated:
                    t_eval = time.perf_counter()
                    for cb in self.callbacks:
                        cb.on_eval(self, metrics)
                    self._phase("training")
                    t_window += time.perf_counter() - t_eval  # a lab's probes, the samples: not training either
                for cb in self.callbacks:
                    cb.on_step(self, metrics)
                if log_now or evaluated or len(metrics) > keys:  # a hook's own metrics are always logged
                    self._log(metrics)
                stop_reason = stop_reason or self._stop_requested()
                in_step = False  # the step's evaluation, hooks and metrics line are done: it may be checkpointed
                # wsd: the stable phase's last state is kept, to extend the run from
                if stop_reason or (c.save_every and self.step % c.save_every == 0) or self.step == self._stable_step:
                    self.require_finite(metrics, weights=True)  # a diverged model never replaces the last good one
                    t_save = time.perf_counter()
                    self._phase("saving")
                    self.save_checkpoint()
                    self._phase("training")
                    t_window += time.perf_counter() - t_save
        except KeyboardInterrupt:
            # A second Ctrl-C (or one outside the main thread's handler) lands anywhere; a checkpoint is only
            # consistent between steps whose bookkeeping is done (evaluation, hooks, metrics line), so before that
            # the previous one stays the latest (a resume trims the log back to it).
            stop_reason = "interrupted"
            if not in_step:
                self.save_checkpoint()
        finally:
            self._signals.restore()
        if stop_reason == "interrupted":
            last = latest_checkpoint(self.out_dir)
            self._say(f"interrupted at step {self.step}; the latest checkpoint is {last}; continue with --resume"
                      if last is not None else f"interrupted at step {self.step}, before the first checkpoint: "
                      f"there is nothing to resume; remove {self.out_dir} to start again")
        final_loss = None if last_loss is None else float(last_loss)
        if final_val is None and self.history and self.history[-1].get("step") == self.step:
            # resumed at its end (final/ was being written, or a no-op resume): the stop step's evaluation is
            # in the log it read back; without it the best val loss left out the last one the first time counted
            final_val = self.history[-1].get("val_loss")
        best = min((v for v in (self.best_val, final_val) if v is not None), default=None)
        result = TrainResult(self.step, self.tokens, stop_reason, final_loss, best, self.out_dir,
                             list(self.history))
        if stop_reason != "interrupted" and not (resume and self._final_is_current()):
            self._phase("saving")
            self.save_final(result)
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        return result

    def require_finite(self, metrics: dict[str, Any], weights: bool = False) -> None:
        """ValueError when this step's loss (read from the device) or, with `weights`, a weight the step updated
        is inf or NaN: the run has diverged, and saving or sampling it would only replace the last good
        checkpoint or crash in the sampler. The loss is the weights' before the step: the weights are checked
        too where they are saved or sampled (a pass over them, on those steps only)."""
        loss = metrics["loss"] = float(metrics["loss"])
        # FSDP: each rank holds a shard of the weights and would answer for its own; the loss is every rank's
        bad = not math.isfinite(loss) or (weights and not self.config.fsdp and not all(
            bool(torch.isfinite(p).all()) for p in self.model.parameters() if p.requires_grad))
        if bad:
            last = latest_checkpoint(self.out_dir)
            kept = f"its last checkpoint, {last.name}, is kept" if last else "no checkpoint had been written"
            if not math.isfinite(loss) and self.step == 1:
                # the first step's loss is the starting weights', before any update: the learning rate played no part
                raise ValueError(f"training diverged: the loss is {loss} at step 1, before any update, so not "
                                 f"through the learning rate; {kept}. Check what sets the starting weights or scales "
                                 "the loss (a new model's --init-std, say)")
            what = f"the loss is {loss}" if not math.isfinite(loss) else "its weights are no longer finite"
            raise ValueError(f"training diverged: {what} at step {self.step}; {kept}. Start a new run (in "
                             "another folder) with a lower learning rate (--lr)")

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor | float]:
        """One optimizer step over grad_accum_steps micro-batches -> (mean loss, grad norm before clipping), as
        0-dim tensors on the device: nothing here waits for the device (fit reads them on logged steps)."""
        c = self.config
        rows = c.batch_size // self.world
        self._step_tokens = 0  # the global batch's, for tokens_per_s and mfu
        total = torch.zeros((), device=self.device)
        extra: dict[str, torch.Tensor] = {}
        for micro in range(c.grad_accum_steps):
            # Every process draws the whole global batch from the same generator and keeps its rows, so
            # N processes see exactly the batch one process would, and one generator state is the data
            # position for resuming on any number of processes.
            batch = self.dataset.sample_batch(c.batch_size, self.seq_len, self.generator)
            counted = self.objective.trained_tokens(batch) if self.objective is not None else None
            self._step_tokens += c.batch_size * self.seq_len if counted is None else counted
            batch = _rows(batch, self.rank * rows, (self.rank + 1) * rows, self.device)
            last = micro == c.grad_accum_steps - 1
            sync = contextlib.nullcontext()
            if self.sharded:
                self.model.set_requires_gradient_sync(last)  # reduce-scatter once, after the last micro-step
            elif self.world > 1 and not last:
                sync = self.train_model.no_sync()            # all-reduce once, after the last micro-step
            with sync:
                with self._autocast():
                    if self.objective is None:
                        loss = self.train_model(*batch).loss / c.grad_accum_steps
                    else:
                        loss, step_metrics = self.objective.loss(self.train_model, batch)
                        loss = loss / c.grad_accum_steps
                        for k, v in step_metrics.items():  # the micro-steps' mean; a running total: its last
                            v = v.detach().float()
                            extra[k] = v if k.endswith("_total") else extra.get(k, 0) + v / c.grad_accum_steps
                self.scaler.scale(loss).backward()
            total += loss.detach()
        grad_norm = float("nan")
        if c.grad_clip:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed; the scale then shrinks
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:  # report the global batch's loss (gloo has no AVG); queued, not waited for
            packed = torch.stack([total, *extra.values()])
            dist.all_reduce(packed)
            packed /= self.world
            total, extra = packed[0], dict(zip(extra, packed[1:]))
        self._step_metrics = extra
        return total, grad_norm

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss per target token over the fixed validation windows; perplexity; bits per byte. Each batch's
        mean counts as many times as it has targets the loss counts (not -100, not padding), so padded
        batches do not weigh more than their tokens. The same windows for any number of processes: each
        takes its rows of every global batch. An objective's own evaluation replaces all of it."""
        if self.objective is not None:
            own = self.objective.evaluate(self)
            if own is not None:
                return own
        self.model.eval()
        pad = self.model_config.pad_token_id
        stat = torch.zeros(2, device=self.device, dtype=torch.float64)  # (sum of token losses, tokens)
        for x, y in self.dataset.eval_batches(self.config.batch_size, self.seq_len, self.config.eval_batches):
            xs, ys = x.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]
            tokens = int(((ys != -100) & (ys != pad if pad is not None else True)).sum())
            if tokens == 0:
                if not self.sharded:
                    continue
                xs, ys = x[:1], y[:1]  # FSDP: every rank joins every forward's all-gathers; counted 0 times
            with self._autocast():
                loss = self.model(xs.to(self.device), ys.to(self.device)).loss.double()
            if tokens:
                stat += torch.stack([loss * tokens, loss.new_tensor(tokens)])
        self.model.train()
        if self.world > 1:
            dist.all_reduce(stat)
        if stat[1] == 0:
            return {}
        val = float(stat[0] / stat[1])
        # nats/token over bytes/token: comparable across tokenizers
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)),
                "val_bpb": bits_per_byte(val, self.dataset.bytes_per_token())}

    def _limit_reached(self) -> str | None:
        c = self.config
        if c.max_steps and self.step >= c.max_steps:
            return "max_steps"
        if c.max_tokens and self.tokens >= c.max_tokens:
            return "max_tokens"
        if c.epochs and self.tokens >= c.epochs * self.dataset.train_tokens:
            return "epochs"
        if c.time_budget_s:
            elapsed = self.elapsed
            if self.world > 1:  # all ranks must agree, or they would deadlock in the next collective
                shared = torch.tensor(elapsed, dtype=torch.float64)
                dist.broadcast(shared, 0, group=self._cpu_group)
                elapsed = shared.item()
            if elapsed >= c.time_budget_s:
                return "time_budget"
        return None

    def _stop_requested(self) -> str | None:
        """A hook's should_stop or Ctrl-C on any process stops every process after this step."""
        interrupted, stopped = self._signals.requested, self.should_stop
        if self.world > 1:
            flags = torch.tensor([float(interrupted), float(stopped)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._cpu_group)
            interrupted, stopped = flags.tolist()
        return "interrupted" if interrupted else "stopped" if stopped else None

    def _check_early_stopping(self) -> None:
        """Early stopping that could never act is refused before anything is written (it was silently off)."""
        if not self.config.early_stopping_patience or self.objective is not None:  # an objective evaluates itself
            return
        if not self.config.eval_every:
            raise ValueError("early stopping (--early-stopping-patience) counts evaluations: set --eval-every too")
        if next(iter(self.dataset.eval_batches(self.config.batch_size, self.seq_len, 1)), None) is None:
            raise ValueError(f"early stopping (--early-stopping-patience) needs validation text: the held-out split "
                             f"has no window of {self.seq_len} tokens (raise --val-fraction, or shorten --seq-len)")

    def _stopped_early(self) -> str | None:
        """"early_stopping" when the run's evaluations already ran out of patience (resuming it does nothing)."""
        patience = self.config.early_stopping_patience
        return "early_stopping" if patience and self.bad_evals >= patience else None

    def _early_stop(self, val: float | None) -> str | None:
        if val is None:
            return None
        if self.best_val is None or val < self.best_val:
            self.best_val, self.bad_evals = val, 0
            return None
        self.bad_evals += 1
        return self._stopped_early()

    def _mfu(self, tokens_per_s: float) -> float | None:
        if not self.peak_flops:
            return None
        return round(self.model_config.flops_per_token(self.seq_len) * tokens_per_s / self.world / self.peak_flops, 4)

    # ---- logging -----------------------------------------------------------------------------------

    def _log(self, metrics: dict[str, Any]) -> None:
        """One metrics line: metrics.jsonl (rank 0), the on_log hooks (TensorBoard and a tracker among them),
        and the progress record on the lmlab.train logger."""
        to_host(metrics)
        self.history.append(metrics)
        if self.is_main:
            with open(_own_fd(self.out_dir / "metrics.jsonl", os.O_APPEND), "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
            log.info("%s", self._progress_line(metrics), extra={"metrics": metrics})
        for cb in self.callbacks:
            cb.on_log(self, metrics)

    def _progress_line(self, m: dict[str, Any]) -> str:
        total = self.total_steps
        left = []
        if total and self.step < total and self.elapsed:
            left.append((total - self.step) * self.elapsed / self.step)
        if self.config.time_budget_s:
            left.append(max(0.0, self.config.time_budget_s - self.elapsed))
        line = f"step {m['step']}{'/' + str(total) if total else ''} loss {m['loss']:.4f} lr {m['lr']:.2e}"
        if m.get("tokens_per_s"):
            line += f" {m['tokens_per_s']:.0f} tok/s"
        if m.get("mfu") is not None:
            line += f" mfu {m['mfu']:.1%}"
        if left:
            line += f" eta {min(left):.0f}s"
        if "val_loss" in m:
            line += f" | val {m['val_loss']:.4f} ppl {m['val_ppl']:.1f} bpb {m['val_bpb']:.3f}"
        return line

    def _phase(self, phase: str) -> None:
        """RUN_DIR/phase.json (rank 0): what the run is doing now, for the web app's run page."""
        if self.is_main:
            from .progress import write_phase
            write_phase(self.out_dir, phase, self.step)

    def _say(self, text: str) -> None:
        """A message on the lmlab.train logger, from rank 0 (console.py: who shows it, and how)."""
        if self.is_main:
            log.info("%s", text)

    def _run_config(self) -> dict[str, Any]:
        return {"train": self.config.to_dict(), "model": self.model_config.to_dict(), **self.provenance}

    def _write_run_files(self, new: bool) -> None:
        """config.json and tokenizer.json for a new run; a resumed run keeps its own (resumes.jsonl says what
        changed)."""
        if new or not (self.out_dir / "config.json").is_file():
            atomic_write_text(self.out_dir / "config.json",
                              json.dumps(self._run_config(), indent=2, ensure_ascii=False) + "\n")
        if hasattr(self.tokenizer, "save") and (new or not (self.out_dir / "tokenizer.json").is_file()):
            # the run's own file, as before: `lmlab train`'s recipe wrote it first
            self.tokenizer.save(self.out_dir / "tokenizer.json", overwrite=True)

    @property
    def _stable_step(self) -> float | None:
        """wsd: the step whose checkpoint ends the stable phase (the decay starts after it)."""
        return decay_start(self.config, self.schedule_steps) if self.config.schedule == "wsd" else None

    def _same_data_and_model(self, run: dict[str, Any]) -> None:
        """A resumed run trains the model it started on the data it started with: ValueError when the dataset's
        token counts (config.json's data_stats) or the model's config differ (a dataset prepared again into the
        same folder, or dropout changed from Python, went on silently). `run`: the run's config.json, read."""
        recorded = run.get("data_stats") or {}
        now = self.dataset.stats() if recorded and callable(getattr(self.dataset, "stats", None)) else {}
        moved = [f"{k} {recorded[k]:,} -> {now[k]:,}" for k in ("tokens", "train_tokens", "val_tokens")
                 if k in recorded and k in now and recorded[k] != now[k]]
        if moved:
            raise ValueError(f"the dataset is not the one this run started on ({', '.join(moved)}); resume on that "
                             "data, or start a new run")
        if run.get("model"):
            before, now_model = ModelConfig.from_dict(run["model"]).to_dict(), self.model_config.to_dict()
            changed = [f"{k} ({v!r} -> {now_model[k]!r})" for k, v in before.items() if now_model[k] != v]
            if changed:
                raise ValueError(f"a resumed run keeps its model: {', '.join(changed)} cannot change")

    def _plan_resume(self) -> Path:
        """Check what this resume changes, plan the schedule so that the learning rate does not jump, append the
        resume to resumes.jsonl (rank 0) and return the checkpoint to load. Only RESUMABLE fields may differ
        from the run's settings (config.json with the earlier resumes' changes)."""
        c, out = self.config, self.out_dir
        path = latest_checkpoint(out)
        if path is None:
            raise FileNotFoundError(no_checkpoint(out))
        run = read_run_config(out) if (out / "config.json").is_file() else {}
        before = TrainConfig.from_dict(run["train"]) if run else c
        changed = {k: [v, getattr(c, k)] for k, v in before.to_dict().items() if getattr(c, k) != v}
        fixed = [f"{k} ({old!r} -> {new!r})" for k, (old, new) in changed.items() if k not in RESUMABLE]
        if fixed:
            raise ValueError(f"a resumed run keeps the settings it started with: {', '.join(fixed)} cannot change "
                             f"(only {', '.join(RESUMABLE)} can)")
        self._same_data_and_model(run)
        try:
            state = json.loads((path / "state.json").read_text())
            step = state["step"]
        except (OSError, ValueError, KeyError) as exc:
            raise damaged(path, exc) from None
        old = state["schedule_steps"] if "schedule_steps" in state else self._planned_steps(before)
        new, note, superseded = self.total_steps, None, []
        self.schedule_steps = old
        if new != old and c.schedule in ("cosine", "linear"):
            note = (f"the {c.schedule} schedule keeps its horizon of {old} steps" if old else
                    f"the {c.schedule} schedule keeps no horizon (the run began without one): the peak learning rate")
            if old and old <= c.warmup_steps:  # lr_at: no decay when the warm-up is as long as the horizon
                note += (f", which the warm-up ({c.warmup_steps} steps) outlasts: the learning rate climbs to step "
                         f"{c.warmup_steps}, then stays at its peak (this run never had a decay)")
            elif old and (not new or new > old):
                note += ", and the learning rate stays at min_lr past it"
        elif new != old and c.schedule == "wsd":
            s_old, s_new = decay_start(c, old), decay_start(c, new)
            stable = out / "checkpoints" / f"step-{s_old}"
            if step <= min(s_old, s_new):  # still in the stable phase of both plans: the decay just moves
                self.schedule_steps = new
                note = f"wsd decays from step {s_new}" if new else "wsd stays at its peak (no step horizon)"
            elif new and old and new > old and s_old <= s_new and stable.is_dir():
                self.schedule_steps, path = new, stable
                superseded = [p for p in checkpoints(out) if checkpoint_step(p) > s_old]
                note = (f"wsd: the decay of the {old}-step plan began after step {s_old}; continuing from that "
                        f"stable-phase checkpoint (later checkpoints removed), to decay from step {s_new}")
            else:
                note = f"wsd keeps its horizon of {old} steps (its decay began after step {s_old})"
        if self.world > 1:
            dist.barrier()  # every rank has chosen the checkpoint before rank 0 removes any
        if self.is_main:
            for p in superseded:
                shutil.rmtree(p)
            record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "from_step": checkpoint_step(path), "changed": changed, "schedule_steps": self.schedule_steps,
                      "world_size": self.world, **({"note": note} if note else {})}
            with open(out / RESUMES, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) or "no settings changed"
        self._say(f"resuming: {what}" + (f"; {note}" if note else ""))
        return path

    # ---- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """checkpoints/step-N/, written under a temporary name and renamed, so a crash mid-write leaves the
        previous checkpoint as the latest complete one. Keeps the last `keep_last` (0: all)."""
        # every rank takes part (FSDP gathers shards; each rank's dropout RNG state is gathered); rank 0 writes
        weights = self._full_model_state()
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=_FULL)
        mine = {"torch": b64(torch.get_rng_state())}
        if self.device.type == "cuda":
            mine["cuda"] = b64(torch.cuda.get_rng_state(self.device))
        ranks: list[Any] = [mine]
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, mine)
        if not self.is_main:
            return None

        def fill(tmp: Path) -> None:
            save_model(weights, str(tmp / "model.safetensors"))
            # tensors and plain numbers only; read back with torch.load(weights_only=True), which unpickles
            # no code
            torch.save(optim, tmp / "optimizer.pt")
            # per rank (a list, rank 0 first): the data generator is shared, dropout's RNG is not
            rng = {"data": b64(self.generator.get_state()), **{k: [r[k] for r in ranks] for k in mine}}
            (tmp / "state.json").write_text(json.dumps({
                "step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed, "best_val": self.best_val,
                "bad_evals": self.bad_evals, "world_size": self.world, "rng": rng,
                "schedule_steps": self.schedule_steps,
                "grad_scaler": self.scaler.state_dict(),
                "objective": self.objective.state_dict() if self.objective is not None else {}}))
            (tmp / "config.json").write_text(json.dumps(self._run_config(), indent=2, ensure_ascii=False))

        final = write_checkpoint(self.out_dir, self.step, fill, self.config.keep_last, keep=self._stable_step)
        for cb in self.callbacks:
            cb.on_checkpoint(self, final)
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, step, RNG and data position from checkpoints/step-N (any number of
        processes may load a checkpoint written by any other)."""
        path = Path(path)
        # sharded: into a plain model on CPU (load_model resolves tied weights), then scattered; else straight into
        # the model, whatever modules it carries (a LoRA model's adapters are in its checkpoints too)
        plain = Transformer(self.model_config) if self.sharded else self.model
        try:
            state = json.loads((path / "state.json").read_text())
            state["step"], state["rng"]["data"]  # noqa: B018 (what resume reads first)
            optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            with safe_open(str(path / "model.safetensors"), "pt") as f:
                f.keys()
        except Exception as exc:  # noqa: BLE001 - safetensors, unpickling, JSON, a missing file or key
            raise damaged(path, exc) from None
        missing, unexpected = load_model(plain, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise mismatch(path, "the model", missing, unexpected)
        if self.sharded:
            set_model_state_dict(self.model, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(self.model, self.optimizer, optim, options=StateDictOptions(full_state_dict=True))
        self.generator.set_state(unb64(state["rng"]["data"]))
        # this rank's dropout RNG (checkpoints before per-rank states held one string); a rank the saving run
        # did not have is seeded afresh in fit()
        saved = {k: [v] if isinstance(v, str) else v for k, v in state["rng"].items() if k != "data"}
        if self.rank < len(saved["torch"]):
            self._torch_rng = unb64(saved["torch"][self.rank])
            if "cuda" in saved and self.device.type == "cuda":
                torch.cuda.set_rng_state(unb64(saved["cuda"][self.rank]), self.device)
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed_s"]
        self.best_val, self.bad_evals = state["best_val"], state["bad_evals"]
        if self.objective is not None:
            self.objective.load_state_dict(state.get("objective", {}))
        if state.get("grad_scaler"):  # fp16: the loss scale reached, so the next steps scale as they would have
            self.scaler.load_state_dict(state["grad_scaler"])
        # metrics logged after the checkpoint will be produced again: drop them
        self.history = trim_metrics(self.out_dir / "metrics.jsonl", self.step, rewrite=self.is_main)
        if self.is_main and (self.out_dir / "samples.jsonl").is_file():  # samples after it will be written again
            trim_metrics(self.out_dir / "samples.jsonl", self.step)
        self._say(f"resumed from {path} (step {self.step})")
        if self.world > 1:
            dist.barrier()  # nobody appends to metrics.jsonl before it is trimmed

    def _full_model_state(self) -> Transformer:
        """The model with full (unsharded) weights on CPU (rank 0; other ranks get a placeholder)."""
        if not self.sharded:
            return self.model
        state = get_model_state_dict(self.model, options=_FULL)
        if not self.is_main:
            return self.model
        plain = Transformer(self.model_config)
        plain.load_state_dict(state)
        return plain

    def _final_is_current(self) -> bool:
        """Whether final/ holds the model of this step (a finished run resumed: nothing to write again); a final/
        left by an earlier stop, or none (a save killed half-way), is written again."""
        try:
            return json.loads((self.out_dir / "final" / TRAINING).read_text(encoding="utf-8"))["steps"] == self.step
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def save_final(self, result: TrainResult) -> Path | None:
        model = self._full_model_state()
        if not self.is_main:
            return None
        training = {**self.provenance, "train_config": self.config.to_dict(), "steps": result.steps,
                    "tokens": result.tokens, "stop_reason": result.stop_reason, "final_loss": result.final_loss,
                    "best_val_loss": result.best_val_loss, "world_size": self.world,
                    "last_eval": next((m for m in reversed(self.history) if "val_loss" in m), None)}
        final = self.out_dir / "final"
        # whole or not at all: a run killed while final/ is written leaves the previous one (or none), and --resume
        # writes it again; never config and weights without the tokenizer, the template or merged adapters
        for left in [*self.out_dir.glob(".final.*.tmp"), *self.out_dir.glob(".final.*.old")]:
            shutil.rmtree(left, ignore_errors=True)  # a killed save's staging folder: this run's, and superseded
        with staged_dir(final) as tmp:
            save_pretrained(tmp, model, self.tokenizer, training=training)
            for cb in self.callbacks:
                cb.on_final(self, tmp)
        return final


RESUMES = "resumes.jsonl"


def damaged(path: Path, exc: BaseException) -> ValueError:
    """A checkpoint is written whole (temporary folder + rename): one whose files do not read is damage on disk."""
    return ValueError(f"cannot read the checkpoint {path} ({type(exc).__name__}); it is damaged: delete it to resume "
                      "from the one before, if there is one")


def _own_fd(path: Path, flags: int) -> int:
    """A descriptor writing to `path` (O_APPEND or O_TRUNC in `flags`), never through a symbolic link: the web app
    reads a run's metrics.jsonl, and a link planted there had the trainer write to a file outside the run (and
    the server serve it)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | flags | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as exc:
        if not path.is_symlink():
            raise
        raise ValueError(f"{path} is a symbolic link, not the run's own file; remove it") from exc


def to_host(metrics: dict[str, Any]) -> None:
    """Replace the device tensors in `metrics` by their numbers, in place (the host waits for the device)."""
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            metrics[key] = float(value)


def dataset_ref(path: str | Path, run_dir: str | Path) -> str:
    """How a run's config.json names its dataset: relative to the run directory when the data is inside it
    (so the run directory can be moved and still resume), else absolute. A relative name stays as it is."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.resolve().relative_to(Path(run_dir).resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """RUN_DIR/config.json as the run started, its "train" fields brought up to date with the changes of every
    resume since (resumes.jsonl, in order): the settings a resume continues with."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"not a run directory (no config.json): {run_dir}")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict) or "model" not in saved:
        raise ValueError(f"{path} is not a run config (train and model)")
    resumes = Path(run_dir) / RESUMES
    for number, line in enumerate(resumes.read_text(encoding="utf-8").splitlines() if resumes.is_file() else [], 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash: that resume never started
        changed = record.get("changed") if isinstance(record, dict) else None
        if not isinstance(changed, dict) or not all(isinstance(v, list) and len(v) == 2 for v in changed.values()):
            raise ValueError(f'{resumes}:{number}: not a resume record ({{"changed": {{"FIELD": [old, new]}}}})')
        saved["train"].update({k: new for k, (_, new) in changed.items()})
    return saved


def train(model: Transformer | ModelConfig, tokenizer: Any, dataset: Any, config: TrainConfig,
          out_dir: str | Path, callbacks: Sequence[Callback] = (), *, resume: bool = False,
          provenance: dict[str, Any] | None = None, objective: Objective | None = None) -> TrainResult:
    """Train `model` (or a fresh Transformer for a ModelConfig, initialised from config.seed) on `dataset`
    and write the run directory. resume=True continues from the last checkpoint in out_dir."""
    if isinstance(model, ModelConfig):
        check_fits(model, config)  # before allocating the weights
        torch.manual_seed(config.seed)
        model = Transformer(model)
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    global _OWN_PROCESS_GROUP
    try:
        trainer = Trainer(model, tokenizer, dataset, config, out_dir, callbacks, provenance=provenance,
                          objective=objective)
        result = trainer.fit(resume=resume)
        if _OWN_PROCESS_GROUP and dist.is_initialized():
            # Leave together: a rank that tears gloo down while rank 0 is still writing final/ sometimes
            # aborts at exit ("terminate called without an active exception"; seen in tests/test_ddp.py).
            trainer = None  # DDP's reducer holds the group: drop it while the group is still registered
            dist.barrier()
            # gloo's worker thread frees each finished collective, which decrefs Python tensors and so needs
            # the GIL; tearing the group down joins that thread while holding the GIL. Joined mid-free, both
            # wait forever (seen: rank 1 hung in ~ProcessGroupGloo after training). Sleeping releases the GIL.
            time.sleep(0.2)
        return result
    finally:
        trainer = None
        if _OWN_PROCESS_GROUP and dist.is_initialized():
            dist.destroy_process_group()
            _OWN_PROCESS_GROUP = False
