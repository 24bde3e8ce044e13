"""What both exporters read from a model directory, and how every exporter writes its output.

A model directory's tokenizer is either lmlab's own `tokenizer.json` (specials at ids 0..3) or, for a
model imported from a checkpoint whose vocabulary puts other tokens there (real GPT-2: ids 0..3 are
``! " # $``), the original Hugging Face tokenizer kept unchanged in `hf_tokenizer/` (see import_hf).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from ..files import COMPONENT_BYTES, FILE_NAME_BYTES, NAME_MAX, atomic_path, staged_dir
from ..models import Transformer
from ..models.io import CONFIG, HF_TOKENIZER_DIR, TOKENIZER, WEIGHTS, load_pretrained
from ..models.quant import QUANTIZATION
from ..tokenizers import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from ..tokenizers.chat_format import TEMPLATE_FILE

CHAT_TEMPLATE = TEMPLATE_FILE  # the file name transformers itself uses
GENERATION_CONFIG = "generation_config.json"  # transformers' generation defaults; in HF_TOKENIZER_DIR: its stop ids
END_OF_TURN = "<|end|>"  # lmlab.tune.chat.END, which this layer cannot import
# what a model directory of another format is: the exporters and to_hf_model say the same
QUANTIZED = (f"is an lmlab int8/int4 model; export the model it was quantized from (see {QUANTIZATION}: "
             "source)")


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
    eos_ids: tuple[int, ...] = ()       # where generation stops: EOS, a chat model's <|end|>, a checkpoint's list


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


def end_of_turn_id(tokenizer: HFTokenizer, template: str | None) -> int | None:
    """The id of lmlab's end of turn when the model has its chat format (the token, and a template that writes
    it): a reply ends there, not only at EOS."""
    end = tokenizer.token_to_id(END_OF_TURN)
    return end if end is not None and template is not None and END_OF_TURN in template else None


def eos_token_ids(value: object, file: Path, vocab_size: int) -> list[int]:
    """transformers' eos_token_id (an id, a list of them, or null) as a list; ValueError naming `file` otherwise."""
    ids = [value] if isinstance(value, int) else value if isinstance(value, list) else [] if value is None else None
    if ids is None or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size for i in ids):
        raise ValueError(f"{file}: eos_token_id must be a token id below {vocab_size} or a list of them, not "
                         f"{value!r:.60}")
    return list(dict.fromkeys(ids))


def check_out_name(out: str | Path, *, file: bool = False) -> None:
    """ValueError naming `out` when its name is longer than the writer's temporary name beside it may be: a folder
    is staged as .NAME.XXXXXXXX.tmp (staged_dir), a file as .NAME.<12 hex>.tmp (files.temp_beside). The file
    system refused those only after the whole export, naming the hidden temporary."""
    name = Path(os.path.abspath(out)).name
    limit = FILE_NAME_BYTES if file else COMPONENT_BYTES
    size, what = len(os.fsencode(name)), "file" if file else "folder"
    if size > limit:
        raise ValueError(f"{out}: the name is {size} bytes, longer than the {limit} an output {what} name may have "
                         f"(a file name holds {NAME_MAX} bytes, less the temporary name's); choose a shorter one")


def load_model_dir(path: str | Path) -> ModelDir:
    """Load a model directory for export; it must carry a tokenizer that fits the model."""
    path = Path(path)
    if (path / QUANTIZATION).is_file():
        raise ValueError(f"{path} {QUANTIZED}")
    model, tok = load_pretrained(path)  # FileNotFoundError / ValueError with a clear message
    template_file = path / CHAT_TEMPLATE
    template = read_utf8(template_file) if template_file.is_file() else None
    if tok is not None:
        names = {"bos_token": "<BOS>", "eos_token": "<EOS>", "unk_token": "<UNK>", "pad_token": "<PAD>"}
        end = end_of_turn_id(tok.hf, template)
        return ModelDir(path, model, tok.hf, LMLAB_SPECIALS, names, template, tok,
                        (EOS_ID,) if end is None else (EOS_ID, end))
    if not (path / HF_TOKENIZER_DIR).is_dir():
        raise FileNotFoundError(f"{path} has no {TOKENIZER}: a model without a tokenizer cannot be exported")
    hf, names, foreign_template = read_hf_tokenizer_files(path / HF_TOKENIZER_DIR)
    size = hf.get_vocab_size(with_added_tokens=True)
    if size > model.config.vocab_size:
        raise ValueError(f"{path / HF_TOKENIZER_DIR} has {size} tokens but vocab_size is {model.config.vocab_size}")
    ids = {k: hf.token_to_id(v) for k, v in names.items()}
    specials = Specials(ids.get("bos_token"), ids.get("eos_token"), ids.get("unk_token"), ids.get("pad_token"))
    template = template or foreign_template
    # the checkpoint's own stop ids where it listed more than its tokenizer's EOS (import_hf keeps them there)
    stop_file = path / HF_TOKENIZER_DIR / GENERATION_CONFIG
    eos = eos_token_ids(_json_object(stop_file).get("eos_token_id"), stop_file, model.config.vocab_size) \
        if stop_file.is_file() else [] if specials.eos is None else [specials.eos]
    end = end_of_turn_id(hf, template)
    eos += [] if end is None or end in eos else [end]
    return ModelDir(path, model, hf, specials, names, template, None, tuple(eos))


def staged_file(out: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) for a temporary file beside `out`, then rename it to `out`."""
    with atomic_path(out) as tmp:
        write(tmp)
    return Path(out)


__all__ = ["CONFIG", "WEIGHTS", "TOKENIZER", "CHAT_TEMPLATE", "END_OF_TURN", "GENERATION_CONFIG", "HF_TOKENIZER_DIR",
           "LMLAB_SPECIALS", "QUANTIZED", "ModelDir", "Specials", "check_out_name", "end_of_turn_id", "eos_token_ids",
           "load_model_dir", "read_hf_tokenizer_files", "staged_dir", "staged_file"]
