"""The one transformer: GPT-1, GPT-2 and Llama-style models are configurations of this file.

Read top to bottom: norms and RoPE -> attention -> MLP -> block -> KV cache -> Transformer.
Shapes in comments: B batch, T new tokens, S cached + new tokens, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    """Zhang & Sennrich 2019. Normalises in fp32 like HF Llama, so bf16 runs match fp32 ones closely."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


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


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(cfg: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of RoPE (Su et al. 2021) in the half-split layout HF Llama uses, each (length, D)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin broadcast to (B or 1, 1, T, D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Linear(nn.Linear):
    """nn.Linear that, while generating, may multiply by a transposed contiguous copy of its weight.

    For one token at a time on CPU, `x @ W.T` with W.T stored contiguously streams the weight ~1.3-2x
    faster than nn.Linear's layout (MKL sgemv vs sgemm; benchmarks/README.md). The copy is used only
    inside `Transformer.decoding()`. An eval-mode model keeps it between generate calls (rebuilding it
    costs ~85 ms for the 14M-parameter reference model, 5-10% of a 128-token generation) as long as the
    weight is unchanged; `train()` frees it, so training never holds the second copy."""

    decode_weight: torch.Tensor | None = None
    _decode_cache: tuple[int, int, torch.Tensor] | None = None  # (data_ptr, version, weight.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wt = self.decode_weight
        if wt is None or x.shape[-2] != 1:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, x.shape[-1])
        return _linear_t(x2, (wt, self.bias)).view(*x.shape[:-1], wt.shape[1])

    def transposed_weight(self) -> torch.Tensor:
        """W.T, contiguous; rebuilt only when the weight was replaced or modified in place (its version
        counter moves with every in-place write: optimizer steps, load_state_dict, `p.mul_()`)."""
        w = self.weight
        key = (w.data_ptr(), w._version)
        if self._decode_cache is None or self._decode_cache[:2] != key:
            with torch.no_grad():
                self._decode_cache = (*key, w.t().contiguous())
        return self._decode_cache[2]

    def train(self, mode: bool = True) -> Linear:
        if mode:
            self._decode_cache = None
        return super().train(mode)


class KVCache:
    """Preallocated keys/values for every layer: (n_layer, B, K, max_len, D). `length` is shared by all
    rows, which is why batched prompts are left-padded."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.max_len = max_len or cfg.block_size
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        k_all, v_all = self.k[layer], self.v[layer]                       # (B, K, max_len, D)
        k_all.narrow(2, self.length, k.shape[2]).copy_(k)
        v_all.narrow(2, self.length, k.shape[2]).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search picks which hypotheses survive)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.split = (cfg.n_embd, kv_dim, kv_dim)
        self.qkv = Linear(cfg.n_embd, cfg.n_embd + 2 * kv_dim, bias=cfg.bias)  # fused q, k, v
        self.proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        causal = mask is None and (cache is None or cache.length == 0) and T > 1
        if cache is not None:
            k, v = cache.update(layer, k, v)                              # (B, K, S, D)
        if T == 1 and cache is not None:
            y = self._attend_one(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head)                 # (B, H, T, D)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))

    def _attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
        """One query per row against the cache, as three small ops. SDPA's CPU flash kernel costs ~180 us
        per call at this size (B=1, H=6, S<=256, D=64; 7% of a decoding step), and its parallel region
        stalls on a busy machine; these ops are below ATen's parallel grain and take ~20 us. Query heads
        sharing a kv head are grouped (B, K, H/K, D), so GQA needs no repeated keys."""
        B, H, _, D = q.shape
        q = q.reshape(B, self.n_kv_head, H // self.n_kv_head, D) * D**-0.5  # (B, K, G, D)
        att = torch.matmul(q, k.transpose(-2, -1))                          # (B, K, G, S)
        if mask is not None:                                                # (B|1, 1, 1, S)
            att = att.masked_fill(~mask, float("-inf"))
        return torch.matmul(att.softmax(-1), v).view(B, H, 1, D)            # (B, H, 1, D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.intermediate_size
        # SwiGLU (Shazeer 2020): gate and up projections fused into one matmul, [gate; up].
        self.fc = Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.proj = Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-1/GPT-2's "gelu_new"
        return self.dropout(self.proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.prenorm = cfg.prenorm
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor, rope, mask, cache, layer: int) -> torch.Tensor:
        if self.prenorm:  # GPT-2 / Llama: x + f(norm(x))
            x = x + self.attn(self.norm1(x), rope, mask, cache, layer)
            return x + self.mlp(self.norm2(x))
        # GPT-1 (post-LN): norm(x + f(x))
        x = self.norm1(x + self.attn(x, rope, mask, cache, layer))
        return self.norm2(x + self.mlp(x))


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


class _DecodeLayer(NamedTuple):
    """One block's tensors for `Transformer._decode_one`: norms as (weight, bias or None), linears as
    (transposed weight, bias or None)."""
    norm1: tuple[torch.Tensor, torch.Tensor | None]
    qkv: tuple[torch.Tensor, torch.Tensor | None]
    proj: tuple[torch.Tensor, torch.Tensor | None]
    norm2: tuple[torch.Tensor, torch.Tensor | None]
    fc: tuple[torch.Tensor, torch.Tensor | None]
    out: tuple[torch.Tensor, torch.Tensor | None]


def _norm_params(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return m.weight, getattr(m, "bias", None)  # RMSNorm and LayerNorm(bias=False) have none


def _linear_t(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    wt, b = wb
    return torch.mm(x, wt) if b is None else torch.addmm(b, x, wt)


class ModelOutput(NamedTuple):
    logits: torch.Tensor              # (B, T, vocab) or (B, 1, vocab) with last_only
    loss: torch.Tensor | None = None  # mean cross-entropy over non-ignored targets


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_encoding == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg) if cfg.final_norm else None
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos_encoding == "rope":
            cos, sin = rope_tables(cfg, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, and residual projections scaled by
        1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth (Radford et al. 2019)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def configure_optimizer(self, lr: float, weight_decay: float = 0.1,
                            betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
        """AdamW with weight decay only on matrices (>= 2-D: linears and embeddings), never on norms and
        biases (nanoGPT's configure_optimizers), using the fused kernel (one launch for all tensors)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """Inference-only fast path for token-by-token decoding of fp32 weights on CPU: each Linear uses
        a transposed contiguous copy of its weight (doubling weight memory until `train()`)."""
        layers = [m for m in self.modules() if isinstance(m, Linear)]
        fast = all(m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 for m in layers)
        try:
            if fast:
                for m in layers:
                    m.decode_weight = m.transposed_weight()
                final = _norm_params(self.norm_f) if self.norm_f is not None else None
                self._decoder = ([self._decode_layer(b) for b in self.blocks], final, self.lm_head.decode_weight)
            yield
        finally:
            for m in layers:
                m.decode_weight = None
            self._decoder = None

    # (layers, final norm, transposed head) for _decode_one while inside decoding(); read once per step, so
    # another thread leaving its decoding() mid-step does not pull the tensors from under this one
    _decoder: tuple[list[_DecodeLayer], tuple[torch.Tensor, torch.Tensor | None] | None, torch.Tensor] | None = None

    @staticmethod
    def _decode_layer(block: Block) -> _DecodeLayer:
        def lin(m: Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
            return m.decode_weight, m.bias

        return _DecodeLayer(_norm_params(block.norm1), lin(block.attn.qkv), lin(block.attn.proj),
                            _norm_params(block.norm2), lin(block.mlp.fc), lin(block.mlp.proj))

    # ---- accounting --------------------------------------------------------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once). exclude_embeddings drops the position table and,
        if the head is untied, the token table, as in Kaplan et al. 2020's N."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N for the matmuls plus 12*L*T*d for attention
        scores (Kaplan et al. 2020; PaLM appendix B). N excludes embedding lookups but includes the head."""
        cfg = self.config
        n = self.num_parameters() - cfg.vocab_size * cfg.n_embd * (not cfg.tie_embeddings)
        n -= self.pos_emb.weight.numel() if self.pos_emb is not None else 0
        T = seq_len or cfg.block_size
        return 6 * n + 12 * cfg.n_layer * T * cfg.n_embd

    # ---- forward -----------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> ModelOutput:
        """idx (B, T) token ids. targets (B, T) aligned next tokens: -100 and pad_token_id are ignored, and
        so is every position whose attention_mask is 0. attention_mask (B, S) marks real tokens (1) among
        the cached and new positions, for left-padded batches. position_ids (B, T) default to the next
        positions after the cache. last_only computes logits for the final position only (generation)."""
        cfg = self.config
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > cfg.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {cfg.block_size}")
        decoder = self._decoder
        if (T == 1 and cache is not None and decoder is not None and targets is None
                and attention_mask is None and position_ids is None and not self.training):
            return ModelOutput(self._decode_one(idx, cache, *decoder).unsqueeze(1))
        x = self.tok_emb(idx)                                                 # (B, T, C)
        if self.pos_emb is not None:
            x = x + (self.pos_emb.weight[past:past + T] if position_ids is None else self.pos_emb(position_ids))
        rope = None
        if self.config.pos_encoding == "rope":
            if position_ids is None:
                rope = (self.rope_cos[past:past + T], self.rope_sin[past:past + T])
            else:
                rope = (self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1))
        mask = self._attention_mask(attention_mask, past, T, x.device)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, cache, i)
        if cache is not None:
            cache.length += T
        if self.norm_f is not None:
            x = self.norm_f(x)
        if last_only:
            return ModelOutput(self.lm_head(x[:, -1:]))
        if targets is None:
            return ModelOutput(self.lm_head(x))                               # (B, T, vocab)
        ignore = targets == -100
        if cfg.pad_token_id is not None:
            ignore |= targets == cfg.pad_token_id
        if attention_mask is not None:
            ignore |= attention_mask[:, -T:] == 0
        if x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad:
            loss, logits = HeadCrossEntropy.apply(x.reshape(B * T, -1), self.lm_head.weight,
                                                  targets.reshape(-1), ~ignore.reshape(-1))
            return ModelOutput(logits.view(B, T, -1), loss)
        logits = self.lm_head(x)                                              # (B, T, vocab)
        targets = targets.masked_fill(ignore, -100)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)
        return ModelOutput(logits, loss)

    @staticmethod
    def _attention_mask(attention_mask: torch.Tensor | None, past: int, T: int,
                        device: torch.device) -> torch.Tensor | None:
        """None when plain causal attention suffices (SDPA's fast path); otherwise a boolean (B|1, 1, T, S)
        mask: causal, no padded keys, and each query may always see itself so rows of padding stay finite."""
        if attention_mask is None and (past == 0 or T == 1):
            return None
        S = past + T
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        mask = (k_pos <= q_pos)[None, None]                                   # (1, 1, T, S)
        if attention_mask is not None:
            keys = attention_mask[:, None, None, :S].bool()                   # (B, 1, 1, S)
            mask = (mask & keys) | (k_pos == q_pos)[None, None]
        return mask

    def _decode_one(self, idx: torch.Tensor, cache: KVCache, layers: list[_DecodeLayer],
                    final: tuple[torch.Tensor, torch.Tensor | None] | None, head: torch.Tensor) -> torch.Tensor:
        """One new token per row, no padding, default positions: the whole forward as direct tensor calls.

        The same arithmetic as the modules above (the KV-cache tests compare the two), without their
        per-call overhead (module calls, dropout in eval, view juggling): at batch 1 a decoding step of the
        reference model is about 200 small ops, and their dispatch costs nearly as much as reading the weights
        (benchmarks/README.md). Used inside `decoding()` on CPU fp32. Returns (B, vocab) logits."""
        cfg = self.config
        B, C, H, K, D = idx.shape[0], cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        G, kv_dim, pos = H // K, K * D, cache.length
        S = pos + 1
        rms, eps, scale = cfg.norm == "rmsnorm", cfg.norm_eps, D**-0.5
        prenorm, rope, swiglu = cfg.prenorm, cfg.pos_encoding == "rope", cfg.mlp == "swiglu"

        def norm(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
            if rms:
                return F.rms_norm(x, (C,), wb[0], eps)
            return F.layer_norm(x, (C,), wb[0], wb[1], eps)

        x = self.tok_emb.weight[idx[:, 0]]                                    # (B, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[pos]
        if rope:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]                 # (D,)
        for i, layer in enumerate(layers):
            h = norm(x, layer.norm1) if prenorm else x
            qkv = _linear_t(h, layer.qkv)                                     # (B, C + 2 * K * D)
            qk = qkv[:, :C + kv_dim].view(B, H + K, D)
            if rope:                                                          # q and k rotated together
                q1, q2 = qk.chunk(2, dim=-1)
                qk = qk * cos + torch.cat([-q2, q1], dim=-1) * sin
            q = qk[:, :H].reshape(B * K, G, D) * scale
            k_all, v_all = cache.k[i], cache.v[i]                             # (B, K, max_len, D)
            k_all.select(2, pos).copy_(qk[:, H:])                             # (B, K, D)
            v_all.select(2, pos).copy_(qkv[:, C + kv_dim:].view(B, K, D))
            keys = k_all.narrow(2, 0, S).flatten(0, 1)                        # (B * K, S, D)
            values = v_all.narrow(2, 0, S).flatten(0, 1)
            att = torch.bmm(q, keys.transpose(1, 2)).softmax(-1)              # (B * K, G, S)
            y = _linear_t(torch.bmm(att, values).view(B, C), layer.proj)
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
        if final is not None:
            x = norm(x, final)
        return torch.mm(x, head)                                              # (B, vocab)

    @staticmethod
    def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        """Left padding: real tokens count positions from 0, as if the row had no padding."""
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
