"""TrainConfig: every training knob in one typed, validated place; saved with the run."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import configs
from ..configs import knob, validate
from ..files import atomic_write_text

SCHEDULES = ("cosine", "linear", "constant", "wsd")

# What a resumed run may change: when it stops, and how it is run and watched. Never what it computes (the
# schedule, the batch, the optimizer, the seed), so a resumed run stays the run that was started; each resume
# and what it changed are recorded in RUN_DIR/resumes.jsonl, and config.json keeps how the run started.
STOP_CONDITIONS = ("max_steps", "max_tokens", "epochs", "time_budget_s")
STOP_FIELDS = (*STOP_CONDITIONS, "early_stopping_patience")
RESUMABLE = (*STOP_FIELDS, "eval_every", "save_every", "keep_last", "log_every", "device", "compile", "fsdp",
             "tensorboard", "tracker", "peak_flops", "sample_every", "sample_prompts", "sample_tokens")


@dataclass
class TrainConfig:
    """Every training knob, with its help text and bounds (`lmlab train` has one flag per field)."""

    batch_size: int = knob(16, "sequences per micro-step, summed over all processes", gt=0)
    seq_len: int | None = knob(None, "tokens per sequence (default: the model's block_size)", gt=0)
    grad_accum_steps: int = knob(1, "micro-steps per optimizer step", gt=0)
    lr: float = knob(3e-4, "peak learning rate, reached at the end of warm-up", gt=0)
    min_lr: float | None = knob(None, "learning rate at the last step (default: lr / 10)", ge=0)
    warmup_steps: int = knob(100, "optimizer steps of linear warm-up from lr / warmup_steps", ge=0)
    schedule: str = knob("cosine", "decay after warm-up, set every optimizer step: cosine, linear, constant, or "
                         "wsd (warmup-stable-decay: the peak lr, then a decay to min_lr over the last decay_fraction "
                         "of the steps; a run extended on resume decays at its new end)", choices=SCHEDULES)
    decay_fraction: float = knob(0.2, "wsd: share of the steps spent decaying to min_lr (default 0.2)", gt=0, le=1)
    # at most 10, the web app's bound: AdamW multiplies the weights by 1 - lr x weight_decay every step, and 1e30
    # made them inf at the second step (a divergence blamed on --lr)
    weight_decay: float = knob(0.1, "AdamW decoupled weight decay on matrices (>= 2-D); never on norms and biases",
                               ge=0, le=10)
    beta1: float = knob(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = knob(0.95, "AdamW beta2", ge=0, lt=1)
    grad_clip: float = knob(1.0, "clip the global gradient norm to this (0: off)", ge=0)
    max_steps: int | None = knob(None, "stop after this many optimizer steps", gt=0)
    max_tokens: int | None = knob(None, "stop after this many training tokens", gt=0)
    epochs: float | None = knob(None, "stop after this many passes over the training tokens", gt=0)
    time_budget_s: float | None = knob(None, "stop after this many seconds of training", gt=0)
    eval_every: int = knob(200, "evaluate every N steps (0: only at the end)", ge=0)
    eval_batches: int = knob(20, "validation batches per evaluation", gt=0)
    early_stopping_patience: int = knob(0, "stop after this many evaluations without a better val loss (0: off)",
                                        ge=0)
    save_every: int = knob(1000, "checkpoint every N steps (0: only at the end)", ge=0)
    keep_last: int = knob(3, "checkpoints to keep (0: all)", ge=0)
    seed: int = knob(1337, "seed for the initial weights, the data order and dropout", ge=0, le=2**62)
    device: str = knob("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    dtype: str = knob("auto", "auto (bf16 autocast on GPUs that have it, fp16 with a gradient scaler on older ones "
                      "such as T4 and V100, fp32 on CPU), fp32, bf16 or fp16", choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = knob(False, "torch.compile the model (minutes of compilation on a CPU)")
    log_every: int = knob(10, "write a metrics line every N steps", gt=0)
    tensorboard: bool = knob(False, "also write RUN_DIR/tensorboard (needs the tensorboard package)")
    tracker: str | None = knob(None, "also log to an experiment tracker: trackio (local, no account: TRACKIO_DIR or "
                               "~/.cache/huggingface/trackio, project lmlab; see it with `trackio show --project "
                               "lmlab`)", choices=("trackio",))
    fsdp: bool = knob(False, "under torchrun, shard weights, gradients and optimizer state (FSDP2) instead of DDP")
    peak_flops: float | None = knob(None, "FLOP/s of one device for MFU (default: a matmul measured at start)", gt=0)
    sample_every: int | None = knob(None, "write generations at --sample-prompts to RUN_DIR/samples.jsonl every N "
                                    "steps (default: at each evaluation; 0: never)", ge=0)
    sample_prompts: list[str] = knob(help="prompts of the samples, a comma list (default: one empty prompt, the "
                                     "model's own start of a text)", factory=lambda: [""])
    sample_tokens: int = knob(48, "tokens per sample", gt=0)
    drift_every: int = knob(0, "record every token's embedding drift from step 0 (and the probes') every N steps "
                            "into RUN_DIR/drift.json, for the Data view and `lmlab lab data drift` (0: off)", ge=0)
    drift_probes: list[str] = knob(help="texts whose last hidden states' drift from step 0 is recorded with "
                                   "--drift-every, a comma list", factory=list)

    def __post_init__(self) -> None:
        validate(self)
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be in [0, lr]")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device ({self.device!r}) must be auto, cpu, cuda, cuda:N or mps")
        if not any(getattr(self, k) for k in STOP_CONDITIONS):
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
        return configs.from_dict(cls, data)

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
