"""Knowledge metrics (paper §1.3, App. B.3, F.2) and training-dynamics probes, as Trainer hooks.

- attribute loss: cross-entropy summed over a value's tokens, averaged over the six attributes and the
  biographies (not averaged over tokens within a value);
- attribute accuracy: a value counts only if every one of its tokens is the argmax;
- the no-knowledge baseline: the entropy of the value distribution, computed from the population;
- on seen individuals x held-out templates (knowledge), seen x training templates (memorisation) and unseen
  individuals (hallucination: loss above the baseline, the max probability and the entropy of the
  prediction at value tokens);
- plateau detection: t1 = first evaluation within `tol_reach` of the baseline, t* = first evaluation below
  baseline - `tol_leave`, confirmed by the next one (this lab's convention).

Probes ("latent volatility": how much what a token means moves during training), usable on any run with a
Biographies dataset: the drift of every token embedding between consecutive evaluations (mean over name,
value and template tokens), and the attention from the position that predicts a value's first token to the
name tokens of its sentence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...models import Transformer
from ...train import Callback
from ..interp.hooks import AttentionRecorder
from .data import Biographies, EvalSet

EVAL_SETS = ("seen_eval", "seen_train", "unseen")


@torch.no_grad()
def attribute_metrics(model: Transformer, es: EvalSet, baseline: float, batch_size: int = 128) -> dict[str, float]:
    """Attribute loss/accuracy and predictive confidence at value tokens on one evaluation set."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses, correct, maxp, ent = [], [], [], []
    for i in range(0, len(es.x), batch_size):
        x, y = es.x[i:i + batch_size].to(device), es.y[i:i + batch_size].to(device)
        pos, mask = es.pos[i:i + batch_size].to(device), es.mask[i:i + batch_size].to(device)
        logp = torch.log_softmax(model(x).logits.float(), -1)                     # (B, T, V)
        B, A, L = pos.shape
        flat = pos.view(B, A * L)
        lp = logp.gather(1, flat[..., None].expand(-1, -1, logp.size(-1)))        # (B, A*L, V)
        target = y.gather(1, flat)                                               # (B, A*L)
        tok_lp = lp.gather(2, target[..., None]).squeeze(-1).view(B, A, L)
        hit = (lp.argmax(-1) == target).view(B, A, L) | ~mask
        p = lp.exp()
        losses.append(-(tok_lp * mask).sum(-1))                                  # (B, A) nats per value
        correct.append(hit.all(-1))
        m = mask.float()
        maxp.append((p.max(-1).values.view(B, A, L) * m).sum(-1) / m.sum(-1))
        ent.append((-(p * lp).sum(-1).view(B, A, L) * m).sum(-1) / m.sum(-1))
    if was_training:
        model.train()
    loss, acc = torch.cat(losses), torch.cat(correct).float()
    return {"loss": float(loss.mean()), "acc": float(acc.mean()),
           "max_prob": float(torch.cat(maxp).mean()), "entropy": float(torch.cat(ent).mean()),
           "above_baseline": float(loss.mean()) - baseline}


def plateau_times(steps: Sequence[int], losses: Sequence[float], baseline: float, tol_reach: float = 0.05,
                  tol_leave: float = 0.1) -> dict[str, int | None]:
    """t1: first step with loss <= baseline + tol_reach (the loss reaches the plateau). t*: first step with
    loss < baseline - tol_leave whose next evaluation is below it too (knowledge emerges); a last evaluation
    below the threshold counts. None where it never happens."""
    t1 = next((s for s, v in zip(steps, losses) if v <= baseline + tol_reach), None)
    t_star = None
    for k, (s, v) in enumerate(zip(steps, losses)):
        if v < baseline - tol_leave and (k + 1 == len(losses) or losses[k + 1] < baseline - tol_leave):
            t_star = s
            break
    return {"t1": t1, "t_star": t_star,
            "plateau_len": None if t1 is None or t_star is None else t_star - t1}


# ---- attention probe -------------------------------------------------------------------------------------

