"""Scoring completions: right-padded prompt+completion rows with a mask over the completion's targets, and the
model's log-probability of each target. Shared by the RL trainers (tune/rl.py, grpo, self-play), the rewards
and test-time compute's log-prob scorer (models/ttc.py), which sits below tune."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .model import Transformer


@dataclass
class Batch:
    """Right-padded prompt+completion rows, with a mask over the completion's target positions."""
    inputs: torch.Tensor   # (B, T-1) ids fed to the model
    targets: torch.Tensor  # (B, T-1) next ids
    mask: torch.Tensor     # (B, T-1) True where the target is a completion token


def make_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int = 0,
               device: str | torch.device = "cpu") -> Batch:
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(rows[i])] = torch.tensor(rows[i])
        mask[i, len(p): len(p) + len(c)] = True
    return Batch(ids[:, :-1].to(device), ids[:, 1:].to(device), mask[:, 1:].to(device))


def token_logprobs(model: Transformer, batch: Batch, *, with_entropy: bool = False,
                   temperature: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(target) at every position (B, T-1), and the policy's entropy there if asked. Right padding
    needs no attention mask: padding only ever follows the real tokens of a row. `temperature` (a float, or
    one per row (B,)) must be the one the completions were sampled at: the policy gradient is that of the
    sampling policy softmax(z / T). Scored with log softmax(z) instead, samples drawn at T < 1 get the
    wrong baseline term and the policy flattens (docs/LOG.md has the run that showed it)."""
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(batch.inputs.device).view(-1, 1, 1)   # (B, 1, 1)
    logits = model(batch.inputs).logits.float()                        # (B, T-1, V)
    if isinstance(temperature, torch.Tensor) or temperature != 1.0:      # no (B, T-1, V) copy at T = 1
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)    # (B, T-1)
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return picked, entropy
