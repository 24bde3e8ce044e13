"""Metrics on text: BLEU and chrF (sacrebleu), ROUGE-1/2/L (rouge-score), the generation probes, and the paired
bootstrap. sacrebleu and rouge-score are the reference implementations (Post 2018, "A Call for Clarity in
Reporting BLEU Scores"; Lin 2004 as reimplemented by Google Research); they come with `pip install lmlab[eval]`.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _need(module: str) -> Any:
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"generation metrics need {module.split('.')[0]}: pip install 'lmlab[eval]'") from None


class WordTokenizer:
    """rouge-score's default tokenizer keeps only [a-z0-9], so Cyrillic text would score 0; this one keeps
    every Unicode word character, lowercased (no stemming: it is English-only)."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


def _rouge() -> Any:
    return _need("rouge_score.rouge_scorer").RougeScorer(list(ROUGE_TYPES), tokenizer=WordTokenizer())


def _ref_streams(refs: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-item references -> sacrebleu's reference streams; items with fewer references are padded with
    None, which sacrebleu skips."""
    width = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def corpus_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Corpus BLEU and chrF (sacrebleu's defaults: 13a tokenisation, chrF with character 6-grams, beta 2) with
    their signatures, and ROUGE-1/2/L F1 averaged over items (best reference per item), all 0-100."""
    if not hyps or any(not r for r in refs):
        raise ValueError("need at least one hypothesis and one reference per item")
    sb = _need("sacrebleu")
    streams = _ref_streams(refs)
    bleu, chrf = sb.metrics.BLEU(), sb.metrics.CHRF()
    b, c = bleu.corpus_score(list(hyps), streams), chrf.corpus_score(list(hyps), streams)
    rouge = _rouge()
    rs = [rouge.score_multi(list(r), h) for h, r in zip(hyps, refs)]
    out: dict[str, Any] = {"bleu": b.score, "chrf": c.score}
    out.update({t: 100 * float(np.mean([s[t].fmeasure for s in rs])) for t in ROUGE_TYPES})
    out["signatures"] = {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())}
    return out


def sentence_scores(hyp: str, refs: Sequence[str]) -> dict[str, float]:
    """Per-item chrF and ROUGE-L (0-100): the paired scores that `lmlab compare` resamples."""
    sb = _need("sacrebleu")
    return {"chrf": sb.sentence_chrf(hyp, list(refs)).score,
            "rougeL": 100 * _rouge().score_multi(list(refs), hyp)["rougeL"].fmeasure}


# ---- generation probes ------------------------------------------------------------------------------

def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(samples: Sequence[str], n: int, tokenize: Callable[[str], list] = str.split) -> float:
    """Unique n-grams over all n-grams of all samples (Li et al. 2016, "A Diversity-Promoting Objective")."""
    grams = [g for s in samples for g in _ngrams(tokenize(s), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(samples: Sequence[str], n: int = 4, tokenize: Callable[[str], list] = str.split) -> float:
    """Mean share of a sample's n-grams that repeat one earlier in it (Welleck et al. 2019, seq-rep-n)."""
    reps = []
    for s in samples:
        grams = _ngrams(tokenize(s), n)
        if grams:
            reps.append(1 - len(set(grams)) / len(grams))
    return float(np.mean(reps)) if reps else 0.0


def self_bleu(samples: Sequence[str]) -> float:
    """Mean BLEU of each sample against all the others (Zhu et al. 2018, Texygen): high means alike."""
    if len(samples) < 2:
        return 0.0
    sb = _need("sacrebleu")
    return float(np.mean([sb.sentence_bleu(s, [o for j, o in enumerate(samples) if j != i]).score
                          for i, s in enumerate(samples)]))


def compression_ratio(samples: Sequence[str]) -> float:
    """Mean UTF-8 bytes / zlib-compressed bytes per sample: looping text compresses far better."""
    ratios = [len(b) / len(zlib.compress(b, 9)) for b in (s.encode("utf-8") for s in samples) if b]
    return float(np.mean(ratios)) if ratios else 0.0


def longest_shared_ngram(samples: Sequence[str], training_text: str) -> int:
    """The longest run of words of any sample found verbatim (word-aligned) in the training text:
    memorisation (Carlini et al. 2021 count such verbatim spans)."""
    haystack = " " + " ".join(training_text.split()) + " "
    best = 0
    for s in samples:
        words = s.split()
        for i in range(len(words)):
            while i + best < len(words) and f" {' '.join(words[i:i + best + 1])} " in haystack:
                best += 1
    return best


def probes(samples: Sequence[str], training_text: str | None = None,
           tokenize: Callable[[str], list] = str.split) -> dict[str, float]:
    """The generation probes on N samples; n-grams of `tokenize` units (words by default; a model's tokens for
    text without spaces)."""
    out = {"distinct_1": distinct_n(samples, 1, tokenize), "distinct_2": distinct_n(samples, 2, tokenize),
           "repetition_4": repetition(samples, 4, tokenize), "self_bleu": self_bleu(samples),
           "compression_ratio": compression_ratio(samples)}
    if training_text is not None:
        out["longest_shared_ngram"] = longest_shared_ngram(samples, training_text)
    return out


# ---- comparison -------------------------------------------------------------------------------------

def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict[str, float]:
    """mean(b) - mean(a) over the same items and its percentile bootstrap interval: items are resampled
    with replacement, the same draw for both (Koehn 2004, "Statistical Significance Tests for Machine
    Translation Evaluation"; Efron & Tibshirani 1993)."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:  # 0: an IndexError
        raise ValueError(f"--resamples ({resamples!r}) must be >= 1")
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("need the same non-empty list of items for both")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"delta": float(d.mean()), "low": float(lo), "high": float(hi)}
