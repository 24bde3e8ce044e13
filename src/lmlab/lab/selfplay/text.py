"""Self-play RL for text models trained on books: sample a group of completions per prompt, score them with
a reward, and update the policy with group-relative advantages (GRPO, Shao et al. 2024) plus a KL penalty
to the starting model, so the reward can rise without the text collapsing into whatever games it.

    lmlab selfplay text --model lmlab-demo/final --out runs/sp-text --reward repetition --iterations 40

Rewards (`--reward`):
- seed: seed 000's `unique_ratio * 0.5 + min(len / 100, 1) * 0.5` over the completion's tokens. In the seed
  it was only logged, never trained on; here it is trained on, so you can watch what it rewards (length).
- repetition: the share of distinct token 3-grams among the completion's 3-grams (0 if it has none).
- perplexity: the mean log-probability per token of the completion (and its EOS) under a second model,
  the judge (`--judge DIR`), which re-tokenises the text with its own tokenizer.
- file: your own function, `--reward-file my_reward.py:fn` with `fn(prompt: str, completion: str) -> float`,
  imported from your local file (your code, run by you; nothing is unpickled).

Every iteration appends one JSON line to OUT/metrics.jsonl (step, reward, reward_std, kl, loss, length,
wall_s), the trainer's format, so the web app can chart it; the final policy is a model directory OUT/final.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...models import GenerationConfig, generate_ids
from ...models.config import atomic_write_text
from ...models.io import load_pretrained, save_pretrained
from .rl import grouped_advantages, make_batch, reinforce_loss, token_logprobs

REWARDS = ("seed", "repetition", "perplexity", "file")
# (prompts, completions as text, completions as ids without EOS) -> one reward per completion
Reward = Callable[[Sequence[str], Sequence[str], Sequence[Sequence[int]]], list[float]]


@dataclass
class TextSelfPlayConfig:
    iterations: int = 40
    prompts_per_iteration: int = 4   # distinct prompts per step
    group_size: int = 8              # completions per prompt; advantages are relative to this group
    max_new_tokens: int = 48
    temperature: float = 1.0         # log-probs are taken at the same temperature: samples come from the policy
    lr: float = 5e-5
    kl_coef: float = 0.1             # weight of the k3 KL estimate to the starting model (GRPO, eq. 4)
    grad_clip: float = 1.0
    seed: int = 0
    reward: str = "seed"

    def __post_init__(self) -> None:
        for name in ("iterations", "prompts_per_iteration", "group_size", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if self.group_size < 2:
            raise ValueError(f"group_size ({self.group_size}) must be >= 2: advantages compare a group")
        if not (self.temperature > 0 and self.lr > 0 and self.grad_clip > 0):
            raise ValueError("temperature, lr and grad_clip must be positive")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef ({self.kl_coef}) must be >= 0")
        if self.reward not in REWARDS:
            raise ValueError(f"reward ({self.reward!r}) must be one of {', '.join(REWARDS)}")

    @classmethod
    def quick(cls, **overrides: Any) -> TextSelfPlayConfig:
        """A few small updates, to check that a setup runs."""
        return cls(**{"iterations": 5, "prompts_per_iteration": 2, "group_size": 4, "max_new_tokens": 16,
                      **overrides})


# ---- rewards ---------------------------------------------------------------------------------------------

def seed_reward(ids: Sequence[int]) -> float:
    """Seed 000 (`azr_trainer.py: compute_reward`): token diversity and length, half each."""
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
        prompt_ids = [tok.encode(p) or [tok.bos_id] for p in prompts]
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
    module_spec.loader.exec_module(module)  # the user's own code, on the user's machine (see module docstring)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{path} has no function {name!r}")
    return fn


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
            value = fn(p, t)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{reward_file} returned {value!r}; a reward must be a finite number")
            out.append(float(value))
        return out
    return user


# ---- the loop -------------------------------------------------------------------------------------------

def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate exp(d) - d - 1 with d = log pi_ref - log pi on tokens sampled
    from pi: unbiased, always >= 0 (Schulman 2020, "Approximating KL divergence"; GRPO's choice)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def read_prompts_file(path: str | Path) -> list[str]:
    """The prompts of `--prompts-file`: a JSON list of strings, at least one (the web app writes its run's
    prompts so, keeping them off the command line). ValueError says what is wrong with the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read the prompts file {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the prompts file {path} is not UTF-8 JSON: {exc}") from None
    if not isinstance(data, list) or not data or not all(isinstance(p, str) for p in data):
        raise ValueError(f"the prompts file {path} must hold a JSON list of strings, at least one")
    return data


def encode_prompts(tok: Any, prompts: Sequence[str], max_new_tokens: int, block_size: int) -> list[list[int]]:
    """Prompt ids ('' starts from <BOS>); ValueError when the longest prompt plus its completion (and EOS)
    does not fit the model's context. The web app calls this before queueing a run, to refuse it at once."""
    encoded = [tok.encode(p) or [tok.bos_id] for p in prompts]
    longest = max(len(p) for p in encoded) + max_new_tokens + 1
    if longest > block_size:
        raise ValueError(f"prompt + max_new_tokens ({longest} tokens) exceeds the model's context ({block_size})")
    return encoded


def run_text_selfplay(model_dir: str | Path, out: str | Path, config: TextSelfPlayConfig,
                      prompts: Sequence[str] = ("",), *, reward: Reward | None = None,
                      judge: str | Path | None = None, reward_file: str | None = None,
                      log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Train the model in `model_dir` against a reward; writes OUT/metrics.jsonl, OUT/config.json and the
    final policy as the model directory OUT/final. Returns the metrics rows."""
    if not prompts:
        raise ValueError("give at least one prompt ('' starts from <BOS>)")
    reward_fn = reward or build_reward(config.reward, judge=judge, reward_file=reward_file)
    policy, tok = load_pretrained(model_dir)
    if tok is None:
        raise ValueError(f"{model_dir} has no tokenizer.json; text self-play needs one")
    reference, _ = load_pretrained(model_dir)  # the starting model, frozen: the KL anchor
    reference.requires_grad_(False)
    encoded = encode_prompts(tok, prompts, config.max_new_tokens, policy.config.block_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(
        {"selfplay_text": dataclasses.asdict(config), "model": str(model_dir), "prompts": list(prompts),
         "judge": str(judge) if judge else None, "reward_file": reward_file}, indent=2) + "\n")
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    opt = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    order = list(range(len(prompts)))
    for step in range(1, config.iterations + 1):
        chosen = [order[((step - 1) * config.prompts_per_iteration + j) % len(order)]
                  for j in range(config.prompts_per_iteration)]
        idx = [i for i in chosen for _ in range(config.group_size)]
        groups = [j for j in range(len(chosen)) for _ in range(config.group_size)]
        gen = GenerationConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                               seed=rng.randrange(2**31))
        comps = generate_ids(policy, [encoded[i] for i in idx], gen, eos_token_id=tok.eos_id, pad_id=tok.pad_id)
        texts = [tok.decode(c) for c in comps]
        rewards = [float(r) for r in reward_fn([prompts[i] for i in idx], texts, comps)]
        if len(rewards) != len(comps):
            raise ValueError(f"the reward returned {len(rewards)} values for {len(comps)} completions")
        adv = grouped_advantages(rewards, groups)
        trained = [c + [tok.eos_id] if len(c) < config.max_new_tokens else c for c in comps]
        batch = make_batch([encoded[i] for i in idx], trained, tok.pad_id)
        policy.train()
        logp, _ = token_logprobs(policy, batch, temperature=config.temperature)
        with torch.no_grad():
            ref_logp, _ = token_logprobs(reference, batch, temperature=config.temperature)
        m = batch.mask.float()
        kl = (kl_k3(logp, ref_logp) * m).sum() / m.sum()
        loss = reinforce_loss(logp, batch.mask, torch.tensor(adv)) + config.kl_coef * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
        opt.step()
        mean = sum(rewards) / len(rewards)
        row = {"step": step, "reward": round(mean, 5),
               "reward_std": round(math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)), 5),
               "kl": round(kl.item(), 6), "loss": round(loss.item(), 6),
               "length": round(sum(map(len, comps)) / len(comps), 2),
               "wall_s": round(time.perf_counter() - t0, 2), "sample": texts[0][:120]}
        rows.append(row)
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if log:
            log(f"step {step:4d} | reward {row['reward']:.4f} | kl {row['kl']:.4f} | len {row['length']:.1f}")
    save_pretrained(out / "final", policy, tok, training={
        "selfplay_text": dataclasses.asdict(config), "init": str(model_dir), "steps": config.iterations,
        "final_reward": rows[-1]["reward"], "final_kl": rows[-1]["kl"]})
    return rows
