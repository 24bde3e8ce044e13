"""CPU fast paths for model.py: the same arithmetic in fewer passes, applied explicitly where it pays.

    fast.for_training(model)              # the Trainer, on CPU: fused head + loss, RMSNorm's gradient
    step = fast.decoder(model)            # generation: one-token steps on transposed weights (or None)

Without them model.py computes the same numbers; tests/test_fast.py checks each path against it for every
config switch. Each path implements the ModelConfig switches listed in SWITCHES. A config with a value or a
field these tables do not name (a switch added to ModelConfig and written only in model.py) gets the plain
path, and tests/test_fast.py, which enumerates ModelConfig's fields, fails until the switch is written here.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from .config import ModelConfig
from .model import KVCache, LMHead, RMSNorm, Transformer

# The architectural switches the fast paths implement, with the values they implement.
SWITCHES: dict[str, tuple[object, ...]] = {
    "norm": ("layernorm", "rmsnorm"), "pos_encoding": ("learned", "rope"), "mlp": ("gelu", "swiglu"),
    "prenorm": (True, False), "final_norm": (True, False), "tie_embeddings": (True, False), "bias": (True, False),
}
# Fields that set sizes and constants the fast paths read as they are: any valid value works.
ANY_VALUE = frozenset({"family", "vocab_size", "n_layer", "n_head", "n_embd", "block_size", "n_kv_head",
                       "intermediate_size", "dropout", "norm_eps", "rope_theta", "init_std", "pad_token_id"})


def supports(cfg: ModelConfig) -> bool:
    """Do the fast paths implement every field of `cfg`, with its value?"""
    names = {f.name for f in dataclasses.fields(cfg)}
    return names <= ANY_VALUE | SWITCHES.keys() and all(getattr(cfg, k) in v for k, v in SWITCHES.items())


# ---- training -------------------------------------------------------------------------------------

class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its gradient written out, for training on CPU. There `F.rms_norm` runs as separate pow,
    mean, rsqrt and mul ops and autograd builds their backward op by op: forward + backward take ~5x the time
    of `F.layer_norm` on a (4096, 64) input, and this takes ~0.4x of theirs. With r = 1/rms(x) per row and
    x̂ = x * r, forward is one dot product per row and two passes; backward, dw = sum(g * x̂) and
    dx = r * (g*w - x̂ * mean(g*w * x̂)), is five."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        r = torch.rsqrt(torch.linalg.vecdot(xf, xf).unsqueeze(-1) / x.shape[-1] + eps)   # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        xhat = x.float() * r
        g = grad.float()
        grad_w = (g * xhat).sum(tuple(range(g.dim() - 1))).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gw = g * weight.float()
        mean = torch.linalg.vecdot(gw, xhat).unsqueeze(-1) / x.shape[-1]
        return gw.sub_(xhat.mul_(mean)).mul_(r).to(x.dtype), grad_w, None


class FusedRMSNorm(RMSNorm):
    """RMSNorm whose CPU training step takes _RMSNormFunction; elsewhere RMSNorm's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        return super().forward(x)


