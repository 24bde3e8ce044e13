"""Quality filters with receipts: Gopher, C4 and FineWeb heuristics and a language filter, each with its
thresholds as knobs, applied in the order given; the run reports what each removed and shows examples.

    lmlab data filter books/ --filters gopher,c4,fineweb,lang=ru --out filtered/
    lmlab data prepare books/ --tokenizer tok.json --out data/ --filters "gopher:max_words=2000000,lang=ru"

A spec is a comma list of NAME[:KEY=VALUE]... (`lang=ru+uk:min_score=0.8` for the language filter). Filters
are opt-in; `prepare --filters` records the receipts (without the examples) in tokens.json under "filters".

Terms shared by the rules: a *line* is a line of the text stripped of surrounding whitespace, blank lines not
counted; a *word* is a whitespace-separated token with at least one character that is not punctuation or a
symbol (Unicode categories P*, S*), so "—" and "..." are not words; a word's *length* is counted without the
punctuation at its ends. The heuristics were made for English web pages: the rules marked "language-specific"
below choose their word lists by the text's script (Cyrillic when it has more Cyrillic letters than Latin
ones), the rest hold for any alphabetic language. A whole book is one document: Gopher's max_words (100,000)
removes a novel; raise it for books (War and Peace is about 560,000 words), or judge each paragraph on its own
(`--filter-level paragraph`: a book keeps the paragraphs that pass).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..configs import knob, validate

EXAMPLES = 5  # removals shown per filter in the receipts
EXCERPT_CHARS = 200

# Gopher's stop words (Rae et al. 2021, appendix A) and, for Cyrillic text, the eight most frequent Russian
# words of Lyashevskaya & Sharoff's frequency dictionary of modern Russian (2009). Language-specific.
STOP_WORDS = {"latin": ("the", "be", "to", "of", "and", "that", "have", "with"),
              "cyrillic": ("и", "в", "не", "на", "я", "быть", "он", "с")}
BULLETS = ("•", "●", "◦", "‣", "▪", "*", "-")  # not "—": Russian dialogue lines start with an em dash
# C4 keeps lines ending in . ! ? or a closing quote (Raffel et al. 2020, section 2.2); Russian books close
# quotes with » and ”. FineWeb counts the same marks plus the ellipsis.
C4_END = (".", "!", "?", '"', "”", "»")
FINEWEB_END = (*C4_END, "'", "…")
_SENTENCE = re.compile(r"[.!?…]+(?=[\"'”»)]*(?:\s|$))")


def _is_mark(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"


def words(text: str) -> list[str]:
    return [t for t in text.split() if not all(map(_is_mark, t))]


def _core(word: str) -> str:
    """The word without the punctuation and symbols at its ends."""
    a, b = 0, len(word)
    while a < b and _is_mark(word[a]):
        a += 1
    while b > a and _is_mark(word[b - 1]):
        b -= 1
    return word[a:b]


def lines(text: str) -> list[str]:
    return [s for s in (line.strip() for line in text.split("\n")) if s]


def script(text: str) -> str:
    """"cyrillic" when the text has more Cyrillic letters than Latin ones, else "latin"."""
    cyr = sum(1 for ch in text if "\u0400" <= ch <= "\u04ff")
    lat = sum(1 for ch in text if ch.isascii() and ch.isalpha())
    return "cyrillic" if cyr > lat else "latin"


@dataclass(frozen=True)
class Verdict:
    """A filter's decision on one document: `text` is what is kept (None: the document is removed, by `rule`,
    whose measured `value` broke `limit`); line filters also count the lines they dropped per rule."""
    text: str | None
    rule: str | None = None
    value: Any = None
    limit: str = ""
    lines_removed: Counter = dataclasses.field(default_factory=Counter)
    line_examples: tuple[tuple[str, str], ...] = ()


def _remove(rule: str, value: Any, limit: str) -> Verdict:
    return Verdict(None, rule, round(value, 4) if isinstance(value, float) else value, limit)


class _Filter:
    name = ""

    def __post_init__(self) -> None:
        validate(self)

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Gopher(_Filter):
    """Gopher's quality rules (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from
    Training Gopher", appendix A.1.1), checked in this order; the first broken one removes the document."""
    name = "gopher"
    min_words: int = knob(50, "remove documents with fewer words", ge=0)
    max_words: int = knob(100_000, "remove documents with more words (a novel has more: raise it for books)", ge=0)
    min_mean_word_length: float = knob(3.0, "remove documents whose mean word length is below", ge=0)
    max_mean_word_length: float = knob(10.0, "remove documents whose mean word length is above", ge=0)
    max_symbol_word_ratio: float = knob(0.1, "remove documents with more (# + ... + …) per word", ge=0)
    max_bullet_lines_ratio: float = knob(0.9, "remove documents with a larger share of lines starting with a bullet",
                                         ge=0, le=1)
    max_ellipsis_lines_ratio: float = knob(0.3, "remove documents with a larger share of lines ending in ... or …",
                                           ge=0, le=1)
    min_alpha_words_ratio: float = knob(0.8, "remove documents with a smaller share of words holding a letter",
                                        ge=0, le=1)
    min_stop_words: int = knob(2, "remove documents with fewer stop-word occurrences (language-specific list)", ge=0)

    def __call__(self, text: str) -> Verdict:
        ws = words(text)
        n = len(ws)
        if not self.min_words <= n <= self.max_words:
            return _remove("word_count", n, f"{self.min_words}..{self.max_words}")
        mean = sum(len(_core(w)) for w in ws) / n if n else 0.0
        if not self.min_mean_word_length <= mean <= self.max_mean_word_length:
            return _remove("mean_word_length", mean, f"{self.min_mean_word_length:g}..{self.max_mean_word_length:g}")
        symbols = text.count("#") + text.count("...") + text.count("…")
        if n and symbols / n > self.max_symbol_word_ratio:
            return _remove("symbol_word_ratio", symbols / n, f"<= {self.max_symbol_word_ratio:g}")
        ls = lines(text)
        bullets = sum(s.startswith(BULLETS) for s in ls) / len(ls) if ls else 0.0
        if bullets > self.max_bullet_lines_ratio:
            return _remove("bullet_lines_ratio", bullets, f"<= {self.max_bullet_lines_ratio:g}")
        ellipsis = sum(s.endswith(("...", "…")) for s in ls) / len(ls) if ls else 0.0
        if ellipsis > self.max_ellipsis_lines_ratio:
            return _remove("ellipsis_lines_ratio", ellipsis, f"<= {self.max_ellipsis_lines_ratio:g}")
        alpha = sum(any(c.isalpha() for c in w) for w in ws) / n if n else 0.0
        if alpha < self.min_alpha_words_ratio:
            return _remove("alpha_words_ratio", alpha, f">= {self.min_alpha_words_ratio:g}")
        stop = set(STOP_WORDS[script(text)])
        hits = sum(_core(w).lower() in stop for w in ws)
        if hits < self.min_stop_words:
            return _remove("stop_words", hits, f">= {self.min_stop_words}")
        return Verdict(text)


