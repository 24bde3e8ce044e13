"""What a run is doing, for whoever watches its directory (the web app's run page): RUN_DIR/phase.json names
the phase (tokenizer, data, training, evaluating, saving) and RUN_DIR/samples.jsonl holds generations at fixed
prompts every N steps, so a run's text can be read over time (TensorBoard's text samples, Weights & Biases'
sample tables).

    {"phase": "evaluating", "step": 400, "time": 1733370000.0}                     # phase.json
    {"step": 400, "samples": [{"prompt": "", "text": "Once upon ..."}]}            # a samples.jsonl line
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write_text
from ..models import fast, generate
from .trainer import Callback, Trainer

PHASE_FILE, SAMPLES_FILE = "phase.json", "samples.jsonl"
PHASES = ("tokenizer", "data", "training", "evaluating", "saving")


def write_phase(run_dir: str | Path, phase: str, step: int | None = None) -> None:
    """RUN_DIR/phase.json, replaced atomically (a reader never sees half of it)."""
    atomic_write_text(Path(run_dir) / PHASE_FILE, json.dumps({"phase": phase, "step": step, "time": time.time()}))


def attach(trainer: Trainer) -> list[Callback]:
    """The Samples callback when the run asks for samples: rank 0 of a run that is not sharded (FSDP's forward
    needs every rank; DDP's rank 0 holds the whole model)."""
    c = trainer.config
    if not trainer.is_main or trainer.sharded or c.sample_every == 0 or not c.sample_prompts \
            or not hasattr(trainer.tokenizer, "encode"):
        return []
    return [Samples()]


class Samples(Callback):
    """Generations at the config's sample_prompts every sample_every steps (default: at each evaluation, the
    last step included), appended to RUN_DIR/samples.jsonl. Sampled with a fixed seed (the run's) so that
    the text changes with the weights only, not with the random draw."""

    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if trainer.config.sample_every is None:
            self.write(trainer)

    def on_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        every = trainer.config.sample_every
        if every and trainer.step % every == 0:
            trainer.require_finite(metrics, weights=True)  # a diverged model's probabilities are NaN
            self.write(trainer)

    @torch.no_grad()
    def write(self, trainer: Trainer) -> None:
        c, model = trainer.config, trainer.model
        model.eval()
        try:
            texts = [generate(model, trainer.tokenizer, p, max_new_tokens=c.sample_tokens, temperature=0.8, top_k=40,
                              seed=c.seed) for p in c.sample_prompts]
        finally:
            # generating in eval mode keeps a decoder (a copy of the weights) for the next call; a model in
            # training must not hold one, and a kept one can miss the optimizer's in-place updates
            fast.decoder(model, keep=False)
            model.train()
        line = {"step": trainer.step, "samples": [{"prompt": p, "text": t} for p, t in zip(c.sample_prompts, texts)]}
        with open(trainer.out_dir / SAMPLES_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
