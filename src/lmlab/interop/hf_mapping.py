"""State-dict and config adapters between lmlab's Transformer and Hugging Face transformers' native
classes: GPT2LMHeadModel (gpt2), LlamaForCausalLM (llama), OpenAIGPTLMHeadModel (gpt).

Plain functions over dicts of tensors (torchtitan's state_dict_adapter idea): no subclassing, no
custom code on the transformers side. Conv1D weights (GPT-1/2) are stored transposed, (in, out).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..models import ModelConfig
from ..tokenizers import BOS_ID, EOS_ID

HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "gpt": "OpenAIGPTLMHeadModel"}
_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "openai-gpt": "gpt"}


def hf_prefixes(family: str) -> tuple[str, dict[str, str]]:
    """HF name of our top-level tensors and of each block's tensors ({} means family-specific)."""
    if family == "gpt2":
        top = {"tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight",
               "norm_f.weight": "transformer.ln_f.weight", "norm_f.bias": "transformer.ln_f.bias"}
        return "transformer.h.{}.", top
    if family == "gpt":
        top = {"tok_emb.weight": "transformer.tokens_embed.weight",
               "pos_emb.weight": "transformer.positions_embed.weight"}
        return "transformer.h.{}.", top
    top = {"tok_emb.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}
    return "model.layers.{}.", top


_CONV1D_BLOCK = {  # ours -> HF, GPT-1 and GPT-2 blocks (weights need a transpose)
    "norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias", "norm2.weight": "ln_2.weight",
    "norm2.bias": "ln_2.bias", "attn.qkv.weight": "attn.c_attn.weight", "attn.qkv.bias": "attn.c_attn.bias",
    "attn.proj.weight": "attn.c_proj.weight", "attn.proj.bias": "attn.c_proj.bias",
    "mlp.fc.weight": "mlp.c_fc.weight", "mlp.fc.bias": "mlp.c_fc.bias",
    "mlp.proj.weight": "mlp.c_proj.weight", "mlp.proj.bias": "mlp.c_proj.bias",
}


def _conv1d(src: dict[str, torch.Tensor], src_prefix: str, dst_prefix: str,
            names: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """A GPT-1/GPT-2 block's tensors renamed from one side to the other: HF's Conv1D keeps each matrix as
    (in, out), the transpose of nn.Linear's, so matrices are transposed either way; vectors are copied."""
    out = {}
    for a, b in names:
        if src_prefix + a in src:
            t = src[src_prefix + a]
            out[dst_prefix + b] = t.t().contiguous() if t.dim() == 2 else t
    return out


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """lmlab state dict -> the HF class's state dict (tied head included, as HF expects)."""
    block_fmt, top = hf_prefixes(cfg.family)
    out: dict[str, torch.Tensor] = {hf: state[ours] for ours, hf in top.items() if ours in state}
    out["lm_head.weight"] = state["lm_head.weight"] if "lm_head.weight" in state else state["tok_emb.weight"]
    q_dim, kv_dim = cfg.n_embd, cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        ours = f"blocks.{i}."
        hf = block_fmt.format(i)
        if cfg.family in ("gpt", "gpt2"):
            out.update(_conv1d(state, ours, hf, _CONV1D_BLOCK.items()))
            continue
        q, k, v = state[ours + "attn.qkv.weight"].split([q_dim, kv_dim, kv_dim])
        gate, up = state[ours + "mlp.fc.weight"].chunk(2)
        out.update({
            hf + "self_attn.q_proj.weight": q, hf + "self_attn.k_proj.weight": k,
            hf + "self_attn.v_proj.weight": v, hf + "self_attn.o_proj.weight": state[ours + "attn.proj.weight"],
            hf + "mlp.gate_proj.weight": gate, hf + "mlp.up_proj.weight": up,
            hf + "mlp.down_proj.weight": state[ours + "mlp.proj.weight"],
            hf + "input_layernorm.weight": state[ours + "norm1.weight"],
            hf + "post_attention_layernorm.weight": state[ours + "norm2.weight"],
        })
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The HF class's state dict -> lmlab state dict for a Transformer(cfg)."""
    block_fmt, top = hf_prefixes(cfg.family)
    out = {ours: hf[name] for ours, name in top.items() if name in hf}
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
    for i in range(cfg.n_layer):
        ours = f"blocks.{i}."
        pre = block_fmt.format(i)
        if cfg.family in ("gpt", "gpt2"):
            out.update(_conv1d(hf, pre, ours, ((h, o) for o, h in _CONV1D_BLOCK.items())))
            continue
        a, m = pre + "self_attn.", pre + "mlp."
        out.update({
            ours + "attn.qkv.weight": torch.cat([hf[a + "q_proj.weight"], hf[a + "k_proj.weight"],
                                                 hf[a + "v_proj.weight"]]),
            ours + "attn.proj.weight": hf[a + "o_proj.weight"],
            ours + "mlp.fc.weight": torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]]),
            ours + "mlp.proj.weight": hf[m + "down_proj.weight"],
            ours + "norm1.weight": hf[pre + "input_layernorm.weight"],
            ours + "norm2.weight": hf[pre + "post_attention_layernorm.weight"],
        })
    return out