@dataclass(frozen=True)
class C4(_Filter):
    """C4's rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
    Transformer", section 2.2). Line rules drop lines (blank lines stay, as paragraph breaks): lines not
    ending in terminal punctuation (C4_END), lines of fewer than min_words_per_line words, lines containing
    "javascript". Document rules, on the whole text: "lorem ipsum", a curly brace, or a word of the bad-words
    list removes it; so does keeping fewer than min_sentences sentences (a run of . ! ? … before a space or
    the end). C4 used the LDNOOBW English list, which is not shipped: give one with bad_words=FILE (one
    word or phrase per line; the rule is off without it; language-specific)."""
    name = "c4"
    min_words_per_line: int = knob(5, "drop lines with fewer words", ge=0)
    min_sentences: int = knob(3, "remove documents keeping fewer sentences", ge=0)
    bad_words: str = knob("", "a file of bad words, one per line (default: the rule is off)")

    def __post_init__(self) -> None:
        super().__post_init__()
        listed: frozenset[str] = frozenset()
        if self.bad_words:
            path = Path(self.bad_words)
            if not path.is_file():
                raise FileNotFoundError(f"c4: no bad-words file {path}")
            listed = frozenset(w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines() if w.strip())
        object.__setattr__(self, "_bad", listed)

    def __call__(self, text: str) -> Verdict:
        low = text.lower()
        if "lorem ipsum" in low:
            return _remove("lorem_ipsum", "lorem ipsum", "absent")
        if "{" in text:
            return _remove("curly_brace", "{", "absent")
        if self._bad:
            tokens = [_core(w) for w in low.split()]
            bad = next((t for t in tokens if t in self._bad), None) or next(
                (p for p in self._bad if " " in p and p in low), None)
            if bad:
                return _remove("bad_words", bad, "absent")
        kept, dropped, examples = [], Counter(), []
        for line in text.split("\n"):
            s = line.strip()
            rule = None if not s else (
                "line_terminal_punctuation" if not s.endswith(C4_END) else
                "line_min_words" if len(words(s)) < self.min_words_per_line else
                "line_javascript" if "javascript" in s.lower() else None)
            if rule:
                dropped[rule] += 1
                if len(examples) < EXAMPLES:
                    examples.append((rule, s[:EXCERPT_CHARS]))
            else:
                kept.append(line)
        out = "\n".join(kept)
        sentences = len(_SENTENCE.findall(out))
        if sentences < self.min_sentences:
            return dataclasses.replace(_remove("sentences", sentences, f">= {self.min_sentences}"),
                                       lines_removed=dropped, line_examples=tuple(examples))
        return Verdict(out, lines_removed=dropped, line_examples=tuple(examples))