@torch.no_grad()
def value_to_name_attention(model: Transformer, es: EvalSet, n: int = 64) -> list[float]:
    """Per layer: attention mass (mean over heads and attributes) from the position that predicts a value's
    first token to the name tokens of the same sentence (paper Fig. 3, App. D)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = es.x[:n].to(device)
    with AttentionRecorder(model) as rec:
        model(x)
    if was_training:
        model.train()
    query = es.pos[:n, :, 0].to(device)                       # (n, A): y index = x index of the predicting token
    names, nmask = es.name_pos[:n].to(device), es.name_mask[:n].to(device)  # (n, A, K)
    out = []
    for probs in rec.probs:                                  # (n, H, T, T)
        p = probs.mean(1)                                    # (n, T, T)
        rows = p.gather(1, query[..., None].expand(-1, -1, p.size(-1)))            # (n, A, T)
        mass = (rows.gather(2, names) * nmask).sum(-1)                              # (n, A)
        out.append(float(mass.mean()))
    return out


# ---- the hook ---------------------------------------------------------------------------------------------

class FactsCallback(Callback):
    """On every evaluation: attribute metrics on the three sets (keys `facts/<set>/<metric>`), the baseline,
    the probes (`probe/drift_<group>`, `probe/att_value_name_L<i>`), and plateau times so far. Keeps its own
    history (`self.history`) for the experiments and writes every value into metrics.jsonl."""

    def __init__(self, data: Biographies, sets: Sequence[str] = EVAL_SETS, probes: bool = True,
                 stop_at_acc: float | None = None) -> None:
        self.data, self.sets, self.probes, self.stop_at_acc = data, tuple(sets), probes, stop_at_acc
        self.baseline = data.baseline()
        self.history: list[dict[str, float]] = []
        self._prev_emb: torch.Tensor | None = None
        vocab = data.tokenizer.vocab_size
        groups = {"name": {t for ids in data.first_ids + data.middle_ids + data.last_ids for t in ids},
                  "value": {t for vs in data.value_ids.values() for ids in vs for t in ids}}
        groups["template"] = {t for ps in data.template_ids.values() for p in ps for part in p for t in part}
        groups["template"] -= groups["name"] | groups["value"]
        self.groups = {g: torch.tensor(sorted(i for i in ids if i < vocab)) for g, ids in groups.items()}

    def on_eval(self, trainer: Any, metrics: dict[str, Any]) -> None:
        model = trainer.model
        row: dict[str, float] = {"step": trainer.step, "baseline": self.baseline}
        for name in self.sets:
            for k, v in attribute_metrics(model, self.data.eval_set(name), self.baseline).items():
                row[f"{name}/{k}"] = v
        if self.probes:
            emb = model.tok_emb.weight.detach().float().cpu().clone()
            if self._prev_emb is not None:
                drift = (emb - self._prev_emb).norm(dim=1) / self._prev_emb.norm(dim=1).clamp_min(1e-12)
                for g, ids in self.groups.items():
                    row[f"drift_{g}"] = float(drift[ids].mean())
            self._prev_emb = emb
            for i, v in enumerate(value_to_name_attention(model, self.data.eval_set("seen_eval"))):
                row[f"att_value_name_L{i}"] = v
        self.history.append(row)
        t = plateau_times([r["step"] for r in self.history], [r["seen_eval/loss"] for r in self.history],
                          self.baseline) if "seen_eval" in self.sets else {}
        for k, v in row.items():
            if k != "step":
                metrics[("probe/" if k.startswith(("drift", "att_")) else "facts/") + k] = v
        for k, v in t.items():
            if v is not None:
                metrics[f"facts/{k}"] = v
        if self.stop_at_acc is not None and row.get("seen_eval/acc", 0.0) >= self.stop_at_acc:
            trainer.should_stop = True


def curves(history: Sequence[dict[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([r["step"] for r in history if key in r], dtype=np.float64)
    return steps, np.array([r[key] for r in history if key in r], dtype=np.float64)
