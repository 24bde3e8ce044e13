"""The model directory: config.json + model.safetensors + tokenizer.json (+ generation.json, training.json,
quantization.json, chat_template.jinja).

Loading executes no code: JSON and safetensors only, never pickle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from ..files import atomic_path, atomic_write_text, refuse_nonempty, staged_dir
from ..tokenizers import Tokenizer
from ..tokenizers.chat_format import TEMPLATE_FILE
from .config import ModelConfig
from .generation import GenerationConfig
from .model import Transformer
from .quant import QUANTIZATION, QuantConfig, apply_quantization

CONFIG, WEIGHTS, TOKENIZER, GENERATION, TRAINING = (
    "config.json", "model.safetensors", "tokenizer.json", "generation.json", "training.json")
CHAT_TEMPLATE = TEMPLATE_FILE  # the chat format's file (tokenizers.chat_format)
MODEL_FILES = (CONFIG, WEIGHTS, TOKENIZER, GENERATION, TRAINING, QUANTIZATION, CHAT_TEMPLATE)
HF_TOKENIZER_DIR = "hf_tokenizer"  # an imported model's own tokenizer, as transformers saved it (lmlab.interop)
# What a model made from another one (merged, quantized) carries over beside its new weights and tokenizer.json:
# the generation defaults, the chat template, and the foreign tokenizer, the only one an imported GPT-2-style
# model has (without it `lmlab export` of the new model failed: no tokenizer.json)
SIDE_FILES = (GENERATION, CHAT_TEMPLATE, HF_TOKENIZER_DIR)


def save_pretrained(path: str | Path, model: Transformer, tokenizer: Tokenizer | None = None, *,
                    generation: GenerationConfig | None = None, training: dict[str, Any] | None = None,
                    keep: tuple[str, ...] = ()) -> Path:
    """Write a model directory. Every file is written to a temporary name and renamed into place.

    A folder that holds a model already gets the new one whole, in one rename (files.staged_dir): the old
    model's files (MODEL_FILES) this save does not write are removed, but for those in `keep` (a caller's own,
    written there for this model); anything else in the folder stays. An old quantization.json or tokenizer.json
    read with new weights would not load, or would mean another model."""
    path = Path(path)
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    stale = tuple(name for name in MODEL_FILES if name not in keep)
    if path.is_dir() and any((path / name).exists() or (path / name).is_symlink() for name in stale):
        with staged_dir(path, stale=stale) as tmp:
            _write(tmp, model, tokenizer, generation, training)
    else:
        path.mkdir(parents=True, exist_ok=True)
        _write(path, model, tokenizer, generation, training)
    return path


def save(path: str | Path, model: Transformer, tokenizer: Tokenizer | None = None, *, overwrite: bool = False,
         generation: GenerationConfig | None = None, training: dict[str, Any] | None = None) -> Path:
    """`lmlab.save`: a new model directory, made whole in one rename. "" (the current folder to Path) is refused,
    and so is a folder that holds anything (another model, a run) unless overwrite=True: then its model is
    replaced as save_pretrained replaces one, which the library's own writers call to replace theirs."""
    if not str(path).strip():
        raise ValueError("the model folder (path) is empty; name the folder to save the model to")
    path = Path(path)
    if overwrite:
        return save_pretrained(path, model, tokenizer, generation=generation, training=training)
    refuse_nonempty(path)
    with staged_dir(path, replace=False) as tmp:  # another process's folder made meanwhile is not replaced
        save_pretrained(tmp, model, tokenizer, generation=generation, training=training)
    return path