@dataclass(frozen=True)
class FineWeb(_Filter):
    """FineWeb's own heuristics (Penedo et al. 2024, "The FineWeb Datasets", section 3.3; thresholds as in
    datatrove's FineWebQualityFilter), in this order."""
    name = "fineweb"
    min_line_punct_ratio: float = knob(0.12, "remove documents with a smaller share of lines ending in "
                                             "punctuation (FINEWEB_END)", ge=0, le=1)
    short_line_length: int = knob(30, "a line of at most this many characters is short", ge=0)
    max_short_line_ratio: float = knob(0.67, "remove documents with a larger share of short lines", ge=0, le=1)
    max_duplicate_line_chars: float = knob(0.01, "remove documents whose repeated lines (each repeat after the "
                                                 "first) hold a larger share of the lines' characters", ge=0, le=1)

    def __call__(self, text: str) -> Verdict:
        ls = lines(text)
        if not ls:
            return _remove("empty", 0, "> 0 lines")
        punct = sum(s.endswith(FINEWEB_END) for s in ls) / len(ls)
        if punct < self.min_line_punct_ratio:
            return _remove("line_punct_ratio", punct, f">= {self.min_line_punct_ratio:g}")
        short = sum(len(s) <= self.short_line_length for s in ls) / len(ls)
        if short > self.max_short_line_ratio:
            return _remove("short_line_ratio", short, f"<= {self.max_short_line_ratio:g}")
        seen: set[str] = set()
        repeated = sum(len(s) for s in ls if s in seen or seen.add(s))
        share = repeated / sum(map(len, ls))
        if share > self.max_duplicate_line_chars:
            return _remove("duplicate_line_chars", share, f"<= {self.max_duplicate_line_chars:g}")
        return Verdict(text)


LANG_SAMPLE_CHARS = 100_000  # py3langid reads this much of a document: a book's language shows in its start
_IDENTIFIER: list = []


def _identifier() -> Any:
    """py3langid's LanguageIdentifier, loaded once (ValueError naming what to install without it)."""
    if not _IDENTIFIER:
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError:
            raise ValueError("language identification needs py3langid (pip install py3langid)") from None
        _IDENTIFIER.append(LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True))
    return _IDENTIFIER[0]


def _known_languages() -> frozenset[str]:
    """The codes py3langid's model tells apart (empty without py3langid: identify says what to install)."""
    try:
        return frozenset(_identifier().nb_classes)
    except ValueError:
        return frozenset()


