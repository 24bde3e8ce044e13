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

The loop is GRPO's (lmlab.tune.grpo, on the Trainer): the `dapo` variant, whose token mean over the batch is
the aggregation this mode always had, with the KL to the starting model always measured (and weighted by
kl_coef). Scoring agrees with sampling: both with dropout off, so the KL is 0 at the first iteration.

Every iteration appends one JSON line to OUT/metrics.jsonl (step, reward, reward_std, kl, loss, length,
zero_spread_groups, sample and the Trainer's own keys), so the web app can chart it; the final policy is a
model directory OUT/final.

Resume: every `--save-every` iterations (0: only at the end), at the end, and when Ctrl-C or SIGTERM asks it
to stop (it finishes the iteration first; a second signal stops at once), the run writes
OUT/checkpoints/step-N/ (the Trainer's: policy weights, AdamW state, the generator the prompts and sampling
seeds come from; the last two kept). `--resume` continues from the latest one and reproduces the uninterrupted
run; settings not given come from OUT/config.json, and those given must match it (only `--iterations`, to
train further, and `--save-every` may change), as must the weights of the starting model and the judge:

    lmlab selfplay text --out runs/sp-text --resume
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ...files import atomic_write_text
from ...models.io import load_pretrained
from ...train.checkpoint import (
    RUN_FILES,
    checkpoint_step,
    latest_checkpoint,
    no_checkpoint,
    refuse_existing_run,
    run_folder,
)
from ...tune.grpo import (
    PromptSource,
    check_same_run,
    file_sha256,
    read_record,
    settings_from,
    train_config,
    train_grpo,
    weights_sha,
)
from ...tune.rewards import (
    REWARDS,
    JudgeReward,
    Reward,
    build_reward,
    load_reward_file,
    repetition_reward,
    resolved_spec,
    seed_reward,
)
from ...tune.rl import kl_k3
from .config import TextSelfPlayConfig

__all__ = ["REWARDS", "JudgeReward", "Reward", "build_reward", "file_sha256", "kl_k3", "load_reward_file",
           "repetition_reward", "seed_reward"]

# The settings that `lmlab selfplay text` takes as flags of the same names (the web app passes them on).
SETTING_FLAGS = ("seed", "iterations", "group_size", "prompts_per_iteration", "max_new_tokens", "lr", "kl_coef",
                 "temperature", "save_every")
KEEP_CHECKPOINTS = 2  # the latest, and the one before it in case the latest was being replaced
RESUMABLE_CHANGES = ("iterations", "save_every")  # the settings a resumed run may change


def read_prompts_file(path: str | Path) -> list[str]:
    """The prompts of `--prompts-file`: a JSON list of strings, at least one (the web app writes its run's
    prompts so, keeping them off the command line). ValueError says what is wrong with the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read the prompts file {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the prompts file {path} is not UTF-8 JSON: {exc}") from None
    except RecursionError:  # [[[[...]]]] deeper than the parser's stack
        raise ValueError(f"the prompts file {path} is nested too deeply to be a list of strings") from None
    if not isinstance(data, list) or not data or not all(isinstance(p, str) for p in data):
        raise ValueError(f"the prompts file {path} must hold a JSON list of strings, at least one")
    return data


def encode_prompts(tok: Any, prompts: Sequence[str], max_new_tokens: int, block_size: int) -> list[list[int]]:
    """Prompt ids ('' starts from <BOS>); ValueError when the longest prompt plus its completion (and EOS)
    does not fit the model's context. The web app calls this before queueing a run, to refuse it at once."""
    return PromptSource(tok, block_size, max_new_tokens, prompts=prompts).encode(prompts)


# ---- the run's record, and resume -------------------------------------------------------------------------

def run_record(model_dir: str | Path, config: TextSelfPlayConfig, prompts: Sequence[str],
               judge: str | Path | None = None, reward_file: str | None = None) -> dict[str, Any]:
    """What OUT/config.json holds besides the Trainer's settings: these settings, the starting model ("init")
    and the sha256 of its weights (the KL anchor, which a resumed run must share), the prompts, the judge (and
    its weights' sha256, for reward perplexity) and the reward file (and its sha256: the reward is the file's code,
    and an edited file would score the rest of a resumed run)."""
    judged = judge is not None and config.reward == "perplexity"
    return {"selfplay_text": dataclasses.asdict(config), "init": str(Path(model_dir).resolve()),
            "model_sha256": weights_sha(model_dir), "prompts": list(prompts),
            "judge": str(Path(judge).resolve()) if judge else None,  # resolved: --resume from another folder
            "judge_sha256": weights_sha(judge) if judged else None,
            "reward_file": resolved_spec(reward_file),
            "reward_file_sha256": file_sha256(Path(reward_file.rpartition(":")[0]))
            if reward_file and config.reward == "file" else None}


def saved_run(out: str | Path) -> dict[str, Any]:
    """OUT/config.json of a text self-play run (see run_record); ValueError if there is none."""
    return read_record(out, "selfplay_text", "text self-play")


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
    out = run_folder(out)
    checkpoint = latest_checkpoint(out)
    if resume and checkpoint is None:
        raise ValueError(no_checkpoint(out))
    if checkpoint is not None and not resume:
        raise ValueError(f"{out} holds the checkpoints of an earlier run (latest {checkpoint.name}): continue it "
                         "with --resume, or start over in another folder")
    if not resume:
        refuse_existing_run(out, RUN_FILES, "lmlab selfplay text")
    reward_fn = reward or build_reward(config.reward, judge=judge, reward_file=reward_file)
    policy, tok = load_pretrained(model_dir)
    if tok is None:
        raise ValueError(f"{model_dir} has no tokenizer.json; text self-play needs one")
    reference = load_pretrained(model_dir)[0].requires_grad_(False)  # the starting model, frozen: the KL anchor
    grpo = config.grpo()
    source = PromptSource(tok, policy.config.block_size, grpo.max_new_tokens, prompts=prompts)
    record = run_record(model_dir, config, prompts, judge, reward_file)
    settings = train_config(grpo, min(policy.config.block_size, source.longest() + grpo.max_new_tokens),
                            KEEP_CHECKPOINTS)
    if checkpoint is not None:
        if "train" not in saved_run(out):
            raise ValueError(f"{out} is a self-play run of an earlier lmlab, whose checkpoints this version cannot "
                             "continue; start a new run in another folder")
        same = {"model_sha256": "the weights of the starting model differ from those the run started with",
                "judge_sha256": "the weights of the judge differ from those the run started with",
                "prompts": "other prompts", "reward_file": ""}
        if "reward_file_sha256" in saved_run(out):  # runs recorded before it have no hash to compare
            same["reward_file_sha256"] = "the reward file's code differs from the code the run started with"
        check_same_run(out, saved_run(out), record, "selfplay_text", RESUMABLE_CHANGES, same)
        if checkpoint_step(checkpoint) > config.iterations:
            raise ValueError(f"the latest checkpoint is at iteration {checkpoint_step(checkpoint)}, past "
                             f"iterations ({config.iterations})")
        # the settings it goes on with (further iterations), so that a later resume starts from them
        atomic_write_text(out / "config.json", json.dumps({"train": settings.to_dict(), "model":
                                                           policy.config.to_dict(), **record}, indent=2) + "\n")
    result = train_grpo(policy, tok, out, grpo, source, reward_fn, reference=reference, provenance=record,
                        resume=resume, log=log, train_settings=settings)
    if result.stop_reason == "interrupted":
        raise KeyboardInterrupt
    return result.history


def resume_text_selfplay(out: str | Path, overrides: dict[str, Any] | None = None, *,
                         model_dir: str | Path | None = None, prompts: Sequence[str] | None = None,
                         judge: str | Path | None = None, reward_file: str | None = None,
                         reward: Reward | None = None,
                         log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Continue the run in OUT from its latest checkpoint with the settings of OUT/config.json. `overrides`
    (TextSelfPlayConfig fields) and the other arguments, where given, must match them except for
    RESUMABLE_CHANGES: {"iterations": 80} trains further."""
    out = Path(out)
    if latest_checkpoint(out) is None:  # says so before anything else
        raise ValueError(no_checkpoint(out))
    saved = saved_run(out)
    config = settings_from(saved["selfplay_text"], TextSelfPlayConfig, overrides or {}, out / "config.json")
    return run_text_selfplay(model_dir or saved["init"], out, config, prompts or saved.get("prompts") or [""],
                             reward=reward, judge=judge or saved.get("judge"),
                             reward_file=reward_file or saved.get("reward_file"), log=log, resume=True)
