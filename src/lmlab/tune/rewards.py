"""Verifiable tasks for `lmlab tune grpo`: a prompt generator and a checker each, so a reward is exact.

    addition   "37+485=" -> "522"                        multi-digit addition
    count      "count a in banaka:" -> "3"                how often a letter occurs in a word
    sort       "sort 7 2 9 4:" -> "2 4 7 9"                a short list of digits, ascending
    format     "wrap kotime:" -> "[kotime]"               the word, and nothing else, in square brackets

Words are made-up syllable strings (tens of thousands of them), so that a held-out set is a small share of
the prompts and the policy cannot pass by recalling words it trained on.

A completion is judged on its first line (a model that goes on after its answer with a new line is not
penalised for it; one that goes on on the same line is). The reward is 1.0 for a right answer, else 0.0.

Train and held-out prompts come from separate seeds: the held-out set is `heldout(n)` (a fixed seed), and
training prompts (drawn from the run's generator) that happen to equal a held-out prompt are drawn again,
so held-out pass@1 measures prompts the policy never trained on.

Also here, the rewards of `lmlab selfplay text` (any text, no right answer): seed, repetition, perplexity (a
judge model), and a user's own function from a local file (`--reward-file FILE.py:FUNCTION`, on the command
line only: the web app runs no user code).
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.generation import encode_prompt
from ..models.io import load_pretrained
from ..models.scoring import make_batch, token_logprobs
from .config import REWARDS

# (prompts, completions as text, completions as ids without EOS) -> one reward per completion
Reward = Callable[[Sequence[str], Sequence[str], Sequence[Sequence[int]]], list[float]]

HELDOUT_SEED = 1_000_003  # the held-out prompts' own stream, apart from any run's seed
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


@dataclass(frozen=True)
class Task:
    """A verifiable task: `make(rng)` draws a prompt, `answer(prompt)` is its one right completion."""
    name: str
    make: Callable[[random.Random], str]
    answer: Callable[[str], str]

    def extract(self, completion: str) -> str:
        """The answer a completion gives: its first line (what check compares and majority voting counts)."""
        return first_line(completion)

    def check(self, prompt: str, completion: str) -> bool:
        return self.extract(completion) == self.answer(prompt)

    def reward(self, prompts: Sequence[str], texts: Sequence[str], ids: Sequence[Sequence[int]]) -> list[float]:
        """The selfplay Reward signature: (prompts, completions as text, as ids) -> one reward each."""
        return [float(self.check(p, t)) for p, t in zip(prompts, texts)]

    def heldout(self, n: int) -> list[str]:
        """n distinct held-out prompts, the same for every run (fewer if the task has fewer)."""
        rng, out = random.Random(HELDOUT_SEED), {}
        for _ in range(n * 20):
            out.setdefault(self.make(rng))
            if len(out) == n:
                break
        return list(out)

    def train_prompts(self, rng: random.Random, n: int, heldout: set[str]) -> list[str]:
        """n training prompts drawn from `rng`, none of them held out (redrawn; a task whose prompts are all
        held out would loop, so the held-out set must be a small share of them)."""
        out = []
        for _ in range(n * 1000):
            prompt = self.make(rng)
            if prompt not in heldout:
                out.append(prompt)
                if len(out) == n:
                    return out
        raise ValueError(f"task {self.name}: nearly every prompt drawn is held out; hold out fewer")


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def _addition(rng: random.Random) -> str:
    a, b = rng.randrange(1, 1000), rng.randrange(1, 1000)
    return f"{a}+{b}="


def _add_answer(prompt: str) -> str:
    m = re.fullmatch(r"(\d+)\+(\d+)=", prompt)
    if m is None:
        raise ValueError(f"not an addition prompt (like 37+485=): {prompt!r}")
    return str(int(m.group(1)) + int(m.group(2)))


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 4)))


def _count(rng: random.Random) -> str:
    word = _word(rng)
    letter = rng.choice(word) if rng.random() < 0.75 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return f"count {letter} in {word}:"


def _count_answer(prompt: str) -> str:
    m = re.fullmatch(r"count (\w) in (\w+):", prompt)
    if m is None:
        raise ValueError(f"not a count prompt (like count a in banaka:): {prompt!r}")
    return str(m.group(2).count(m.group(1)))


def _sort(rng: random.Random) -> str:
    return "sort " + " ".join(str(rng.randrange(10)) for _ in range(rng.randint(3, 5))) + ":"


def _sort_answer(prompt: str) -> str:
    m = re.fullmatch(r"sort ((?:\d+ )*\d+):", prompt)
    if m is None:
        raise ValueError(f"not a sort prompt (like sort 7 2 9 4:): {prompt!r}")
    return " ".join(sorted(m.group(1).split(), key=int))


def _format(rng: random.Random) -> str:
    return f"wrap {_word(rng)}:"


def _format_answer(prompt: str) -> str:
    m = re.fullmatch(r"wrap (\w+):", prompt)
    if m is None:
        raise ValueError(f"not a format prompt (like wrap kotime:): {prompt!r}")
    return f"[{m.group(1)}]"


TASKS = {t.name: t for t in (Task("addition", _addition, _add_answer), Task("count", _count, _count_answer),
                             Task("sort", _sort, _sort_answer), Task("format", _format, _format_answer))}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task ({name!r}) must be one of {', '.join(TASKS)}")
    return TASKS[name]


# ---- the self-play rewards -------------------------------------------------------------------------------------------

def seed_reward(ids: Sequence[int]) -> float:
    """The AZR Model Trainer app (github.com/Slavikpro557/ai-neural-network-project, `azr_trainer.py:
    compute_reward`): token diversity and length, half each."""
    unique_ratio = len(set(ids)) / max(len(ids), 1)
    return unique_ratio * 0.5 + min(len(ids) / 100.0, 1.0) * 0.5


def repetition_reward(ids: Sequence[int], n: int = 3) -> float:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


class JudgeReward:
    """Mean log p_judge(completion + EOS | prompt) per token: fluency as judged by a second model."""

    def __init__(self, judge_dir: str | Path, device: str = "cpu") -> None:
        self.model, self.tokenizer = load_pretrained(judge_dir, device=device)
        if self.tokenizer is None:
            raise ValueError(f"judge {judge_dir} has no tokenizer.json")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], ids: Sequence[Sequence[int]]) -> list[float]:
        tok = self.tokenizer
        prompt_ids = [encode_prompt(tok, p) for p in prompts]  # as generate does
        comp_ids = [tok.encode(c) + [tok.eos_id] for c in completions]
        limit = self.model.config.block_size
        for i, (p, c) in enumerate(zip(prompt_ids, comp_ids)):  # keep the end of a too-long row
            if len(p) + len(c) > limit + 1:
                prompt_ids[i] = p[-max(1, limit + 1 - len(c)):]
                comp_ids[i] = c[: limit]
        batch = make_batch(prompt_ids, comp_ids, tok.pad_id)
        logp, _ = token_logprobs(self.model, batch)
        m = batch.mask.float()
        return ((logp * m).sum(1) / m.sum(1).clamp_min(1)).tolist()


def resolved_spec(spec: str | None) -> str | None:
    """FILE.py:FUNCTION with FILE made absolute (from the current folder, where the reward is loaded from): what a
    run records, so that --resume from another folder finds the file again."""
    if not spec:
        return spec
    path, sep, function = spec.rpartition(":")
    return f"{Path(path).resolve()}{sep}{function}" if sep and path else spec


def load_reward_file(spec: str) -> Callable[[str, str], float]:
    """`path/to/file.py:function` -> that function, imported from the user's own local file."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"--reward-file {spec!r} must look like my_reward.py:function_name")
    file = Path(path)
    if not file.is_file() or file.suffix != ".py":
        raise ValueError(f"reward file {path} is not a .py file")
    module_spec = importlib.util.spec_from_file_location(f"lmlab_user_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)  # the user's own code, on the user's machine (see module docstring)
    except Exception as exc:  # noqa: BLE001 - the user's code: their error, said in one line (--debug: traceback)
        raise ValueError(f"importing {path} raised {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{path} has no function {name!r}")
    return fn


def _finite(value: object, reward_file: str) -> float:
    """A user reward as a float: any real number (numpy's too) that a float holds finitely; not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{reward_file} returned {value!r}; a reward must be a finite number")
    try:
        number = float(value)
    except OverflowError:  # an int past a float's range; its repr may be thousands of digits
        raise ValueError(f"{reward_file} returned an integer too large for a float; a reward must be a finite "
                         "number") from None
    if not math.isfinite(number):
        raise ValueError(f"{reward_file} returned {value!r}; a reward must be a finite number")
    return number


def build_reward(name: str, *, judge: str | Path | None = None, reward_file: str | None = None) -> Reward:
    if name not in REWARDS:
        raise ValueError(f"reward ({name!r}) must be one of {', '.join(REWARDS)}")
    if name == "seed":
        return lambda prompts, texts, ids: [seed_reward(i) for i in ids]
    if name == "repetition":
        return lambda prompts, texts, ids: [repetition_reward(i) for i in ids]
    if name == "perplexity":
        if judge is None:
            raise ValueError("--reward perplexity needs --judge MODEL_DIR")
        return JudgeReward(judge)
    if reward_file is None:
        raise ValueError("--reward file needs --reward-file my_reward.py:function_name")
    fn = load_reward_file(reward_file)

    def user(prompts: Sequence[str], texts: Sequence[str], ids: Sequence[Sequence[int]]) -> list[float]:
        out = []
        for p, t in zip(prompts, texts):
            try:
                value = fn(p, t)
            except Exception as exc:  # noqa: BLE001 - the user's function failed, not lmlab: one line, as bad input
                raise ValueError(f"{reward_file} raised {type(exc).__name__}: {exc} (scoring {t[:40]!r}; run with "
                                 "--debug for its traceback)") from exc
            out.append(_finite(value, reward_file))
        return out
    return user
