"""The one scorer: log-likelihoods of token sequences, batched (and KV-cached on request), and what is built
on them — bits per byte with a sliding window, multiple choice (acc, acc_norm), exact greedy continuation,
and generation scored with BLEU, chrF and ROUGE.

    from lmlab.eval import load_task, run_task, text_nll
    text_nll(model, tokenizer, ["a long text ..."], stride=64)["bits_per_byte"]
    run_task(model, tokenizer, load_task("fables-mc"))

Conventions follow EleutherAI's lm-evaluation-harness (https://github.com/EleutherAI/lm-evaluation-harness) so
that its numbers and ours agree: a continuation is the tokens of `context + continuation` after those of
`context`; trailing spaces of a context move to the continuation; `acc_norm` divides by the choice's
characters; a document scored on its own starts after one `<EOS>` (its "prefix token").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..models import GenerationConfig, generate
from ..models.model import KVCache, Transformer

# ---- token level ------------------------------------------------------------------------------------

def windows(n: int, length: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows over a sequence of n + 1 tokens (n targets): (start, first, end) means the model reads
    ids[start:end] and the targets ids[first + 1:end + 1] are counted. The first window scores targets with
    whatever context precedes them; every later one scores the next `stride` targets with a full window of
    `length` tokens before them, so each target has at least length - stride tokens of context (Press et
    al. 2021, "Shortformer", sliding-window evaluation). stride == length is lm-evaluation-harness's
    loglikelihood_rolling."""
    stride = length if stride is None else stride
    if not 1 <= stride <= length:
        raise ValueError(f"stride ({stride}) must be in [1, context length {length}]")
    if n < 1:
        return []
    out = [(0, 0, min(length, n))]
    while out[-1][2] < n:
        first = out[-1][2]
        end = min(first + stride, n)
        out.append((max(0, end - length), first, end))
    return out