def identify(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) from py3langid (Lui & Baldwin 2012's langid.py model, 97 languages,
    offline) for the first LANG_SAMPLE_CHARS characters."""
    lang, p = _identifier().classify(text[:LANG_SAMPLE_CHARS])
    return lang, float(p)


@dataclass(frozen=True)
class Lang(_Filter):
    """Keep documents that py3langid assigns to one of `langs` with probability >= min_score (FineWeb keeps
    English at fastText score >= 0.65; py3langid's probabilities are calibrated differently, so check a few
    documents with `lmlab data inspect` before raising it)."""
    name = "lang"
    langs: tuple[str, ...] = knob(("ru",), "ISO 639-1 codes to keep (lang=ru+uk)")
    min_score: float = knob(0.65, "the least probability of the language to keep a document", ge=0, le=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.langs:
            raise ValueError("name at least one language to keep, e.g. lang=ru")
        # RU, Russian: codes as the model has them (lowercase ISO 639-1); an unknown one kept no document
        object.__setattr__(self, "langs", tuple(code.strip().lower() for code in self.langs))
        known = _known_languages()
        unknown = [code for code in self.langs if known and code not in known]
        if unknown:
            raise ValueError(f"lang: {unknown[0]!r} is not a language code of py3langid's model (ISO 639-1, e.g. "
                             f"ru, uk, en; it knows {len(known)}: {', '.join(sorted(known))})")

    def __call__(self, text: str) -> Verdict:
        lang, p = identify(text)
        if lang not in self.langs:
            return _remove("language", lang, "+".join(self.langs))
        if p < self.min_score:
            return _remove("language_score", p, f">= {self.min_score:g}")
        return Verdict(text)


FILTERS = {f.name: f for f in (Gopher, C4, FineWeb, Lang)}


def filter_help() -> str:
    """Each filter's thresholds with their defaults, for `lmlab data filter --help`."""
    out = ["filters and their thresholds (NAME:KEY=VALUE):"]
    for name, cls in FILTERS.items():
        out.append(f"  {name if name != 'lang' else 'lang=CODE[+CODE]'}")
        out += [f"    {f.name}={f.default if not isinstance(f.default, tuple) else '+'.join(f.default)}: "
                f"{f.metadata['help']}" for f in dataclasses.fields(cls)]
    return "\n".join(out)


LEVELS = ("document", "paragraph")
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")  # a blank line (and what follows it up to the next text)


class FilterPlan(list):
    """The filters in order, and what each judges: whole documents (`level` "document"), or each paragraph (text
    between blank lines) of them as a document of its own, a document keeping the paragraphs that pass."""

    def __init__(self, filters: Sequence[_Filter] = (), level: str = "document") -> None:
        if level not in LEVELS:
            raise ValueError(f"the filter level must be one of {', '.join(LEVELS)}, got {level!r}")
        super().__init__(filters)
        self.level = level


def parse_filters(spec: str, level: str = "document") -> FilterPlan:
    """"gopher,c4:min_sentences=5,lang=ru+uk" -> [Gopher(), C4(min_sentences=5), Lang(langs=("ru", "uk"))], judging
    `level` units (document or paragraph)."""
    plan = FilterPlan(level=level)  # the level first: a bad one fails before the spec is read
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, *pairs = item.split(":")
        kwargs: dict[str, Any] = {}
        if name.startswith("lang="):
            name, kwargs["langs"] = "lang", tuple(c for c in name[5:].split("+") if c)
        if name not in FILTERS:
            raise ValueError(f"unknown filter {name!r} (have: {', '.join(FILTERS)}; lang=CODE)")
        cls = FILTERS[name]
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in fields:
                raise ValueError(f"filter {name}: {pair!r} is not KEY=VALUE with KEY one of {', '.join(fields)}")
            kind = type(fields[key])
            try:
                kwargs[key] = tuple(value.split("+")) if kind is tuple else kind(float(value)) if kind is int \
                    and float(value).is_integer() else kind(value)
            except ValueError:
                raise ValueError(f"filter {name}: {key}={value!r} is not {kind.__name__}") from None
        try:
            out.append(cls(**kwargs))
        except ValueError as exc:
            raise ValueError(f"filter {name}: {exc}") from None
    if not out:
        raise ValueError(f"no filter named in {spec!r}")
    plan.extend(out)
    return plan


