"""Self-play RL for text models trained on books: sample a group of completions per prompt, score them with
a reward, and update the policy with group-relative advantages (GRPO, Shao et al. 2024) plus a KL penalty
to the starting model, so the reward can rise without the text collapsing into whatever games it.

    lmlab selfplay text --model lmlab-demo/final --out runs/sp-text --reward repetition --iterations 40

Rewards (`--reward`):
- seed: the AZR Model Trainer app's `unique_ratio * 0.5 + min(len / 100, 1) * 0.5` over the completion's
  tokens. In the app it was only logged, never trained on; here it is trained on, so you can watch what it
  rewards (length).
- repetition: the share of distinct token 3-grams among the completion's 3-grams (0 if it has none).
- perplexity: the mean log-probability per token of the completion (and its EOS) under a second model,
  the judge (`--judge DIR`), which re-tokenises the text with its own tokenizer.
- file: your own function, `--reward-file my_reward.py:fn` with `fn(prompt: str, completion: str) -> float`,
  imported from your local file (your code, run by you; nothing is unpickled).

Every iteration appends one JSON line to OUT/metrics.jsonl (step, reward, reward_std, kl, loss, length,
wall_s), the trainer's format, so the web app can chart it; the final policy is a model directory OUT/final.

Resume: every `--save-every` iterations (0: only at the end), at the end, and when Ctrl-C or SIGTERM asks it
to stop (it finishes the iteration first; a second signal stops at once), the run writes
OUT/checkpoints/step-N/ (policy weights, AdamW state, the sampling and torch RNG states, wall time; the last
two kept), the trainer's layout. `--resume` continues from the latest one and reproduces the uninterrupted
run; settings not given come from OUT/config.json, and those given must match it (only `--iterations`, to
train further, and `--save-every` may change), as must the weights of the starting model and the judge:

    lmlab selfplay text --out runs/sp-text --resume
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from safetensors.torch import load_model, save_model

from ...configs import knob, validate
from ...files import atomic_write_text
from ...models import GenerationConfig, generate_ids
from ...models.io import WEIGHTS, load_pretrained, save_pretrained
from ...train.checkpoint import (
    StopOnSignal,
    b64,
    checkpoint_step,
    latest_checkpoint,
    trim_metrics,
    unb64,
    write_checkpoint,
)
from .rl import grouped_advantages, make_batch, reinforce_loss, token_logprobs

REWARDS = ("seed", "repetition", "perplexity", "file")
# The settings that `lmlab selfplay text` takes as flags of the same names (the web app passes them on).
SETTING_FLAGS = ("seed", "iterations", "group_size", "prompts_per_iteration", "max_new_tokens", "lr", "kl_coef",
                 "temperature", "save_every")
# (prompts, completions as text, completions as ids without EOS) -> one reward per completion
Reward = Callable[[Sequence[str], Sequence[str], Sequence[Sequence[int]]], list[float]]
KEEP_CHECKPOINTS = 2  # the latest, and the one before it in case the latest was being replaced
RESUMABLE_CHANGES = ("iterations", "save_every")  # the settings a resumed run may change


@dataclass
class TextSelfPlayConfig:
    iterations: int = knob(40, "policy updates", gt=0)
    prompts_per_iteration: int = knob(4, "distinct prompts per update", gt=0)
    group_size: int = knob(8, "completions per prompt; advantages are relative to this group", ge=2)
    max_new_tokens: int = knob(48, "tokens per completion", gt=0)
    temperature: float = knob(1.0, "sampling temperature; log-probs are taken at the same temperature, so samples "
                              "come from the policy", gt=0)
    lr: float = knob(5e-5, "AdamW learning rate", gt=0)
    kl_coef: float = knob(0.1, "weight of the k3 KL estimate to the starting model (GRPO, eq. 4)", ge=0)
    grad_clip: float = knob(1.0, "clip the gradient norm to this", gt=0)
    seed: int = knob(0, "seed for sampling and the update")
    reward: str = knob("seed", "seed: the AZR Model Trainer app's diversity*0.5+length*0.5; repetition: distinct "
                       "3-grams; perplexity: judge log-prob (--judge); file: your function (--reward-file)",
                       choices=REWARDS)
    save_every: int = knob(10, "checkpoint every N iterations (0: only at the end; also on Ctrl-C or SIGTERM)",
                           ge=0)

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def quick(cls, **overrides: Any) -> TextSelfPlayConfig:
        """A few small updates, to check that a setup runs."""
        return cls(**{"iterations": 5, "prompts_per_iteration": 2, "group_size": 4, "max_new_tokens": 16,
                      **overrides})


# ---- rewards ---------------------------------------------------------------------------------------------

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


# ---- checkpoints and resume ------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_record(model_dir: str | Path, config: TextSelfPlayConfig, prompts: Sequence[str],
               judge: str | Path | None = None, reward_file: str | None = None) -> dict[str, Any]:
    """What OUT/config.json holds: the settings, the starting model and the sha256 of its
    weights (the KL anchor, which a resumed run must share), the prompts, the judge (and its weights' sha256,
    for reward perplexity) and the reward file."""
    judged = judge is not None and config.reward == "perplexity"
    return {"selfplay_text": dataclasses.asdict(config), "model": str(model_dir),
            "model_sha256": file_sha256(Path(model_dir) / WEIGHTS), "prompts": list(prompts),
            "judge": str(judge) if judge else None,
            "judge_sha256": file_sha256(Path(judge) / WEIGHTS) if judged else None,
            "reward_file": reward_file}


def saved_run(out: str | Path) -> dict[str, Any]:
    """OUT/config.json of a text self-play run (see run_record); ValueError if there is none."""
    path = Path(out) / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"not a self-play run directory (no config.json): {out}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("selfplay_text"), dict) or "model" not in saved:
        raise ValueError(f"{path} is not the config of a text self-play run")
    return saved


def _resume_point(out: Path) -> Path:
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        raise ValueError(f"no checkpoint to resume from in {out / 'checkpoints'}")
    return checkpoint


def _check_same_run(out: Path, saved: dict[str, Any], record: dict[str, Any]) -> None:
    """ValueError naming what a resumed run would change beyond RESUMABLE_CHANGES."""
    was, now = saved["selfplay_text"], record["selfplay_text"]
    changes = [f"{k} {was[k]!r} -> {v!r}" for k, v in now.items()
               if k not in RESUMABLE_CHANGES and was.get(k, v) != v]
    for key, what in (("model_sha256", "the starting model"), ("judge_sha256", "the judge")):
        if saved.get(key) != record[key]:
            changes.append(f"the weights of {what} differ from those the run started with")
    if saved.get("prompts") != record["prompts"]:
        changes.append("other prompts")
    if saved.get("reward_file") != record["reward_file"]:
        changes.append(f"reward_file {saved.get('reward_file')!r} -> {record['reward_file']!r}")
    if changes:
        raise ValueError(f"cannot resume {out}: {'; '.join(changes)}; a resumed run keeps its settings (only "
                         f"{' and '.join(RESUMABLE_CHANGES)} may change); start a new run in another folder instead")


def _save_checkpoint(out: Path, step: int, policy: torch.nn.Module, opt: torch.optim.Optimizer, rng: random.Random,
                     elapsed: float) -> Path:
    def fill(tmp: Path) -> None:
        save_model(policy, str(tmp / WEIGHTS))
        # tensors and plain numbers only; read back with torch.load(weights_only=True), which unpickles no code
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        version, internal, gauss = rng.getstate()  # the sampling seeds
        (tmp / "state.json").write_text(json.dumps({
            "step": step, "elapsed_s": elapsed,
            "rng": {"python": [version, list(internal), gauss], "torch": b64(torch.get_rng_state())}}))
    return write_checkpoint(out, step, fill, KEEP_CHECKPOINTS)


def _load_checkpoint(path: Path, policy: torch.nn.Module, opt: torch.optim.Optimizer,
                     rng: random.Random) -> tuple[int, float]:
    """Restore the policy, AdamW, the sampling RNG and the torch RNG (dropout) -> (step, wall time so far)."""
    try:
        missing, unexpected = load_model(policy, str(path / WEIGHTS), strict=False)
        if not (missing or unexpected):
            opt.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
            state = json.loads((path / "state.json").read_text())
            version, internal, gauss = state["rng"]["python"]
            rng.setstate((version, tuple(internal), gauss))
            torch.set_rng_state(unb64(state["rng"]["torch"]))
    # a checkpoint is written whole (temporary folder + rename), so this is damage on disk: safetensors,
    # unpickling (whose own message suggests weights_only=False), JSON or a missing file or key
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read the checkpoint {path} ({type(exc).__name__}); it is damaged: delete it to "
                         "resume from the one before, if there is one") from None
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return state["step"], state["elapsed_s"]


# ---- the run ---------------------------------------------------------------------------------------------

def run_text_selfplay(model_dir: str | Path, out: str | Path, config: TextSelfPlayConfig,
                      prompts: Sequence[str] = ("",), *, reward: Reward | None = None,
                      judge: str | Path | None = None, reward_file: str | None = None,
                      log: Callable[[str], None] | None = print, resume: bool = False) -> list[dict[str, Any]]:
    """Train the model in `model_dir` against a reward; writes OUT/config.json, OUT/metrics.jsonl,
    OUT/checkpoints/step-N and the final policy as the model directory OUT/final. Returns the metrics rows
    (resumed: from the first iteration on).

    resume=True continues from the latest checkpoint in OUT; ValueError if there is none, or if the arguments
    differ from OUT/config.json beyond RESUMABLE_CHANGES (or the starting model's or judge's weights do). A new
    run refuses an OUT that holds checkpoints: a later resume would take them for its own. Ctrl-C or SIGTERM:
    the iteration finishes, a checkpoint is written, and KeyboardInterrupt is raised (OUT/final is not)."""
    if not prompts:
        raise ValueError("give at least one prompt ('' starts from <BOS>)")
    out = Path(out)
    checkpoint = _resume_point(out) if resume else latest_checkpoint(out)
    if checkpoint is not None and not resume:
        raise ValueError(f"{out} holds the checkpoints of an earlier run (latest {checkpoint.name}): continue it "
                         f"with --resume, or start over in another folder (or after removing {out / 'checkpoints'})")
    reward_fn = reward or build_reward(config.reward, judge=judge, reward_file=reward_file)
    policy, tok = load_pretrained(model_dir)
    if tok is None:
        raise ValueError(f"{model_dir} has no tokenizer.json; text self-play needs one")
    reference, _ = load_pretrained(model_dir)  # the starting model, frozen: the KL anchor
    reference.requires_grad_(False)
    encoded = encode_prompts(tok, prompts, config.max_new_tokens, policy.config.block_size)
    record = run_record(model_dir, config, prompts, judge, reward_file)
    if checkpoint is not None:
        _check_same_run(out, saved_run(out), record)
        if checkpoint_step(checkpoint) > config.iterations:
            raise ValueError(f"the latest checkpoint is at iteration {checkpoint_step(checkpoint)}, past "
                             f"iterations ({config.iterations})")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(record, indent=2) + "\n")
    metrics_path = out / "metrics.jsonl"
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    opt = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    start, elapsed, rows = 0, 0.0, []
    if checkpoint is None:
        metrics_path.write_text("")
    else:
        start, elapsed = _load_checkpoint(checkpoint, policy, opt, rng)
        rows = trim_metrics(metrics_path, start)  # the lines after the checkpoint are logged again
        if log:
            log(f"resumed from {checkpoint} (step {start})")
    t0 = time.perf_counter() - elapsed
    order = list(range(len(prompts)))
    with StopOnSignal(log) as stop:
        for step in range(start + 1, config.iterations + 1):
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
            stopping = stop.requested  # read once: a signal from here on is the next iteration's
            if stopping or step == config.iterations or (config.save_every and step % config.save_every == 0):
                written = _save_checkpoint(out, step, policy, opt, rng, time.perf_counter() - t0)
            if stopping:
                if log:
                    log(f"interrupted at step {step}; the latest checkpoint is {written}; continue with --resume")
                raise KeyboardInterrupt
    save_pretrained(out / "final", policy, tok, training={
        "selfplay_text": dataclasses.asdict(config), "init": str(model_dir), "steps": config.iterations,
        "final_reward": rows[-1]["reward"], "final_kl": rows[-1]["kl"]})
    return rows


def resume_text_selfplay(out: str | Path, overrides: dict[str, Any] | None = None, *,
                         model_dir: str | Path | None = None, prompts: Sequence[str] | None = None,
                         judge: str | Path | None = None, reward_file: str | None = None,
                         reward: Reward | None = None,
                         log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Continue the run in OUT from its latest checkpoint with the settings of OUT/config.json. `overrides`
    (TextSelfPlayConfig fields) and the other arguments, where given, must match them except for
    RESUMABLE_CHANGES: {"iterations": 80} trains further."""
    out = Path(out)
    _resume_point(out)  # no checkpoint says so before anything else
    saved = saved_run(out)
    fields = {f.name for f in dataclasses.fields(TextSelfPlayConfig)}
    settings = {**{k: v for k, v in saved["selfplay_text"].items() if k in fields}, **(overrides or {})}
    # a hand-edited file: a number that is not one would be a TypeError in __post_init__'s comparisons
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    for name, default in dataclasses.asdict(TextSelfPlayConfig()).items():
        if name in settings and number(default) and not number(settings[name]):
            raise ValueError(f"{out / 'config.json'}: {name} ({settings[name]!r}) must be a number")
    config = TextSelfPlayConfig(**settings)
    return run_text_selfplay(model_dir or saved["model"], out, config, prompts or saved.get("prompts") or [""],
                             reward=reward, judge=judge or saved.get("judge"),
                             reward_file=reward_file or saved.get("reward_file"), log=log, resume=True)
