"""TrainConfig: every training knob in one typed, validated place; saved with the run."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import atomic_write_text
from ..models.config import check_types, known_fields

SCHEDULES = ("cosine", "linear", "constant", "wsd")

# What a resumed run may change: when it stops, and how it is run and watched. Never what it computes (the
# schedule, the batch, the optimizer, the seed), so a resumed run stays the run that was started; each resume
# and what it changed are recorded in RUN_DIR/resumes.jsonl, and config.json keeps how the run started.
STOP_FIELDS = ("max_steps", "max_tokens", "epochs", "time_budget_s", "early_stopping_patience")
RESUMABLE = (*STOP_FIELDS, "eval_every", "save_every", "keep_last", "log_every", "device", "compile", "fsdp",
             "tensorboard", "tracker", "peak_flops")

HELP = {
    "batch_size": "sequences per micro-step, summed over all processes",
    "seq_len": "tokens per sequence (default: the model's block_size)",
    "grad_accum_steps": "micro-steps per optimizer step",
    "lr": "peak learning rate, reached at the end of warm-up",
    "min_lr": "learning rate at the last step (default: lr / 10)",
    "warmup_steps": "optimizer steps of linear warm-up from lr / warmup_steps",
    "schedule": "decay after warm-up, set every optimizer step: cosine, linear, constant, or wsd (warmup-stable-"
                "decay: the peak lr, then a decay to min_lr over the last decay_fraction of the steps; a run "
                "extended on resume decays at its new end)",
    "decay_fraction": "wsd: share of the steps spent decaying to min_lr (default 0.2)",
    "weight_decay": "AdamW decoupled weight decay on matrices (>= 2-D); never on norms and biases",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "max_steps": "stop after this many optimizer steps",
    "max_tokens": "stop after this many training tokens",
    "epochs": "stop after this many passes over the training tokens",
    "time_budget_s": "stop after this many seconds of training",
    "eval_every": "evaluate every N steps (0: only at the end)",
    "eval_batches": "validation batches per evaluation",
    "early_stopping_patience": "stop after this many evaluations without a better val loss (0: off)",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "keep_last": "checkpoints to keep (0: all)",
    "seed": "seed for the initial weights, the data order and dropout",
    "device": "auto (cuda if available), cpu, cuda, cuda:N",
    "dtype": "auto (bf16 autocast on GPUs that have it, fp16 with a gradient scaler on older ones such as T4 "
             "and V100, fp32 on CPU), fp32, bf16 or fp16",
    "compile": "torch.compile the model (minutes of compilation on a CPU)",
    "log_every": "write a metrics line every N steps",
    "tensorboard": "also write RUN_DIR/tensorboard (needs the tensorboard package)",
    "tracker": "also log to an experiment tracker: trackio (local, no account: TRACKIO_DIR or "
               "~/.cache/huggingface/trackio, project lmlab; see it with `trackio show --project lmlab`)",
    "fsdp": "under torchrun, shard weights, gradients and optimizer state (FSDP2) instead of DDP",
    "peak_flops": "FLOP/s of one device for MFU (default: a matmul measured at start)",
}


@dataclass
class TrainConfig:
    """Every training knob (HELP below says what each means; `lmlab train` has one flag per field)."""

    batch_size: int = 16
    seq_len: int | None = None
    grad_accum_steps: int = 1
    lr: float = 3e-4
    min_lr: float | None = None
    warmup_steps: int = 100
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    epochs: float | None = None
    time_budget_s: float | None = None
    eval_every: int = 200
    eval_batches: int = 20
    early_stopping_patience: int = 0
    save_every: int = 1000
    keep_last: int = 3
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    log_every: int = 10
    tensorboard: bool = False
    tracker: str | None = None
    fsdp: bool = False
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        check_types(self)
        positive = ["batch_size", "grad_accum_steps", "eval_batches", "log_every"]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        for name in ["warmup_steps", "eval_every", "save_every", "early_stopping_patience", "keep_last"]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} ({value!r}) must be an integer >= 0")
        for name in ["seq_len", "max_steps", "max_tokens"]:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        for name in ["epochs", "time_budget_s"]:
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} ({value!r}) must be a positive number")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr ({self.lr}) must be a positive number")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be in [0, lr]")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule ({self.schedule!r}) must be one of {', '.join(SCHEDULES)}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction ({self.decay_fraction}) must be in (0, 1]")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if self.tracker not in (None, "trackio"):
            raise ValueError(f"tracker ({self.tracker!r}) must be trackio")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype ({self.dtype!r}) must be auto, fp32, bf16 or fp16")
        if self.peak_flops is not None and not (self.peak_flops > 0 and math.isfinite(self.peak_flops)):
            raise ValueError(f"peak_flops ({self.peak_flops!r}) must be a positive number")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device ({self.device!r}) must be auto, cpu, cuda, cuda:N or mps")
        if not any([self.max_steps, self.max_tokens, self.epochs, self.time_budget_s]):
            raise ValueError("give a stop condition: max_steps, max_tokens, epochs or time_budget_s")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**known_fields(cls, data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object of TrainConfig fields")
        return cls.from_dict(data.get("train", data))  # a run's config.json works too


def decay_start(cfg: TrainConfig, total_steps: int | None) -> float:
    """wsd: the first step of the decay, after warm-up and the stable phase (inf: no horizon, no decay)."""
    if not total_steps:
        return math.inf
    return max(cfg.warmup_steps, total_steps - max(1, round(cfg.decay_fraction * total_steps)))


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the chosen decay to min_lr
    over the remaining steps, and min_lr after them. Called every optimizer step — never per epoch (the seed
    trainer's bug)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or not total_steps or total_steps <= cfg.warmup_steps:
        return cfg.lr
    # the first decay step is already below the peak, and the last step trains at min_lr exactly
    if cfg.schedule == "wsd":
        # warmup-stable-decay (Hu et al. 2024, MiniCPM, arXiv:2404.06395): the peak until the last
        # decay_fraction of the steps, then the (1 - sqrt) cool-down that Hägele et al. 2024 (arXiv:2405.18392)
        # found better than a linear one; with 20% of the steps it matches cosine at the same length. The
        # horizon only shapes the end, so a run can be extended from its stable phase.
        start = int(decay_start(cfg, total_steps))
        if step < start:
            return cfg.lr
        progress = min(1.0, (step - start + 1) / (total_steps - start))
        return cfg.final_lr + (cfg.lr - cfg.final_lr) * (1 - math.sqrt(progress))
    progress = min(1.0, (step - cfg.warmup_steps + 1) / (total_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.final_lr - cfg.lr) * progress
    return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + math.cos(math.pi * progress))
