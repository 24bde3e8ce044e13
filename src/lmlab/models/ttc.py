"""Test-time compute: spending more inference on one prompt for a better answer, with the model as it is.

- best_of_n: N samples (seeds seed, seed + 1, ... as `lmlab generate --num-samples` draws them; 0, 1, ... without
  a seed, so the same samples on every call, where plain sampling without a seed varies) and the one a
  reward or verifier scores highest, ties to the earliest (Cobbe et al. 2021's verifiers; with an exact checker
  this is pass@N made usable, Brown et al. 2024, "Large Language Monkeys").
- self_consistency: N samples, each one's answer extracted, the most frequent answer wins (Wang et al. 2023);
  ties go to the answer that appeared first, so the result does not depend on dict or set order.
- step_beam_search: W partial completions advanced a step of k tokens at a time. Each beam branches into its W
  most likely next tokens, each continued greedily to the end of the step; the W best of these (and of the
  finished ones) by a scorer survive: the model's own mean log-probability per token, or a reward on the text
  so far with the log-probability breaking ties (step-wise search with a scorer, Snell et al. 2024; Beeching et
  al. 2024, "Scaling test-time compute with open models"). Width 1 is greedy decoding.

Every result counts the tokens it generated (`tokens`): the compute it spent, for accuracy-against-compute
plots (`lmlab lab ttc`). The rewards and answer extractors are plain functions: the post-training tasks
(lmlab.tune.rewards.TASKS) supply them in the CLI.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .generation import GenerationConfig, continuation, encode_prompt, generate_rows
from .model import Transformer
from .scoring import make_batch, token_logprobs

Reward = Callable[[str, str], float]  # (prompt, completion) -> score; higher is better


@dataclass
class Result:
    text: str                                  # the chosen completion
    candidates: list[str]                      # every completion considered (samples, or the final beams)
    scores: list[float | None] = field(default_factory=list)  # each candidate's score (reward, log-prob)
    tokens: int = 0                            # tokens generated in all, each EOS generated included
    answer: str | None = None                  # self-consistency: the winning answer
    votes: dict[str, int] = field(default_factory=dict)


def sample_n(model: Transformer, tokenizer: Any, prompt: str, cfg: GenerationConfig, n: int, *,
             add_bos: bool = False) -> tuple[list[str], list[list[int]], list[bool], int]:
    """n samples of one prompt, sample i with seed cfg.seed + i (0 + i without a seed, so the same samples
    every call): exactly what `generate(..., seed=seed + i)` returns. Each sample prefills the prompt again
    (one at a time keeps each sample equal to generate's with its seed). -> (texts, ids without EOS, whether
    each ended on EOS, tokens generated: the ids, plus one for each EOS; a stop string's tokens are in the
    ids)."""
    if n < 1:
        raise ValueError(f"n ({n}) must be >= 1")
    if cfg.num_beams > 1:
        raise ValueError("test-time compute samples one sequence at a time; num_beams must be 1")
    base = cfg.seed if cfg.seed is not None else 0
    texts, rows, eos = [], [], []
    for i in range(n):
        t, r, e = generate_rows(model, tokenizer, [prompt], dataclasses.replace(cfg, seed=base + i), add_bos=add_bos)
        texts.append(t[0])
        rows.append(r[0])
        eos.append(e[0])
    return texts, rows, eos, sum(len(r) + e for r, e in zip(rows, eos))


def check_context(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
    """Scoring a whole sample (or a beam) feeds the prompt and every token in one forward: refuse up front
    what would not fit the model's context, rather than after the sampling."""
    if len(prompt_ids) + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt + max_new_tokens ({len(prompt_ids)} + {max_new_tokens} tokens) exceeds the "
                         f"model's context ({model.config.block_size}): lower --max-new-tokens")


@torch.inference_mode()
def mean_logprobs(model: Transformer, prompt_ids: Sequence[int], rows: Sequence[Sequence[int]]) -> list[float]:
    """The model's mean log-probability per token of each row after `prompt_ids` (raw distribution, eval mode:
    dropout would make the scores, and so best_of_n's choice, random); -inf for an empty row. One batch, as the
    policy-gradient code scores its samples (tune/rl.py)."""

    if not any(rows):
        return [float("-inf")] * len(rows)
    was = model.training
    model.eval()
    try:
        batch = make_batch([prompt_ids] * len(rows), rows, device=next(model.parameters()).device)
        logp, _ = token_logprobs(model, batch)
    finally:
        model.train(was)
    m = batch.mask.float()
    return [s / k if k else float("-inf") for s, k in zip((logp * m).sum(1).tolist(), m.sum(1).tolist())]


def best_of_n(model: Transformer, tokenizer: Any, prompt: str, cfg: GenerationConfig, n: int,
              reward: Reward | None = None, *, add_bos: bool = False) -> Result:
    """The highest-reward of n samples (the earliest among equals). Without a reward, the sample the model
    itself finds likeliest: its mean log-probability per token, EOS included where the sample ended on it (not
    where a stop string ended it)."""
    prompt_ids = encode_prompt(tokenizer, prompt, add_bos)
    if reward is None:
        check_context(model, prompt_ids, cfg.max_new_tokens)
    texts, rows, ended, tokens = sample_n(model, tokenizer, prompt, cfg, n, add_bos=add_bos)
    if reward is None:
        eos = getattr(tokenizer, "eos_id", None)
        scores = mean_logprobs(model, prompt_ids, [r + [eos] if e else r for r, e in zip(rows, ended)])
    else:
        scores = [float(reward(prompt, t)) for t in texts]
    best = max(range(n), key=lambda i: (scores[i], -i))
    return Result(texts[best], texts, scores, tokens)


