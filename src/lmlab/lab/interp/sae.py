"""Sparse autoencoders on one residual stream (numbered as in hooks.py: 0 = embeddings, s = output of block s-1).

Two variants, each trained with the tricks its paper reports:
- "topk" (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", https://arxiv.org/abs/2406.04093): the
  k largest pre-activations kept, then ReLU, so at most k features fire per token (exactly k where the top k are
  positive); loss = reconstruction MSE alone. Encoder initialised as the decoder's transpose (their §A.1).
- "l1" (Bricken et al. 2023, "Towards Monosemanticity", https://transformer-circuits.pub/2023/monosemantic-features
  and Anthropic's April 2024 update): ReLU features, loss = MSE + l1 * sum_i f_i ||d_i||.
Both: a pre-encoder bias (b_dec subtracted before encoding, added back after decoding; initialised at the data
mean, a cheap stand-in for Bricken et al.'s geometric median); decoder columns renormalised to unit norm after
every step with the gradient's component along each column removed first (Bricken et al.; Gao et al. §A.4);
inputs scaled by one constant so E||x||^2 = d_in (SAELens' "expected_average_only_in" normalisation), so one l1
coefficient fits any model; dead features counted as those that fired on none of the last `dead_window`
training tokens (no resampling or AuxK here: the counts are reported instead).

Metrics as SAELens reports them: MSE and the fraction of variance unexplained (FVU) on held-out activations,
mean L0, dead (never fire on the held-out tokens) and dense (fire on more than 10% of them) feature shares, and
the fraction of language-modelling loss recovered with the SAE spliced into the forward pass,
    (L_zero_ablate - L_sae) / (L_zero_ablate - L_clean)                                    (`loss_recovered`).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...configs import knob, validate
from ...files import atomic_write_text, staged_dir
from ...models import Transformer
from .hooks import _Hooks, run_with_residuals

KINDS = ("topk", "l1")
DENSE = 0.1  # a feature firing on more than 10% of tokens counts as dense (Anthropic's feature-density plots)
# the largest dictionary per input dimension: Bricken et al. 2023 went from 512 to 131,072 features on a 512-wide
# layer; past it a typo (--features 10**10) would only fill memory (weights, Adam state, tokens x features codes)
MAX_EXPANSION = 256


@dataclass
class SAEConfig:
    """One SAE: its shape, its variant and how it is trained (saved as config.json beside the weights)."""

    d_in: int = knob(64, "width of the residual stream it reads", gt=0)
    n_features: int = knob(512, "dictionary size", gt=0)
    kind: str = knob("topk", "topk (Gao et al. 2024) or l1 (Bricken et al. 2023)", choices=KINDS)
    k: int = knob(32, "topk: features kept per token", gt=0)
    l1: float = knob(1.0, "l1: sparsity coefficient on sum_i f_i ||d_i|| (inputs scaled to E||x||^2 = d_in)", ge=0)
    stream: int = knob(1, "residual stream (0 = embeddings, s = output of block s - 1)", ge=0)
    steps: int = knob(2000, "optimizer steps", gt=0)
    batch_size: int = knob(1024, "activations per step", gt=0)
    lr: float = knob(1e-3, "Adam learning rate", gt=0)
    dead_window: int = knob(100_000, "a feature is dead in training if it fired on none of this many tokens", gt=0)
    seed: int = knob(0, "initialisation and batch order")

    def __post_init__(self) -> None:
        validate(self)
        if self.n_features > MAX_EXPANSION * self.d_in:
            raise ValueError(f"n_features ({self.n_features}) must be at most {MAX_EXPANSION} x d_in = "
                             f"{MAX_EXPANSION * self.d_in}, the largest dictionary per input dimension in Bricken et "
                             "al. 2023")
        if self.kind == "topk" and self.k > self.n_features:
            raise ValueError(f"k ({self.k}) must be <= n_features ({self.n_features})")


class SparseAutoencoder(nn.Module):
    """x (..., d_in) -> features f (..., F) -> reconstruction (..., d_in); `scale` maps the model's units onto
    the normalised ones the SAE works in (a buffer: saved with the weights)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        w = torch.randn(cfg.d_in, cfg.n_features, generator=g)
        self.W_dec = nn.Parameter(w / w.norm(dim=0, keepdim=True))                 # (d_in, F), unit columns
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())                    # (F, d_in)
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_features))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("scale", torch.ones(()))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x * self.scale)

    def features(self, xn: torch.Tensor) -> torch.Tensor:
        """Features of inputs already in the SAE's normalised units."""
        pre = (xn - self.b_dec) @ self.W_enc.T + self.b_enc                       # (..., F)
        if self.cfg.kind == "l1":
            return F.relu(pre)
        top = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return (f @ self.W_dec.T + self.b_dec) / self.scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12)