def hf_config_dict(cfg: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The keyword arguments of the transformers config class for `cfg` (GPT2Config, LlamaConfig,
    OpenAIGPTConfig); `extra` adds or overrides keys. Raises ValueError for switches the target class
    cannot express."""
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=BOS_ID,
                  eos_token_id=EOS_ID, pad_token_id=cfg.pad_token_id)
    common.update(extra)  # e.g. the special ids of a tokenizer that is not lmlab's
    want = ModelConfig(family=cfg.family, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_embd=cfg.n_embd, block_size=cfg.block_size,
                       n_kv_head=cfg.n_kv_head if cfg.family == "llama" else None,
                       intermediate_size=cfg.intermediate_size if cfg.family != "gpt" else None,
                       norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, dropout=cfg.dropout,
                       init_std=cfg.init_std, pad_token_id=cfg.pad_token_id, tie_embeddings=cfg.tie_embeddings)
    if want != cfg:
        diff = [k for k, v in cfg.to_dict().items() if want.to_dict()[k] != v]
        raise ValueError(f"a {cfg.family} model with custom {', '.join(diff)} has no "
                         f"{HF_ARCHITECTURES[cfg.family]} equivalent")
    if cfg.family == "llama":
        return dict(common, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
                    num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                    num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.block_size,
                    rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, hidden_act="silu",
                    attention_bias=False, mlp_bias=False, attention_dropout=cfg.dropout,
                    initializer_range=cfg.init_std)
    shape = dict(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_positions=cfg.block_size,
                 layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                 attn_pdrop=cfg.dropout, initializer_range=cfg.init_std)
    if cfg.family == "gpt2":
        return dict(common, **shape, n_inner=cfg.intermediate_size, activation_function="gelu_new")
    return dict(common, **shape, afn="gelu")


class _Fields:
    """A transformers config's values, each checked for its type where it is read: a config.json with a string
    for a bool or a list for a name is refused naming the key (transformers refuses them too), never read as
    something else (bool("false") is True)."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.d = d

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        v = self.d[key] if default is _REQUIRED else self.d.get(key, default)
        if v is None and default is not _REQUIRED:
            return default
        if isinstance(v, bool) != (bool in kinds) or not isinstance(v, kinds):
            raise ValueError(f"{key} must be {what}, not {v!r:.40}")
        return v

    def int(self, key: str, default: Any = None, low: int = 1) -> Any:
        v = self._get(key, _REQUIRED if default is None else default, (int,), f"an integer >= {low}")
        if v < low:
            raise ValueError(f"{key} must be an integer >= {low}, not {v}")
        return v

    def float(self, key: str, default: Any = None) -> float:
        v = self._get(key, _REQUIRED if default is None else default, (int, float), "a number")
        if not math.isfinite(v):
            raise ValueError(f"{key} must be a finite number, not {v}")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        return self._get(key, default, (bool,), "true or false")

    def str(self, key: str, default: str) -> str:
        return self._get(key, default, (str,), "a string")

    def obj(self, key: str) -> dict[str, Any]:
        return self._get(key, {}, (dict,), "an object")


_REQUIRED = object()


def model_config_from_hf(hf: Any) -> ModelConfig:
    """A transformers config object (or its dict) -> ModelConfig. ValueError (naming the key) for a value of the
    wrong type, and for settings lmlab's model does not compute (it would give other numbers, not an error)."""
    d = hf if isinstance(hf, dict) else hf.to_dict()
    f = _Fields(d)
    family = _MODEL_TYPES.get(f.str("model_type", ""))
    if family is None:
        raise ValueError(f"unsupported architecture {d.get('model_type')!r}; lmlab reads "
                         f"{', '.join(_MODEL_TYPES)}")
    pad = d.get("pad_token_id")
    if isinstance(pad, list):  # some configs list several; the loss can ignore only one
        pad = pad[0] if pad else None
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 0):
        raise ValueError(f"pad_token_id must be a token id, not {pad!r:.40}")
    init_std = f.float("initializer_range", 0.02)
    if family == "llama":
        if f.bool("attention_bias", False) or f.bool("mlp_bias", False) or f.str("hidden_act", "silu") != "silu":
            raise ValueError("only bias-free SiLU Llama models are supported")
        for key in ("rope_scaling", "rope_parameters"):  # transformers 4 / 5 spelling
            rope = f.obj(key)
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raise ValueError("RoPE scaling is not supported")
        width, heads = f.int("hidden_size"), f.int("num_attention_heads")
        if f.int("head_dim", width // heads, low=0) != width // heads:
            raise ValueError(f"head_dim {d['head_dim']} != hidden_size / num_attention_heads is not supported")
        # transformers 4 reads rope_theta, 5 rope_parameters.rope_theta: a config holding both, unequal, gives
        # other logits in each, so it is refused rather than read as one of them
        key = "rope_parameters.rope_theta"
        nested = _Fields({key: f.obj("rope_parameters").get("rope_theta")})
        top = f.float("rope_theta") if d.get("rope_theta") is not None else None
        theta = nested.float(key) if nested.d[key] is not None else top if top is not None else 10000.0
        if top is not None and top != theta:
            raise ValueError(f"rope_theta ({top:g}) and {key} ({theta:g}) disagree (transformers 4 reads the first, "
                             "5 the second); make them equal")
        return ModelConfig(family="llama", vocab_size=f.int("vocab_size"), n_layer=f.int("num_hidden_layers"),
                           n_head=heads, n_embd=width, n_kv_head=f.int("num_key_value_heads", heads),
                           intermediate_size=f.int("intermediate_size"),
                           block_size=f.int("max_position_embeddings"), norm_eps=f.float("rms_norm_eps"),
                           rope_theta=theta,
                           tie_embeddings=f.bool("tie_word_embeddings", False), pad_token_id=pad,
                           dropout=f.float("attention_dropout", 0.0), init_std=init_std)
    act = f.str("activation_function" if family == "gpt2" else "afn", "gelu_new" if family == "gpt2" else "gelu")
    if act not in ("gelu_new", "gelu_pytorch_tanh") and not (family == "gpt" and act == "gelu"):
        raise ValueError(f"activation {act!r} is not supported (lmlab uses tanh-approximated GELU)")
    if family == "gpt2" and (not f.bool("scale_attn_weights", True) or f.bool("scale_attn_by_inverse_layer_idx",
                                                                              False)):
        raise ValueError("GPT-2 attention scaled other than by 1/sqrt(head size) (scale_attn_weights false or "
                         "scale_attn_by_inverse_layer_idx true) is not supported")
    width = f.int("n_embd")
    return ModelConfig(family=family, vocab_size=f.int("vocab_size"), n_layer=f.int("n_layer"),
                       n_head=f.int("n_head"), n_embd=width, block_size=f.int("n_positions"),
                       norm_eps=f.float("layer_norm_epsilon"),
                       intermediate_size=f.int("n_inner", 4 * width) if family == "gpt2" else None,
                       tie_embeddings=f.bool("tie_word_embeddings", True), pad_token_id=pad,
                       dropout=f.float("resid_pdrop", 0.1), init_std=init_std)
