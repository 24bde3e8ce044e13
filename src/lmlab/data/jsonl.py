"""JSONL files of examples, one reader for every format (evaluation tasks, fine-tuning conversations and
pairs): each error is one line naming the file and the line, `FILE:LINE: why`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def read_jsonl(path: str | Path, check: Callable[[Any], T]) -> list[tuple[int, T]]:
    """(line number, check(record)) for every non-blank line of a UTF-8 JSONL file; ValueError naming the line
    at the first bad one (bad UTF-8, bad JSON, or whatever `check` refuses with a ValueError), and for a file
    with no examples."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    out = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{number}: not UTF-8 (byte {exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if "\\u" in line:  # only an escape can hold a lone surrogate ("\ud800"): check those lines alone
                    json.dumps(record, ensure_ascii=False).encode("utf-8")
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg}, column {exc.colno})") from None
            except UnicodeEncodeError:
                raise ValueError(f"{path}:{number}: a \\u escape that is half of a character (a lone surrogate), "
                                 "not text") from None
            except RecursionError:
                raise ValueError(f"{path}:{number}: JSON nested too deeply") from None
            except ValueError as exc:  # json's own limits, such as an integer of more than 4300 digits
                raise ValueError(f"{path}:{number}: not JSON that can be read ({exc})") from None
            try:
                out.append((number, check(record)))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
    if not out:
        raise ValueError(f"{path}: no examples (an empty file)")
    return out
