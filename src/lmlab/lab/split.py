"""Reasoning / knowledge / noise (`lmlab lab data split`): every passage of the user's text gets one of three labels
by rules written out below, with the scores behind the label, and each class is written as a text file that
`lmlab data prepare --weight` and `lmlab lab data mix` take as a source.

    lmlab lab data split books/ --out runs/split                            # heuristics only
    lmlab lab data split books/ --model runs/demo/final --out runs/split    # + the model's loss and gradient norm

A passage is a paragraph (text between blank lines) or, with unit="document", a whole document. Scores, per passage:
- words: letter/digit runs (Latin or Cyrillic); lines: non-empty lines.
- symbol_ratio: characters that are neither letters, digits nor whitespace, over all non-space characters.
- repetition: 1 − distinct word 3-grams / word 3-grams (0 for fewer than 3 words): boilerplate and spam repeat
  themselves (Gopher, Rae et al. 2021, https://arxiv.org/abs/2112.11446, filters on duplicate n-gram shares).
- short_lines: share of lines with fewer than 3 words (menus, link lists, tables of contents).
- markers: reasoning connectives and argument markers from REASONING_WORDS (English and Russian).
- numbers (words with a digit), dates (years 1000–2099 and month names), entities (capitalised words that do not
  start a sentence), definitions (DEFINITION_PATTERNS such as "is a", "refers to", "— это", "называется").
- reasoning = 100 × MARKER_WEIGHT × markers / words; knowledge = 100 × (numbers + dates + entities +
  DEFINITION_WEIGHT × definitions) / words.
- with a model: loss (mean token NLL of the passage), loss_gap (loss − the median loss of all passages), loss_z
  (robust z-score: loss_gap / (1.4826 × MAD) over all passages) and grad_norm (the L2 norm of the gradient of the
  passage's loss: how hard one step on it would push the model). grad_norm is shown, not used by the rules.

Rules, first match wins (the `rule` field names the one that fired):
1. noise/short: fewer than MIN_WORDS words;  2. noise/symbols: symbol_ratio > MAX_SYMBOL_RATIO;
3. noise/repetition: repetition > MAX_REPETITION;  4. noise/short_lines: at least 3 lines and short_lines >
MAX_SHORT_LINES;  5. noise/model: loss_z > MAX_LOSS_Z and loss_gap > MIN_LOSS_GAP nats (the model finds it far less
predictable than the rest; the gap keeps a homogeneous corpus, whose MAD is tiny, from flagging ordinary passages;
needs a model and at least MIN_PASSAGES_FOR_Z passages);  6. reasoning/markers: reasoning > knowledge;
7. knowledge/default: everything else (facts and plain narrative alike: it is what the model stores, not argues).
"""

from __future__ import annotations

import html
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import find_documents, read_document
from ..data.dataset import _document_names
from ..files import atomic_write_text
from .facts.report import write_report

LABELS = ("reasoning", "knowledge", "noise")
MIN_WORDS, MAX_SYMBOL_RATIO, MAX_REPETITION, MAX_SHORT_LINES = 5, 0.3, 0.5, 0.5
MAX_LOSS_Z, MIN_LOSS_GAP, MIN_PASSAGES_FOR_Z = 3.0, 0.5, 10
MARKER_WEIGHT, DEFINITION_WEIGHT = 3, 2

REASONING_WORDS = frozenset("""
because therefore thus hence consequently since if then implies imply follows suppose assume assuming proof prove
proves conclude conclusion reason why however although whereas unless
потому поэтому следовательно значит если тогда однако хотя поскольку ибо откуда итак предположим допустим докажем
доказательство вывод причина почему означает следует
""".split())
MONTHS = frozenset("""
january february march april may june july august september october november december
января февраля марта апреля мая июня июля августа сентября октября ноября декабря
январь февраль март апрель май июнь июль август сентябрь октябрь ноябрь декабрь
""".split())
DEFINITION_PATTERNS = re.compile(r"\b(is an?|is the|are the|refers to|is defined as|known as)\b|"
                                 r"\s[—-]\s*это\b|\b(является|называется|называют|это есть)\b", re.IGNORECASE)
_WORD = re.compile(r"[0-9A-Za-zА-Яа-яЁё]+(?:[-'’][0-9A-Za-zА-Яа-яЁё]+)*")
_YEAR = re.compile(r"^(1\d{3}|20\d{2})$")


