"""Where a run's metrics go besides metrics.jsonl: TensorBoard (`tensorboard=True`) and an experiment tracker
(`tracker="trackio"`). Each is a Callback the Trainer attaches on rank 0 that gets every metrics line as it is
written (Callback.on_log), so both hold exactly the lines of metrics.jsonl.

Trackio (https://github.com/gradio-app/trackio) keeps its runs in a local SQLite store: no account and no
network. The store is TRACKIO_DIR (default ~/.cache/huggingface/trackio), the project is "lmlab", and
`trackio show --project lmlab` opens the dashboard. The run's config.json goes in as the tracker run's config.
"""

from __future__ import annotations

import importlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from ..files import atomic_write_text
from .config import TrainConfig
from .trainer import Callback, Trainer, TrainResult

PROJECT = "lmlab"
TRACKER_FILE = "tracker.json"  # RUN_DIR/tracker.json: which tracker run this run logs to, for resuming it


def check_installed(config: TrainConfig) -> None:
    """ValueError naming the package to install, before anything is built or written."""
    needs = [("--tensorboard", "torch.utils.tensorboard", "tensorboard")] if config.tensorboard else []
    if config.tracker:
        needs.append((f"--tracker {config.tracker}", config.tracker, config.tracker))
    for flag, module, package in needs:
        try:
            importlib.import_module(module)
        except ImportError:
            raise ValueError(f"{flag} needs the {package} package: pip install {package}") from None


def attach(trainer: Trainer, resume: bool) -> list[Callback]:
    """The callbacks the run's config asks for (rank 0 only: one writer per run)."""
    c, out = trainer.config, trainer.out_dir
    if not trainer.is_main:
        return []
    found: list[Callback] = [TensorBoard(out)] if c.tensorboard else []
    if c.tracker == "trackio":
        found.append(Trackio(out, trainer._run_config(), resume))
    return found


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}


class TensorBoard(Callback):
    """RUN_DIR/tensorboard: one scalar per metric and step."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        for key, value in _numbers(metrics).items():
            self.writer.add_scalar(key, value, metrics["step"])

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        self.writer.close()


class Trackio(Callback):
    """One Trackio run per lmlab run, named after the run directory (and when it started, as names need not
    be unique in a project). A resumed run logs on in the same tracker run, and leaves out the steps the
    tracker already holds: the lines after the checkpoint, logged again with the same numbers."""

    def __init__(self, run_dir: Path, run_config: dict[str, Any], resume: bool) -> None:
        import trackio
        from trackio.sqlite_storage import SQLiteStorage

        saved, self.logged = run_dir / TRACKER_FILE, 0
        if resume and saved.is_file():
            name = json.loads(saved.read_text())["run"]
            self.logged = SQLiteStorage.get_max_step_for_run(PROJECT, name) or 0
        else:  # a new run, or one that starts tracking on this resume
            name = f"{run_dir.resolve().name}-{datetime.now():%Y%m%d-%H%M%S}"
            atomic_write_text(saved, json.dumps({"tracker": "trackio", "project": PROJECT, "run": name}) + "\n")
        self.run = trackio.init(project=PROJECT, name=name, config=run_config, resume="allow")

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if metrics["step"] > self.logged:
            self.run.log(_numbers(metrics), step=metrics["step"])

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        self.run.finish()
