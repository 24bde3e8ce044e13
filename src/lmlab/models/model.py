"""The one transformer: GPT-1, GPT-2 and Llama-style models are configurations of this file.

Read top to bottom: norms and RoPE -> KV cache -> attention -> MLP -> block -> head -> Transformer.
Shapes in comments: B batch, T new tokens, S cached + new tokens, H query heads, K kv heads, D head dim.

This file is the one path: every architectural switch of ModelConfig is written here once. Faster CPU
versions of some of it (a fused head + loss and an RMSNorm with its gradient written out for training; a
one-token decoding step on transposed weights) live in fast.py, applied explicitly by the Trainer and by
generation, and checked against this file for every config switch (tests/test_fast.py).
"""

from __future__ import annotations

import math
from pathlib import Path
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
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


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
        self.qkv = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * kv_dim, bias=cfg.bias)  # fused q, k, v
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def heads(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, D), k and v (B, K, T, D) of the input x (B, T, C), RoPE applied: the one projection of
        the forward and of the interpretability lab's attention recorder."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.heads(x, rope)
        causal = mask is None and (cache is None or cache.length == 0) and T > 1
        if cache is not None:
            k, v = cache.update(layer, k, v)                              # (B, K, S, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)                     # (B, H, T, D)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.intermediate_size
        # SwiGLU (Shazeer 2020): gate and up projections fused into one matmul, [gate; up].
        self.fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
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


class LMHead(nn.Linear):
    """The output projection, and the loss over its logits. fast.py swaps in one that fuses the two."""

    def logits_and_loss(self, x: torch.Tensor, targets: torch.Tensor,
                        ignore: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C), targets (B, T), ignore (B, T) bool -> logits (B, T, vocab), mean cross-entropy
        over the targets not ignored (computed in fp32)."""
        logits = self(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.masked_fill(ignore, -100).flatten(),
                               ignore_index=-100)
        return logits, loss


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
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size, bias=False)
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
        return ModelOutput(*self.lm_head.logits_and_loss(x, targets, ignore))

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

    @staticmethod
    def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        """Left padding: real tokens count positions from 0, as if the row had no padding."""
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device` (CPU: the kernel's MemAvailable); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