def train_sae(acts: torch.Tensor, cfg: SAEConfig, log_every: int = 0) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Train on activations (N, d_in) sampled with replacement; returns the SAE and its training record (final
    loss, features dead over the last `dead_window` tokens)."""
    if acts.dim() != 2 or acts.shape[1] != cfg.d_in:
        raise ValueError(f"activations must be (N, {cfg.d_in}), got {tuple(acts.shape)}")
    acts = acts.float()
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.scale.fill_(float(cfg.d_in / acts.pow(2).sum(-1).mean()) ** 0.5)
        sae.b_dec.copy_((acts * sae.scale).mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    since_fired = torch.zeros(cfg.n_features, dtype=torch.long)                # tokens since each feature last fired
    history = []
    for step in range(cfg.steps):
        x = acts[torch.randint(len(acts), (cfg.batch_size,), generator=g)] * sae.scale
        f = sae.features(x)
        recon = f @ sae.W_dec.T + sae.b_dec
        mse = (recon - x).pow(2).sum(-1).mean()
        loss = mse + (cfg.l1 * (f * sae.W_dec.norm(dim=0)).sum(-1).mean() if cfg.kind == "l1" else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # no gradient along the unit-norm constraint (Bricken et al.)
            w = sae.W_dec
            w.grad -= (w.grad * w).sum(0, keepdim=True) * w
        opt.step()
        sae.normalize_decoder()
        fired = (f > 0).any(0)
        since_fired = torch.where(fired, 0, since_fired + cfg.batch_size)
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            history.append({"step": step, "loss": float(loss.detach()), "mse_normalised": float(mse.detach()),
                            "l0": float((f > 0).sum(-1).float().mean())})
    dead = int((since_fired >= min(cfg.dead_window, cfg.steps * cfg.batch_size)).sum())
    return sae.eval(), {"final_loss": float(loss.detach()), "dead_in_training": dead, "history": history}


# ---- splicing and the metrics -------------------------------------------------------------------------------

class Splice(_Hooks):
    """Replaces residual stream `stream` by fn(stream) for every forward inside the block; removed on exit, an
    exception included."""

    def __init__(self, model: Transformer, stream: int, fn) -> None:
        super().__init__(model)
        n = model.config.n_layer
        if not 0 <= stream <= n:
            raise ValueError(f"residual stream {stream} out of range: the model has streams 0..{n}")
        self.stream, self.fn = stream, fn

    def _register(self) -> None:
        blocks = self.model.blocks
        if self.stream < len(blocks):
            h = blocks[self.stream].register_forward_pre_hook(lambda m, args: (self.fn(args[0]), *args[1:]))
        else:
            h = blocks[-1].register_forward_hook(lambda m, args, out: self.fn(out))
        self._handles.append(h)


def loss_recovered(l_clean: float, l_sae: float, l_zero: float) -> float:
    """(L_zero_ablate - L_sae) / (L_zero_ablate - L_clean): 1 when the SAE costs nothing, 0 when splicing it
    in is as bad as zeroing the stream (SAELens' `ce_loss_score`)."""
    if l_zero == l_clean:
        raise ValueError("zero-ablating the stream does not change the loss: loss recovered is undefined")
    return (l_zero - l_sae) / (l_zero - l_clean)


@torch.no_grad()
def lm_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor, stream: int | None = None, fn=None,
            batch: int = 16) -> float:
    """Mean next-token cross-entropy over targets y != -100, with stream replaced by fn(stream) if given."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(x), batch):
            with Splice(model, stream, fn) if fn is not None else contextlib.nullcontext():
                logits = model(x[i:i + batch]).logits.float()
            yb = y[i:i + batch]
            total += float(F.cross_entropy(logits.flatten(0, 1), yb.flatten(), ignore_index=-100, reduction="sum"))
            count += int((yb != -100).sum())
    finally:
        model.train(was)
    return total / count


@torch.no_grad()
def stream_activations(model: Transformer, x: torch.Tensor, stream: int, batch: int = 16) -> torch.Tensor:
    """Residual stream `stream` over windows x (n, T) -> (n, T, d)."""
    if not 0 <= stream <= model.config.n_layer:
        raise ValueError(f"--layer {stream} out of range: the model has residual streams 0..{model.config.n_layer}")
    return torch.cat([run_with_residuals(model, x[i:i + batch])[1][stream] for i in range(0, len(x), batch)])


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, model: Transformer, x: torch.Tensor, y: torch.Tensor,
             acts: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> dict[str, float]:
    """The field's SAE metrics on held-out windows x, y (n, T); `keep` (n, T) bool picks the tokens counted in
    the activation metrics (default all)."""
    s = sae.cfg.stream
    acts = stream_activations(model, x, s) if acts is None else acts
    a = acts[keep] if keep is not None else acts.flatten(0, -2)
    recon, f = sae(a)
    err = (recon - a).pow(2).sum(-1)
    fired = (f > 0).float()
    freq = fired.mean(0)
    l_clean = lm_loss(model, x, y)
    l_sae = lm_loss(model, x, y, s, lambda h: sae(h)[0].to(h.dtype))
    l_zero = lm_loss(model, x, y, s, torch.zeros_like)
    return {"mse": float(err.mean()), "fvu": float(err.sum() / (a - a.mean(0)).pow(2).sum(-1).sum()),
            "l0": float(fired.sum(-1).mean()), "dead_share": float((freq == 0).float().mean()),
            "dense_share": float((freq > DENSE).float().mean()), "loss_clean": l_clean, "loss_sae": l_sae,
            "loss_zero_ablated": l_zero, "loss_recovered": loss_recovered(l_clean, l_sae, l_zero),
            "tokens": len(a)}


# ---- saving -------------------------------------------------------------------------------------------------

WEIGHTS, CONFIG = "sae.safetensors", "config.json"


def save_sae(sae: SparseAutoencoder, out: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """out/sae.safetensors + out/config.json, written in a temporary folder and renamed into place; refused if
    `out` exists (an SAE someone trained is never overwritten)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; remove it or choose another --name for the new SAE")
    with staged_dir(out, replace=False) as tmp:
        save_file({k: v.detach().contiguous() for k, v in sae.state_dict().items()}, str(tmp / WEIGHTS))
        atomic_write_text(tmp / CONFIG, json.dumps({"sae": asdict(sae.cfg), **(extra or {})}, indent=1) + "\n")
    return out


