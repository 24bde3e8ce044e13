"""ModelConfig: one typed, validated description of every architecture lmlab builds.

A family (`gpt`, `gpt2`, `llama`) fills in the architectural switches it implies; a size fills in the
shape. Anything left as ``None`` is taken from the family, so ``ModelConfig(family="llama", n_layer=4)``
is a complete Llama-style config. The resolved config is what gets saved next to the weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import configs
from ..configs import knob, validate
from ..files import atomic_write_text

FAMILIES = ("gpt", "gpt2", "llama")

# What each family means, as switches of the one implementation in model.py.
#  gpt   — GPT-1 (Radford et al. 2018) and the AZR Model Trainer app's CustomTransformerLM: learned positions,
#          post-LN blocks, no final norm; HF's OpenAIGPTLMHeadModel ties the head, so we do too.
#  gpt2  — pre-LN blocks, a final LayerNorm, tied head, biases everywhere.
#  llama — RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases, untied head.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt": dict(norm="layernorm", pos_encoding="learned", mlp="gelu", prenorm=False, final_norm=False,
                tie_embeddings=True, bias=True, norm_eps=1e-5),
    "gpt2": dict(norm="layernorm", pos_encoding="learned", mlp="gelu", prenorm=True, final_norm=True,
                 tie_embeddings=True, bias=True, norm_eps=1e-5),
    "llama": dict(norm="rmsnorm", pos_encoding="rope", mlp="swiglu", prenorm=True, final_norm=True,
                  tie_embeddings=False, bias=False, norm_eps=1e-5),
}

# Sizes. small/medium/large follow the AZR Model Trainer app's table (~5M / ~20M / ~100M parameters, d_model 128-768,
# 4-16 layers); gpt2-124m is exactly GPT-2 small. Counts are for the gpt2 family at the listed vocab;
# `lmlab info --preset` prints the exact number for any family.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=1024),
    "small": dict(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=8192),
    "medium": dict(n_layer=10, n_head=6, n_embd=384, block_size=512, vocab_size=8192),
    "large": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=16384),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
}

# Config keys of the projects lmlab grew from -> our field names: the AZR Model Trainer app's CustomTransformerLM
# (github.com/Slavikpro557/ai-neural-network-project) and llm-arch-research's GPT/GPT2 config dicts
# (github.com/pese-git/llm-arch-research).
FOREIGN_KEYS = {
    "d_model": "n_embd", "embed_dim": "n_embd", "num_layers": "n_layer", "num_heads": "n_head",
    "num_kv_heads": "n_kv_head", "d_ff": "intermediate_size", "max_seq_len": "block_size",
    "max_position_embeddings": "block_size",
}


@dataclass
class ModelConfig:
    family: str = knob("gpt2", "architecture family: what the switches below default to", choices=FAMILIES)
    # the upper bounds (2**40) only keep a number no model has (2**63) from reaching torch as an overflow or a
    # TypeError; sizes below them are weighed against the weights and the memory, with those messages
    vocab_size: int = knob(8192, "tokens in the vocabulary (the tokenizer's size)", ge=5, le=2**40)
    n_layer: int = knob(6, "transformer blocks", gt=0, le=2**40)
    n_head: int = knob(6, "attention (query) heads", gt=0, le=2**40)
    n_embd: int = knob(384, "width of the residual stream", gt=0, le=2**40)
    block_size: int = knob(256, "context length in tokens", gt=0, le=2**40)
    n_kv_head: int | None = knob(None, "key/value heads: fewer than n_head is grouped-query attention "
                                 "(default n_head)", gt=0)
    intermediate_size: int | None = knob(None, "MLP hidden width (default 4*n_embd for gelu, ~8/3*n_embd "
                                         "rounded to 64 for swiglu)", gt=0, le=2**40)
    dropout: float = knob(0.0, "dropout on embeddings, attention and residual branches", ge=0, lt=1)
    # Architectural switches; None means "what the family does".
    norm: str | None = knob(None, "layernorm or rmsnorm (default: the family's)", choices=("layernorm", "rmsnorm"))
    pos_encoding: str | None = knob(None, "learned or rope (default: the family's)", choices=("learned", "rope"))
    mlp: str | None = knob(None, "gelu (tanh approximation, as GPT-1/2) or swiglu (default: the family's)",
                           choices=("gelu", "swiglu"))
    prenorm: bool | None = knob(None, "norm before each sublayer (GPT-2, Llama) or after it (GPT-1)")
    final_norm: bool | None = knob(None, "a norm after the last block")
    tie_embeddings: bool | None = knob(None, "the output head shares the token embedding's weights")
    bias: bool | None = knob(None, "biases in linear layers and LayerNorms")
    norm_eps: float | None = knob(None, "epsilon of the norms (default 1e-5)", gt=0)
    rope_theta: float = knob(10000.0, "RoPE base", gt=0)
    init_std: float = knob(0.02, "standard deviation of the initial weights", gt=0)
    pad_token_id: int | None = knob(0, "targets equal to it are ignored by the loss (null: none are)", ge=0)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family ({self.family!r}) must be one of {', '.join(FAMILIES)}")
        for key, value in _FAMILY_DEFAULTS[self.family].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None and isinstance(self.n_embd, int):
            if self.mlp == "swiglu":  # keep parameters ~ a 4x GELU MLP (Shazeer 2020), multiple of 64
                self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
            else:
                self.intermediate_size = 4 * self.n_embd
        self._validate()

    def _validate(self) -> None:
        validate(self)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim (n_embd/n_head = {self.head_dim}) must be even for RoPE")
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must be in [0, vocab_size)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    # ---- accounting without building the model (for `lmlab info` and the web app's estimates) -----

    def num_parameters(self) -> int:
        """Unique parameters of Transformer(self), computed analytically (a tied head counts once)."""
        d, L, kv = self.n_embd, self.n_layer, self.n_kv_head * self.head_dim
        b = int(self.bias)
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        attn = d * (d + 2 * kv) + b * (d + 2 * kv) + d * d + b * d
        up = self.intermediate_size * (2 if self.mlp == "swiglu" else 1)
        mlp = d * up + b * up + self.intermediate_size * d + b * d
        n = L * (attn + mlp + 2 * norm) + self.vocab_size * d
        n += self.block_size * d if self.pos_encoding == "learned" else 0
        n += norm if self.final_norm else 0
        n += 0 if self.tie_embeddings else self.vocab_size * d
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N for the matmuls plus 12*L*T*d for attention
        scores (Kaplan et al. 2020; PaLM appendix B). N excludes embedding lookups, includes the head."""
        n = self.num_parameters() - self.vocab_size * self.n_embd * (not self.tie_embeddings)
        n -= self.block_size * self.n_embd if self.pos_encoding == "learned" else 0
        return 6 * n + 12 * self.n_layer * (seq_len or self.block_size) * self.n_embd

    def memory_estimate(self, batch_size: int = 1, seq_len: int | None = None, *, training: bool = True,
                        bytes_per_param: int = 4) -> dict[str, int]:
        """Rough peak bytes. Training: weights + grads + AdamW's two moments (4 copies) plus activations,
        ~ (34 + 5 * n_head * T / d) * T * d bytes per layer and sequence at 2 bytes (Korthikanti et al.
        2022, eq. 2), doubled for fp32, plus the logits. Inference: weights plus a full KV cache."""
        T = seq_len or self.block_size
        weights = self.num_parameters() * bytes_per_param
        if not training:
            kv = 2 * self.n_layer * self.n_kv_head * self.head_dim * T * batch_size * bytes_per_param
            return {"weights": weights, "kv_cache": kv, "total": weights + kv}
        per_layer = (34 + 5 * self.n_head * T / self.n_embd) * T * self.n_embd * bytes_per_param // 2
        activations = int(per_layer * self.n_layer * batch_size) + 3 * batch_size * T * self.vocab_size * 4
        states = 3 * weights
        return {"weights": weights, "grads_and_optimizer": states, "activations": activations,
                "total": weights + states + activations}

    # ---- presets -----------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """`preset("llama-small")`, `preset("gpt2-124m")`, or `preset("small", family="gpt")`. A family given
        beside a name that has one must be the same: which of the two was meant cannot be told."""
        family, size = overrides.pop("family", None), name
        for fam in FAMILIES:
            if name.startswith(fam + "-") and name[len(fam) + 1:] in SIZES:
                if family is not None and family != fam:
                    raise ValueError(f"preset {name!r} is the {fam} family, but family {family!r} was given too; "
                                     f"give the size alone ({name[len(fam) + 1:]!r}) with a family, or drop the family")
                family, size = fam, name[len(fam) + 1:]
                break
        if size not in SIZES:
            raise ValueError(f"preset ({name!r}) is unknown; choose one of {', '.join(preset_names())}")
        return cls(family=family or "gpt2", **{**SIZES[size], **overrides})

    # ---- (de)serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict; also accepts the keys of the AZR Model Trainer app and of llm-arch-research (d_model,
        num_layers, embed_dim, ...)."""
        return configs.from_dict(cls, data, aliases=FOREIGN_KEYS)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"model config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("model config must be a JSON object")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """config.json; ValueError naming the file for one that is not UTF-8 text (a UnicodeDecodeError reads
        as lmlab's own bug)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8 text: {exc}") from None
        refuse_run_config(Path(path), text)
        return cls.from_json(text)


def refuse_run_config(path: Path, text: str) -> None:
    """ValueError when the config.json at `path` is a training run's ({train, model, ...}) given where a model
    directory belongs: a finished run (its model is final/), one that did not finish, or one of its checkpoints.
    Read as a model's, it said "unknown ModelConfig field(s): train, model, ..."."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return
    if not (isinstance(data, dict) and isinstance(data.get("train"), dict) and isinstance(data.get("model"), dict)):
        return
    folder = path.parent
    if (folder / "final" / "config.json").is_file():  # a finished run: its model is there
        raise ValueError(f"{folder} is a training run's folder, not a model directory: its model is {folder / 'final'}")
    if folder.parent.name == "checkpoints":
        raise ValueError(f"{folder} is a checkpoint of the training run {folder.parent.parent}, not a model directory: "
                         f"score its checkpoints with `lmlab eval {folder.parent.parent} --all-checkpoints`, or resume "
                         "the run to its final/ model")
    raise ValueError(f"{folder} is a training run without a final/ model (it stopped before the end): resume it "
                     "with its command's --resume, or give a model directory")


def preset_names() -> list[str]:
    return [f"{fam}-{size}" for fam in FAMILIES for size in SIZES]


# here, not in generation.py, so that the CLI builds its sampling flags without importing torch
@dataclass
class GenerationConfig:
    max_new_tokens: int = knob(100, "tokens to generate", ge=0)
    do_sample: bool = knob(True, "sample; --no-do-sample (or --greedy, or temperature 0) takes the most likely "
                           "token")
    temperature: float = knob(1.0, "softmax temperature; 0 means greedy", ge=0)
    top_k: int = knob(0, "sample from the k most likely tokens (0: off)", ge=0)
    top_p: float = knob(1.0, "nucleus sampling mass (1.0: off)", gt=0, le=1)
    repetition_penalty: float = knob(1.0, "CTRL penalty for tokens already in the context (Keskar et al. 2019; "
                                     "1.0: off)", gt=0)
    # ModelConfig's bound on sizes: a width below it is checked against the free memory (each beam is a row of
    # the KV cache); 2**63 was a TypeError inside torch.zeros
    num_beams: int = knob(1, "beam search width (1: no beam search; deterministic)", ge=1, le=2**40)
    # the server's bounds: length ** 10 stays a finite float for any length a run reaches (1000 overflowed at 4
    # tokens: 4 ** 1000 > 1.8e308)
    length_penalty: float = knob(1.0, "beam score = sum log p / length ** length_penalty", ge=-10, le=10)
    stop_strings: list[str] = knob(factory=list, help="stop when one of these texts appears (comma list on the "
                                   "command line; --stop TEXT repeats)")
    stop_at_eos: bool = knob(True, "stop at <EOS>; --no-stop-at-eos (or --ignore-eos) keeps going")
    # 64 bits, the seeds torch.Generator takes (-1 is 2**64 - 1 to it): past them 2**64 sampled as 0 did on a CPU
    # (sampling_generator keeps a seed's 64 bits), and a CUDA generator refused it mid-request
    seed: int | None = knob(None, "seed for reproducible sampling", ge=-2**63, lt=2**64)
    prompt_lookup: int = knob(0, "greedy only: draft up to N tokens by prompt lookup and verify them in one pass "
                              "(faster on repetitive text; 0: off)", ge=0, le=64)

    def __post_init__(self) -> None:
        validate(self)
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GenerationConfig:
        """generation.json; ValueError (naming the file, and the field) for bad JSON or an unknown field."""
        try:
            return configs.from_dict(cls, json.loads(Path(path).read_text(encoding="utf-8")))
        except ValueError as exc:  # json.JSONDecodeError too
            raise ValueError(f"{path}: {exc}") from None
