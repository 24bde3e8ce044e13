"""LoRA: low-rank adapters on a frozen model (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", https://arxiv.org/abs/2106.09685), saved in PEFT's layout so `peft` loads them onto the HF export.

    from lmlab.tune.lora import LoRAConfig, apply_lora, save_adapter
    apply_lora(model, LoRAConfig(rank=8))          # base frozen; configure_optimizer now sees the adapters only
    ...train...
    save_adapter(model, "run/adapter")             # adapter_config.json + adapter_model.safetensors
    peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("demo-hf"), "run/adapter")

    lmlab train BOOKS --init runs/demo/final --lora-rank 8 --out runs/lora    # RUN/adapter, RUN/final merged
    lmlab lora merge runs/demo/final runs/lora/adapter --out merged           # a plain model directory

A targeted linear computes W x + (alpha / rank) · B A dropout(x), with A (rank, in) Kaiming-uniform and B
(out, rank) zero, so training starts from the base model exactly (PEFT's initialisation). Targets are named
as in the HF export, the names PEFT users give as `target_modules`: q_proj, k_proj, v_proj, o_proj, gate_proj,
up_proj, down_proj (Llama); c_attn, c_proj, c_fc (GPT-2, GPT-1); "all-linear" (the default) is every linear of
the blocks, never the output head. lmlab fuses q, k, v into one matrix (and gate, up into another): each HF
module is a segment of it with its own A and B, as in PEFT, so an adapter means the same thing on both sides
and converts both ways exactly; only the dropout mask is shared by the segments of one fused matrix.

`tokens` (and `chat_tokens`, `--lora-new-tokens`: the chat format's tokens, which add_chat_tokens appends to the
tokenizer with rows at the mean) also trains the embedding rows of those tokens, and the output head's when it is
untied (`head_tokens`: other rows for the head; with chat_tokens the head trains <|end|>'s row and not the role
markers', which are never a target): PEFT's `trainable_token_indices` (its TrainableTokens layer), which stores
the trained rows themselves and puts them in place of the frozen ones (the chat tokens' rows are new: PEFT needs
the export of the base resized to the run's vocabulary first, `resize_token_embeddings`, README). A token LoRA
cannot otherwise move, such as a new end-of-turn token whose row starts at the mean, costs a frozen-embedding run
most of its loss (docs/LOG.md, issue 16).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import refuse_nonempty, staged_dir
from ..interop.hf_mapping import hf_prefixes
from ..models import Transformer
from ..models.config import FAMILIES
from ..models.io import CHAT_TEMPLATE, GENERATION, TOKENIZER, TRAINING, WEIGHTS, load_pretrained, save_pretrained
from ..models.merge import require_finite
from ..models.model import LMHead
from ..models.quant import QUANTIZATION, refuse_quantized

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names
ALL_LINEAR = "all-linear"  # PEFT's spelling for "every linear layer but the output head"
_PREFIX = "base_model.model."  # PEFT's prefix of a PeftModelForCausalLM's keys
_ROWS = ".token_adapter.trainable_tokens_delta"  # PEFT's key of a TrainableTokens layer: the rows, not a delta
# the embedding's last name in the HF export of each family (embed_tokens, wte, tokens_embed): PEFT's key for it
_EMBEDDING_NAMES = {hf_prefixes(f)[1]["tok_emb.weight"].removesuffix(".weight").rsplit(".", 1)[-1] for f in FAMILIES}


def parse_targets(text: str | None) -> tuple[str, ...]:
    """--lora-targets (the API's lora_targets): a comma list of module names; None (not given) is every linear.
    A list that names nothing ("" or ",") is refused: it would have trained every linear layer unasked."""
    names = tuple(t.strip() for t in (ALL_LINEAR if text is None else text).split(",") if t.strip())
    if not names:
        raise ValueError(f"--lora-targets names no module ({text!r}); leave it out to adapt every linear layer")
    return names


# the web app's bound: the update is scaled by alpha / r, and at 2**63 the second step's loss was NaN (a divergence
# blamed on --lr)
MAX_ALPHA = 1e6


@dataclass(frozen=True)
class LoRAConfig:
    """rank r, alpha (the update is scaled by alpha / r), dropout on the adapter's input, target modules."""
    rank: int = 8
    alpha: float | None = None  # None: 2 * rank, LLaMA-Factory's default (PEFT's own is 8 whatever the rank)
    dropout: float = 0.0
    targets: tuple[str, ...] = (ALL_LINEAR,)
    tokens: tuple[int, ...] = ()  # token ids whose embedding (and untied head) rows train too
    chat_tokens: bool = False  # and the chat format's tokens (tune/chat.py), found in the run's tokenizer
    # an untied head's trained rows, when not those of the embedding (PEFT's trainable_token_indices as a dict
    # with two lists); None: the embedding's
    head_tokens: tuple[int, ...] | None = None
    # chat_tokens: the head rows of the role markers train too. They are never a target of the chat losses (the
    # assistant's turns and <|end|>), so by default only <|end|>'s head row trains and the budget goes elsewhere;
    # runs started before this option existed trained them (from_section)
    role_heads: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"the LoRA rank must be a positive integer, not {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
                                           and 0 < self.alpha < math.inf):
            raise ValueError(f"LoRA alpha must be a positive finite number, not {self.alpha!r}")
        if self.alpha is not None and self.alpha > MAX_ALPHA:
            raise ValueError(f"LoRA alpha ({self.alpha:g}) must be at most {MAX_ALPHA:g}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), not {self.dropout!r}")
        if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"LoRA targets must be a non-empty list of module names, not {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        for name in ("tokens", "head_tokens"):  # in order: PEFT's rows follow its list
            ids = getattr(self, name)
            if ids is None and name == "head_tokens":
                continue
            what = name.replace("_", " ")
            if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise ValueError(f"LoRA {what} must be a list of token ids, not {ids!r}")
            if len(set(ids)) < len(ids):
                raise ValueError(f"LoRA {what} are listed more than once in {list(ids)}")
            object.__setattr__(self, name, tuple(ids))
        for flag in ("chat_tokens", "role_heads"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LoRA {flag} must be true or false, not {getattr(self, flag)!r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(2 * self.rank))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets), "tokens": list(self.tokens),
                "head_tokens": None if self.head_tokens is None else list(self.head_tokens)}

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> LoRAConfig:
        """The config a run's config.json keeps (to_dict). A run written before `role_heads` existed trained the
        chat role markers' head rows: it resumes with them, so its checkpoints still fit."""
        section = dict(section)
        if section.get("chat_tokens") and "role_heads" not in section:
            section["role_heads"] = True
        return cls(**section)

    def row_ids(self, tokenizer: Any = None) -> tuple[list[int], list[int]]:
        """(the ids whose embedding rows train, those whose rows of an untied head train): `tokens` (the head:
        `head_tokens` if given), and with chat_tokens the chat format's tokens in `tokenizer`."""
        ids = list(self.tokens)
        head = list(ids if self.head_tokens is None else self.head_tokens)
        if self.chat_tokens:
            from .chat import chat_token_ids  # chat.py sits above the model code this module needs alone
            if tokenizer is None:
                raise ValueError("--lora-new-tokens needs the model's tokenizer")
            try:
                chat = chat_token_ids(tokenizer)
            except ValueError as exc:
                raise ValueError(f"--lora-new-tokens: {exc}") from None
            ids += [i for i in sorted(chat.values()) if i not in ids]
            head += [i for role, i in sorted(chat.items(), key=lambda kv: kv[1])
                     if i not in head and (self.role_heads or role == "end")]
        return ids, head

    def check(self, model: Transformer, tokenizer: Any = None) -> None:
        """ValueError for what apply_lora would refuse on `model`, which is left as it is: a run that puts the
        adapters on later (tune dpo: after the reference log-probabilities) checks before it writes anything."""
        _plan(model, self, tokenizer)

    def attach(self, model: Transformer, seed: int, tokenizer: Any = None) -> None:
        """The adapters on `model`, initialised from `seed`, unless it carries them already (train.recipes)."""
        if not lora_layers(model):
            torch.manual_seed(seed)
            apply_lora(model, self, tokenizer)

    def finish(self, model: Transformer, run_dir: str | Path, tokenizer: Any, final: Path) -> None:
        save_lora_run(model, run_dir, tokenizer, final)