def passages(text: str, unit: str = "paragraph") -> list[str]:
    """Paragraphs (split on blank lines, stripped, empty ones dropped), or the whole text for unit="document"."""
    if unit == "document":
        return [text.strip()] if text.strip() else []
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def heuristic_scores(text: str) -> dict[str, float]:
    """The scores of the module docstring that need no model."""
    matches = list(_WORD.finditer(text))
    words = [m.group() for m in matches]
    n = len(words)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    chars = [c for c in text if not c.isspace()]
    symbols = sum(not c.isalnum() for c in chars)
    grams = list(zip(words, words[1:], words[2:]))
    entities = 0
    for m in matches:
        # what precedes the word, short of spaces, opening quotes and dashes: a sentence starts after nothing, a
        # line break, or an end mark (perhaps followed by a closing quote)
        prev = text[max(0, m.start() - 8):m.start()].rstrip(" \t«\"“'(—–-")
        first = not prev or prev[-1] in ".!?…\n" or (prev[-1] in "\"'»”)" and len(prev) > 1 and prev[-2] in ".!?…")
        if m.group()[0].isupper() and not m.group().isupper() and not first:
            entities += 1  # capitalised, not all caps (LOUD noise), not the first word of a sentence
    lower = [w.lower() for w in words]
    s = {"words": n, "lines": len(lines),
         "symbol_ratio": symbols / len(chars) if chars else 0.0,
         "repetition": 1 - len(set(grams)) / len(grams) if grams else 0.0,
         "short_lines": sum(len(_WORD.findall(ln)) < 3 for ln in lines) / len(lines) if lines else 0.0,
         "markers": sum(w in REASONING_WORDS for w in lower),
         "numbers": sum(any(c.isdigit() for c in w) for w in words),
         "dates": sum(bool(_YEAR.match(w)) or w in MONTHS for w in lower),
         "entities": entities,
         "definitions": len(DEFINITION_PATTERNS.findall(text))}
    s["reasoning"] = 100 * MARKER_WEIGHT * s["markers"] / n if n else 0.0
    s["knowledge"] = (100 * (s["numbers"] + s["dates"] + s["entities"] + DEFINITION_WEIGHT * s["definitions"]) / n
                      if n else 0.0)
    return s


def label(s: dict[str, float]) -> tuple[str, str]:
    """(label, rule) by the rules of the module docstring, in order."""
    if s["words"] < MIN_WORDS:
        return "noise", "noise/short"
    if s["symbol_ratio"] > MAX_SYMBOL_RATIO:
        return "noise", "noise/symbols"
    if s["repetition"] > MAX_REPETITION:
        return "noise", "noise/repetition"
    if s["lines"] >= 3 and s["short_lines"] > MAX_SHORT_LINES:
        return "noise", "noise/short_lines"
    if s.get("loss_z") is not None and s["loss_z"] > MAX_LOSS_Z and s["loss_gap"] > MIN_LOSS_GAP:
        return "noise", "noise/model"
    if s["reasoning"] > s["knowledge"]:
        return "reasoning", "reasoning/markers"
    return "knowledge", "knowledge/default"


def model_scores(model_dir: str | Path, texts: list[str]) -> list[dict[str, float | None]]:
    """Per passage: loss (mean token NLL over windows of the model's block size), grad_norm and loss_z."""
    from ..models.io import load_pretrained
    model, tok = load_pretrained(model_dir)
    if tok is None:
        raise ValueError(f"{model_dir} has no tokenizer.json; the passages cannot be tokenised for it")
    block = model.config.block_size
    out: list[dict[str, float | None]] = []
    for text in texts:
        ids = tok.encode(text, add_bos=True)
        if len(ids) < 2:
            out.append({"loss": None, "grad_norm": None})
            continue
        model.zero_grad(set_to_none=True)
        n_targets, total = len(ids) - 1, 0.0
        for i in range(0, n_targets, block):  # windows of the block size; each token a target once
            chunk = torch.tensor(ids[i:i + block + 1])[None]
            loss = model(chunk[:, :-1], chunk[:, 1:]).loss * (chunk.shape[1] - 1) / n_targets
            loss.backward()  # summed over windows: the gradient of the passage's mean loss
            total += loss.item()
        grads = [p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None]
        out.append({"loss": total, "grad_norm": float(torch.stack(grads).sum().sqrt())})
    losses = [o["loss"] for o in out if o["loss"] is not None]
    med = statistics.median(losses) if losses else 0.0
    mad = 1.4826 * statistics.median([abs(v - med) for v in losses]) if losses else 0.0
    for o in out:
        ok = o["loss"] is not None and len(losses) >= MIN_PASSAGES_FOR_Z and mad > 0
        o["loss_gap"] = o["loss"] - med if o["loss"] is not None else None
        o["loss_z"] = o["loss_gap"] / mad if ok else None
    return out


