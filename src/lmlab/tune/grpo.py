"""GRPO: group-relative policy optimisation with verifiable or scored rewards, on the Trainer.

    lmlab tune grpo --model runs/add/final --task addition --out runs/add-grpo --steps 60

Each step samples `group_size` completions for each of `prompts_per_step` prompts from the current policy
(KV-cached, dropout off), scores them, and takes one optimizer step on the clipped surrogate

    L_it = -min(rho_it A_i, clip(rho_it, 1 - epsilon, 1 + epsilon_high) A_i) + kl_coef * KL_it

with rho_it = pi(y_it) / pi_old(y_it) and A_i the group-relative advantage (Shao et al. 2024, "DeepSeekMath",
arXiv:2402.03300, eq. 3). `--variant` picks the normalisations, as TRL's GRPOTrainer defines its loss_type
(github.com/huggingface/trl, trl/trainer/grpo_trainer.py, `_compute_loss`):

    grpo     A = (r - mean_group) / (std_group + 1e-4) (sample std, as TRL); each completion's token mean,
             then the mean over completions (the paper's 1/|o_i| length normalisation)
    dr_grpo  A = r - mean_group, no std; the token sum over (completions x max_new_tokens): no length
             normalisation, whose bias favours long wrong answers (Liu et al. 2025, "Understanding R1-Zero-Like
             Training: A Critical Perspective", arXiv:2503.20783)
    dapo     A as grpo; the token sum over all completion tokens of the batch (token-level loss) and clip-higher,
             epsilon_high 0.28 (Yu et al. 2025, "DAPO", arXiv:2503.14476)

KL_it is the k3 estimate exp(d) - d - 1, d = log pi_ref - log pi (Schulman 2020, "Approximating KL
divergence"; the paper's eq. 4), to the starting model, loaded only when kl_coef > 0 (TRL's default beta is 0).
With LoRA (`--lora-rank`: adapters trained on the frozen model, RUN/adapter in PEFT's layout) the starting model
is the policy with its adapters switched off, as TRL does with a PEFT model: no second copy of the weights.

Scoring agrees with sampling: log-probabilities for the update and the KL are taken in eval mode (dropout off,
as the samples were drawn) at the sampling temperature. So at the first step the KL is exactly 0, and the
update is on-policy even for a model whose config carries dropout (imported GPT-2 models: 0.1). One update per
batch (TRL's num_iterations 1), on the weights that sampled it: pi_old is the policy's log-probability itself,
detached (no second forward), so the ratio is 1 in value and the clip never binds; it is kept for the
surrogate's gradient.

Groups whose completions all got the same reward have advantage 0: they are counted (metric
`zero_spread_groups`) and, without a KL term (kl_coef 0), dropped from the batch before the forward and backward,
which they would only cost. The loss is still normalised over the whole batch (its completions, or for dapo its
completion tokens), so dropping them changes no gradient: the step is TRL's on the full batch. With kl_coef > 0
they stay, since the KL penalises every completion (the paper's eq. 3; TRL). DAPO's dynamic sampling would
replace them with new groups; here the step simply has less signal. A step with nothing left still steps (a
zero gradient).

The run is the Trainer's (lmlab.train): this module is both its dataset (sample_batch draws the prompts and the
sampling seed from the trainer's generator, so a resumed run samples what the uninterrupted one would) and its
Objective; checkpoints, resume, metrics.jsonl and final/ are those of `lmlab train`. One process only.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..configs import settings_from
from ..files import file_sha256
from ..models import GenerationConfig, generate_ids
from ..models.generation import encode_prompt
from ..models.io import WEIGHTS
from ..models.quant import refuse_quantized
from ..models.scoring import Batch, make_batch, token_logprobs
from ..train import TrainConfig
from ..train.checkpoint import RUN_FILES, no_checkpoint, refuse_existing_run, run_folder
from ..train.trainer import Callback, Objective, Trainer
from .chat import ChatTemplate, has_template
from .config import VARIANTS, GRPOConfig
from .lora import LoRAConfig, adapters_disabled
from .rewards import Reward, Task, resolved_spec
from .rl import kl_k3

STD_EPS = 1e-4   # TRL's guard on the group std


# ---- the loss, on tensors ----------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """(N,) rewards, consecutive groups of `group_size` -> (N,) advantages: r minus its group's mean, divided by
    the group's sample std + 1e-4 when `scale` (GRPO, DAPO; TRL's scale_rewards), not for Dr. GRPO."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + STD_EPS)
    return adv.flatten()


