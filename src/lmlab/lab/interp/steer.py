"""Steering directions: a vector in the residual stream made from two contrastive sets of texts, added to the
stream at generation time or projected out of it.

The direction is the difference of the mean residual stream over the positive texts' tokens and over the
negative texts' tokens at one stream (Turner et al. 2023, "Activation Addition"; Rimsky et al. 2024,
"Contrastive Activation Addition"). `Steering` applies it through forward hooks (hooks.py's _Hooks: removed on
exit, an exception included):
  add:    x <- x + coef * v at that one stream, every position, the prompt's and each decoded token's;
  ablate: x <- x - (x . v^) v^ at every stream (every block's input and the last block's output), as Arditi et
          al. 2024 remove the refusal direction ("abliteration").
Both act position by position, so the KV-cached decode (which feeds one new token per step) computes what a
full recompute of the steered model would; models/fast.py's one-token Decoder skips module calls, so
fast.decoder() steps aside while a hook is registered.

Saved as a folder: direction.safetensors ({"direction": (n_embd,) float32}) and direction.json (the stream,
its norm and how it was made).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ...files import atomic_path, atomic_write_text
from ...models import Transformer
from .hooks import _Hooks, run_with_residuals

WEIGHTS, META = "direction.safetensors", "direction.json"
# the largest coefficient `Steering` adds, the web app's bound: 1e30 times a direction overflowed float32 in the
# stream's norm and sampling failed on NaN probabilities
MAX_COEF = 1000.0


@dataclass
class Direction:
    """A steering vector (n_embd,) for residual stream `layer` (hooks.py's numbering: 0 = the embeddings,
    s < n_layer the input of block s, n_layer the last block's output)."""
    vector: torch.Tensor
    layer: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vector = torch.as_tensor(self.vector).detach().float().cpu()
        if self.vector.dim() != 1 or not self.vector.numel():
            raise ValueError(f"a direction is one vector; got shape {tuple(self.vector.shape)}")
        if not bool(torch.isfinite(self.vector).all()):
            raise ValueError("the direction has non-finite values")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer ({self.layer!r}) must be a residual stream number >= 0")

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    def check(self, model: Transformer) -> None:
        """ValueError unless the direction fits `model`: its width and its stream."""
        cfg = model.config
        if self.vector.numel() != cfg.n_embd:
            raise ValueError(f"the direction has width {self.vector.numel()}, the model's residual stream "
                             f"{cfg.n_embd}: it was made on another model")
        if self.layer > cfg.n_layer:
            raise ValueError(f"the direction is for residual stream {self.layer}; the model has streams "
                             f"0..{cfg.n_layer}")

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / WEIGHTS) as tmp:
            save_file({"direction": self.vector.contiguous()}, str(tmp), metadata={"format": "pt"})
        info = {"layer": self.layer, "n_embd": self.vector.numel(), "norm": self.norm, **self.meta}
        atomic_write_text(folder / META, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        return folder

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """A direction folder, or its direction.safetensors (direction.json beside it); ValueError naming the
        file for anything else."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        weights, meta = folder / WEIGHTS, folder / META
        if not path.exists():
            raise ValueError(f"{path} does not exist")
        if not weights.is_file() or not meta.is_file():
            raise ValueError(f"{folder} is not a steering direction: it needs {WEIGHTS} and {META} (lmlab lab "
                             "interp steer writes them)")
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
            tensors = load_file(str(weights))
        except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as exc:
            raise ValueError(f"{folder}: unreadable direction files ({exc})") from None
        if not isinstance(info, dict) or "layer" not in info:
            raise ValueError(f"{meta}: no 'layer' field")
        if set(tensors) != {"direction"}:
            raise ValueError(f"{weights}: expected one tensor named 'direction', found {sorted(tensors)}")
        meta_rest = {k: v for k, v in info.items() if k not in ("layer", "n_embd", "norm")}
        return cls(tensors["direction"], info["layer"], meta_rest)


def mean_residual(model: Transformer, prompts: Sequence[Sequence[int]], layer: int) -> tuple[torch.Tensor, int]:
    """The mean of residual stream `layer` over every token of every prompt (each prompt run alone, so no
    padding enters the mean): ((n_embd,), tokens)."""
    total, count = torch.zeros(model.config.n_embd, dtype=torch.float64), 0
    for ids in prompts:
        _, streams = run_with_residuals(model, list(ids))
        total += streams[layer][0].double().sum(0).cpu()
        count += len(ids)
    return total / count, count


def difference_of_means(model: Transformer, positive: Sequence[Sequence[int]], negative: Sequence[Sequence[int]],
                        layer: int, meta: dict[str, Any] | None = None) -> Direction:
    """mean(stream `layer` over the positive prompts' tokens) - mean(over the negative prompts' tokens); `meta`
    (where the prompts came from) is kept in direction.json."""
    if not 0 <= layer <= model.config.n_layer:
        raise ValueError(f"layer {layer} out of range: the model has residual streams 0..{model.config.n_layer}")
    for name, sets in (("positive", positive), ("negative", negative)):
        if not sets or any(len(p) == 0 for p in sets):
            raise ValueError(f"the {name} set needs at least one non-empty prompt")
    pos, n_pos = mean_residual(model, positive, layer)
    neg, n_neg = mean_residual(model, negative, layer)
    # the same texts on both sides (in any order: float64 sums differ in the last bits): nothing to steer along,
    # and ablating it divides by its norm; refused before a caller saves it
    if float((pos - neg).norm()) <= 1e-9 * max(float(pos.norm()), float(neg.norm()), 1e-30):
        raise ValueError(f"the positive and negative sets have the same mean at stream {layer}: the direction is "
                         "zero; give sets that differ")
    return Direction((pos - neg).float(), layer, {"method": "difference of means", "positive_prompts": len(positive),
                                                   "positive_tokens": n_pos, "negative_prompts": len(negative),
                                                   "negative_tokens": n_neg, **(meta or {})})


class Steering(_Hooks):
    """Adds `coef` times the direction at its stream, or (ablate) projects the direction out of every stream,
    while the block is open. Also a no-op context when `direction` is None (generation without steering)."""

    def __init__(self, model: Transformer, direction: Direction | None, coef: float = 0.0,
                 ablate: bool = False) -> None:
        super().__init__(model)
        self.direction, self.coef, self.ablate = direction, float(coef), ablate
        if direction is None:
            return
        direction.check(model)
        if ablate and coef:
            raise ValueError("steer by adding (a coefficient) or by ablating, not both")
        if not math.isfinite(self.coef):
            raise ValueError(f"the coefficient ({coef}) must be a finite number")
        if abs(self.coef) > MAX_COEF:
            raise ValueError(f"the coefficient ({coef}) must be between -{MAX_COEF:g} and {MAX_COEF:g}")
        if ablate and direction.norm == 0:
            raise ValueError("a zero direction has nothing to project out")
        p = next(model.parameters())
        self.vector = direction.vector.to(p.device, p.dtype)
        self.unit = self.vector / self.vector.norm() if ablate else None

    def _register(self) -> None:
        if self.direction is None:
            return
        blocks, n = self.model.blocks, self.model.config.n_layer
        streams = range(n + 1) if self.ablate else [self.direction.layer]
        for s in streams:
            if s < n:  # the input of block s
                self._handles.append(blocks[s].register_forward_pre_hook(
                    lambda m, args: (self._edit(args[0]), *args[1:])))
            else:      # the last block's output
                self._handles.append(blocks[-1].register_forward_hook(lambda m, args, out: self._edit(out)))

    def _edit(self, x: torch.Tensor) -> torch.Tensor:
        if self.ablate:
            u = self.unit.to(x.dtype)
            return x - (x @ u)[..., None] * u                                   # (B, T, C) less its component on u
        return x + self.coef * self.vector.to(x.dtype)


# ---- measuring a direction ----------------------------------------------------------------------------------

def cyrillic_share(text: str) -> float | None:
    """Cyrillic letters / (Cyrillic + Latin letters) in `text`; None without any letter of either script."""
    cyr = sum(1 for c in text if "\u0400" <= c <= "\u04ff")
    lat = sum(1 for c in text if c.isascii() and c.isalpha())
    return cyr / (cyr + lat) if cyr + lat else None


@torch.no_grad()
def neutral_kl(model: Transformer, texts: Sequence[Sequence[int]], direction: Direction, coef: float = 0.0,
               ablate: bool = False) -> float:
    """Mean per-token KL(P_unsteered || P_steered) of the next-token distributions over every position of the
    neutral texts, in nats: what the steering costs where it should change nothing (Arditi et al. 2024 check
    their ablation the same way, on harmless text)."""
    total, count = 0.0, 0
    for ids in texts:
        plain, _ = run_with_residuals(model, list(ids))
        with Steering(model, direction, coef, ablate):
            steered, _ = run_with_residuals(model, list(ids))
        logp, logq = plain[0].float().log_softmax(-1), steered[0].float().log_softmax(-1)   # (T, V)
        total += float((logp.exp() * (logp - logq)).sum())
        count += len(ids)
    return total / count