def majority_vote(answers: Sequence[str]) -> tuple[str | None, dict[str, int]]:
    """The most frequent non-empty answer and the counts; a tie goes to the answer seen first. None if every
    answer is empty (no sample gave one)."""
    counts = Counter(a for a in answers if a)
    if not counts:
        return None, {}
    top = max(counts.values())
    return next(a for a in answers if counts.get(a) == top), dict(counts)


def self_consistency(model: Transformer, tokenizer: Any, prompt: str, cfg: GenerationConfig, n: int,
                     extract: Callable[[str], str], *, add_bos: bool = False) -> Result:
    """Majority vote over the answers `extract` finds in n samples; the text is the first sample giving the
    winning answer (the first sample if none gave one)."""
    texts, _, _, tokens = sample_n(model, tokenizer, prompt, cfg, n, add_bos=add_bos)
    answers = [extract(t) for t in texts]
    winner, votes = majority_vote(answers)
    text = texts[answers.index(winner)] if winner is not None else texts[0]
    return Result(text, texts, [float(votes.get(a, 0)) for a in answers], tokens, winner, votes)


@dataclass
class _Beam:
    ids: list[int]
    logp: float = 0.0
    done: bool = False


@torch.inference_mode()
def step_beam_search(model: Transformer, tokenizer: Any, prompt: str, width: int, *, step_tokens: int = 4,
                     max_new_tokens: int = 100, reward: Reward | None = None, add_bos: bool = False) -> Result:
    """Step-wise beam search (module docstring). The model's raw distribution (temperature 1, no filtering)
    gives the branches and the log-probabilities; a finished beam ends at EOS or after max_new_tokens."""
    if width < 1:
        raise ValueError(f"beam width ({width}) must be >= 1")
    if step_tokens < 1:
        raise ValueError(f"step_tokens ({step_tokens}) must be >= 1")
    prompt_ids = encode_prompt(tokenizer, prompt, add_bos)
    check_context(model, prompt_ids, max_new_tokens)
    eos = getattr(tokenizer, "eos_id", None)
    device = next(model.parameters()).device

    def next_logp(beams: list[_Beam]) -> torch.Tensor:  # live beams have equal lengths: no padding needed
        x = torch.tensor([prompt_ids + b.ids for b in beams], device=device)
        return model(x, last_only=True).logits[:, -1].float().log_softmax(-1)

    def text(b: _Beam) -> str:
        return continuation(tokenizer, prompt_ids, b.ids[:-1] if b.done and b.ids and b.ids[-1] == eos else b.ids)

    def key(b: _Beam) -> tuple[float, ...]:
        mean = b.logp / max(len(b.ids), 1)
        return (float(reward(prompt, text(b))), mean) if reward is not None else (mean,)

    was = model.training
    model.eval()
    beams, spent = [_Beam([], done=max_new_tokens == 0)], 0
    try:
        while live := [b for b in beams if not b.done]:
            top = next_logp(live).topk(min(width, model.config.vocab_size), dim=-1)
            cands = [_Beam(b.ids + [t], b.logp + v, t == eos) for b, vs, ts in
                     zip(live, top.values.tolist(), top.indices.tolist()) for v, t in zip(vs, ts)]
            going = [c for c in cands if not c.done]
            for _ in range(min(step_tokens, max_new_tokens - len(live[0].ids)) - 1):  # the rest of the step: greedy
                going = [c for c in going if not c.done]
                if not going:
                    break
                best = next_logp(going).max(-1)
                for c, v, t in zip(going, best.values.tolist(), best.indices.tolist()):
                    c.ids.append(t)
                    c.logp += v
                    c.done = t == eos
            spent += sum(len(c.ids) for c in cands) - len(cands) * len(live[0].ids)
            for c in cands:
                c.done = c.done or len(c.ids) >= max_new_tokens
            pool = [b for b in beams if b.done] + cands
            beams = sorted(pool, key=key, reverse=True)[:width]                  # stable: earlier wins a tie
    finally:
        model.train(was)
    return Result(text(beams[0]), [text(b) for b in beams], [key(b)[0] for b in beams], spent)


STRATEGIES = ("best-of", "vote", "beam")


def run_strategy(model: Transformer, tokenizer: Any, prompt: str, cfg: GenerationConfig, strategy: str, n: int,
                 task: Any = None, step_tokens: int = 4) -> tuple[Result, str]:
    """One test-time compute strategy as `lmlab generate --best-of | --vote | --beam` and POST /api/v1/generate
    run it -> (the result, one line on what was chosen and spent). `task` is a post-training task (its check
    scores best-of and beam, its extract finds vote's answers; the prompt then starts a text, BOS first, as in
    lmlab tune grpo) or None: the model's own mean log-prob per token (best-of, beam)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy ({strategy!r}) must be one of {', '.join(STRATEGIES)}")
    if strategy == "vote" and task is None:
        raise ValueError("voting needs a task: its answer extractor")
    reward = None if task is None else lambda p, t: float(task.check(p, t))
    bos, by = task is not None, getattr(task, "name", "logprob")
    if strategy == "best-of":
        res = best_of_n(model, tokenizer, prompt, cfg, n, reward, add_bos=bos)
        line = f"best of {n} by {by}: score {max(res.scores):.4g}"
    elif strategy == "vote":
        res = self_consistency(model, tokenizer, prompt, cfg, n, task.extract, add_bos=bos)
        line = f"vote of {n}: answer {res.answer!r} with {res.votes.get(res.answer, 0)} votes ({res.votes})"
    else:
        res = step_beam_search(model, tokenizer, prompt, n, step_tokens=step_tokens,
                               max_new_tokens=cfg.max_new_tokens, reward=reward, add_bos=bos)
        line = f"beam {n} by {by}: score {res.scores[0]:.4g}"
    return res, f"{line}; {res.tokens} tokens generated"