def has_spread(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(groups,) True where a group's rewards are not all equal (the groups that carry a signal)."""
    r = rewards.view(-1, group_size)
    return r.amax(1) > r.amin(1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, *,
                variant: str, epsilon: float, epsilon_high: float, max_new_tokens: int,
                ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0, batch_rows: int | None = None,
                batch_tokens: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The variant's loss over (B, T) per-token log-probs (mask: completion tokens) and (B,) advantages, and its
    statistics over the completion tokens: the mean ratio, the share of tokens the clip took out of the gradient,
    the mean k3 KL (with ref_logp). batch_rows / batch_tokens: the completions and completion tokens of the batch
    these rows were taken from (rows of advantage 0 left out), which the variants normalise by; default these
    rows'."""
    m = mask.float()
    tokens = m.sum().clamp_min(1.0)
    rows = m.shape[0] if batch_rows is None else batch_rows
    norm_tokens = tokens if batch_tokens is None else max(float(batch_tokens), 1.0)
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats = {"ratio": ((ratio.detach() - 1) * m).sum() / tokens + 1,  # 1 over no tokens: nothing off-policy
             # where the clip binds (the clipped term is the smaller: no gradient), TRL's clip_ratio/region_mean; a
             # ratio outside the range on the other side of its advantage keeps its gradient and is not counted
             "clipped": (((clipped * adv).detach() < (ratio * adv).detach()).float() * m).sum() / tokens}
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        stats["kl"] = (kl.detach() * m).sum() / tokens
        if kl_coef:
            per_token = per_token + kl_coef * kl
    if variant == "grpo":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp_min(1.0)).sum() / max(rows, 1)
    elif variant == "dr_grpo":
        loss = (per_token * m).sum() / (max(rows, 1) * max_new_tokens)
    elif variant == "dapo":
        loss = (per_token * m).sum() / norm_tokens
    else:
        raise ValueError(f"variant ({variant!r}) must be one of {', '.join(VARIANTS)}")
    return loss, stats


# ---- prompts -----------------------------------------------------------------------------------------------

class PromptSource:
    """The prompts of each step: a fixed list taken in turn, or a task's training prompts drawn at random."""

    def __init__(self, tokenizer: Any, block_size: int, max_new_tokens: int, *, prompts: Sequence[str] = (),
                 task: Task | None = None, heldout: Sequence[str] = ()) -> None:
        if not prompts and task is None:
            raise ValueError("give prompts or a task")
        self.tok, self.task, self.prompts = tokenizer, task, list(prompts)
        self.heldout, self.block_size, self.max_new_tokens = list(heldout), block_size, max_new_tokens
        self._heldout_set = set(heldout)
        self.encode(self.prompts or self.heldout)  # refuse prompts that do not fit before anything runs

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Ids of each prompt: a task's prompt starts a text (<BOS> first); a given one as it is ('' starts
        from <BOS>). ValueError when prompt + max_new_tokens (and EOS) exceeds the model's context."""
        tok = self.tok
        ids = [encode_prompt(tok, p, bos=bool(self.task)) for p in prompts]
        longest = max(len(p) for p in ids) + self.max_new_tokens + 1
        if longest > self.block_size:
            raise ValueError(f"prompt + max_new_tokens ({longest} tokens) exceeds the model's context "
                             f"({self.block_size})")
        return ids

    def longest(self) -> int:
        return max(len(p) for p in self.encode(self.prompts or self.heldout))

    def draw(self, call: int, n: int, generator: torch.Generator) -> list[str]:
        if self.task is None:  # in turn, from where the previous step stopped
            return [self.prompts[((call - 1) * n + j) % len(self.prompts)] for j in range(n)]
        rng = random.Random(int(torch.randint(2**62, (), generator=generator)))
        return self.task.train_prompts(rng, n, self._heldout_set)


