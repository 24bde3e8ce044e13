"""Metrics on text: BLEU and chrF (sacrebleu), ROUGE-1/2/L (rouge-score), the generation probes, and the paired
bootstrap. sacrebleu and rouge-score are the reference implementations (Post 2018, "A Call for Clarity in
Reporting BLEU Scores"; Lin 2004 as reimplemented by Google Research); they come with `pip install lmlab[eval]`.
"""

from __future__ import annotations

import math
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
    """Distinct n-grams of all samples over the number of generated tokens, as Li et al. 2016 define it ("A
    Diversity-Promoting Objective Function for Neural Conversation Models": "scaled by total number of generated
    tokens"); not the n-gram ratio some libraries report (distinct over all n-grams), which is higher for n > 1."""
    units = [tokenize(s) for s in samples]
    tokens = sum(len(u) for u in units)
    return len({g for u in units for g in _ngrams(u, n)}) / tokens if tokens else 0.0


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

# index draws held at once by the bootstrap (8 MB): the whole (resamples, items) array was 610 MiB at
# 20,000 items
BOOTSTRAP_CHUNK = 1 << 20


def min_items(level: float = 0.95) -> int:
    """The fewest paired items from which a difference can be significant at `level`: with n items all moving
    the same way a two-sided sign test gives p = 2 * 0.5**n, above 1 - level for n < 6 at 95%, while the
    bootstrap's interval of n identical differences is a point away from 0 whatever n is."""
    return math.floor(math.log2(2 / (1 - level))) + 1


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict[str, float | None]:
    """mean(b) - mean(a) over the same items and its percentile bootstrap interval: items are resampled
    with replacement, the same draw for both (Koehn 2004, "Statistical Significance Tests for Machine
    Translation Evaluation"; Efron & Tibshirani 1993). Below min_items(level) items there is no interval:
    low and high are None."""
    if not 0 < level < 1:
        raise ValueError(f"level ({level}) must be in (0, 1), e.g. 0.95")
    if len(a) != len(b):
        raise ValueError(f"need the same items for both: {len(a)} scores against {len(b)}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:  # 0: an IndexError
        raise ValueError(f"--resamples ({resamples!r}) must be >= 1")
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("need the same non-empty list of items for both")
    if len(d) < min_items(level):
        return {"delta": float(d.mean()), "low": None, "high": None}
    rng = np.random.default_rng(seed)
    # drawn a block of rows at a time: the generator's stream runs on across calls, so the numbers are those
    # of one (resamples, n) draw
    rows = max(1, BOOTSTRAP_CHUNK // len(d))
    means = np.concatenate([d[rng.integers(0, len(d), size=(min(rows, resamples - r), len(d)))].mean(1)
                            for r in range(0, resamples, rows)])
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"delta": float(d.mean()), "low": float(lo), "high": float(hi)}
