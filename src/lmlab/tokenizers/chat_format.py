"""The chat format's tokens and its Jinja template (lmlab.tune.chat renders and trains with them): here, below the
rooms that read a chat model (eval's lm-eval bridge, models, interop), so that none of them imports tune."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"
CHAT_TOKENS = (*MARKERS.values(), END)
TEMPLATE_FILE = "chat_template.jinja"  # the file name transformers itself uses
TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|system|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'user' -%}<|user|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def chat_token_ids(tokenizer: Any) -> dict[str, int]:
    """{"system": id, "user": id, "assistant": id, "end": id}; ValueError when the tokenizer lacks them."""
    ids = {role: tokenizer.token_to_id(t) for role, t in (*MARKERS.items(), ("end", END))}
    missing = [t for t, i in zip(CHAT_TOKENS, ids.values()) if i is None]
    if missing:
        raise ValueError(f"the tokenizer has no chat tokens ({', '.join(missing)}); fine-tune the model on "
                         "conversations first (lmlab tune sft)")
    return ids  # type: ignore[return-value]


def has_template(model_dir: str | Path) -> bool:
    """Whether a model directory holds lmlab's chat template (a plain file, not a link)."""
    file = Path(model_dir) / TEMPLATE_FILE
    return file.is_file() and not file.is_symlink() and file.read_text(encoding="utf-8", errors="replace") == TEMPLATE