# ---- the rollout source and objective ----------------------------------------------------------------------

class GRPO(Objective):
    """Both the dataset and the Objective of a GRPO run: sample_batch samples, scores and packs a batch;
    loss() takes the policy-gradient step's loss on it; evaluate() is held-out pass@1 for a task."""

    def __init__(self, policy: torch.nn.Module, tokenizer: Any, config: GRPOConfig, prompts: PromptSource,
                 reward: Reward, reference: torch.nn.Module | None = None) -> None:
        self.policy, self.tok, self.config, self.source, self.reward = policy, tokenizer, config, prompts, reward
        self.reference = reference
        self.calls = 0            # sample_batch calls so far: the fixed prompts' turn (travels in checkpoints)
        self.flat_total = 0       # groups without reward spread so far (logged: those between logged steps count)
        self.stats: dict[str, torch.Tensor] = {}  # the latest rollout's, logged with its step
        self.sample = ""

    # the Trainer's dataset interface
    @torch.no_grad()
    def sample_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> dict[str, Any]:
        c, tok, G = self.config, self.tok, self.config.group_size
        self.calls += 1
        prompts = self.source.draw(self.calls, c.prompts_per_step, generator)
        seed = int(torch.randint(2**31 - 1, (), generator=generator))
        encoded = self.source.encode(prompts)
        rows = [p for p in encoded for _ in range(G)]
        texts_in = [p for p in prompts for _ in range(G)]
        self.policy.eval()  # dropout off, as it will be scored; keeps the KV-cache decoder between steps
        gen = GenerationConfig(max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=seed)
        comps = generate_ids(self.policy, rows, gen, eos_token_id=tok.eos_id, pad_id=tok.pad_id)
        texts = [tok.decode(ids) for ids in comps]
        rewards = [float(r) for r in self.reward(texts_in, texts, comps)]
        if len(rewards) != len(comps):
            raise ValueError(f"the reward returned {len(rewards)} values for {len(comps)} completions")
        r = torch.tensor(rewards, dtype=torch.float32)
        adv = group_advantages(r, G, scale=c.variant != "dr_grpo")
        spread = has_spread(r, G)
        # advantage-0 rows add nothing but their KL: without one they are left out (the normalisers count them)
        keep = spread.repeat_interleave(G) if not c.kl_coef else torch.ones(len(comps), dtype=torch.bool)
        self.sample = texts[0][:120]
        flat = int((~spread).sum())
        self.flat_total += flat
        self.stats = {"reward": r.mean(), "reward_std": r.std(correction=0),
                      "length": torch.tensor(sum(map(len, comps)) / len(comps)),
                      "zero_spread_groups": torch.tensor(float(flat)),
                      "zero_spread_groups_total": torch.tensor(float(self.flat_total))}
        kept = keep.nonzero().flatten().tolist()
        whole = [comps[i] + [tok.eos_id] if len(comps[i]) < c.max_new_tokens else comps[i] for i in range(len(comps))]
        trained = [whole[i] for i in kept]
        device = next(self.policy.parameters()).device
        if kept:
            batch = make_batch([rows[i] for i in kept], trained, tok.pad_id, device)
        else:  # nothing to learn from: an empty batch (a zero gradient)
            empty = torch.zeros(0, 1, dtype=torch.long, device=device)
            batch = Batch(empty, empty, empty.bool())
        out = {"inputs": batch.inputs, "targets": batch.targets, "mask": batch.mask, "advantages": adv[keep].to(device),
               "batch_rows": len(whole), "batch_tokens": sum(map(len, whole))}
        if self.reference is not None:
            # a LoRA run's reference is the policy itself with its adapters off; a no-op for a separate model
            with adapters_disabled(self.reference.to(device).eval()) as reference:
                out["ref_logp"] = token_logprobs(reference, batch, temperature=c.temperature)[0]
        return out

    # the Objective
    def trained_tokens(self, batch: dict[str, Any]) -> int:
        return batch["inputs"].numel()  # the kept groups' rows (sampling them is not counted)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        model.eval()  # dropout off: the policy is scored as it sampled (the update stays on-policy)
        logp, _ = token_logprobs(model, Batch(batch["inputs"], batch["targets"], batch["mask"]),
                                 temperature=c.temperature)
        # one update per batch, on the weights that sampled it: the old policy's log-probs are these, detached (TRL
        # with num_iterations=1), so no second forward; the ratio (1) keeps the clipped surrogate's gradient
        loss, stats = policy_loss(logp, logp.detach(), batch["mask"], batch["advantages"], variant=c.variant,
                                  epsilon=c.epsilon, epsilon_high=c.clip_high, max_new_tokens=c.max_new_tokens,
                                  ref_logp=batch.get("ref_logp"), kl_coef=c.kl_coef,
                                  batch_rows=batch.get("batch_rows"), batch_tokens=batch.get("batch_tokens"))
        device = loss.device
        return loss, {**{k: v.to(device) for k, v in self.stats.items()}, **stats}

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        if self.source.task is None:
            return {}
        return {"heldout_pass1": pass_at_1(self.policy, self.tok, self.source, self.source.heldout)}

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "flat_total": self.flat_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state.get("calls", 0))
        self.flat_total = int(state.get("flat_total", 0))


