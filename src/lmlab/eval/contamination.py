"""Train-test contamination: which eval items share a word n-gram with the training text.

    lmlab data contamination --train books/ --eval fables-mc              # a shipped task, a task YAML ...
    lmlab data contamination --train books/ --eval held-out.txt --n 8     # ... or a text (one item a paragraph)
    lmlab data contamination --train runs/demo/data/book.txt --eval my-task.yaml --model runs/demo/final

As lm-evaluation-harness's decontamination (https://github.com/EleutherAI/lm-evaluation-harness,
lm_eval/decontamination, after GPT-3's paper, Brown et al. 2020, appendix C): texts are compared as words, so
punctuation and case do not hide a copy (its Janitor lower-cases ASCII and deletes punctuation; here words are
Unicode `\\w+` runs of the case-folded text, ё read as е, so Russian text compares the same way), and an item
is contaminated when any of its 13-grams occurs in the training text. Unlike the harness, whose items shorter
than n words have no n-gram and are never flagged, such an item here counts as one gram of its length, so a
short item copied word for word is caught. An item's text is what a model would have memorised: the context
with its answer (multiple choice: the right choice; lm: the continuation; generate: the first reference). Per item: its
n-grams, how many occur in training, the training documents they occur in and one example. With a model, the
task is scored once and its metrics are averaged over all items and over the clean ones, as GPT-3's paper
compares each benchmark with its clean subset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..data.dataset import _document_names
from ..data.dedup import ngrams, split_units, word_chunks, words
from ..data.documents import find_documents, read_document
from .tasks import METRICS, SHIPPED, load_task, run_task, solved_text

TASK_SUFFIXES = (".yaml", ".yml", ".json")


def eval_items(spec: str, need_task: bool = False) -> tuple[str, list[str], Any]:
    """(name, item texts, Task or None) for a shipped task name, a task file, or text documents (paragraphs)."""
    path = Path(spec)
    if path.suffix.lower() in TASK_SUFFIXES or (not path.suffix and (SHIPPED / f"{spec}.yaml").is_file()):
        task = load_task(spec)
        return task.name, [solved_text(task, item) for item in task.items], task
    if need_task:
        raise ValueError(f"--model scores tasks; {spec} is a text")
    texts = [read_document(p) for p in find_documents([spec])]
    return path.name, [texts[u.doc][u.start:u.end] for u in split_units(texts, "paragraph")], None


def contamination(train_texts: Iterable[str], items: Sequence[str], *, n: int = 13,
                  train_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per item: {"index", "ngrams", "matched", "overlap" (matched / ngrams), "contaminated", "documents",
    "example"}. Memory: the items' n-grams and one piece of one training document: the training text is streamed
    a document at a time (read as it is reached when train_texts is a generator) and cut into words a piece at a
    time, once for every distinct gram length (n, and the word counts of items shorter than n)."""
    if n < 1:
        raise ValueError(f"n ({n}) must be at least 1")
    grams = [ngrams(words(t), n) for t in items]
    owners: dict[int, dict[str, list[int]]] = {}  # gram length -> gram -> items holding it
    for i, g in enumerate(grams):
        for s in g:
            owners.setdefault(s.count(" ") + 1, {}).setdefault(s, []).append(i)
    found: dict[str, list[int]] = {}  # gram -> training documents it occurs in
    longest = max(owners, default=1)
    doc_names = []
    for d, text in enumerate(train_texts):
        doc_names.append(train_names[d] if train_names is not None else f"text-{d}")
        for piece, _ in word_chunks(text, keep=longest - 1):  # a gram across two pieces is whole in the second
            for length, table in owners.items():
                for s in set(map(" ".join, zip(*(piece[k:] for k in range(length))))) & table.keys():
                    docs = found.setdefault(s, [])
                    if not docs or docs[-1] != d:  # the overlap repeats a gram in the next piece
                        docs.append(d)
    out = []
    for i, g in enumerate(grams):
        hit = sorted(s for s in g if s in found)
        docs = sorted({d for s in hit for d in found[s]})
        out.append({"index": i, "ngrams": len(g), "matched": len(hit), "overlap": len(hit) / len(g) if g else 0.0,
                    "contaminated": bool(hit), "documents": [doc_names[d] for d in docs],
                    "example": hit[0] if hit else None})
    return out


def check(train_sources: Sequence[str | Path], eval_spec: str, *, n: int = 13, model: Any = None,
          tokenizer: Any = None, batch_size: int = 16) -> dict[str, Any]:
    """contamination() of one eval task or text against the documents under `train_sources`; with a model
    (and the eval is a task), its metrics over all items and over the clean ones."""
    paths = find_documents(train_sources)
    name, items, task = eval_items(eval_spec, need_task=model is not None)
    if not items:
        raise ValueError(f"{eval_spec} has no items (no text)")
    per_item = contamination(map(read_document, paths), items, n=n, train_names=_document_names(paths))
    dirty = [r["index"] for r in per_item if r["contaminated"]]
    out: dict[str, Any] = {"eval": name, "n": n, "items": len(items), "contaminated": dirty,
                           "clean": len(items) - len(dirty), "per_item": per_item}
    if model is not None:
        scored = run_task(model, tokenizer, task, batch_size=batch_size)["items"]
        clean = [s for s, r in zip(scored, per_item) if not r["contaminated"]]
        out["scores"] = {subset: {m: sum(s[m] for s in rows) / len(rows) if rows else None
                                  for m in METRICS[task.kind]} | {"n": len(rows)}
                         for subset, rows in (("all", scored), ("clean", clean))}
    return out