def apply_filters(texts: Sequence[str], names: Sequence[str], filters: Sequence[_Filter],
                  ) -> tuple[list[str | None], dict[str, Any]]:
    """Run the filters in order over the documents; a document removed by one is not shown to the next.
    Returns the kept texts (None where removed) and the receipts: per filter its parameters, the documents
    and characters it removed, the count per rule, the lines it dropped, and the first EXAMPLES removals.
    A FilterPlan at level "paragraph" judges every paragraph alone (see by_paragraph)."""
    if getattr(filters, "level", "document") == "paragraph":
        return by_paragraph(texts, names, filters)
    kept: list[str | None] = list(texts)
    receipts = []
    for f in filters:
        r: dict[str, Any] = {"name": f.name, "params": f.params(), "documents_in": sum(t is not None for t in kept),
                             "documents_removed": 0, "characters_removed": 0, "removed_by_rule": Counter(),
                             "lines_removed_by_rule": Counter(), "examples": [], "line_examples": []}
        for i, text in enumerate(kept):
            if text is None:
                continue
            v = f(text)
            r["lines_removed_by_rule"].update(v.lines_removed)
            r["line_examples"] += [{"document": names[i], "rule": rule, "line": line}
                                   for rule, line in v.line_examples][: EXAMPLES - len(r["line_examples"])]
            r["characters_removed"] += len(text) - len(v.text or "")
            kept[i] = v.text
            if v.text is None:
                r["documents_removed"] += 1
                r["removed_by_rule"][v.rule] += 1
                if len(r["examples"]) < EXAMPLES:
                    r["examples"].append({"document": names[i], "rule": v.rule, "value": v.value, "limit": v.limit,
                                          "excerpt": text[:EXCERPT_CHARS]})
        r["removed_by_rule"], r["lines_removed_by_rule"] = dict(r["removed_by_rule"]), dict(r["lines_removed_by_rule"])
        receipts.append(r)
    summary = {"documents_in": len(texts), "documents_kept": sum(t is not None for t in kept),
               "characters_in": sum(map(len, texts)), "characters_kept": sum(len(t) for t in kept if t is not None),
               "filters": receipts}
    return kept, summary


def by_paragraph(texts: Sequence[str], names: Sequence[str], filters: Sequence[_Filter],
                 ) -> tuple[list[str | None], dict[str, Any]]:
    """The filters on each paragraph (named "NAME ¶K") as a document of its own; a document keeps its passing
    paragraphs, joined by blank lines, and is removed when none passes. Each filter's receipt counts paragraphs
    (paragraphs_in, paragraphs_removed; removed_by_rule and examples are per paragraph) and the documents it left
    without any (documents_in, documents_removed); characters count the paragraphs' own text."""
    units, owner, unit_names = [], [], []
    for d, text in enumerate(texts):
        for k, part in enumerate(p for p in _PARAGRAPH.split(text) if p.strip()):
            units.append(part.strip("\n"))
            owner.append(d)
            unit_names.append(f"{names[d]} ¶{k + 1}")
    kept: list[str | None] = list(units)
    alive = lambda: {owner[i] for i, u in enumerate(kept) if u is not None}  # noqa: E731
    receipts = []
    for f in filters:
        idx, before = [i for i, u in enumerate(kept) if u is not None], alive()
        out, summary = apply_filters([kept[i] for i in idx], [unit_names[i] for i in idx], [f])
        for j, i in enumerate(idx):
            kept[i] = out[j]
        r = summary["filters"][0]
        r.update(paragraphs_in=r.pop("documents_in"), paragraphs_removed=r.pop("documents_removed"))
        receipts.append({"name": r.pop("name"), "params": r.pop("params"), "documents_in": len(before),
                         "documents_removed": len(before - alive()), **r})
    docs: list[str | None] = [None] * len(texts)
    for d in range(len(texts)):
        parts = [u for i, u in enumerate(kept) if owner[i] == d and u is not None]
        docs[d] = "\n\n".join(parts) if parts else None
    return docs, {"level": "paragraph", "documents_in": len(texts), "documents_kept": sum(t is not None for t in docs),
                  "paragraphs_in": len(units), "paragraphs_kept": sum(u is not None for u in kept),
                  "characters_in": sum(map(len, texts)), "characters_kept": sum(len(t) for t in docs if t is not None),
                  "filters": receipts}


def without_examples(receipts: dict[str, Any]) -> dict[str, Any]:
    """The receipts as tokens.json records them: counts and parameters, not the removed text."""
    return {**receipts, "filters": [{k: v for k, v in r.items() if k not in ("examples", "line_examples")}
                                    for r in receipts["filters"]]}