def load_sae(path: str | Path) -> SparseAutoencoder:
    from safetensors.torch import load_file

    path = Path(path)
    cfg = SAEConfig(**json.loads((path / CONFIG).read_text())["sae"])
    sae = SparseAutoencoder(cfg)
    sae.load_state_dict(load_file(str(path / WEIGHTS)))
    return sae.eval()


# ---- ground truth: purity -----------------------------------------------------------------------------------

def purity(feats: torch.Tensor, labels: torch.Tensor, n_classes: int, min_count: int = 20) -> np.ndarray:
    """Per feature, the share of its activation mass on labelled tokens that falls on its majority class:
    max_j sum_{t: label_t = j} f_t / sum_{t: label_t >= 0} f_t (1 / n_classes at best spread, 1 = one class),
    Bricken et al. 2023's activation-weighted specificity taken over the labelled tokens only. Tokens without a
    class (label -1) are left out: firing on a template word says how selective a feature is for labelled
    tokens at all (`labelled_share`), not which class it belongs to, and counting it as impurity made a
    feature's score mostly that selectivity. feats (N, F) >= 0; labels (N,) in -1 or 0..n_classes-1. NaN for
    features firing on fewer than `min_count` labelled tokens: the majority share of a few firings is biased up
    (by count, 5 firings spread at random over 6 balanced classes give 0.43 on average, 20 give 0.29)."""
    m = labels >= 0
    feats, labels = feats[m].double(), labels[m]
    onehot = F.one_hot(labels, n_classes).double()                             # (N, C)
    mass = onehot.T @ feats                                                    # (C, F)
    out = (mass.max(0).values / feats.sum(0).clamp_min(1e-30)).numpy()
    out[((feats > 0).sum(0) < min_count).numpy()] = np.nan
    return out


def labelled_share(feats: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per feature, the share of its activation mass on labelled tokens (labels >= 0); NaN if it never fires."""
    feats = feats.double()
    total = feats.sum(0)
    return (feats[labels >= 0].sum(0) / total).where(total > 0, torch.nan).numpy()


def superiority(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Vargha & Delaney's A = P(a > b) + P(a = b) / 2 for one draw from each sample (Mann-Whitney U / (n_a n_b)),
    and the one-sided p-value of a Mann-Whitney U test of "a tends to be larger", from the normal approximation
    with the tie correction (Mann & Whitney 1947; exact enough for the hundreds of features compared here)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    n, m = len(a), len(b)
    if not n or not m:
        raise ValueError(f"both samples must be non-empty (got {n} and {m})")
    both = np.concatenate([a, b])
    _, inv, counts = np.unique(both, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inv]                        # average ranks, 1-based
    u = ranks[:n].sum() - n * (n + 1) / 2
    N = n + m
    var = n * m / 12 * (N + 1 - (counts ** 3 - counts).sum() / (N * (N - 1))) if N > 1 else 0.0
    if var <= 0:  # every value equal: no evidence either way
        return float(u / (n * m)), 0.5
    z = (u - n * m / 2 - 0.5) / var ** 0.5                                     # continuity-corrected
    return float(u / (n * m)), float(0.5 * math.erfc(z / 2 ** 0.5))
