"""What both exporters read from a model directory, and how every exporter writes its output.

A model directory's tokenizer is either lmlab's own `tokenizer.json` (specials at ids 0..3) or, for a
model imported from a checkpoint whose vocabulary puts other tokens there (real GPT-2: ids 0..3 are
``! " # $``), the original Hugging Face tokenizer kept unchanged in `hf_tokenizer/` (see import_hf).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from ..files import atomic_path, staged_dir
from ..models import Transformer
from ..models.io import CONFIG, TOKENIZER, WEIGHTS, load_pretrained
from ..models.quant import QUANTIZATION
from ..tokenizers import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

HF_TOKENIZER_DIR = "hf_tokenizer"     # a foreign tokenizer, as transformers saved it
CHAT_TEMPLATE = "chat_template.jinja"  # the file name transformers itself uses


@dataclass(frozen=True)
class Specials:
    """Ids of the special tokens, None where the vocabulary has none."""
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None


LMLAB_SPECIALS = Specials(bos=BOS_ID, eos=EOS_ID, unk=UNK_ID, pad=PAD_ID)


@dataclass
class ModelDir:
    """A loaded model directory: the model, its tokenizer (as a `tokenizers` object) and what the
    exporters need to describe that tokenizer to other libraries."""
    path: Path
    model: Transformer
    tokenizer: HFTokenizer
    specials: Specials
    special_tokens: dict[str, str]      # {"bos_token": "<BOS>", ...} for transformers
    chat_template: str | None
    lmlab_tokenizer: Tokenizer | None   # None when the tokenizer is a foreign one


def _token_name(entry: object) -> str | None:
    """tokenizer_config.json stores a special token as a string or as an AddedToken dict."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def read_hf_tokenizer_files(folder: Path) -> tuple[HFTokenizer, dict[str, str], str | None]:
    """tokenizer.json + tokenizer_config.json (+ chat template) as transformers writes them."""
    file = folder / TOKENIZER
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no {TOKENIZER} (lmlab reads fast tokenizers only: load the "
                                "checkpoint with transformers.AutoTokenizer and save_pretrained it once)")
    try:
        hf = HFTokenizer.from_str(file.read_text(encoding="utf-8"))
    except Exception as exc:  # tokenizers raises a plain Exception on bad JSON
        raise ValueError(f"{file} is not a valid tokenizer.json: {str(exc).splitlines()[0]}") from None
    config = _json_object(folder / "tokenizer_config.json")
    special_map = _json_object(folder / "special_tokens_map.json")  # older transformers keep them here
    names = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        name = _token_name(config.get(key)) or _token_name(special_map.get(key))
        if name is not None:
            if hf.token_to_id(name) is None:
                raise ValueError(f"{folder}: {key} {name!r} is not in the tokenizer's vocabulary")
            names[key] = name
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates ([{"name", "template"}]): transformers' default is "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if (folder / CHAT_TEMPLATE).is_file():
        template = read_utf8(folder / CHAT_TEMPLATE)
    return hf, names, template if isinstance(template, str) else None


def _json_object(file: Path) -> dict[str, Any]:
    """A JSON object file, {} when there is none; ValueError naming it when it is not one."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(read_utf8(file))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must be a JSON object, not a {type(data).__name__}")
    return data


def read_utf8(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_model_dir(path: str | Path) -> ModelDir:
    """Load a model directory for export; it must carry a tokenizer that fits the model."""
    path = Path(path)
    if (path / QUANTIZATION).is_file():
        raise ValueError(f"{path} is an lmlab int8/int4 model; export the model it was quantized from "
                         f"(see {QUANTIZATION}: source)")
    model, tok = load_pretrained(path)  # FileNotFoundError / ValueError with a clear message
    template_file = path / CHAT_TEMPLATE
    template = read_utf8(template_file) if template_file.is_file() else None
    if tok is not None:
        names = {"bos_token": "<BOS>", "eos_token": "<EOS>", "unk_token": "<UNK>", "pad_token": "<PAD>"}
        return ModelDir(path, model, tok.hf, LMLAB_SPECIALS, names, template, tok)
    if not (path / HF_TOKENIZER_DIR).is_dir():
        raise FileNotFoundError(f"{path} has no {TOKENIZER}: a model without a tokenizer cannot be exported")
    hf, names, foreign_template = read_hf_tokenizer_files(path / HF_TOKENIZER_DIR)
    size = hf.get_vocab_size(with_added_tokens=True)
    if size > model.config.vocab_size:
        raise ValueError(f"{path / HF_TOKENIZER_DIR} has {size} tokens but vocab_size is {model.config.vocab_size}")
    ids = {k: hf.token_to_id(v) for k, v in names.items()}
    specials = Specials(ids.get("bos_token"), ids.get("eos_token"), ids.get("unk_token"), ids.get("pad_token"))
    return ModelDir(path, model, hf, specials, names, template or foreign_template, None)


def staged_file(out: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) for a temporary file beside `out`, then rename it to `out`."""
    with atomic_path(out) as tmp:
        write(tmp)
    return Path(out)


__all__ = ["CONFIG", "WEIGHTS", "TOKENIZER", "CHAT_TEMPLATE", "HF_TOKENIZER_DIR", "LMLAB_SPECIALS", "ModelDir",
           "Specials", "load_model_dir", "read_hf_tokenizer_files", "staged_dir", "staged_file"]
