"""Looking inside a model through forward hooks on the one transformer of models/model.py: the residual stream
at every layer boundary (recorded, or overwritten at chosen positions), the attention probabilities of every
head, the logit lens, and activation patching. Nothing here is a second copy of the model's forward: the
model runs as it always does and the hooks read or replace what flows between its blocks, as TransformerLens'
HookPoints and nnsight do.

Residual streams are numbered 0..n_layer: stream s < n_layer is the input of block s (stream 0: the token and
position embeddings), stream n_layer the output of the last block (before the final norm).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...models import Transformer


class _Hooks:
    """Registers forward hooks on enter and always removes them on exit, an exception included."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self._handles: list[Any] = []

    def __enter__(self):
        try:
            self._register()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _register(self) -> None:
        raise NotImplementedError


class Residuals(_Hooks):
    """Records the residual stream at every layer boundary: `streams[s]` (B, T, C) for s in 0..n_layer.

    `patch` overwrites entries before they are recorded and before the next block reads them: {stream: mask
    (B or 1, T) bool} takes `source[stream]` (1 or B, T, C) where the mask is True (activation patching)."""

    def __init__(self, model: Transformer, patch: dict[int, torch.Tensor] | None = None,
                 source: list[torch.Tensor] | None = None) -> None:
        super().__init__(model)
        n = model.config.n_layer
        self.patch = patch or {}
        bad = [s for s in self.patch if not 0 <= s <= n]
        if bad:
            raise ValueError(f"residual stream {bad[0]} out of range: the model has streams 0..{n}")
        if self.patch and source is None:
            raise ValueError("patching needs the source streams to take values from")
        self.source = source
        self.streams: list[torch.Tensor | None] = [None] * (n + 1)

    def _register(self) -> None:
        blocks = self.model.blocks
        for s, block in enumerate(blocks):  # stream s < n_layer: what block s reads
            self._handles.append(block.register_forward_pre_hook(
                lambda m, args, s=s: (self._take(s, args[0]), *args[1:])))
        self._handles.append(blocks[-1].register_forward_hook(lambda m, args, out: self._take(len(blocks), out)))

    def _take(self, s: int, x: torch.Tensor) -> torch.Tensor:
        if s in self.patch:
            mask = self.patch[s].to(x.device)[..., None]                      # (B|1, T, 1)
            x = torch.where(mask, self.source[s].to(x.dtype), x)
        self.streams[s] = x
        return x


class AttentionRecorder(_Hooks):
    """Every layer's attention probabilities (B, H, T, S) as the model's SDPA call computes them, recomputed in
    a forward hook on each attention module from its own input and its own arguments (RoPE tables, the mask the
    model built, GQA's shared key heads): SDPA never materialises them. `probs` holds one tensor per layer in
    the order the layers ran."""

    def __init__(self, model: Transformer) -> None:
        super().__init__(model)
        self.probs: list[torch.Tensor] = []

    def _register(self) -> None:
        for block in self.model.blocks:
            self._handles.append(block.attn.register_forward_hook(self._hook))

    def _hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        x, rope, mask, cache = args[:4]
        if cache is not None:
            raise ValueError("attention is recorded on a whole-prompt forward, not one with a KV cache")
        self.probs.append(attention_probs(module, x, rope, mask))