class HeadCrossEntropy(torch.autograd.Function):
    """logits = x @ W.T and their mean cross-entropy as one autograd op, for training on CPU.

    Autograd's version makes five passes over the (N, vocab) logits after the matmul: log_softmax
    writes log-probabilities; backward zero-fills a gradient, scatters -1/N into it, and log_softmax's
    backward reads both and writes a third tensor. Here forward computes the softmax, takes the loss
    from log p(target) (N values; a row whose p(target) underflows to 0 is redone from its logits), turns
    the probabilities into the gradient in place (-1 at each target: softmax - one-hot), and backward
    only multiplies it, with 1/N and the ignored rows folded into the small (N, C) operands instead of
    the large one. That halves the passes over logits: 33% less time for head + loss on the tiny preset
    (vocab 1024), the same on the reference config where the matmuls dominate (benchmarks/README.md).
    The logits are returned as well, and gradients that reach them are honoured."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x (N, C), weight (V, C), targets (N,) in [0, V) wherever valid (N,) is True
        ctx.set_materialize_grads(False)  # unused logits get None, not a zero-filled (N, V) gradient
        logits = x @ weight.t()                                             # (N, V)
        grad = torch.softmax(logits, -1, dtype=torch.float32)              # p, becomes dloss/dlogits
        index = targets.clamp_min(0)[:, None]
        p = grad.gather(1, index).squeeze(1)                                # p(target), (N,)
        picked = p.log()
        lost = p == 0                                                       # underflow: log p from logits
        if lost.any():
            rows = lost.nonzero().squeeze(1)
            exact = logits[rows].float()
            picked[rows] = exact.gather(1, index[rows]).squeeze(1) - exact.logsumexp(-1)
        count = valid.sum()
        loss = -torch.where(valid, picked, 0.0).sum() / count
        grad.scatter_add_(1, index, torch.full_like(picked, -1.0)[:, None])  # softmax - one-hot
        ctx.save_for_backward(x, weight, grad, valid, count)
        return loss, logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor | None, grad_logits: torch.Tensor | None):
        x, weight, grad, valid, count = ctx.saved_tensors
        rows = valid[:, None].to(x.dtype)                                   # ignored rows contribute 0
        if grad_loss is None:
            grad, rows = grad_logits, torch.ones_like(rows)
        elif grad_logits is None:
            rows = rows * (grad_loss / count)
        else:
            grad, rows = grad * (rows * (grad_loss / count)) + grad_logits, torch.ones_like(rows)
        grad = grad.to(x.dtype)
        grad_x = (grad @ weight) * rows                                     # (N, C)
        grad_w = grad.t() @ (x * rows)                                      # (V, C)
        return grad_x, grad_w, None, None


class FusedLMHead(LMHead):
    """LMHead whose CPU training step takes HeadCrossEntropy; elsewhere LMHead's own logits and loss."""

    def logits_and_loss(self, x: torch.Tensor, targets: torch.Tensor,
                        ignore: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not (x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad):
            return super().logits_and_loss(x, targets, ignore)
        B, T, C = x.shape
        loss, logits = HeadCrossEntropy.apply(x.reshape(B * T, C), self.weight, targets.reshape(-1),
                                              ~ignore.reshape(-1))
        return logits.view(B, T, -1), loss


def for_training(model: Transformer) -> Transformer:
    """Give `model` the fused CPU training modules, in place, and return it. Each RMSNorm and the LMHead
    becomes its fused subclass: the same object with the same parameters (state dict, optimizer state and a
    tied head are untouched), so this may run before or after the optimizer is built. A config these paths
    do not implement is left as it is."""
    if supports(model.config):
        for module in model.modules():
            if type(module) is RMSNorm:
                module.__class__ = FusedRMSNorm
            elif type(module) is LMHead:
                module.__class__ = FusedLMHead
    return model


# ---- decoding -------------------------------------------------------------------------------------

class _Layer(NamedTuple):
    """One block's tensors: norms as (weight, bias or None), linears as (transposed weight, bias or None)."""
    norm1: tuple[torch.Tensor, torch.Tensor | None]
    qkv: tuple[torch.Tensor, torch.Tensor | None]
    proj: tuple[torch.Tensor, torch.Tensor | None]
    norm2: tuple[torch.Tensor, torch.Tensor | None]
    fc: tuple[torch.Tensor, torch.Tensor | None]
    out: tuple[torch.Tensor, torch.Tensor | None]


def _norm_params(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return m.weight, getattr(m, "bias", None)  # RMSNorm and LayerNorm(bias=False) have none


def _transposed(m: torch.nn.Module) -> Any:
    if hasattr(m, "effective_weight"):  # a LoRA layer (tune/lora.py): W + its low-rank update unless merged already
        return m.effective_weight().t().contiguous(), m.bias
    if not isinstance(m, torch.nn.Linear):
        return m.operands()  # a quantized linear (quant.py): its kernel with the operands bound, or (Ŵ.T, b)
    return m.weight.t().contiguous(), m.bias


def _linear_t(x: torch.Tensor, wb: Any) -> torch.Tensor:
    if not isinstance(wb, tuple):
        return wb(x)
    wt, b = wb
    return torch.mm(x, wt) if b is None else torch.addmm(b, x, wt)


# Optimizer steps taken in this process. The fused AdamW kernel (the Trainer's) writes the parameters without
# moving their version counters, so a key of versions alone kept a decoder of the weights before the step.
_optimizer_steps = 0


def _count_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_step)


def _weights_key(model: Transformer) -> tuple[Any, ...]:
    """Changes when any weight is replaced or modified in place: the version counter moves with in-place writes
    (load_state_dict, `p.mul_()`, the unfused optimizers), and any optimizer step in the process counts."""
    return (_optimizer_steps, *((p.data_ptr(), p._version) for p in (*model.parameters(), *model.buffers())))


class Decoder:
    """Transformer.forward for one new token per row with a KV cache, in eval mode, as direct tensor calls.

    The same arithmetic as model.py without its per-call overhead (module calls, dropout in eval, view
    juggling): at batch 1 a decoding step of the reference model is about 200 small ops, and their dispatch
    costs nearly as much as reading the weights (benchmarks/README.md). Linear weights are read from
    transposed contiguous copies: for one token, `x @ W.T` with W.T stored contiguously streams the weight
    ~1.3-2x faster than nn.Linear's layout (MKL sgemv against sgemm). Attention is three small ops per layer,
    below ATen's parallel grain: SDPA's CPU kernel costs several times more at one query per row. Query
    heads sharing a kv head are grouped (B, K, H/K, D), so grouped-query attention repeats no keys."""

    def __init__(self, model: Transformer) -> None:
        self.config = cfg = model.config
        self.key = _weights_key(model)
        with torch.no_grad():
            self.layers = [_Layer(_norm_params(b.norm1), _transposed(b.attn.qkv), _transposed(b.attn.proj),
                                  _norm_params(b.norm2), _transposed(b.mlp.fc), _transposed(b.mlp.proj))
                           for b in model.blocks]
            self.head = _transposed(model.lm_head)                           # (C, vocab), no bias
        self.final = _norm_params(model.norm_f) if model.norm_f is not None else None
        emb = model.tok_emb  # a QuantEmbedding (quant.py) reads rows of the quantized head
        if isinstance(emb, torch.nn.Embedding):
            with torch.no_grad():  # with LoRA's trained rows (tune/lora.py) in place
                self.tok_emb = (emb.effective_weight() if hasattr(emb, "effective_weight") else emb.weight).__getitem__
        else:
            self.tok_emb = emb.lookup()
        self.pos_emb = model.pos_emb.weight if model.pos_emb is not None else None
        self.rope = (model.rope_cos, model.rope_sin) if cfg.pos_encoding == "rope" else None

    def __call__(self, idx: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, 1) -> (B, vocab) logits, as `model(idx, cache=cache, attention_mask=attention_mask,
        position_ids=position_ids).logits[:, -1]` would give; the cache grows by one position."""
        cfg = self.config
        B, C, H, K, D = idx.shape[0], cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        G, kv_dim, pos = H // K, K * D, cache.length
        S = pos + 1
        if S > cfg.block_size:
            raise ValueError(f"sequence of {S} tokens exceeds block_size {cfg.block_size}")
        rms, eps, scale = cfg.norm == "rmsnorm", cfg.norm_eps, D**-0.5
        prenorm, swiglu = cfg.prenorm, cfg.mlp == "swiglu"

        def norm(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
            if rms:
                return F.rms_norm(x, (C,), wb[0], eps)
            return F.layer_norm(x, (C,), wb[0], wb[1], eps)

        at = pos if position_ids is None else position_ids[:, -1]           # int, or (B,) per row
        x = self.tok_emb(idx[:, 0])                                          # (B, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb[at]
        if self.rope is not None:
            cos, sin = self.rope[0][at], self.rope[1][at]                    # (D,) or (B, D)
            if cos.dim() == 2:
                cos, sin = cos[:, None], sin[:, None]                        # (B, 1, D): every head of a row
        hidden = None
        if attention_mask is not None:  # padded keys stay out; a query always sees itself (model.py's mask)
            hidden = ~attention_mask[:, :S].bool()
            hidden[:, pos] = False
            hidden = hidden[:, None, None, :]                                # (B, 1, 1, S)
        for i, layer in enumerate(self.layers):
            h = norm(x, layer.norm1) if prenorm else x
            qkv = _linear_t(h, layer.qkv)                                    # (B, C + 2 * K * D)
            qk = qkv[:, :C + kv_dim].view(B, H + K, D)
            if self.rope is not None:                                        # q and k rotated together
                q1, q2 = qk.chunk(2, dim=-1)
                qk = qk * cos + torch.cat([-q2, q1], dim=-1) * sin
            q = qk[:, :H].reshape(B * K, G, D) * scale
            k_all, v_all = cache.k[i], cache.v[i]                            # (B, K, max_len, D)
            k_all.select(2, pos).copy_(qk[:, H:])                            # (B, K, D)
            v_all.select(2, pos).copy_(qkv[:, C + kv_dim:].view(B, K, D))
            keys = k_all.narrow(2, 0, S).flatten(0, 1)                       # (B * K, S, D)
            values = v_all.narrow(2, 0, S).flatten(0, 1)
            att = torch.bmm(q, keys.transpose(1, 2))                         # (B * K, G, S)
            if hidden is not None:
                att = att.view(B, K, G, S).masked_fill(hidden, float("-inf")).view(B * K, G, S)
            y = _linear_t(torch.bmm(att.softmax(-1), values).view(B, C), layer.proj)
            x = x + y if prenorm else norm(x + y, layer.norm1)
            h = _linear_t(norm(x, layer.norm2) if prenorm else x, layer.fc)
            if swiglu:
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = F.gelu(h, approximate="tanh")
            y = _linear_t(h, layer.out)
            x = x + y if prenorm else norm(x + y, layer.norm2)
        cache.length += 1
        if self.final is not None:
            x = norm(x, self.final)
        return _linear_t(x, self.head)                                       # (B, vocab)


# Decoders of models that generate again and again (the server's loaded models), kept between calls: building
# one copies every weight (~85 ms for the 14M-parameter reference model, 5-10% of a 128-token generation).
_KEPT: weakref.WeakKeyDictionary[Transformer, Decoder] = weakref.WeakKeyDictionary()


def forget(model: Transformer) -> None:
    """Drop the Decoder held for `model` (its weights change in a way _weights_key does not see: LoRA adapters
    switched off, tune/lora.py)."""
    _KEPT.pop(model, None)


def decoder(model: Transformer, *, keep: bool = True) -> Decoder | None:
    """A Decoder for `model` (in eval mode), or None where it does not apply: weights other than fp32 on the
    CPU, a config outside SWITCHES, or a model with forward hooks (steering, lab/interp/steer.py: the Decoder
    calls no module, so a hook would silently not run). keep: hold it (a second copy of the weights) for the next
    call, rebuilt when a weight has changed since; False drops a held one (a model that trains between
    generations)."""
    params = list(model.parameters())
    if not supports(model.config) or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return None
    held = _KEPT.get(model)
    dec = held if held is not None and held.key == _weights_key(model) else Decoder(model)
    if keep:
        _KEPT[model] = dec
    else:
        _KEPT.pop(model, None)
    return dec