def _write(path: Path, model: Transformer, tokenizer: Tokenizer | None, generation: GenerationConfig | None,
           training: dict[str, Any] | None) -> None:
    with atomic_path(path / WEIGHTS) as tmp:
        save_model(model, str(tmp), metadata={"format": "pt", "lmlab_family": model.config.family})
    model.config.save(path / CONFIG)
    if tokenizer is not None:
        tokenizer.save(path / TOKENIZER, overwrite=True)  # a new folder, or its staged copy
    if generation is not None:
        generation.save(path / GENERATION)
    if training is not None:
        atomic_write_text(path / TRAINING, json.dumps(training, indent=2, ensure_ascii=False) + "\n")
    quantization = getattr(model, "quantization", None)
    if quantization is not None:
        quantization.save(path / QUANTIZATION)


def copy_side_files(src: str | Path, dst: str | Path, names: tuple[str, ...] = SIDE_FILES) -> None:
    """Copy `names` of model directory `src` into `dst` (a folder: the files in it), those that are there.
    Symbolic links are left out, so nothing is read from outside `src`. `dst` is a staged folder (staged_dir):
    it is renamed into place whole, so the files need no atomic write of their own."""
    src, dst = Path(src), Path(dst)
    for name in names:
        file = src / name
        if file.is_symlink():
            continue
        if file.is_dir():
            (dst / name).mkdir(exist_ok=True)
            copy_side_files(file, dst / name, tuple(sorted(f.name for f in file.iterdir())))
        elif file.is_file():
            (dst / name).write_bytes(file.read_bytes())


def load_pretrained(path: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """Read a model directory -> (model in eval mode, tokenizer or None if the directory has none)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path} is not a model directory: {CONFIG} is missing")
    config = ModelConfig.load(path / CONFIG)  # first: a run's folder without final/ is said to be one
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not a model directory: {WEIGHTS} is missing")
    require_size(config, stored_values(path / WEIGHTS), path / CONFIG)
    model = Transformer(config)
    if (path / QUANTIZATION).is_file():  # int8/int4 linears (quant.py) in place of nn.Linear
        apply_quantization(model, QuantConfig.load(path / QUANTIZATION))
    try:
        missing, unexpected = load_model(model, path / WEIGHTS, strict=False, device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path / WEIGHTS} is not a readable safetensors file: {exc}") from None
    except RuntimeError as exc:  # shape mismatch between config.json and the weights
        raise ValueError(f"{path / WEIGHTS} does not match {CONFIG}: {str(exc).splitlines()[0]}") from None
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS} does not match {CONFIG}: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    model.to(device=device, dtype=dtype)
    tokenizer = Tokenizer.load(path / TOKENIZER) if (path / TOKENIZER).is_file() else None
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ValueError(f"{path / TOKENIZER} has {len(tokenizer)} tokens but vocab_size is {config.vocab_size}")
    return model.eval(), tokenizer


def require_size(config: ModelConfig, stored: int, where: str | Path) -> None:
    """ValueError, before a model is allocated, when `config` describes far more parameters than the `stored`
    values of the weights meant for it (a config.json with n_layer 10**7 would take all memory first). RoPE's
    cos/sin tables are no parameters but are made for the whole block_size: they are held to the same bound,
    with room for a long context (2**26 values, 256 MB)."""
    if config.num_parameters() > 8 * stored + 1_000_000:  # 8: int4 packs 2 values a byte, with room to spare
        raise ValueError(f"{where} describes {config.num_parameters():,} parameters but the weights hold "
                         f"{stored:,} values: they do not belong together (nothing was allocated)")
    tables = 2 * config.block_size * config.head_dim if config.pos_encoding == "rope" else 0
    if tables > 8 * stored + 2**26:
        raise ValueError(f"{where} describes RoPE tables of {tables:,} values (block_size {config.block_size:,}) but "
                         f"the weights hold {stored:,} values: they do not belong together (nothing was allocated)")


def stored_values(file: str | Path) -> int:
    """How many values a safetensors file holds, read from its header alone (no tensor is loaded)."""
    try:
        with safe_open(str(file), "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{file} is not a readable safetensors file: {exc}") from None


def load_generation_config(path: str | Path) -> GenerationConfig:
    file = Path(path) / GENERATION
    return GenerationConfig.load(file) if file.is_file() else GenerationConfig()