def run_split(sources: list[str | Path], out: str | Path, model_dir: str | Path | None = None,
              unit: str = "paragraph", command: str = "") -> dict[str, Any]:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder")
    if unit not in ("paragraph", "document"):
        raise ValueError(f"unit must be paragraph or document, not {unit!r}")
    paths = find_documents(sources)
    if not paths:
        raise ValueError(f"no documents found in {', '.join(map(str, sources))}")
    t0 = time.perf_counter()
    names = _document_names(paths)  # two notes.txt in different folders are two sources
    rows = [{"source": name, "index": i, "text": t} for p, name in zip(paths, names)
            for i, t in enumerate(passages(read_document(p), unit))]
    if not rows:
        raise ValueError("the sources hold no text")
    extra = model_scores(model_dir, [r["text"] for r in rows]) if model_dir else [{}] * len(rows)
    for r, m in zip(rows, extra):
        r["scores"] = {**heuristic_scores(r["text"]), **m}
        r["label"], r["rule"] = label(r["scores"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "passages.jsonl", "".join(json.dumps({k: r[k] for k in ("source", "index", "label", "rule",
                      "scores", "text")}, ensure_ascii=False) + "\n" for r in rows))
    for lab in LABELS:
        atomic_write_text(out / f"{lab}.txt", "\n\n".join(r["text"] for r in rows if r["label"] == lab) + "\n")
    counts = {lab: sum(r["label"] == lab for r in rows) for lab in LABELS}
    words = {lab: sum(r["scores"]["words"] for r in rows if r["label"] == lab) for lab in LABELS}
    table = [{"class": lab, "passages": counts[lab], "words": words[lab],
              "rules that fired": ", ".join(sorted({r["rule"] for r in rows if r["label"] == lab})) or "—"}
             for lab in LABELS]
    per_source = [{"source": name, **{lab: sum(r["label"] == lab and r["source"] == name for r in rows)
                                      for lab in LABELS}} for name in names]
    mean_loss = {lab: statistics.mean(v) if (v := [r["scores"]["loss"] for r in rows if r["label"] == lab
                                                   and r["scores"].get("loss") is not None]) else None
                 for lab in LABELS}
    others = [r["scores"]["loss"] for r in rows if r["label"] != "noise" and r["scores"].get("loss") is not None]
    checks = {"noise is less predictable to the model than the rest (mean loss)":
              None if mean_loss["noise"] is None or not others else mean_loss["noise"] > statistics.mean(others)}
    measured = (f"{len(rows)} {unit}s: " + ", ".join(f"{lab} {counts[lab]}" for lab in LABELS)
                + ("; mean loss " + ", ".join(f"{lab} {v:.3f}" for lab, v in mean_loss.items() if v is not None)
                   if model_dir else "; no model given (heuristics only)"))
    results = {"unit": unit, "model": str(model_dir) if model_dir else None, "counts": counts, "words": words,
               "mean_loss": mean_loss, "files": {lab: f"{lab}.txt" for lab in LABELS},
               "speed": {"wall_s": time.perf_counter() - t0}}
    write_report(out, "split", "Passages split into reasoning, knowledge and noise by the documented rules below; "
                 "each label shows the scores behind it.", measured, checks, table, [], results,
                 command or "lmlab lab data split", [("passages per source", per_source)],
                 title="lmlab lab data", claim_label="<b>What this is</b> (the dataset as a designed object)",
                 extra_html=_examples(rows), note=_RULES_NOTE)
    return results


_RULES_NOTE = (f"Rules, first match wins: fewer than {MIN_WORDS} words, symbol ratio > {MAX_SYMBOL_RATIO}, repeated "
               f"word 3-grams > {MAX_REPETITION}, short lines > {MAX_SHORT_LINES} (3+ lines), or model loss z > "
               f"{MAX_LOSS_Z} and {MIN_LOSS_GAP} nats above the median → noise; reasoning score (100 × {MARKER_WEIGHT} "
               f"× markers / words) above knowledge score (100 × (numbers + dates + entities + {DEFINITION_WEIGHT} "
               "× definitions) / words) → reasoning; else knowledge. Every passage with its scores: passages.jsonl.")


def _examples(rows: list[dict[str, Any]], per_class: int = 5) -> str:
    """Up to `per_class` passages of each class with their scores (the most typical first: highest own score)."""
    key = {"reasoning": "reasoning", "knowledge": "knowledge", "noise": "symbol_ratio"}
    shown = ("rule", "words", "reasoning", "knowledge", "symbol_ratio", "repetition", "short_lines", "loss", "loss_gap",
             "loss_z", "grad_norm")
    parts = []
    for lab in LABELS:
        mine = sorted((r for r in rows if r["label"] == lab), key=lambda r: -r["scores"][key[lab]])[:per_class]
        parts.append(f"<h2>{lab}: examples</h2>" + ("<p>none</p>" if not mine else "<table><tr>" + "".join(
            f"<th>{c}</th>" for c in ("passage", *shown)) + "</tr>" + "".join(
            "<tr><td>" + html.escape(r["text"][:300]) + ("…" if len(r["text"]) > 300 else "") + "</td>" + "".join(
                f"<td>{html.escape(_cell(r['rule'] if c == 'rule' else r['scores'].get(c)))}</td>" for c in shown)
            + "</tr>" for r in mine) + "</table>"))
    return "".join(parts)


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v:.3g}" if isinstance(v, float) and np.isfinite(v) else str(v)
