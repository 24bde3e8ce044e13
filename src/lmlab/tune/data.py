"""Post-training data: JSONL files, one example per line, each error naming its line (`FILE:LINE: why`).

    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is 2 plus 3?"},
                  {"role": "assistant", "content": "Answer: 5."}]}          # a conversation
    {"prompt": "Once upon a time", "completion": " there was a fox."}       # prompt–completion

Every format is read by data.jsonl.read_jsonl(path, check): `check(obj)` returns the example or raises
ValueError with the reason, which comes out as one line naming the file and the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.jsonl import read_jsonl

ROLES = ("system", "user", "assistant")


def _text(record: dict[str, Any], key: str, where: str = "") -> str:
    if key not in record:
        raise ValueError(f"{where}no {key!r}")
    if not isinstance(record[key], str):
        raise ValueError(f"{where}{key!r} must be a string, not {type(record[key]).__name__}")
    return record[key]


def check_conversation(record: Any) -> list[dict[str, str]]:
    """{"messages": [{"role", "content"}, ...]}: known roles, string contents, at least one assistant turn
    and no empty one (an empty reply would teach the model to end its turn at once). Other turns may be
    empty; other keys are ignored."""
    if not isinstance(record, dict) or "messages" not in record:
        raise ValueError('a conversation must be an object with "messages"')
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    out = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} must be an object, not {type(m).__name__}")
        role = _text(m, "role", f"message {i}: ")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (use {', '.join(ROLES)})")
        content = _text(m, "content", f"message {i}: ")
        if role == "assistant" and not content.strip():
            raise ValueError(f"message {i}: empty assistant turn")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant turn: nothing to learn from")
    return out


def check_prompt_completion(record: Any) -> dict[str, str]:
    """{"prompt": str, "completion": non-empty str}."""
    if not isinstance(record, dict):
        raise ValueError(f"an example must be an object, not {type(record).__name__}")
    prompt, completion = _text(record, "prompt"), _text(record, "completion")
    if not completion.strip():
        raise ValueError("empty completion")
    return {"prompt": prompt, "completion": completion}


def check_sft_example(record: Any) -> tuple[str, Any]:
    """A conversation or a prompt–completion pair -> ("messages", list) or ("prompt", dict)."""
    if isinstance(record, dict) and "messages" in record:
        return "messages", check_conversation(record)
    if isinstance(record, dict) and ("prompt" in record or "completion" in record):
        return "prompt", check_prompt_completion(record)
    raise ValueError('expected a conversation {"messages": [...]} or {"prompt": ..., "completion": ...}')


def read_sft(path: str | Path) -> tuple[str, list[tuple[int, Any]]]:
    """A file of conversations or of prompt–completion pairs (not both) -> (kind, [(line, example)])."""
    rows = read_jsonl(path, check_sft_example)
    kind = rows[0][1][0]
    for number, (k, _) in rows:
        if k != kind:
            raise ValueError(f"{path}:{number}: a {'conversation' if k == 'messages' else 'prompt–completion pair'} "
                             f"in a file of {'conversations' if kind == 'messages' else 'prompt–completion pairs'}")
    return kind, [(number, example) for number, (_, example) in rows]
