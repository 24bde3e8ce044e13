"""Training: TrainConfig, the step loop with exact resume, callbacks, checkpoints, the demo."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

__all__ = ["SCHEDULES", "TrainConfig", "lr_at", "Callback", "Objective", "Trainer", "TrainResult", "check_fits",
           "checkpoint_step", "checkpoints", "latest_checkpoint", "train", "evaluate_texts", "resume_run", "run_demo",
           "train_from_sources"]

# name -> its module, imported on first use (PEP 562): config.py needs no torch, and `lmlab train --help`
# builds its flags from TrainConfig without importing the trainer (torch.distributed.checkpoint)
_LAZY = {
    "checkpoint_step": ".checkpoint", "checkpoints": ".checkpoint", "latest_checkpoint": ".checkpoint",
    "SCHEDULES": ".config", "TrainConfig": ".config", "lr_at": ".config",
    "evaluate_texts": ".recipes", "resume_run": ".recipes", "run_demo": ".recipes", "train_from_sources": ".recipes",
    "Callback": ".trainer", "Objective": ".trainer", "Trainer": ".trainer", "TrainResult": ".trainer",
    "check_fits": ".trainer", "train": ".trainer",
}

if TYPE_CHECKING:
    from .checkpoint import checkpoint_step, checkpoints, latest_checkpoint
    from .config import SCHEDULES, TrainConfig, lr_at
    from .recipes import evaluate_texts, resume_run, run_demo, train_from_sources
    from .trainer import Callback, Objective, Trainer, TrainResult, check_fits, train


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)