def _device(model: Transformer) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_logprobs(model: Transformer, rows: Sequence[Sequence[int]], *, batch_size: int = 16,
                   cache_chunk: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each row of ids: (log p(row[i] | row[:i]) for i >= 1, whether row[i] was the argmax), as float64 and
    bool arrays of length len(row) - 1. Rows are batched by length, right-padded: with causal attention a
    pad after a position cannot change it, so the numbers are those of the row alone. cache_chunk > 0 feeds
    each row through the KV cache that many tokens at a time instead (the decoding path)."""
    was_training = model.training
    model.eval()
    device = _device(model)
    out: list[Any] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    if cache_chunk:
        for i in order:
            ids = torch.tensor([list(rows[i])], device=device)
            x, n = ids[:, :-1], ids.shape[1] - 1
            cache = KVCache(model.config, 1, n, device=device, dtype=next(model.parameters()).dtype)
            logits = torch.cat([model(x[:, s:s + cache_chunk], cache=cache).logits
                                for s in range(0, n, cache_chunk)], 1)
            out[i] = _pick(logits, ids[:, 1:], [n])[0]
    else:
        for b in range(0, len(order), batch_size):
            chunk = order[b:b + batch_size]
            width = len(rows[chunk[0]]) - 1
            x = torch.zeros(len(chunk), width, dtype=torch.long)
            y = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, i in enumerate(chunk):
                row = torch.as_tensor(list(rows[i]), dtype=torch.long)
                x[r, :len(row) - 1], y[r, :len(row) - 1] = row[:-1], row[1:]
            logits = model(x.to(device)).logits
            for i, res in zip(chunk, _pick(logits, y.to(device), [len(rows[i]) - 1 for i in chunk])):
                out[i] = res
    model.train(was_training)
    return out


def _pick(logits: torch.Tensor, targets: torch.Tensor, lengths: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    logp = logits.double().log_softmax(-1)                                   # (B, T, V)
    chosen = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu().numpy()
    greedy = (logits.argmax(-1) == targets).cpu().numpy()
    return [(chosen[r, :n], greedy[r, :n]) for r, n in enumerate(lengths)]


def sequence_nll(model: Transformer, ids: Sequence[int], *, seq_len: int | None = None, stride: int | None = None,
                 count: Sequence[bool] | None = None, batch_size: int = 16, cache_chunk: int = 0) -> tuple[float, int]:
    """(sum of -log p over the counted targets ids[1:], how many) with windows() of seq_len (default: the model's
    context) and stride. `count[i]` says whether ids[i + 1] counts (special and masked tokens do not)."""
    return nll_many(model, [ids], None if count is None else [count], seq_len=seq_len, stride=stride,
                    batch_size=batch_size, cache_chunk=cache_chunk)[0]


def nll_many(model: Transformer, seqs: Sequence[Sequence[int]], counts: Sequence[Sequence[bool]] | None = None, *,
             seq_len: int | None = None, stride: int | None = None, batch_size: int = 16,
             cache_chunk: int = 0) -> list[tuple[float, int]]:
    """sequence_nll of many sequences, their windows batched together."""
    seq_len = min(seq_len or model.config.block_size, model.config.block_size)
    spans = [windows(len(ids) - 1, seq_len, stride) for ids in seqs]
    rows = [ids[s:e + 1] for ids, sp in zip(seqs, spans) for s, _, e in sp]
    scored = iter(token_logprobs(model, rows, batch_size=batch_size, cache_chunk=cache_chunk))
    out = []
    for k, (ids, sp) in enumerate(zip(seqs, spans)):
        mask = np.ones(len(ids) - 1, dtype=bool) if counts is None else np.asarray(counts[k], dtype=bool)
        total, n = 0.0, 0
        for s, first, e in sp:
            logp = next(scored)[0]
            keep = mask[first:e]
            total -= float(logp[first - s:][keep].sum())
            n += int(keep.sum())
        out.append((total, n))
    return out


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Total nats over the UTF-8 bytes they encode: comparable across tokenizers (nanochat's loss_eval)."""
    return nats / math.log(2) / n_bytes if n_bytes else float("nan")


def text_nll(model: Transformer, tokenizer: Any, texts: Sequence[str], *, seq_len: int | None = None,
             stride: int | None = None, batch_size: int = 16, cache_chunk: int = 0) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte of `texts`, each document scored on its own after an
    <EOS>, or the <BOS> of a tokenizer that puts one before a text (lm-eval's loglikelihood_rolling with a
    stride); special tokens inside a text are not counted, but
    <unk> is: it stands for bytes of the text, which bits per byte counts (left out, a text of unseen letters
    scored 3x better, and the bridge's loglikelihood_rolling, which counts it, disagreed)."""
    specials = {getattr(tokenizer, k) for k in ("pad_id", "bos_id", "eos_id") if hasattr(tokenizer, k)}
    docs = [(text, enc) for text, enc in zip(texts, tokenizer.encode_batch(list(texts))) if enc]
    first = tokenizer.bos_id if getattr(tokenizer, "adds_bos", False) else tokenizer.eos_id
    scored = nll_many(model, [[first, *enc] for _, enc in docs],
                      [[i not in specials for i in enc] for _, enc in docs], seq_len=seq_len, stride=stride,
                      batch_size=batch_size, cache_chunk=cache_chunk)
    total, n = sum(t for t, _ in scored), sum(k for _, k in scored)
    n_bytes = sum(len(text.encode("utf-8")) for text, _ in docs)
    if not n:
        raise ValueError("the texts are empty")
    loss = total / n
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": bits_per_byte(total, n_bytes),
            "nats": total, "tokens": n, "bytes": n_bytes}


# ---- text pairs: multiple choice and greedy continuation ---------------------------------------------

def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split (TemplateLM._encode_pair): the context's trailing whitespace joins the continuation; the
    continuation's ids are those of the whole text after the context's (so a merge across the boundary is not
    counted twice); an empty context is <EOS>. A tokenizer whose own rule puts <BOS> before a text (Tokenizer.adds_bos)
    gets it before the context, an empty one too (lm-eval's prefix token is the BOS where there is one)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    bos = getattr(tokenizer, "adds_bos", False)
    if not context:
        return [tokenizer.bos_id if bos else tokenizer.eos_id], tokenizer.encode(continuation)
    whole, ctx = tokenizer.encode(context + continuation, add_bos=bos), tokenizer.encode(context, add_bos=bos)
    return ctx, whole[len(ctx):]


def loglikelihood(model: Transformer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                  batch_size: int = 16) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding gives exactly the continuation) per pair of id
    lists; a context too long for the model is cut from the left, a continuation longer than the model's
    context is scored window by window (_continuation_windows). Pairs that share a context (the choices of
    one question) read it once: it goes through the KV cache, which is then copied for each continuation."""
    for i, (_, x) in enumerate(pairs):  # as lm-eval's hf model asserts: no tokens would score 0 and "greedy"
        if not x:
            raise ValueError(f"pair {i}: an empty continuation has no log-likelihood to score")
    limit = model.config.block_size + 1
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (c, x) in enumerate(pairs):
        if len(c) + len(x) <= limit and x:
            groups.setdefault(tuple(c), []).append(i)
    shared = {i for g in groups.values() if len(g) > 1 for i in g}
    out: list[Any] = [None] * len(pairs)
    chunks: list[list[tuple[int, ...]]] = []
    cont = 0  # a chunk's longest context (the last, by the sort) and longest continuation must fit in one cache
    for c in sorted((c for c, g in groups.items() if len(g) > 1), key=len):
        longest = max(len(pairs[i][1]) for i in groups[c])
        if not chunks or len(chunks[-1]) * 4 >= batch_size or len(c) + max(cont, longest) > limit:
            chunks.append([])
            cont = 0
        chunks[-1].append(c)
        cont = max(cont, longest)
    for chunk in chunks:
        for i, res in zip([i for c in chunk for i in groups[c]],
                          _shared_context(model, chunk, [[list(pairs[i][1]) for i in groups[c]] for c in chunk])):
            out[i] = res
    rest = [i for i in range(len(pairs)) if i not in shared]
    spans = {i: _continuation_windows(len(pairs[i][0]), len(pairs[i][1]), limit - 1) for i in rest}
    rows = [(list(pairs[i][0]) + list(pairs[i][1]))[s:e + 1] for i in rest for s, _, e in spans[i]]
    scored = iter(token_logprobs(model, rows, batch_size=batch_size))
    for i in rest:
        total, greedy = 0.0, True
        for s, first, _ in spans[i]:
            logp, top = next(scored)
            total, greedy = total + float(logp[first - s:].sum()), greedy and bool(top[first - s:].all())
        out[i] = (total, greedy)
    return out


def _continuation_windows(c: int, k: int, length: int) -> list[tuple[int, int, int]]:
    """windows() that score the k continuation targets after a context of c ids with at most `length` ids read
    at a time: the last window is the `length` ids before the end (a longer context is cut from the left); a
    continuation longer than that is scored in disjoint windows before it, as loglikelihood_rolling does,
    instead of only its last `length` tokens."""
    spans, end, start = [], c + k - 1, c - 1  # targets ids[t + 1] for t in [start, end)
    while end > start:
        first = max(start, end - length)
        spans.append((max(0, end - length), first, end))
        end = first
    return spans[::-1]


@torch.no_grad()
def _shared_context(model: Transformer, contexts: Sequence[Sequence[int]],
                    continuations: Sequence[Sequence[list[int]]]) -> list[tuple[float, bool]]:
    """Contexts left-padded in one forward into the KV cache; the cache rows repeated once per continuation;
    the continuations right-padded in a second forward. Returns the pairs in order."""
    was_training = model.training
    model.eval()
    device = _device(model)
    W = max(len(c) for c in contexts)
    ids = torch.zeros(len(contexts), W, dtype=torch.long)
    mask = torch.zeros(len(contexts), W, dtype=torch.bool)
    for r, c in enumerate(contexts):
        ids[r, W - len(c):], mask[r, W - len(c):] = torch.as_tensor(list(c)), True
    conts = [x for xs in continuations for x in xs]
    owner = torch.tensor([r for r, xs in enumerate(continuations) for _ in xs])
    C = max(len(x) for x in conts)
    cache = KVCache(model.config, len(contexts), W + C - 1, device=device, dtype=next(model.parameters()).dtype)
    ids, mask = ids.to(device), mask.to(device)
    first = model(ids, attention_mask=mask, position_ids=Transformer.positions_from_mask(mask), cache=cache,
                  last_only=True).logits                                     # (B, 1, V)
    cache.reorder(owner.to(device))
    logits = first[owner.to(device)]
    if C > 1:
        x = torch.zeros(len(conts), C - 1, dtype=torch.long)
        for r, cont in enumerate(conts):
            x[r, :len(cont) - 1] = torch.as_tensor(cont[:-1])
        full = torch.cat([mask[owner.to(device)], torch.ones(len(conts), C - 1, dtype=torch.bool, device=device)], 1)
        pos = Transformer.positions_from_mask(full)[:, W:]
        logits = torch.cat([logits, model(x.to(device), attention_mask=full, position_ids=pos, cache=cache).logits], 1)
    y = torch.zeros(len(conts), C, dtype=torch.long)
    for r, cont in enumerate(conts):
        y[r, :len(cont)] = torch.as_tensor(cont)
    model.train(was_training)
    return [(float(lp.sum()), bool(g.all())) for lp, g in _pick(logits, y.to(device), [len(x) for x in conts])]


def score_choices(model: Transformer, tokenizer: Any, items: Sequence[dict[str, Any]], *, delimiter: str = " ",
                  batch_size: int = 16) -> list[dict[str, Any]]:
    """Multiple choice: `items` hold the full prompt (`context`), `choices` and `answer`; each choice is scored
    as the continuation `delimiter + choice`. acc picks the highest log-likelihood, acc_norm the highest per
    character of the choice (lm-eval's acc_norm)."""
    pairs = [encode_pair(tokenizer, it["context"], delimiter + c) for it in items for c in it["choices"]]
    _need_tokens(pairs, [(i, delimiter + c) for i, it in enumerate(items) for c in it["choices"]])
    scores = iter(loglikelihood(model, pairs, batch_size=batch_size))
    out = []
    for it in items:
        lls = np.array([next(scores)[0] for _ in it["choices"]])
        norm = lls / np.array([max(len(c), 1) for c in it["choices"]])
        pred, pred_norm = int(lls.argmax()), int(norm.argmax())
        out.append({"acc": float(pred == it["answer"]), "acc_norm": float(pred_norm == it["answer"]),
                    "pred": pred, "loglikelihoods": lls.tolist()})
    return out


def _need_tokens(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], texts: Sequence[tuple[int, str]]) -> None:
    """A continuation with no tokens of its own (all whitespace for a word tokenizer, or merged into the
    context's last token by BPE) would score 0, the best log-likelihood, and count as right."""
    for (_, x), (i, text) in zip(pairs, texts):
        if not x:
            raise ValueError(f"item {i + 1}: the continuation {text!r} adds no token to its context, so there is "
                             "nothing to score")


def score_greedy(model: Transformer, tokenizer: Any, items: Sequence[dict[str, Any]], *, delimiter: str = "",
                 batch_size: int = 16) -> list[dict[str, Any]]:
    """LM tasks (nanochat CORE's "language modeling"): 1 when greedy decoding reproduces the continuation."""
    pairs = [encode_pair(tokenizer, it["context"], delimiter + it["continuation"]) for it in items]
    _need_tokens(pairs, [(i, delimiter + it["continuation"]) for i, it in enumerate(items)])
    return [{"exact": float(g), "loglikelihood": ll}
            for ll, g in loglikelihood(model, pairs, batch_size=batch_size)]


def score_generation(model: Transformer, tokenizer: Any, items: Sequence[dict[str, Any]],
                     config: GenerationConfig, *, batch_size: int = 16) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate for each prompt and score against its references: per item sentence chrF and ROUGE-L, and
    corpus BLEU, chrF (sacrebleu, with its signature) and mean ROUGE-1/2/L F1 (rouge-score)."""
    from .metrics import corpus_scores, sentence_scores
    hyps: list[str] = []
    for b in range(0, len(items), batch_size):
        hyps += generate(model, tokenizer, [it["prompt"] for it in items[b:b + batch_size]], config)
    refs = [it["references"] for it in items]
    per_item = [{"output": h, **sentence_scores(h, r)} for h, r in zip(hyps, refs)]
    return per_item, corpus_scores(hyps, refs)
