"""Training: TrainConfig, the step loop with exact resume, callbacks, checkpoints, the demo."""

from .checkpoint import checkpoint_step, checkpoints, latest_checkpoint
from .config import SCHEDULES, TrainConfig, lr_at
from .recipes import evaluate_texts, resume_run, run_demo, train_from_sources
from .trainer import Callback, Objective, Trainer, TrainResult, check_fits, train

__all__ = ["SCHEDULES", "TrainConfig", "lr_at", "Callback", "Objective", "Trainer", "TrainResult", "check_fits",
           "checkpoint_step", "checkpoints", "latest_checkpoint", "train", "evaluate_texts", "resume_run", "run_demo",
           "train_from_sources"]