def block_segments(model: Transformer) -> dict[str, list[tuple[str, int]]]:
    """Each block linear (our name within a block) -> its segments: (HF module name within the block, rows)."""
    cfg, block = model.config, model.blocks[0]
    if cfg.family != "llama":
        return {"attn.qkv": [("attn.c_attn", block.attn.qkv.out_features)], "attn.proj": [("attn.c_proj", cfg.n_embd)],
                "mlp.fc": [("mlp.c_fc", block.mlp.fc.out_features)], "mlp.proj": [("mlp.c_proj", cfg.n_embd)]}
    q, k, v = block.attn.split
    fc = block.mlp.fc.out_features
    return {"attn.qkv": [("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v)],
            "attn.proj": [("self_attn.o_proj", cfg.n_embd)],
            "mlp.fc": [("mlp.gate_proj", fc // 2), ("mlp.up_proj", fc // 2)] if block.mlp.swiglu
            else [("mlp.up_proj", fc)],
            "mlp.proj": [("mlp.down_proj", cfg.n_embd)]}


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a target module given by name: the module's name is it, or ends with '.' + it."""
    return target == ALL_LINEAR or name == target or name.endswith("." + target)


class LoRALinear(nn.Linear):
    """nn.Linear plus scale · B A dropout(x). Rows of the weight fall in segments (the HF modules fused into it);
    each adapted segment j has its own A_j (rank, in) and B_j (rows_j, rank): lora_A stacks the A_j, lora_B the
    B_j, and the update's B is their block diagonal with zero rows for the segments left alone."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def add_adapter(self, segments: list[tuple[int, bool]], config: LoRAConfig) -> None:
        """segments: (rows, adapted) in the weight's row order."""
        n, r = sum(a for _, a in segments), config.rank
        w = self.weight
        self.segments, self.rank, self.scale, self.merged, self.disabled = segments, r, config.scale, False, False
        self.lora_A = nn.Parameter(torch.empty(n * r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(sum(rows for rows, a in segments if a), r, device=w.device,
                                               dtype=w.dtype))
        for a in self.lora_A.data.split(r):  # PEFT's init per module: kaiming_uniform_(a=sqrt(5)), B zero
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        # in the layer's mode: an adapter put on a model in eval mode must not drop anything
        self.lora_dropout = (nn.Dropout(config.dropout) if config.dropout else nn.Identity()).train(self.training)

    def lora_pieces(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per segment: (A_j, B_j), or None for a segment without an adapter."""
        a_parts = iter(self.lora_A.split(self.rank))
        b_parts = iter(self.lora_B.split([rows for rows, a in self.segments if a]))
        return [(next(a_parts), next(b_parts)) if a else None for _, a in self.segments]

    def _full_B(self) -> torch.Tensor:
        """(out, n_adapted * rank): block-diagonal; a segment without an adapter is a block of zero columns."""
        return torch.block_diag(*(p[1] if p else self.lora_B.new_zeros(rows, 0)
                                  for p, (rows, _) in zip(self.lora_pieces(), self.segments)))

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self._full_B() @ self.lora_A)                # (out, in)

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer applies: W + scale · B A unless merged into W already or disabled (fast.py's
        decoder)."""
        return self.weight if self.merged or self.disabled else self.weight + self.delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self._full_B()) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight()
            self.merged = False


class TokenRows:
    """The embedding or the output head with the rows of some tokens taken from a trainable (k, in) `lora_rows`
    instead of its frozen weight (PEFT's TrainableTokens layer: it too keeps the rows themselves, not a delta).
    A head tied to the embedding reads the embedding's rows (`rows_of`), so one set of rows serves both, as in
    PEFT; merging writes the rows into the weight, unmerging writes back the originals."""

    weight: nn.Parameter

    def add_rows(self, ids: list[int], rows_of: Any = None) -> None:
        self.merged, self.disabled = False, False
        if rows_of is not None:  # not a submodule: its parameters are the embedding's
            self.__dict__["rows_of"] = rows_of
            return
        w = self.weight
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long, device=w.device), persistent=False)
        self.register_buffer("lora_original", w.detach()[ids].clone(), persistent=False)
        self.lora_rows = nn.Parameter(w.detach()[ids].clone())

    def _owner(self) -> Any:
        return self.__dict__.get("rows_of", self)

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer applies (also fast.py's decoder): the trained rows in place unless merged already
        or disabled."""
        o = self._owner()
        return self.weight if self.merged or self.disabled else self.weight.index_copy(0, o.token_ids, o.lora_rows)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.index_copy_(0, self._owner().token_ids, self._owner().lora_rows)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.index_copy_(0, self._owner().token_ids, self._owner().lora_original)
            self.merged = False


class TokenRowsEmbedding(TokenRows, nn.Embedding):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.effective_weight())


class TokenRowsHead(TokenRows, LMHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _adapted(model: nn.Module) -> list[Any]:
    """Every module that carries an adapter: the LoRA linears and the embedding and head with trained rows."""
    return [m for m in model.modules() if isinstance(m, (LoRALinear, TokenRows))]


def _plan(model: Transformer, config: LoRAConfig, tokenizer: Any
          ) -> tuple[dict[str, list[tuple[str, int]]], list[int], list[int]]:
    """apply_lora's refusals, all made before it changes anything: (block_segments, the token ids whose embedding
    rows train, those whose untied head rows train)."""
    if lora_layers(model):
        raise ValueError("this model has LoRA adapters already; merge them first (lmlab lora merge)")
    refuse_quantized(model)  # its integer weights are buffers: no adapter goes on them
    segments = block_segments(model)
    names = [hf for segs in segments.values() for hf, _ in segs]
    unknown = [t for t in config.targets if not any(_matches(n, t) for n in names)]
    if unknown:
        raise ValueError(f"unknown LoRA target {unknown[0]!r} for a {model.config.family} model; choose from "
                         f"{', '.join(dict.fromkeys(n.split('.')[-1] for n in names))} or {ALL_LINEAR}")
    shapes = [(rows, model.blocks[0].get_submodule(ours).in_features) for ours, segs in segments.items()
              for hf, rows in segs if any(_matches(hf, t) for t in config.targets)]
    rows, cols = min(shapes, key=min)
    if config.rank > min(rows, cols):  # a larger B A spans no more, only adds parameters (10^5 wrote 977 MB)
        raise ValueError(f"LoRA rank {config.rank} is above what the targeted matrices can use: the smallest is "
                         f"{rows}x{cols}; choose a rank of at most {min(rows, cols)}")
    ids, head = config.row_ids(tokenizer)
    if max(ids + head, default=-1) >= model.config.vocab_size:
        raise ValueError(f"LoRA token {max(ids + head)} is outside the model's vocabulary of "
                         f"{model.config.vocab_size}")
    if model.config.tie_embeddings and config.head_tokens is not None and list(config.head_tokens) != ids:
        raise ValueError("LoRA head tokens need an untied output head: a tied head reads the embedding's rows")
    return segments, ids, head


def apply_lora(model: Transformer, config: LoRAConfig, tokenizer: Any = None) -> Transformer:
    """Freeze every parameter of `model` and give the targeted block linears trainable adapters, in place
    (parameter names and the state dict keep theirs, plus `...lora_A` and `...lora_B`), and the config's tokens
    trainable rows (`tok_emb.lora_rows`, and `lm_head.lora_rows` for an untied head). Returns the model.
    ValueError for a target that names no module of this model, a token outside its vocabulary, or a model that
    has adapters already. `tokenizer`: where chat_tokens finds the chat format's tokens."""
    segments, ids, head = _plan(model, config, tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for ours, segs in segments.items():
            adapted = [(rows, any(_matches(hf, t) for t in config.targets)) for hf, rows in segs]
            if any(a for _, a in adapted):
                module = block.get_submodule(ours)
                module.__class__ = LoRALinear
                module.add_adapter(adapted, config)
    tied = model.config.tie_embeddings
    if ids:
        model.tok_emb.__class__ = TokenRowsEmbedding
        model.tok_emb.add_rows(ids)
    if (ids if tied else head):  # a tied head reads the embedding's rows
        model.lm_head.__class__ = TokenRowsHead
        model.lm_head.add_rows(head, model.tok_emb if tied else None)
    # what save_adapter writes into adapter_config.json: the tokens as ids
    model.lora_config = replace(config, tokens=tuple(ids), head_tokens=None if tied or head == ids else tuple(head),
                                chat_tokens=False, role_heads=False)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` is its frozen base: every adapter is skipped (PEFT's disable_adapter). This is how
    a LoRA run's reference model (DPO's, GRPO's KL) is the base itself, without a second copy of its weights. A
    model without adapters passes through unchanged; merged adapters are refused (W holds them)."""
    layers = _adapted(model)
    if any(m.merged for m in layers):
        raise ValueError("merged adapters cannot be disabled; unmerge them first")
    from ..models import fast
    fast.forget(model)  # a decoder kept with the adapters in its weights must not serve the base
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False
        fast.forget(model)


def merge(model: nn.Module) -> None:
    """Fold every adapter into its weight (W += scale · B A; trained rows written in place): the same outputs with
    plain matmuls."""
    for m in _adapted(model):
        m.merge()


def unmerge(model: nn.Module) -> None:
    """Undo merge(): W -= scale · B A (W is back up to float rounding), the tokens' original rows back."""
    for m in _adapted(model):
        m.unmerge()


def merge_and_unload(model: Transformer) -> Transformer:
    """PEFT's merge_and_unload: fold the adapters into the weights and drop them, leaving a plain Transformer
    (in place) whose state dict is a model directory's again."""
    for m in lora_layers(model).values():
        m.merge()
        del m.lora_A, m.lora_B, m.lora_dropout, m.segments, m.rank, m.scale, m.merged, m.disabled
        m.__class__ = nn.Linear
    rows = [(m, plain) for m, plain in ((model.tok_emb, nn.Embedding), (model.lm_head, LMHead))
            if isinstance(m, TokenRows)]
    for m, _ in rows:  # all merged before any is stripped: a tied head reads the embedding's rows
        m.merge()
    for m, plain in rows:
        for store in (m.__dict__, m._parameters, m._buffers):
            for name in ("lora_rows", "token_ids", "lora_original", "rows_of", "merged", "disabled"):
                store.pop(name, None)
        m.__class__ = plain
    model.__dict__.pop("lora_config", None)
    return model


def checkpoint_adapters(model: Transformer, section: dict[str, Any], checkpoint: Path) -> Callable[..., Any]:
    """train.checkpoint_model's `adapt` for a LoRA run's checkpoint: the adapters (and the tokens' rows; the chat
    tokens found with the run's tokenizer.json) put on as the run's config.json says, merge_and_unload to follow.

        model = checkpoint_model(run / "checkpoints" / "step-100", checkpoint_adapters)"""
    tokenizer = None
    if section.get("chat_tokens"):
        from ..tokenizers import Tokenizer
        tokenizer = Tokenizer.load(Path(checkpoint).parent.parent / "tokenizer.json")
    apply_lora(model, LoRAConfig.from_section(section), tokenizer)
    return merge_and_unload


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, as PEFT's print_trainable_parameters counts them (adapters included)."""
    params = list(model.parameters())  # unique: a tied head counts once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---- PEFT's layout ----------------------------------------------------------------------------------

def _export_rows(model: Transformer) -> dict[str, tuple[list[int], torch.Tensor]]:
    """HF module name -> (the token ids, their rows) that the adapter file carries. An untied head also carries
    the rows of the embedding's trained tokens it does not train (the chat role markers': never a target), as
    the base has them: a new token's head row is the mean of the others in lmlab (add_chat_tokens) and whatever
    `resize_token_embeddings` gave it in the HF export, and the adapter pins it to lmlab's."""
    out = {}
    emb = model.tok_emb.token_ids.tolist() if isinstance(model.tok_emb, TokenRows) else []
    for hf, m in _row_modules(model).items():
        ids = m.token_ids.tolist()
        carried = emb + [i for i in ids if i not in emb] if m is model.lm_head else ids
        if carried == ids:
            out[hf] = (ids, m.lora_rows)
            continue
        rows = m.weight.detach()[carried].clone()  # a few rows, not a copy of the whole head (merged: trained)
        if not m.merged and not m.disabled:
            rows[[carried.index(i) for i in ids]] = m.lora_rows.detach()
        out[hf] = (carried, rows)
    return out


def _peft_tensors(model: Transformer, rows: dict[str, tuple[list[int], torch.Tensor]] | None = None
                  ) -> dict[str, torch.Tensor]:
    """PEFT's key -> tensor for every adapter of `model`: base_model.model.<HF module>.lora_A/B.weight, and the
    trained rows (the parameters themselves, or `rows`: those the file carries, _export_rows)."""
    block_fmt = hf_prefixes(model.config.family)[0]
    out = {}
    for i, block in enumerate(model.blocks):
        for ours, segs in block_segments(model).items():
            module = block.get_submodule(ours)
            if isinstance(module, LoRALinear):
                for (hf, _), piece in zip(segs, module.lora_pieces()):
                    if piece is not None:
                        key = _PREFIX + block_fmt.format(i) + hf
                        out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = piece
    for hf, m in _row_modules(model).items():
        out[_PREFIX + hf + _ROWS] = rows[hf][1] if rows is not None else m.lora_rows
    return out


def _row_modules(model: Transformer) -> dict[str, Any]:
    """HF module name -> our module that holds trained rows: the embedding, and the head unless tied to it (PEFT
    then ties a TrainableTokens layer on the head to the embedding's and saves one set of rows)."""
    emb = hf_prefixes(model.config.family)[1]["tok_emb.weight"].removesuffix(".weight")
    return {**({emb: model.tok_emb} if isinstance(model.tok_emb, TokenRows) else {}),
            **({"lm_head": model.lm_head} if isinstance(model.lm_head, TokenRows)
               and not model.config.tie_embeddings else {})}


def save_adapter(model: Transformer, out_dir: str | Path, *, base_model: str | None = None,
                 tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write the adapters of `model` in PEFT's layout: adapter_config.json and adapter_model.safetensors, keys
    named for the HF export (`lmlab export hf`), so peft.PeftModel.from_pretrained(export, out_dir) loads them,
    and the `tokenizer` it was trained with, if given (tokenizer.json beside them, as TRL saves one; PEFT reads
    only its own two files). `out_dir` must be new or empty unless overwrite=True: then the files are written
    beside and renamed into place, and the other files in out_dir are kept."""
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    carried = _export_rows(model)
    tensors = _peft_tensors(model, carried)
    if config is None or not tensors:
        raise ValueError("this model has no LoRA adapters to save")
    if not str(out_dir).strip():  # Path("") is the current folder
        raise ValueError("the adapter folder (out_dir) is empty; name the folder to save the adapter to")
    if not overwrite:
        refuse_nonempty(Path(out_dir))
    targets = sorted({key[len(_PREFIX):].split(".", 3)[-1].rsplit(".lora_", 1)[0] for key in tensors
                      if not key.endswith(_ROWS)})
    # PEFT's trainable_token_indices: a list means the input embedding (and a head tied to it); an untied head is
    # named with the embedding in a dict (PEFT's key is the module's last name), each with its own rows
    rows = {hf.rsplit(".", 1)[-1]: ids for hf, (ids, _) in carried.items()}
    ids = next(iter(rows.values()), [])
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "target_modules": targets, "bias": "none",
        # HF's GPT-1/GPT-2 keep their linears as Conv1D, (in, out): PEFT transposes the update for them
        "fan_in_fan_out": model.config.family != "llama", "use_rslora": False, "init_lora_weights": True,
        "modules_to_save": None, "base_model_name_or_path": base_model, "inference_mode": True,
        "trainable_token_indices": (ids if list(rows) != ["lm_head"] and len(rows) == 1 else rows) if rows else None,
    }
    with staged_dir(Path(out_dir), replace=overwrite) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
    return Path(out_dir)


def read_adapter_config(adapter_dir: str | Path) -> LoRAConfig:
    """adapter_config.json (PEFT's, lmlab's or one PEFT wrote) -> LoRAConfig; ValueError for anything else."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a LoRA adapter: {ADAPTER_CONFIG} is missing")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(d, dict) or d.get("peft_type") != "LORA":
        raise ValueError(f"{path} does not describe a LoRA adapter (peft_type LORA)")
    unsupported = [k for k in ("use_rslora", "use_dora", "modules_to_save", "layers_to_transform", "rank_pattern",
                               "alpha_pattern") if d.get(k)]
    if d.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise ValueError(f"{path}: lmlab does not read adapters with {', '.join(unsupported)}")
    targets = d.get("target_modules")
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{path}: target_modules must be a list of module names, not {targets!r}")
    rows = d.get("trainable_token_indices") or []
    if isinstance(rows, dict):  # {"embed_tokens": [...], "lm_head": [...]}: each module its own rows
        unknown = sorted(set(rows) - {*_EMBEDDING_NAMES, "lm_head"})
        if unknown or len(rows) > 2 or ("lm_head" not in rows and len(rows) == 2):
            raise ValueError(f"{path}: lmlab reads trainable_token_indices for the embedding and the output head "
                             f"only, not {sorted(rows)}")
        emb_rows = next((ids for k, ids in rows.items() if k != "lm_head"), [])
        head_rows = rows.get("lm_head")
    else:
        emb_rows, head_rows = rows, None
    if not all(isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
               for ids in (emb_rows, head_rows or [])):
        raise ValueError(f"{path}: trainable_token_indices must list token ids, not {rows!r}")
    # a key left out means PEFT's LoraConfig default (r 8, lora_alpha 8), not lmlab's (alpha 2 * r)
    return LoRAConfig(rank=d.get("r", PEFT_DEFAULTS["r"]), alpha=d.get("lora_alpha", PEFT_DEFAULTS["lora_alpha"]),
                      dropout=d.get("lora_dropout", 0.0), targets=tuple(targets or ()), tokens=tuple(emb_rows),
                      head_tokens=None if head_rows is None or head_rows == emb_rows else tuple(head_rows))


PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}  # peft.LoraConfig's


def load_adapter(model: Transformer, adapter_dir: str | Path) -> Transformer:
    """Give `model` (frozen) the adapters saved in `adapter_dir` in PEFT's layout, ours or one PEFT trained on
    the HF export of this model. Returns the model; ValueError when the file does not fit it."""
    config = read_adapter_config(adapter_dir)
    apply_lora(model, config)
    file = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        saved = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{file} is not a readable safetensors file: {exc}") from None
    saved = {k.replace(".default.", "."): v for k, v in saved.items()}  # some writers keep the adapter name
    want = _peft_tensors(model)
    # rows a file leaves out stay as the base has them: PEFT given a list trains no rows of an untied head
    missing = sorted(k for k in want.keys() - saved.keys() if not k.endswith(_ROWS))
    extra = sorted(saved.keys() - want.keys())
    if missing or extra:
        raise ValueError(f"{file} does not fit this {model.config.family} model: missing {missing[:2]}, "
                         f"unexpected {extra[:2]}")
    with torch.no_grad():
        for key, param in want.items():
            if key not in saved:
                continue
            if saved[key].shape != param.shape:
                raise ValueError(f"{file}: {key} has shape {tuple(saved[key].shape)}, this model needs "
                                 f"{tuple(param.shape)}")
            param.copy_(saved[key])  # a view into lora_A / lora_B, or the rows
    return model


def save_lora_run(model: Transformer, run_dir: str | Path, tokenizer: Any, final: Path) -> Path:
    """A LoRA run's model as it ends: RUN/adapter in PEFT's layout, and `final` (final/'s staging folder, which the
    trainer wrote with the adapters as extra tensors) rewritten as a plain model directory with the adapters
    merged, so that `lmlab generate`, `lmlab export` and the web app read it like any other (training.json stays
    as the trainer wrote it). Returns RUN/adapter."""
    adapter = save_adapter(model, Path(run_dir) / "adapter", tokenizer=tokenizer, overwrite=True)  # the run's own
    save_pretrained(final, merge_and_unload(copy.deepcopy(model)), tokenizer, keep=(TRAINING, CHAT_TEMPLATE))
    return adapter


def merge_lora_dir(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """`lmlab lora merge`: a new model directory `out_dir` holding `model_dir` with the adapter merged (its other
    files copied, symbolic links left out; training.json says what was merged). Refuses an `out_dir` that exists;
    written beside, renamed.

    An adapter saved with its tokenizer (lmlab's runs save it) must have been trained with the model's: an adapter
    of the same widths on another vocabulary would merge without a complaint into a model that means nothing.
    The tokenizer of a chat fine-tuning run (`lmlab tune sft --lora-rank`) is the model's plus the chat tokens:
    they are added here as the run added them (tune.chat.add_chat_tokens: rows at the mean, deterministic) and
    the chat template is written, so the merged model is the run's own final model."""
    from ..tokenizers import Tokenizer
    from .chat import TEMPLATE_FILE, add_chat_tokens, write_template

    out = Path(out_dir)
    if out.exists():
        raise ValueError(f"{out} exists; choose a new --out (lmlab never overwrites a model)")
    if (Path(model_dir) / QUANTIZATION).is_file():  # integer weights: no adapter merges into them
        raise ValueError(f"{model_dir} is an int8/int4 model, which an adapter cannot be merged into; merge it into "
                         f"the model it was quantized from (its {QUANTIZATION}: source)")
    model, tok = load_pretrained(model_dir)
    config = read_adapter_config(adapter_dir)
    chat = False
    if (Path(adapter_dir) / TOKENIZER).is_file():
        trained = Tokenizer.load(Path(adapter_dir) / TOKENIZER)
        if tok is None or tok.fingerprint() != trained.fingerprint():
            if tok is not None:
                chat_model, chat_tok, added = add_chat_tokens(model, tok)
                chat = added > 0 and chat_tok.fingerprint() == trained.fingerprint()
            if not chat:
                raise ValueError(f"{adapter_dir} was trained with another tokenizer than {model_dir}'s "
                                 f"({len(trained)} tokens, this model {len(tok) if tok is not None else 'none'}): "
                                 "merge it onto the model it was trained from")
            model, tok = chat_model, chat_tok
    merge_and_unload(load_adapter(model, adapter_dir))
    require_finite(model.state_dict(), f"merging {adapter_dir}", "its tensors or its lora_alpha are not usable")
    with staged_dir(out, replace=False) as tmp:
        for entry in Path(model_dir).iterdir():
            if entry.is_symlink() or entry.name in (WEIGHTS, TRAINING) or (chat and entry.name == TOKENIZER):
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name,
                                ignore=lambda d, names: [n for n in names if (Path(d) / n).is_symlink()])
            elif entry.is_file():
                shutil.copyfile(entry, tmp / entry.name)
        merged = {"model": str(Path(model_dir).resolve()), "adapter": str(Path(adapter_dir).resolve()),
                  "lora": config.to_dict(), **({"chat_tokens_added": True} if chat else {})}
        save_pretrained(tmp, model, tok if chat else None, training={"merged": merged},
                        keep=(TOKENIZER, GENERATION, CHAT_TEMPLATE))  # copied from model_dir above
        if chat and not (tmp / TEMPLATE_FILE).is_file():
            write_template(tmp)
    return out