def attention_probs(attn: torch.nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) of one Attention module on its input x (B, T, C) -> (B, H, T, T): causal when
    `mask` is None (the model's `is_causal`), else the model's boolean mask (True: may attend)."""
    T = x.shape[1]
    q, k, _v = attn.heads(x, rope)                                            # (B, H, T, D), (B, K, T, D)
    k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)             # SDPA's enable_gqa: kv head h // (H/K)
    scores = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)               # (B, H, T, T)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


# ---- logit lens ---------------------------------------------------------------------------------------------

def _ids(idx: torch.Tensor | list[int], model: Transformer) -> torch.Tensor:
    idx = torch.as_tensor(idx, dtype=torch.long, device=next(model.parameters()).device)
    return idx[None] if idx.dim() == 1 else idx


@torch.no_grad()
def run_with_residuals(model: Transformer, idx: torch.Tensor | list[int], patch: dict[int, torch.Tensor] | None = None,
                       source: list[torch.Tensor] | None = None, last_only: bool = False,
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward of `idx` ((T,) or (B, T)) in eval mode: (logits (B, T, V), or (B, 1, V) with `last_only`,
    the residual streams)."""
    was = model.training
    model.eval()
    try:
        with Residuals(model, patch, source) as res:
            logits = model(_ids(idx, model), last_only=last_only).logits
    finally:
        model.train(was)
    return logits, res.streams


@torch.no_grad()
def logit_lens(model: Transformer, idx: torch.Tensor | list[int]) -> torch.Tensor:
    """nostalgebraist's logit lens (2020): every residual stream through the final norm and the head, as the
    model treats its last one. (T,) ids -> (n_layer + 1, T, V) logits; the last row is the model's own logits."""
    _, streams = run_with_residuals(model, idx)
    norm = model.norm_f if model.norm_f is not None else torch.nn.Identity()
    return torch.stack([model.lm_head(norm(s))[0] for s in streams])


def lens_table(logits: torch.Tensor, target: int | None = None, k: int = 5) -> dict[str, Any]:
    """From logit_lens' (L + 1, T, V): top-k token ids and probabilities per stream and position, and the
    probability and rank (0 = top) of `target` at each."""
    probs = logits.float().softmax(-1)
    top = probs.topk(k, dim=-1)
    out: dict[str, Any] = {"top_ids": top.indices.tolist(), "top_probs": top.values.tolist()}
    if target is not None:
        p = probs[..., target]
        out["target_prob"] = p.tolist()
        out["target_rank"] = (probs > p[..., None]).sum(-1).tolist()
    return out


@torch.no_grad()
def attention_patterns(model: Transformer, idx: torch.Tensor | list[int]) -> torch.Tensor:
    """(T,) ids -> (n_layer, n_head, T, T) attention probabilities of every head."""
    was = model.training
    model.eval()
    try:
        with AttentionRecorder(model) as rec:
            model(_ids(idx, model))
    finally:
        model.train(was)
    return torch.stack([p[0] for p in rec.probs])


# ---- activation patching ------------------------------------------------------------------------------------

def logit_diff(logits: torch.Tensor, target: int, foil: int) -> torch.Tensor:
    """logit[target] - logit[foil] at the last position, per row of (B, T, V)."""
    last = logits[:, -1].float()
    return last[:, target] - last[:, foil]


@torch.no_grad()
def activation_patching(model: Transformer, clean: list[int], corrupt: list[int], target: int,
                        foil: int | None = None) -> dict[str, Any]:
    """Causal tracing / activation patching (Meng et al. 2022, ROME; Heimersheim & Nanda 2024's "How to use and
    interpret activation patching"): run the corrupted prompt with the clean run's residual stream restored at
    one (stream, position) and measure the restored fraction of the logit difference
        (d_patched - d_corrupt) / (d_clean - d_corrupt),   d = logit[target] - logit[foil] at the last position;
    1 where the patch brings back the clean prediction, 0 where it does nothing. `foil` defaults to the
    corrupted run's most likely token other than `target`. Returns the (n_layer + 1, T) map and the three
    differences; each stream's T patches run as one batch."""
    if len(clean) != len(corrupt):
        raise ValueError(f"the clean and corrupted prompts must have the same number of tokens ({len(clean)} vs "
                         f"{len(corrupt)})")
    # logits at the last position only, in every run here: logit_diff reads nothing else, and the patched runs
    # (T rows per stream) would otherwise hold T x T x vocab numbers
    clean_logits, source = run_with_residuals(model, clean, last_only=True)
    corrupt_logits, _ = run_with_residuals(model, corrupt, last_only=True)
    if foil is None:
        order = corrupt_logits[0, -1].argsort(descending=True).tolist()
        foil = next(t for t in order if t != target)
    d_clean, d_corrupt = float(logit_diff(clean_logits, target, foil)), float(logit_diff(corrupt_logits, target, foil))
    if abs(d_clean - d_corrupt) <= 1e-6 * max(1.0, abs(d_clean)):  # a ratio of rounding errors otherwise
        raise ValueError("the clean and corrupted prompts give the same logit difference: nothing to restore")
    T = len(clean)
    one_each = torch.eye(T, dtype=torch.bool)                                 # row p patches position p
    rows = torch.tensor([corrupt] * T)
    restored = torch.stack([
        (logit_diff(run_with_residuals(model, rows, {s: one_each}, source, last_only=True)[0], target, foil)
         - d_corrupt)
        / (d_clean - d_corrupt) for s in range(model.config.n_layer + 1)])
    return {"restored": restored, "target": target, "foil": foil, "d_clean": d_clean, "d_corrupt": d_corrupt}


def restored_fraction(model: Transformer, clean: list[int], corrupt: list[int], target: int, foil: int,
                      patch: dict[int, torch.Tensor]) -> float:
    """The restored fraction of one patched run: `patch` {stream: mask (1, T)} of clean values."""
    clean_logits, source = run_with_residuals(model, clean, last_only=True)
    d_clean = logit_diff(clean_logits, target, foil)
    d_corrupt = logit_diff(run_with_residuals(model, corrupt, last_only=True)[0], target, foil)
    d = logit_diff(run_with_residuals(model, corrupt, patch, source, last_only=True)[0], target, foil)
    return float((d - d_corrupt) / (d_clean - d_corrupt))
