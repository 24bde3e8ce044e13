"""Embedding drift during training (`lmlab train --drift-every N [--drift-probes TEXTS]`): how far each token's
embedding row, and the last hidden states of chosen probe texts, have moved from step 0, every N steps, for the
web app's Data view and `lmlab lab data drift`.

Drift of a row is ||e_t - e_0|| / ||e_0|| (relative, so rows of any norm compare). A row whose token never
occurs as an input gets no gradient from the input side; AdamW then only decays it (Loshchilov & Hutter 2019:
p <- p (1 - lr_t wd), and Adam's moments stay zero, so its update is exactly 0), so its drift is exactly
1 - prod_t (1 - lr_t wd): `decay_only`. That holds for an untied head only (the llama family): a tied head
(gpt, gpt2) hands every row the output-side gradient of the softmax.

RUN_DIR/drift_start.safetensors holds step 0 (the embedding, "tok_emb", and each probe's last hidden states,
"probe.I"), so a resumed run measures from the same origin. RUN_DIR/drift.json, replaced atomically at each
record and checkpoint:

    {"every": 10, "tied_embeddings": false, "weight_decay": 0.1, "vocab_size": 1024, "probes": ["Once upon"],
     "records": [{"step": 10, "tokens": 20480, "elapsed_s": 3.1, "mean": 0.01, "max": 0.2, "decay_only": 1e-4,
                  "probes": [0.05]}, ...],
     "step": 200, "drift": [per row at the last record], "counts": [per token id in the training data] or null,
     "volatile": [{"id": 17, "token": "the", "drift": 0.9, "count": 5120}, ...],  # the last record's top 20
     "decay_at": {"100": 0.99...}}          # prod (1 - lr wd) at each checkpoint's step, for resuming
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_path, atomic_write_text
from .config import lr_at
from .console import log
from .trainer import Callback, Trainer

DRIFT_FILE, START_FILE = "drift.json", "drift_start.safetensors"
TOP = 20  # the most volatile tokens kept in drift.json


def row_drift(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per row: ||after - before|| / ||before|| (float64)."""
    before, after = before.double(), after.double()
    return (after - before).norm(dim=1) / before.norm(dim=1).clamp_min(1e-30)


def decay_drift(lrs: Sequence[float], weight_decay: float) -> float:
    """The drift of a row that gets no gradient, after AdamW steps at learning rates `lrs`: 1 - prod(1 - lr wd)."""
    return 1.0 - float(np.prod([1.0 - lr * weight_decay for lr in lrs], dtype=np.float64))


def token_counts(dataset: Any, vocab_size: int) -> np.ndarray | None:
    """How often each token id occurs in the training region (the inputs the model sees); None for a dataset
    without one token stream (conversations, preference pairs)."""
    if not hasattr(dataset, "tokens") or not hasattr(dataset, "train_tokens"):
        return None
    train = dataset.tokens[: dataset.train_tokens]
    return np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size)[:vocab_size]


@torch.no_grad()
def last_hidden(model: Any, ids: Sequence[int]) -> torch.Tensor:
    """The last block's output (T, C) for `ids`, in eval mode (no dropout), on the CPU in float64."""
    seen: list[torch.Tensor] = []
    handle = model.blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out))
    was = model.training
    model.eval()
    try:
        model(torch.tensor([list(ids)], device=model.tok_emb.weight.device), last_only=True)
    finally:
        handle.remove()
        model.train(was)
    return seen[0][0].detach().double().cpu()


