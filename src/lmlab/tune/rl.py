"""The policy-gradient pieces both self-play modes share: reward normalisation and the REINFORCE loss (the
log-probabilities of sampled completions are models/scoring.py's, which test-time compute uses too).

Sign convention (the later, v2 version of the AZR Model Trainer app, github.com/Slavikpro557/ai-neural-network-
project, flipped it): the loss is `-A * log pi(y)`, so gradient descent raises the log-probability of completions with a
positive advantage. tests/test_selfplay.py checks this on a real model after one optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

EPS = 1e-6


def normalize(rewards: Sequence[float]) -> list[float]:
    """(r - mean) / std with the population std; all zeros when the rewards are (nearly) equal, because a
    batch with one reward value carries no preference (veRL's whitening would divide by ~0)."""
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    if std < EPS:
        return [0.0] * n
    return [(r - mean) / std for r in rewards]


def grouped_advantages(rewards: Sequence[float], groups: Sequence[object]) -> list[float]:
    """Normalise rewards separately within each group key: the (task type x role) batches of AZR's TRR++
    (Zhao et al. 2025, sec. 3.3.5), or the completions of one prompt in GRPO (Shao et al. 2024)."""
    if len(rewards) != len(groups):
        raise ValueError(f"{len(rewards)} rewards but {len(groups)} group labels")
    out = [0.0] * len(rewards)
    for key in dict.fromkeys(groups):
        idx = [i for i, g in enumerate(groups) if g == key]
        for i, a in zip(idx, normalize([rewards[i] for i in idx])):
            out[i] = a
    return out


def learnability(successes: Sequence[float]) -> float:
    """AZR's proposer reward: 1 - mean solve rate over the G solver samples, and 0 when the task is
    always or never solved (nothing to learn from it). The largest value, 1 - 1/G, goes to the hardest
    task that is still solvable."""
    if not successes:
        raise ValueError("learnability needs at least one solver sample")
    p = sum(successes) / len(successes)
    return 0.0 if p <= 0.0 or p >= 1.0 else 1.0 - p


def reinforce_loss(logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                   entropy: torch.Tensor | None = None, entropy_coef: float = 0.0) -> torch.Tensor:
    """Token-mean REINFORCE: -sum_i A_i sum_t log pi(y_it) / (number of completion tokens), minus an
    entropy bonus. Token-mean is veRL's default aggregation, which AZR trains with."""
    m = mask.float()
    n = m.sum().clamp_min(1.0)
    loss = -(advantages[:, None] * logp * m).sum() / n
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * (entropy * m).sum() / n
    return loss


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate exp(d) - d - 1 with d = log pi_ref - log pi on tokens sampled
    from pi: unbiased, always >= 0 (Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html;
    GRPO's choice). GRPO and the preference losses' KL metric both use it."""
    d = ref_logp - logp
    return torch.expm1(d) - d
