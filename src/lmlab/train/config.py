"""TrainConfig: every training knob in one typed, validated place; saved with the run."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    batch_size: int = 16                  # sequences per micro-step, summed over all processes
    seq_len: int | None = None            # None: the model's block_size
    grad_accum_steps: int = 1             # micro-steps per optimizer step
    lr: float = 3e-4
    min_lr: float | None = None           # None: lr / 10
    warmup_steps: int = 100
    schedule: str = "cosine"              # decay after warm-up: cosine | linear | constant
    weight_decay: float = 0.1             # on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                # 0: off
    max_steps: int | None = None          # stop conditions: whichever comes first
    max_tokens: int | None = None
    epochs: float | None = None           # passes over the training tokens
    time_budget_s: float | None = None
    eval_every: int = 200                 # 0: only at the end
    eval_batches: int = 20
    early_stopping_patience: int = 0      # evaluations without improvement before stopping; 0: off
    save_every: int = 1000                # 0: only at the end
    keep_last: int = 3                    # checkpoints kept
    seed: int = 1337
    device: str = "auto"                  # auto: cuda if available, else cpu
    dtype: str = "auto"                   # auto: bf16 autocast on CUDA, fp32 on CPU | fp32 | bf16
    compile: bool = False                 # torch.compile the model
    log_every: int = 10
    tensorboard: bool = False
    fsdp: bool = False                    # shard parameters across processes (torchrun)

    def __post_init__(self) -> None:
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
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"dtype ({self.dtype!r}) must be auto, fp32 or bf16")
        if not any([self.max_steps, self.max_tokens, self.epochs, self.time_budget_s]):
            raise ValueError("give a stop condition: max_steps, max_tokens, epochs or time_budget_s")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the chosen decay to min_lr
    over the remaining steps. Called every optimizer step — never per epoch (the seed trainer's bug)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or not total_steps or total_steps <= cfg.warmup_steps:
        return cfg.lr
    # the first decay step is already below the peak, and the last step trains at min_lr exactly
    progress = min(1.0, (step - cfg.warmup_steps + 1) / (total_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.final_lr - cfg.lr) * progress
    return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + math.cos(math.pi * progress))