class DriftCallback(Callback):
    """Per-row embedding drift from the weights at construction (step 0), every `every` steps (and at the last
    step): `records` holds (step, drift per row as float64 numpy, the weight-decay-only drift predicted from the
    learning rates seen so far), and the step's metrics get drift/mean, drift/max and drift/decay_only. With
    `out_dir`, RUN_DIR/drift.json and drift_start.safetensors are written (see the module's docstring)."""

    def __init__(self, model: Any, every: int = 10, *, probes: Sequence[str] = (),
                 probe_ids: Sequence[Sequence[int]] = (), out_dir: str | Path | None = None,
                 counts: np.ndarray | None = None, weight_decay: float | None = None, tokenizer: Any = None,
                 saved: dict[str, torch.Tensor] | None = None) -> None:
        """`saved`: step 0 as drift_start.safetensors holds it (a resumed run), instead of the model's weights now."""
        if every < 1:
            raise ValueError(f"every ({every}) must be >= 1")
        if len(probes) != len(probe_ids):
            raise ValueError("give the ids of every probe text")
        self.every, self.probes, self.probe_ids = every, list(probes), [list(p) for p in probe_ids]
        if saved is None:
            self.start = model.tok_emb.weight.detach().cpu().clone()
            self.probe_start = [last_hidden(model, p) for p in self.probe_ids]
        else:
            self.start, self.probe_start = saved["tok_emb"], [saved[f"probe.{i}"] for i in range(len(probes))]
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.counts, self.weight_decay, self.tokenizer = counts, weight_decay, tokenizer
        self.tied = bool(model.config.tie_embeddings)
        self.keep = 1.0  # prod (1 - lr wd) so far: a never-updated row's share of its start
        self.decay_at: dict[str, float] = {}
        self.records: list[tuple[int, np.ndarray, float]] = []
        self.summary: list[dict[str, Any]] = []
        self.drift: np.ndarray | None = None  # per row at the last record
        if self.out_dir is not None and saved is None:
            from safetensors.torch import save_file
            tensors = {"tok_emb": self.start.contiguous(),
                       **{f"probe.{i}": h.contiguous() for i, h in enumerate(self.probe_start)}}
            with atomic_path(self.out_dir / START_FILE) as tmp:
                save_file(tensors, str(tmp))

    @classmethod
    def resumed(cls, trainer: Trainer) -> DriftCallback:
        """The callback of a run resumed at trainer.step: step 0's rows and probe states from drift_start, the
        records up to this step from drift.json, the decay product at this checkpoint."""
        from safetensors.torch import load_file
        out, c = trainer.out_dir, trainer.config
        found = json.loads((out / DRIFT_FILE).read_text(encoding="utf-8")) if (out / DRIFT_FILE).is_file() else {}
        probes = list(found.get("probes", c.drift_probes))
        cb = cls(trainer.model, c.drift_every, probes=probes, probe_ids=[trainer.tokenizer.encode(p) for p in probes],
              out_dir=out, counts=token_counts(trainer.dataset, trainer.model_config.vocab_size),
              weight_decay=c.weight_decay, tokenizer=trainer.tokenizer, saved=load_file(str(out / START_FILE)))
        cb.decay_at = {k: v for k, v in found.get("decay_at", {}).items() if int(k) <= trainer.step}
        if str(trainer.step) in cb.decay_at:
            cb.keep = cb.decay_at[str(trainer.step)]
        else:  # a checkpoint saved before its drift.json was: the schedule's learning rates, as planned now
            cb.keep = 1.0 - decay_drift([lr_at(t, c, trainer.schedule_steps) for t in range(trainer.step)],
                                          c.weight_decay)
        cb.summary = [r for r in found.get("records", []) if r["step"] <= trainer.step]
        # the rows of the last record kept, unless it was past this checkpoint (a wsd run resumed earlier)
        kept = found.get("drift") if found.get("step", -1) <= trainer.step else None
        cb.drift = np.asarray(kept, dtype=np.float64) if kept and cb.summary else None
        return cb

    def on_step(self, trainer: Any, metrics: dict[str, Any]) -> None:
        wd = trainer.config.weight_decay if self.weight_decay is None else self.weight_decay
        self.keep *= 1.0 - float(metrics["lr"]) * wd
        last = trainer.step == getattr(trainer, "total_steps", None)
        if trainer.step % self.every and not trainer.should_stop and not last:
            return
        self.record(trainer, metrics)

    def on_train_end(self, trainer: Any, result: Any) -> None:
        if not self.summary or self.summary[-1]["step"] != trainer.step:  # a time budget or a signal ended it
            self.record(trainer, {"step": trainer.step, "tokens": trainer.tokens, "elapsed_s": trainer.elapsed})

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        self.decay_at[str(trainer.step)] = self.keep
        self.write()

    def record(self, trainer: Any, metrics: dict[str, Any]) -> None:
        model = trainer.model
        drift = row_drift(self.start, model.tok_emb.weight.detach().cpu()).numpy()
        decay = 1.0 - self.keep
        probes = [float(row_drift(h0, last_hidden(model, ids)).mean())
                  for h0, ids in zip(self.probe_start, self.probe_ids)]
        self.records.append((trainer.step, drift, decay))
        self.drift = drift
        self.summary.append({"step": trainer.step, "tokens": metrics.get("tokens"),
                             "elapsed_s": metrics.get("elapsed_s"), "mean": float(drift.mean()),
                             "max": float(drift.max()), "decay_only": decay, "probes": probes})
        if "lr" in metrics:  # a training step's line (not the end of a run): the metrics get them too
            metrics.update({"drift/mean": float(drift.mean()), "drift/max": float(drift.max()),
                            "drift/decay_only": decay, **{f"drift/probe{i}": v for i, v in enumerate(probes)}})
        self.write()

    def write(self) -> None:
        if self.out_dir is None or not self.summary:
            return
        drift = self.drift
        if drift is None:  # resumed past the last record and nothing recorded since
            return
        # the token as text (byte-level pieces such as "Ġthe" decoded), when the run has a tokenizer
        name = (lambda i: self.tokenizer.decode([i])) if hasattr(self.tokenizer, "decode") else (lambda i: None)
        volatile = [{"id": int(i), "token": name(int(i)), "drift": float(drift[i]),
                     "count": None if self.counts is None else int(self.counts[i])} for i in np.argsort(-drift)[:TOP]]
        atomic_write_text(self.out_dir / DRIFT_FILE, json.dumps({
            "every": self.every, "tied_embeddings": self.tied, "weight_decay": self.weight_decay,
            "vocab_size": int(self.start.shape[0]), "probes": self.probes, "records": self.summary,
            "step": self.summary[-1]["step"], "drift": [float(f"{v:.6g}") for v in drift],
            "counts": None if self.counts is None else self.counts.tolist(), "volatile": volatile,
            "decay_at": self.decay_at}))


def attach(trainer: Trainer, resume: bool) -> list[Callback]:
    """The drift callback when the run asks for it: rank 0 of a run that is not sharded (FSDP splits the
    embedding across the processes)."""
    c = trainer.config
    if not c.drift_every or not trainer.is_main:
        return []
    if trainer.sharded:
        log("drift tracking is off under FSDP (the embedding is split across the processes)")
        return []
    if resume and (trainer.out_dir / START_FILE).is_file():
        return [DriftCallback.resumed(trainer)]
    if resume:
        log(f"drift is measured from step {trainer.step}: this run kept no {START_FILE}")
    return [DriftCallback(trainer.model, c.drift_every, probes=c.drift_probes,
                          probe_ids=[trainer.tokenizer.encode(p) for p in c.drift_probes], out_dir=trainer.out_dir,
                          counts=token_counts(trainer.dataset, trainer.model_config.vocab_size),
                          weight_decay=c.weight_decay, tokenizer=trainer.tokenizer)]
