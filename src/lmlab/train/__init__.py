"""Training: TrainConfig, the step loop with exact resume, callbacks, checkpoints, the demo."""

from .config import SCHEDULES, TrainConfig, lr_at
from .trainer import Callback, Trainer, TrainResult, latest_checkpoint, train

__all__ = ["SCHEDULES", "TrainConfig", "lr_at", "Callback", "Trainer", "TrainResult", "latest_checkpoint", "train"]