@torch.no_grad()
def pass_at_1(model: torch.nn.Module, tokenizer: Any, source: PromptSource, prompts: Sequence[str],
              batch: int = 64) -> float:
    """The share of `prompts` whose greedy completion the task's checker accepts."""
    was = model.training
    model.eval()
    right = 0
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i:i + batch])
        comps = generate_ids(model, source.encode(chunk), max_new_tokens=source.max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        right += sum(source.task.check(p, tokenizer.decode(c)) for p, c in zip(chunk, comps))
    model.train(was)
    return right / max(len(prompts), 1)


class _Report(Callback):
    """Each step's line gets the first completion (the web app shows it with its reward); the final model's
    training.json gets the last reward and KL (the web app records them with the model it makes)."""

    def __init__(self, grpo: GRPO, log: Callable[[str], None] | None) -> None:
        self.grpo, self.log = grpo, log

    def on_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        metrics["sample"] = self.grpo.sample

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if "reward" not in metrics:
            return
        trainer.provenance.update(final_reward=metrics["reward"], final_kl=metrics.get("kl"))
        if self.log:
            kl = f" | kl {metrics['kl']:.4f}" if "kl" in metrics else ""
            extra = f" | held-out pass@1 {metrics['heldout_pass1']:.3f}" if "heldout_pass1" in metrics else ""
            self.log(f"step {metrics['step']:4d} | reward {metrics['reward']:.4f}{kl} | len {metrics['length']:.1f} "
                     f"| flat groups {int(metrics['zero_spread_groups'])}{extra}")


def train_config(config: GRPOConfig, seq_len: int, keep_last: int = 2) -> TrainConfig:
    """The Trainer's settings for a GRPO run: one batch of groups per step, a constant learning rate, AdamW
    without weight decay (torch's betas), a line and a sample every step."""
    return TrainConfig(batch_size=config.prompts_per_step * config.group_size, seq_len=seq_len, lr=config.lr,
                       min_lr=config.lr, warmup_steps=0, schedule="constant", weight_decay=0.0, beta1=0.9,
                       beta2=0.999, grad_clip=config.grad_clip, max_steps=config.steps, eval_every=config.eval_every,
                       save_every=config.save_every, keep_last=keep_last, seed=config.seed, device=config.device,
                       log_every=1, sample_every=0)


def train_grpo(policy: torch.nn.Module, tokenizer: Any, out: str | Path, config: GRPOConfig, source: PromptSource,
               reward: Reward, *, reference: torch.nn.Module | None = None, provenance: dict[str, Any] | None = None,
               resume: bool = False, log: Callable[[str], None] | None = print,
               train_settings: TrainConfig | None = None, lora: LoRAConfig | None = None,
               keep_template: bool = False, side_files: str | Path | None = None) -> Any:
    """The one RL loop: `policy` trained by the Trainer on its own samples; returns the TrainResult. `lora`:
    adapters trained on the frozen policy (then a `reference` must be the policy itself, or None). `keep_template`:
    final/ gets lmlab's chat template (a run from a chat model); `side_files`: the model directory whose side files
    (models.io.SIDE_FILES) final/ carries."""
    from ..train.recipes import CarrySideFiles, train_with_lora
    from ..train.trainer import dist_env
    if dist_env()[1] > 1:
        raise ValueError("GRPO runs in one process; start it without torchrun")
    grpo = GRPO(policy, tokenizer, config, source, reward, reference)
    seq_len = min(policy.config.block_size, source.longest() + config.max_new_tokens)
    settings = train_settings or train_config(config, seq_len)
    callbacks = [_Report(grpo, log), *([ChatTemplate()] if keep_template else []),
                 *([CarrySideFiles(side_files)] if side_files is not None else [])]
    return train_with_lora(policy, tokenizer, grpo, settings, out, callbacks, lora, resume=resume,
                           provenance=provenance, objective=grpo)


# ---- a run's record: what resume keeps ---------------------------------------------------------------------

def read_record(out: str | Path, section: str, what: str) -> dict[str, Any]:
    """OUT/config.json of a run with its settings under `section`; ValueError if there is none."""
    path = Path(out) / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"not a {what} run directory (no config.json): {out}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get(section), dict):
        raise ValueError(f"{path} is not the config of a {what} run")
    if isinstance(saved.get("reward_file"), str):  # recorded as typed before it was recorded resolved
        saved["reward_file"] = resolved_spec(saved["reward_file"])
    return saved


def check_same_run(out: Path, saved: dict[str, Any], record: dict[str, Any], section: str,
                   resumable: Sequence[str], same: dict[str, str]) -> None:
    """ValueError naming what a resumed run would change: a setting of `section` beyond `resumable`, or a key of
    `same` (key -> what it is, e.g. the weights of the starting model)."""
    was, now = saved[section], record[section]
    changes = [f"{k} {was[k]!r} -> {v!r}" for k, v in now.items() if k not in resumable and was.get(k, v) != v]
    for key, what in same.items():
        if saved.get(key) != record.get(key):
            changes.append(what if what.startswith(("the ", "other ")) else
                           f"{key} {saved.get(key)!r} -> {record.get(key)!r}")
    if changes:
        raise ValueError(f"cannot resume {out}: {'; '.join(changes)}; a resumed run keeps its settings (only "
                         f"{' and '.join(resumable)} may change); start a new run in another folder instead")


def weights_sha(model_dir: str | Path) -> str:
    return file_sha256(Path(model_dir) / WEIGHTS)


# ---- `lmlab tune grpo` -------------------------------------------------------------------------------------

RESUMABLE_CHANGES = ("steps", "save_every", "eval_every", "device")  # what a resumed run may change


def run_grpo(model_dir: str | Path, out: str | Path, config: GRPOConfig, *, task: str | None = None,
             reward: str | None = None, prompts: Sequence[str] = (), judge: str | Path | None = None,
             reward_file: str | None = None, resume: bool = False,
             log: Callable[[str], None] | None = print, lora: LoRAConfig | None = None) -> Any:
    """GRPO on `task` (a verifiable task of tune.rewards, scored by its checker, with held-out pass@1 at each
    evaluation) or on `prompts` with `reward` (a self-play reward, or a user's function: reward "file" with
    reward_file FILE.py:FUNCTION). resume=True continues OUT from its last checkpoint; the settings must match
    OUT/config.json but for RESUMABLE_CHANGES, and the starting model's weights must be the same. `lora`: train
    adapters on the frozen model (their dropout must be 0: the policy is scored with dropout off)."""
    from ..models.io import load_pretrained
    from ..train import latest_checkpoint
    from .rewards import build_reward, get_task

    if isinstance(prompts, str):  # one prompt, not one per character
        raise ValueError("prompts must be a list of prompts, not one string")
    if (task is None) == (reward is None):
        raise ValueError("give --task NAME (a verifiable task) or --reward NAME (with --prompt), not both")
    if task is not None and (prompts or judge or reward_file):
        raise ValueError("--task makes its own prompts and checks its answers: drop --prompt, --judge and "
                         "--reward-file")
    out = run_folder(out)
    checkpoint = latest_checkpoint(out)
    if resume and checkpoint is None:
        raise ValueError(no_checkpoint(out))
    if not resume and checkpoint is not None:
        raise ValueError(f"{out} holds the checkpoints of an earlier run (latest {checkpoint.name}): continue it "
                         "with --resume, or start over in another folder")
    if not resume:
        refuse_existing_run(out, RUN_FILES, "lmlab tune grpo")
    if lora is not None and lora.dropout:
        raise ValueError("GRPO scores the policy with dropout off, as it samples (the update stays on-policy): "
                         "--lora-dropout does not apply; leave it out")
    the_task = get_task(task) if task is not None else None
    score = the_task.reward if the_task else build_reward(reward, judge=judge, reward_file=reward_file)
    policy, tok = load_pretrained(model_dir)
    refuse_quantized(policy)  # before the adapters go on
    if tok is None:
        raise ValueError(f"{model_dir} has no tokenizer.json; GRPO needs one")
    reference = None
    if config.kl_coef > 0:  # with LoRA the policy itself, its adapters switched off when it scores the reference
        reference = policy if lora is not None else load_pretrained(model_dir)[0].requires_grad_(False)
    if the_task is not None:
        source = PromptSource(tok, policy.config.block_size, config.max_new_tokens, task=the_task,
                              heldout=the_task.heldout(config.eval_prompts))
    else:
        source = PromptSource(tok, policy.config.block_size, config.max_new_tokens, prompts=list(prompts) or [""])
    # paths resolved, as the preference runs record theirs: --resume from another folder finds them again
    record = {"grpo": dataclasses.asdict(config), "task": task, "reward": reward,
              "init": str(Path(model_dir).resolve()), "model_sha256": weights_sha(model_dir),
              "prompts": list(prompts), "reward_file": resolved_spec(reward_file),
              "judge": str(Path(judge).resolve()) if judge else None, "lora": lora.to_dict() if lora else None,
              # the reward is the file's code: an edited file would score the rest of a resumed run otherwise
              "reward_file_sha256": file_sha256(Path(reward_file.rpartition(":")[0])) if reward_file else None}
    if resume:
        saved = read_record(out, "grpo", "GRPO")
        if saved.get("lora"):  # a section written before a LoRAConfig field: its default
            saved = {**saved, "lora": LoRAConfig.from_section(saved["lora"]).to_dict()}
        same = {"model_sha256": "the weights of the starting model differ from those the run started with",
                "prompts": "other prompts", "task": "", "reward": "", "reward_file": "", "lora": ""}
        if "reward_file_sha256" in saved:  # runs recorded before it have no hash to compare
            same["reward_file_sha256"] = "the reward file's code differs from the code the run started with"
        check_same_run(out, saved, record, "grpo", RESUMABLE_CHANGES, same)
    return train_grpo(policy, tok, out, config, source, score, reference=reference, provenance=record,
                      resume=resume, log=log, lora=lora, keep_template=has_template(model_dir), side_files=model_dir)


def resume_grpo(out: str | Path, overrides: dict[str, Any] | None = None, *,
                log: Callable[[str], None] | None = print) -> Any:
    """Continue the GRPO run in OUT with the settings of its config.json, `overrides` on top."""
    from ..train import latest_checkpoint
    out = Path(out)
    if latest_checkpoint(out) is None:
        raise ValueError(no_checkpoint(out))
    from ..train.trainer import read_run_config
    saved = read_record(out, "grpo", "GRPO")
    # config.json is the run as it started; the Trainer records each resume's changes in resumes.jsonl
    train = read_run_config(out)["train"]
    now = {"steps": train["max_steps"], "save_every": train["save_every"], "eval_every": train["eval_every"]}
    config = settings_from({**saved["grpo"], **now}, GRPOConfig, overrides or {}, out / "config.json")
    return run_grpo(saved["init"], out, config, task=saved.get("task"), reward=saved.get("reward"),
                    prompts=saved.get("prompts") or (), judge=saved.get("judge"),
                    reward_file=saved.get("reward_file"), resume=True, log=log,
                    lora=LoRAConfig.from_section(saved["lora"]) if saved.get("lora") else None)
