"""The toy associative memory of App. F.4: a one-hidden-layer ReLU MLP maps random unit keys to classes.

Paper settings: 256 hidden units, 64-d keys, 30 classes, 8,192 pairs; pre-training with AdamW, cosine from
0.03 over 16k steps, batch 128, weight decay 0.01; fine-tuning on new pairs at a constant 1e-3 for 4,000
steps. It reproduces the fine-tuning pattern of the language model (Figs. Q-R): old pairs are forgotten
within a few hundred steps while new ones are learned slowly.

This is not a language model, so it does not go through the Trainer (which trains a Transformer on token
batches); its loop is the ten lines below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...configs import knob, validate


@dataclass
class MemoryConfig:
    n_pairs: int = knob(8192, "key-value pairs learned first", gt=0)
    n_new: int = knob(512, "fresh pairs learned in fine-tuning", gt=0)
    dim: int = knob(64, "key dimension", gt=0)
    hidden: int = knob(256, "hidden units of the MLP", gt=0)
    classes: int = knob(30, "values a key maps to", gt=0)
    pretrain_steps: int = knob(16000, "steps on the first pairs", gt=0)
    finetune_steps: int = knob(4000, "steps on the new pairs", gt=0)
    batch_size: int = knob(128, "pairs per step", gt=0)
    lr: float = knob(0.03, "learning rate of pre-training", gt=0)
    finetune_lr: float = knob(1e-3, "learning rate of fine-tuning", gt=0)
    weight_decay: float = knob(0.01, "weight decay", ge=0)
    replay_weight: float = knob(0.0, "per old pair, relative to 1 per new pair, during fine-tuning", ge=0)
    eval_every: int = knob(50, "evaluate every N steps", gt=0)
    seed: int = knob(0, "keys, values, weights and order")

    def __post_init__(self) -> None:
        validate(self)


def _accuracy(model: torch.nn.Module, keys: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(keys)
        return float((logits.argmax(-1) == labels).float().mean()), float(F.cross_entropy(logits, labels))


def run_memory(cfg: MemoryConfig) -> dict[str, object]:
    """Pre-train on n_pairs, fine-tune on n_new fresh pairs (optionally replaying old ones); returns curves of
    old/new accuracy and loss. The no-knowledge baseline is ln(classes)."""
    g = torch.Generator().manual_seed(cfg.seed)
    total = cfg.n_pairs + cfg.n_new
    keys = F.normalize(torch.randn(total, cfg.dim, generator=g), dim=1)
    labels = torch.randint(cfg.classes, (total,), generator=g)
    torch.manual_seed(cfg.seed)
    model = torch.nn.Sequential(torch.nn.Linear(cfg.dim, cfg.hidden), torch.nn.ReLU(),
                                torch.nn.Linear(cfg.hidden, cfg.classes))
    old, new = slice(0, cfg.n_pairs), slice(cfg.n_pairs, total)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict[str, float]] = []

    def log(phase: str, step: int) -> None:
        acc_old, loss_old = _accuracy(model, keys[old], labels[old])
        acc_new, loss_new = _accuracy(model, keys[new], labels[new])
        history.append({"phase": phase, "step": step, "old_acc": acc_old, "old_loss": loss_old,
                        "new_acc": acc_new, "new_loss": loss_new})

    for step in range(cfg.pretrain_steps):
        for group in opt.param_groups:  # cosine from lr to 0, no warm-up (App. F.4)
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.pretrain_steps))
        idx = torch.randint(cfg.n_pairs, (cfg.batch_size,), generator=g)
        loss = F.cross_entropy(model(keys[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % (cfg.eval_every * 10) == 0:
            log("pretrain", step + 1)
    log("finetune", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.finetune_lr, weight_decay=cfg.weight_decay)
    weights = torch.cat([torch.full((cfg.n_pairs,), cfg.replay_weight), torch.ones(cfg.n_new)])
    for step in range(cfg.finetune_steps):
        idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=g)
        loss = F.cross_entropy(model(keys[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.eval_every == 0:
            log("finetune", step + 1)
    return {"history": history, "baseline": math.log(cfg.classes)}
