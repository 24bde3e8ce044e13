"""Tasks from your own texts: multiple choice built only from the held-out (validation) part of each book in a
training run's dataset, so the model is scored on passages it never trained on.

Held out means exactly the tokens the run's token file puts in its validation region (lmlab.data: the last
`val_fraction` of each document's tokens, never inside a training window); they are decoded back to text
with the run's tokenizer. Distractors come from the same held-out text.

    cloze:          context = the preceding sentence and a sentence up to its last word; choices = that word
                    and words of similar length from elsewhere in the held-out text
    next-sentence:  context = a sentence; choices = the sentence that follows it and other held-out sentences
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data import TokenDataset
from ..files import atomic_write_text
from ..tokenizers import Tokenizer

KINDS = ("cloze", "next-sentence")
_SENTENCE = re.compile(r"[^.!?…\n]+[.!?…]+[»”“\"'’)\]]*")  # the closing quotes and brackets stay with their sentence


def held_out_texts(run_dir: str | Path, books: Sequence[str] = ()) -> dict[str, str]:
    """{document name: its held-out text} of a run (or a dataset folder with the run's tokenizer beside it);
    `books` (names, file names or stems) selects documents."""
    run = Path(run_dir)
    config = run / "config.json"
    if config.is_file():
        data = run / json.loads(config.read_text(encoding="utf-8")).get("dataset", "data")
    else:
        data = run
    tok_file = run / "tokenizer.json" if (run / "tokenizer.json").is_file() else data.parent / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {run}: give a training run directory")
    tok = Tokenizer.load(tok_file)
    ds = TokenDataset.open(data, tok)
    wanted = set(books)
    out = {}
    for d in ds.documents:
        if wanted and not wanted & {d.name, Path(d.name).name, Path(d.name).stem}:
            continue
        if d.val_tokens:
            out[d.name] = tok.decode(ds.tokens[d.val[0]:d.val[1]].tolist())
    if wanted and not out:
        raise ValueError(f"none of {', '.join(sorted(wanted))} has held-out text in {data}")
    if not out:
        raise ValueError(f"{data} holds no held-out text (train it with --val-fraction > 0)")
    return out


def make_items(texts: Sequence[str], kind: str, *, n: int = 100, choices: int = 4, seed: int = 0) -> list[dict]:
    """Up to n multiple-choice items (fewer if the text is short); the answer's position is random; no two
    choices of an item are equal up to case."""
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if n < 1:  # 0 and below took every item there is
        raise ValueError(f"items ({n}) must be >= 1")
    rng = random.Random(seed)
    # (text, start, end) of each sentence; contexts are cut from the text itself, so each is one literal passage
    spans = [(t, m.start() + len(m.group()) - len(m.group().lstrip()), m.end()) for t in texts
             for m in _SENTENCE.finditer(t) if len(m.group().split()) >= 4]
    sentences = [t[a:b] for t, a, b in spans]
    items = []
    if kind == "cloze":
        words = sorted({w for s in sentences for w in re.findall(r"\w+", s) if len(w) >= 3})
        for i in rng.sample(range(len(spans)), len(spans)):
            text, start, end = spans[i]
            m = re.search(r"(\w+)(\W*)$", text[start:end])
            if not m or len(m.group(1)) < 3:
                continue
            answer = m.group(1)
            pool = _distinct([w for w in words if abs(len(w) - len(answer)) <= 2], answer) or \
                _distinct(words, answer)
            if len(pool) < choices - 1:
                continue
            first = spans[i - 1][1] if i and spans[i - 1][0] is text else start  # the sentence before, if any
            context = text[first:start + m.start(1)].rstrip()
            items.append(_item(context, answer, rng.sample(pool, choices - 1), rng))
            if len(items) == n:
                break
    else:
        for i in rng.sample(range(len(spans) - 1), max(len(spans) - 1, 0)):
            if spans[i + 1][0] is not spans[i][0]:
                continue
            pool = _distinct([s for j, s in enumerate(sentences) if j not in (i, i + 1)], sentences[i + 1])
            if len(pool) < choices - 1:
                continue
            items.append(_item(sentences[i], sentences[i + 1], rng.sample(pool, choices - 1), rng))
            if len(items) == n:
                break
    if not items:
        raise ValueError("the held-out text is too short to build any item")
    return items


def _distinct(candidates: Sequence[str], answer: str) -> list[str]:
    """The candidates for distractors with one of each case-folded form, and none that is the answer up to case:
    a text that repeats a sentence gave two identical choices, and "Ёжик" was offered beside the answer "ёжик"."""
    seen, out = {answer.casefold()}, []
    for c in candidates:
        if c.casefold() not in seen:
            seen.add(c.casefold())
            out.append(c)
    return out


def _yaml_string(text: str) -> str:
    """A YAML double-quoted scalar: JSON's escapes, and \\u escapes for the characters YAML may not hold raw
    (DEL, C1 controls, U+FFFE/FFFF, lone surrogates) or reads as line breaks (NEL, U+2028/9): json.dumps keeps
    them, and a name with DEL gave a task file that could not be read back."""
    return re.sub("[^\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]",
                  lambda m: f"\\u{ord(m.group()):04x}", json.dumps(text, ensure_ascii=False))


def _item(context: str, answer: str, distractors: list[str], rng: random.Random) -> dict[str, Any]:
    options = [answer, *distractors]
    rng.shuffle(options)
    return {"context": context, "choices": options, "answer": options.index(answer)}


def write_task(path: str | Path, name: str, items: list[dict], *, source: str) -> Path:
    """NAME.yaml + NAME.jsonl beside it, each written atomically; an existing task is not overwritten."""
    path = Path(path).with_suffix(".yaml")
    data = path.with_suffix(".jsonl")
    for p in (path, data):
        if p.exists():
            raise ValueError(f"{p} exists; choose another --out or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(data, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    atomic_write_text(path, f"# made by lmlab eval make-task from the held-out text of {source}\n"
                            f"name: {_yaml_string(name)}\nkind: multiple_choice\n"
                            f"data: {_yaml_string(data.name)}\ntarget_delimiter: \" \"\n")
    return path
