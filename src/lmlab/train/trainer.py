"""The training loop: a plain, linear step loop (nanoGPT's train.py shape) with exact resume.

    from lmlab.train import TrainConfig, train
    result = train(ModelConfig.preset("gpt2-tiny", vocab_size=len(tok)), tok, dataset,
                   TrainConfig(max_steps=200, batch_size=16), "runs/tiny")

Run directory:
    config.json          resolved TrainConfig + ModelConfig (+ data and tokenizer provenance)
    metrics.jsonl        one JSON object per logged step / eval
    checkpoints/step-N/  model.safetensors, optimizer.pt, rng.safetensors, state.json (atomic, last K kept)
    final/               a model directory (config.json, model.safetensors, tokenizer.json, training.json)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model

from ..models import ModelConfig, Transformer
from ..models.config import atomic_write_text
from ..models.io import save_pretrained
from .config import TrainConfig, lr_at


class Callback:
    """Hooks the labs and the web app use to observe and steer a run. Set `trainer.should_stop = True`
    from any hook to end the run after the current step (a checkpoint is written)."""

    def on_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...
    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None: ...


@dataclass
class TrainResult:
    steps: int
    tokens: int
    stop_reason: str                     # max_steps | max_tokens | epochs | time_budget | early_stopping | ...
    final_loss: float | None
    best_val_loss: float | None
    out_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    return torch.device(name)


def measured_peak_flops(device: torch.device) -> float:
    """Dense matmul FLOP/s measured here (fp32 on CPU, bf16 on CUDA): the denominator of MFU."""
    n = 1024 if device.type == "cpu" else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps = 5 if device.type == "cpu" else 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Trainer:
    def __init__(self, model: Transformer, tokenizer: Any, dataset: Any, config: TrainConfig,
                 out_dir: str | Path, callbacks: Sequence[Callback] = (), *, provenance: dict[str, Any] | None = None):
        self.config, self.tokenizer, self.dataset = config, tokenizer, dataset
        self.out_dir = Path(out_dir)
        self.callbacks = list(callbacks)
        self.provenance = provenance or {}
        self.rank, self.world, local_rank = _dist_env()
        self.is_main = self.rank == 0
        self.device = resolve_device(config.device)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if config.batch_size % self.world:
                raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the {self.world} processes")
        self.model = model.to(self.device)
        self.model_config: ModelConfig = model.config
        self.seq_len = config.seq_len or self.model_config.block_size
        if self.seq_len > self.model_config.block_size:
            raise ValueError(f"seq_len ({self.seq_len}) exceeds the model's block_size "
                             f"({self.model_config.block_size})")
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
        self._check_memory()
        self.autocast = (self.device.type == "cuda" and config.dtype in ("auto", "bf16")) or config.dtype == "bf16"
        self.optimizer = self.model.configure_optimizer(config.lr, config.weight_decay, (config.beta1, config.beta2))
        self.train_model: torch.nn.Module = self.model
        self.sharded = config.fsdp and self.world > 1
        if self.sharded:
            from torch.distributed.fsdp import fully_shard
            for block in self.model.blocks:
                fully_shard(block)
            fully_shard(self.model)
            self.optimizer = self.model.configure_optimizer(config.lr, config.weight_decay,
                                                            (config.beta1, config.beta2))
        elif self.world > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.tokens_per_step = config.batch_size * self.seq_len * config.grad_accum_steps
        self.total_steps = self._planned_steps()
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.best_val: float | None = None
        self.bad_evals = 0
        self.should_stop = False
        self.history: list[dict[str, Any]] = []
        self.peak_flops = measured_peak_flops(self.device) if self.is_main else 0.0
        self._tb = None

    # ---- planning ----------------------------------------------------------------------------------

    def _planned_steps(self) -> int | None:
        """The schedule's horizon: the earliest of the step-countable stop conditions (a wall-clock
        budget alone leaves it open, and the learning rate stays at its peak after warm-up)."""
        c = self.config
        candidates = [c.max_steps] if c.max_steps else []
        if c.max_tokens:
            candidates.append(math.ceil(c.max_tokens / self.tokens_per_step))
        if c.epochs:
            candidates.append(math.ceil(c.epochs * self.dataset.train_tokens / self.tokens_per_step))
        return min(candidates) if candidates else None

    def _check_memory(self) -> None:
        need = self.model_config.memory_estimate(self.config.batch_size // self.world, self.seq_len)["total"]
        have = available_memory(self.device)
        if have is not None and need > have:
            raise ValueError(f"this model and batch need ~{need / 2**30:.1f} GiB but only {have / 2**30:.1f} GiB is "
                             f"available on {self.device}; lower --batch-size or --seq-len, or pick a smaller preset")

    # ---- the loop ----------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainResult:
        c = self.config
        if resume:
            self._resume()
        elif self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "metrics.jsonl").write_text("")
        if self.is_main:
            self._write_run_config()
            if c.tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(self.out_dir / "tensorboard")
        torch.manual_seed(c.seed + self.step)  # dropout stream; restored exactly from checkpoints below
        if resume and self._rng_state is not None:
            torch.set_rng_state(self._rng_state)
        stop_reason = None
        last_loss = None
        t_start = time.perf_counter() - self.elapsed
        t_window, tokens_window = time.perf_counter(), 0
        try:
            while stop_reason is None:
                lr = lr_at(self.step, c, self.total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, grad_norm = self._optimizer_step()
                self.step += 1
                self.tokens += self.tokens_per_step
                tokens_window += self.tokens_per_step
                self.elapsed = time.perf_counter() - t_start
                last_loss = loss
                metrics: dict[str, Any] | None = None
                if self.step % c.log_every == 0 or self.step == 1:
                    now = time.perf_counter()
                    tps = tokens_window / max(now - t_window, 1e-9)
                    t_window, tokens_window = now, 0
                    metrics = {"step": self.step, "tokens": self.tokens, "elapsed_s": round(self.elapsed, 3),
                               "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": round(tps, 1),
                               "mfu": self._mfu(tps)}
                stop_reason = self._stop_reason()
                if c.eval_every and self.step % c.eval_every == 0 or stop_reason:
                    ev = self.evaluate()
                    metrics = {**(metrics or {"step": self.step, "tokens": self.tokens,
                                              "elapsed_s": round(self.elapsed, 3), "loss": loss, "lr": lr}), **ev}
                    early = self._early_stop(ev.get("val_loss"))
                    stop_reason = stop_reason or early
                if metrics is not None:
                    self._log(metrics)
                if "val_loss" in (metrics or {}):
                    for cb in self.callbacks:
                        cb.on_eval(self, metrics)
                for cb in self.callbacks:
                    cb.on_step(self, metrics or {"step": self.step, "loss": loss, "lr": lr})
                if self.should_stop and not stop_reason:
                    stop_reason = "stopped"
                if stop_reason or (c.save_every and self.step % c.save_every == 0):
                    self.save_checkpoint()
        except KeyboardInterrupt:
            stop_reason = "interrupted"
            self.save_checkpoint()
            self._print("\ninterrupted: checkpoint saved; continue with --resume")
        result = TrainResult(self.step, self.tokens, stop_reason, last_loss, self.best_val, self.out_dir, self.history)
        if stop_reason not in ("interrupted", "stopped"):
            self.save_final(result)
        if self._tb is not None:
            self._tb.close()
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        self._print("")
        return result

    def _optimizer_step(self) -> tuple[float, float]:
        c = self.config
        rows = c.batch_size // self.world
        total = 0.0
        for micro in range(c.grad_accum_steps):
            # Every process draws the whole global batch from the same generator and keeps its rows, so
            # N processes see exactly the batch one process would (and resume needs one generator state).
            x, y = self.dataset.sample_batch(c.batch_size, self.seq_len, self.generator)
            x = x[self.rank * rows:(self.rank + 1) * rows].to(self.device, non_blocking=True)
            y = y[self.rank * rows:(self.rank + 1) * rows].to(self.device, non_blocking=True)
            sync = contextlib.nullcontext()
            if self.world > 1 and micro < c.grad_accum_steps - 1 and hasattr(self.train_model, "no_sync"):
                sync = self.train_model.no_sync()
            with sync, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.train_model(x, y).loss / c.grad_accum_steps
            loss.backward()
            total += loss.detach()
        grad_norm = 0.0
        if c.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.AVG if self.device.type == "cuda" else dist.ReduceOp.SUM)
            if self.device.type != "cuda":
                total /= self.world
        return float(total), grad_norm

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the fixed validation windows; perplexity; bits per byte."""
        self.model.eval()
        stat = torch.zeros(2, device=self.device)  # (sum of per-window losses, windows)
        rows = max(1, self.config.batch_size // self.world)
        for i, (x, y) in enumerate(self.dataset.eval_batches(rows, self.seq_len, self.config.eval_batches)):
            if self.world > 1 and not self.sharded and i % self.world != self.rank:
                continue  # (FSDP: every rank runs every batch, since each forward is a collective)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.model(x.to(self.device), y.to(self.device)).loss.float()
            stat += torch.stack([loss * len(x), torch.tensor(float(len(x)), device=self.device)])
        self.model.train()
        if self.world > 1 and not self.sharded:
            dist.all_reduce(stat)
        if stat[1] == 0:
            return {}
        val = float(stat[0] / stat[1])
        bpt = self.dataset.bytes_per_token()
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)),
                "val_bpb": val / math.log(2) / bpt if bpt else float("nan")}

    def _stop_reason(self) -> str | None:
        c = self.config
        if c.max_steps and self.step >= c.max_steps:
            return "max_steps"
        if c.max_tokens and self.tokens >= c.max_tokens:
            return "max_tokens"
        if c.epochs and self.tokens >= c.epochs * self.dataset.train_tokens:
            return "epochs"
        if c.time_budget_s:
            elapsed = torch.tensor(self.elapsed)
            if self.world > 1:  # all ranks must agree, or they would deadlock in the next collective
                dist.broadcast(elapsed, 0)
            if float(elapsed) >= c.time_budget_s:
                return "time_budget"
        return None

    def _early_stop(self, val: float | None) -> str | None:
        if val is None:
            return None
        if self.best_val is None or val < self.best_val:
            self.best_val, self.bad_evals = val, 0
            return None
        self.bad_evals += 1
        patience = self.config.early_stopping_patience
        return "early_stopping" if patience and self.bad_evals >= patience else None

    def _mfu(self, tokens_per_s: float) -> float | None:
        if not self.peak_flops:
            return None
        return round(self.model_config.flops_per_token(self.seq_len) * tokens_per_s / self.world / self.peak_flops, 4)

    # ---- logging -----------------------------------------------------------------------------------

    def _log(self, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        if not self.is_main:
            return
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, metrics["step"])
        self._print(self._progress_line(metrics), end="\r" if sys.stdout.isatty() else "\n")

    def _progress_line(self, m: dict[str, Any]) -> str:
        total = self.total_steps
        eta = ""
        if total and m["step"] < total and self.elapsed:
            eta = f" eta {(total - m['step']) * self.elapsed / m['step']:.0f}s"
        elif self.config.time_budget_s and not total:
            eta = f" eta {max(0.0, self.config.time_budget_s - self.elapsed):.0f}s"
        line = f"step {m['step']}{'/' + str(total) if total else ''} loss {m['loss']:.4f} lr {m['lr']:.2e}"
        if m.get("tokens_per_s"):
            line += f" {m['tokens_per_s']:.0f} tok/s"
        if m.get("mfu") is not None:
            line += f" mfu {m['mfu']:.1%}"
        line += eta
        if "val_loss" in m:  # eval lines stay on screen
            line += f" | val {m['val_loss']:.4f} ppl {m['val_ppl']:.1f} bpb {m['val_bpb']:.3f}"
            line += " " * 8 + "\n" if sys.stdout.isatty() else ""
        return line

    def _print(self, text: str, end: str = "\n") -> None:
        if self.is_main:
            print(text, end=end, flush=True)

    def _write_run_config(self) -> None:
        atomic_write_text(self.out_dir / "config.json", json.dumps(
            {"train": self.config.to_dict(), "model": self.model_config.to_dict(), **self.provenance},
            indent=2, ensure_ascii=False) + "\n")

    # ---- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """checkpoints/step-N/, written under a temporary name and renamed, so a crash mid-write leaves the
        previous checkpoint as the latest complete one. Keeps the last `keep_last`."""
        state = self._full_state_dict()  # all ranks take part (FSDP gathers shards); rank 0 writes
        optim = None if self.sharded else self.optimizer.state_dict()
        if not self.is_main:
            return None
        root = self.out_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step}"
        tmp = root / f".tmp-step-{self.step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(self._unsharded(state), str(tmp / "model.safetensors"))
        if optim is not None:  # FSDP runs keep weights only: they cannot be resumed (yet)
            torch.save(optim, tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "data": self.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(self.device if self.device.type == "cuda" else None)
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({
            "step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed, "best_val": self.best_val,
            "bad_evals": self.bad_evals}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        steps = sorted(int(p.name[5:]) for p in root.glob("step-*") if p.name[5:].isdigit())
        for old in steps[: max(0, len(steps) - self.config.keep_last)] if self.config.keep_last else []:
            shutil.rmtree(root / f"step-{old}", ignore_errors=True)
        for cb in self.callbacks:
            cb.on_checkpoint(self, final)
        return final

    _rng_state: torch.Tensor | None = None

    def _resume(self) -> None:
        path = latest_checkpoint(self.out_dir)
        if self.sharded:
            raise ValueError("resuming an FSDP run is not supported yet; resume it with DDP (without --fsdp)")
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.out_dir / 'checkpoints'}")
        missing, unexpected = load_model(self.model, str(path / "model.safetensors"), device=str(self.device))
        if missing or unexpected:
            raise ValueError(f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        # weights_only=True: the optimizer state is tensors and numbers; nothing is unpickled as code
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True))
        rng = load_file(str(path / "rng.safetensors"))
        self.generator.set_state(rng["data"])
        self._rng_state = rng["torch"]
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        state = json.loads((path / "state.json").read_text())
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed_s"]
        self.best_val, self.bad_evals = state["best_val"], state["bad_evals"]
        if self.is_main:  # drop metrics logged after the checkpoint: they will be produced again
            metrics = self.out_dir / "metrics.jsonl"
            lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= self.step]
            atomic_write_text(metrics, "".join(ln + "\n" for ln in kept))
            self.history = [json.loads(ln) for ln in kept]
            self._print(f"resumed from {path} (step {self.step})")

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        if self.sharded:
            state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
        return state

    def _unsharded(self, state: dict[str, torch.Tensor]) -> Transformer:
        if not self.sharded:
            return self.model
        plain = Transformer(self.model_config)
        plain.load_state_dict({k: v.cpu() for k, v in state.items()})
        return plain

    def save_final(self, result: TrainResult) -> Path | None:
        state = self._full_state_dict()
        if not self.is_main:
            return None
        training = {**self.provenance, "train_config": self.config.to_dict(), "steps": result.steps,
                    "tokens": result.tokens, "stop_reason": result.stop_reason, "final_loss": result.final_loss,
                    "best_val_loss": result.best_val_loss,
                    "last_eval": next((m for m in reversed(self.history) if "val_loss" in m), None)}
        return save_pretrained(self.out_dir / "final", self._unsharded(state), self.tokenizer, training=training)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    steps = sorted(int(p.name[5:]) for p in root.glob("step-*") if p.name[5:].isdigit()) if root.is_dir() else []
    return root / f"step-{steps[-1]}" if steps else None


def train(model: Transformer | ModelConfig, tokenizer: Any, dataset: Any, config: TrainConfig,
          out_dir: str | Path, callbacks: Sequence[Callback] = (), *, resume: bool = False,
          provenance: dict[str, Any] | None = None) -> TrainResult:
    """Train `model` (or a fresh Transformer for a ModelConfig) on `dataset` and write the run directory."""
    if isinstance(model, ModelConfig):
        torch.manual_seed(config.seed)
        model = Transformer(model)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    return Trainer(model, tokenizer, dataset, config, out_dir, callbacks, provenance=provenance).fit(resume=resume)
