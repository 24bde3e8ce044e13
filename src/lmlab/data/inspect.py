"""What a corpus holds before training on it: per source (each SOURCES argument) and in total — documents,
characters, tokens, languages, encodings found, exact duplicates, the token-length histogram, tokens per
parameter for a preset, and an epoch advisor for a planned token budget.

    lmlab data inspect books/ more.epub --tokenizer tok.json --preset gpt2-small --planned-tokens 50000000

Duplicates are exact (a hash of the text): a document repeating an earlier one, and a paragraph (blank-line
separated, surrounding whitespace stripped) repeating an earlier paragraph, across the documents counted.
Near duplicates are the dedup tool's work. A file that two sources name is counted in the first only.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .dataset import _document_names
from .documents import as_sources, encoding_label, find_documents, read_document
from .filters import identify

# Muennighoff et al. 2023, "Scaling Data-Constrained Language Models": up to ~4 epochs, repeated tokens are
# worth almost as much as new ones; past that their value decays, and around 16 epochs and beyond more
# compute on the same data brings next to nothing.
MAX_USEFUL_EPOCHS = 4
WORTHLESS_EPOCHS = 16


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def duplicates(texts: Sequence[str]) -> dict[str, Any]:
    """Exact duplicate documents and paragraphs: each copy after the first counts, the first does not."""
    seen_docs: set[bytes] = set()
    seen_pars: set[bytes] = set()
    dup_docs = pars = dup_pars = par_chars = dup_par_chars = 0
    for text in texts:
        d = _digest(text.strip())
        dup_docs += d in seen_docs
        seen_docs.add(d)
        for p in (p.strip() for p in text.split("\n\n")):
            if not p:
                continue
            h = _digest(p)
            pars, par_chars = pars + 1, par_chars + len(p)
            if h in seen_pars:
                dup_pars, dup_par_chars = dup_pars + 1, dup_par_chars + len(p)
            seen_pars.add(h)
    return {"duplicate_documents": dup_docs, "duplicate_document_share": dup_docs / len(texts) if texts else 0.0,
            "paragraphs": pars, "duplicate_paragraphs": dup_pars,
            "duplicate_paragraph_share": dup_pars / pars if pars else 0.0,
            "duplicate_character_share": dup_par_chars / par_chars if par_chars else 0.0}


def histogram(lengths: Sequence[int]) -> list[dict[str, int]]:
    """Documents per power-of-two bucket of token length: [lo, hi) with lo = 2^k (and [0, 1) for empty ones)."""
    counts = Counter(0 if n == 0 else 1 << (n.bit_length() - 1) for n in lengths)
    return [{"min": lo, "max": max(1, 2 * lo), "documents": counts[lo]} for lo in sorted(counts)]


def epoch_advice(tokens: int, planned_tokens: int) -> dict[str, Any]:
    """How often a planned budget repeats the corpus (all its tokens: prepare holds out 5% of each document for
    validation, so training repeats its part slightly more often), and whether that is still worth it."""
    epochs = planned_tokens / tokens if tokens else math.inf
    if epochs > WORTHLESS_EPOCHS:
        warning = (f"the plan repeats the data {epochs:.1f} times: past ~{WORTHLESS_EPOCHS} epochs further passes "
                   "add almost nothing (Muennighoff et al. 2023); add data or plan a smaller budget")
    elif epochs > MAX_USEFUL_EPOCHS:
        warning = (f"the plan repeats the data {epochs:.1f} times: past ~{MAX_USEFUL_EPOCHS} epochs repeated tokens "
                   "are worth less than new ones (Muennighoff et al. 2023); add data if you can")
    else:
        warning = None
    return {"planned_tokens": planned_tokens, "epochs": epochs, "max_useful_epochs": MAX_USEFUL_EPOCHS,
            "warning": warning}


def _summary(docs: list[dict[str, Any]], texts: list[str], with_tokens: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"documents": len(docs), "characters": sum(d["characters"] for d in docs)}
    if with_tokens:
        out["tokens"] = sum(d["tokens"] for d in docs)
        out["token_histogram"] = histogram([d["tokens"] for d in docs])
    out["languages"] = dict(Counter(d["language"] for d in docs).most_common())
    out["encodings"] = dict(Counter(d["encoding"] for d in docs).most_common())
    out.update(duplicates(texts))
    return out


def inspect(sources: Sequence[str | Path], tokenizer: Any = None, *, model_config: Any = None,
            planned_tokens: int | None = None) -> dict[str, Any]:
    """The report: {"sources": [{source, ..., documents: [...]}], "total": {...}}; with a tokenizer also tokens
    and their histogram, with `model_config` tokens per parameter, with `planned_tokens` the epoch advice."""
    if (model_config is not None or planned_tokens is not None) and tokenizer is None:
        raise ValueError("tokens per parameter and the epoch advisor need --tokenizer")
    if planned_tokens is not None and (isinstance(planned_tokens, bool) or not isinstance(planned_tokens, int)
                                       or planned_tokens <= 0):  # -5 was "-0.00 epochs of the corpus: fine"
        raise ValueError(f"--planned-tokens ({planned_tokens!r}) must be > 0")
    report: dict[str, Any] = {"sources": []}
    all_texts: list[str] = []
    all_docs: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for source in as_sources(sources):  # one path alone is one source, not its characters
        paths = [p for p in find_documents([source]) if not (p.resolve() in seen or seen.add(p.resolve()))]
        names = _document_names(paths)
        texts = [read_document(p) for p in paths]
        docs = []
        for path, name, text in zip(paths, names, texts):
            suffix = path.suffix.lower()
            lang, p = identify(text) if text.strip() else ("und", 0.0)
            docs.append({"name": name, "characters": len(text), "language": lang, "language_score": round(p, 4),
                         "encoding": encoding_label(b"" if suffix in (".epub", ".pdf") else path.read_bytes(),
                                                    suffix)})
        if tokenizer is not None:
            for d, ids in zip(docs, tokenizer.encode_batch(texts)):
                d["tokens"] = len(ids)
        report["sources"].append({"source": str(source), **_summary(docs, texts, tokenizer is not None),
                                  "per_document": docs})
        all_texts += texts
        all_docs += docs
    total = report["total"] = _summary(all_docs, all_texts, tokenizer is not None)
    if model_config is not None:
        n = model_config.num_parameters()
        # Hoffmann et al. 2022 (Chinchilla): compute-optimal training uses ~20 tokens per parameter.
        total.update(parameters=n, tokens_per_parameter=total["tokens"] / n, chinchilla_tokens=20 * n)
    if planned_tokens is not None:
        total["epoch_advice"] = epoch_advice(total["tokens"], planned_tokens)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A readable table of the report (one row per source and the total) and the advice under it."""
    rows = [(s["source"], s) for s in report["sources"]] + [("total", report["total"])]
    head = f"{'source':<28} {'docs':>6} {'characters':>12} {'tokens':>12} {'dup docs':>8} {'dup paras':>9}  " \
           f"{'languages':<16} encodings"
    lines = [head, "-" * len(head)]
    for name, s in rows:
        tokens = f"{s['tokens']:,}" if "tokens" in s else "-"
        langs = ",".join(f"{k}:{v}" for k, v in s["languages"].items())
        encs = ",".join(f"{k}:{v}" for k, v in s["encodings"].items())
        lines.append(f"{name[-28:]:<28} {s['documents']:>6} {s['characters']:>12,} {tokens:>12} "
                     f"{s['duplicate_document_share']:>8.1%} {s['duplicate_paragraph_share']:>9.1%}  "
                     f"{langs:<16} {encs}")
    total = report["total"]
    if "token_histogram" in total:
        lines.append("document length (tokens): " + "  ".join(
            f"[{b['min']:,}, {b['max']:,}): {b['documents']}" for b in total["token_histogram"]))
    if "tokens_per_parameter" in total:
        lines.append(f"tokens per parameter: {total['tokens_per_parameter']:.2f} ({total['parameters']:,} parameters; "
                     f"Chinchilla-optimal is ~20, i.e. {total['chinchilla_tokens']:,} tokens)")
    if "epoch_advice" in total:
        a = total["epoch_advice"]
        lines.append(f"planned {a['planned_tokens']:,} tokens = {a['epochs']:.2f} epochs of the corpus: "
                     + (f"warning: {a['warning']}" if a["warning"] else f"fine (<= ~{a['max_useful_epochs']} epochs)"))
    return "\n".join(lines)
