"""Hugging Face transformers export and import, with native classes only (no trust_remote_code).

    lmlab export hf runs/demo/final hf-demo        # then AutoModelForCausalLM.from_pretrained("hf-demo")
    lmlab import hf hf-demo imported-model         # and back, for continued training in lmlab
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..models import ModelConfig, Transformer
from ..models.io import load_pretrained, save_pretrained
from ..tokenizers import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, Tokenizer
from .hf_mapping import HF_ARCHITECTURES, from_hf_state_dict, hf_config_dict, model_config_from_hf, to_hf_state_dict


def _classes(family: str):
    import transformers
    return {
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "gpt": (transformers.OpenAIGPTConfig, transformers.OpenAIGPTLMHeadModel),
    }[family]


def to_hf_model(model: Transformer):
    """An in-memory transformers model with `model`'s weights (fp32)."""
    cfg = model.config
    config_cls, model_cls = _classes(cfg.family)
    hf_config = config_cls(**hf_config_dict(cfg), architectures=[HF_ARCHITECTURES[cfg.family]])
    hf = model_cls(hf_config)
    state = to_hf_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()}, cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # GPT-1 keeps a causal-mask buffer and position ids that are not weights
    missing = [m for m in missing if not m.endswith(("attn.bias", "position_ids", "masked_bias"))]
    if missing or unexpected:
        raise ValueError(f"weights do not map onto {model_cls.__name__}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return hf.eval()


def hf_tokenizer(tokenizer: Tokenizer, chat_template: str | None = None):
    """A transformers PreTrainedTokenizerFast around the same tokenizers object."""
    from transformers import PreTrainedTokenizerFast
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf, pad_token=SPECIAL_TOKENS[PAD_ID],
                                   unk_token=SPECIAL_TOKENS[UNK_ID], bos_token=SPECIAL_TOKENS[BOS_ID],
                                   eos_token=SPECIAL_TOKENS[EOS_ID], clean_up_tokenization_spaces=False)
    if chat_template:
        fast.chat_template = chat_template
    return fast


def export_hf(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a transformers-native checkpoint: config.json, model.safetensors, generation_config.json and
    the tokenizer files. Loads with AutoModelForCausalLM / AutoTokenizer / pipeline, no custom code."""
    from transformers import GenerationConfig as HFGenerationConfig
    model, tok = load_pretrained(model_dir)
    if tok is None:
        raise ValueError(f"{model_dir} has no tokenizer.json; HF export needs the tokenizer")
    hf = to_hf_model(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.generation_config = HFGenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    hf.save_pretrained(out, safe_serialization=True)
    chat = None
    gen_file = Path(model_dir) / "chat_template.jinja"
    if gen_file.is_file():
        chat = gen_file.read_text(encoding="utf-8")
    hf_tokenizer(tok, chat).save_pretrained(out)
    return out


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """safetensors only (single file or sharded index); pickled .bin checkpoints are refused."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(str(path / name)))
        return state
    if any(path.glob("*.bin")):
        raise ValueError(f"{path} has only pickled .bin weights; lmlab reads safetensors only (re-save it with "
                         "save_pretrained(..., safe_serialization=True))")
    raise FileNotFoundError(f"{path} has no model.safetensors")


def import_hf(hf_dir: str | Path, model_dir: str | Path, *, with_tokenizer: bool = True) -> Path:
    """Read a local transformers checkpoint (GPT-2, Llama or OpenAI GPT) into an lmlab model directory."""
    path = Path(hf_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a transformers checkpoint (no config.json): {path}")
    hf_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    cfg = model_config_from_hf(hf_config)
    state = from_hf_state_dict(_read_hf_weights(path), cfg)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} weights do not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tok = None
    if with_tokenizer:
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json (pass with_tokenizer=False / --no-tokenizer "
                                    "to import the weights alone)")
        try:
            tok = Tokenizer.load(path / "tokenizer.json")
        except ValueError as exc:
            raise ValueError(f"mismatched tokenizer: {exc}; lmlab needs <PAD>=0 <UNK>=1 <BOS>=2 <EOS>=3 "
                             "(import the weights alone with --no-tokenizer)") from None
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"mismatched tokenizer: {tok.vocab_size} tokens but the model has {cfg.vocab_size}")
    return save_pretrained(model_dir, model, tok)


def model_config_of(hf_dir: str | Path) -> ModelConfig:
    return model_config_from_hf(json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8")))
