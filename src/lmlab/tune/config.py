"""The tune methods' settings that the command line reads for its flags: here, apart from the methods, so that
`lmlab tune grpo --help` and `lmlab selfplay --help` need no torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..configs import knob, validate

REWARDS = ("seed", "repetition", "perplexity", "file")  # rewards.build_reward's names
# rewards.TASKS' names, spelled out for the flags' help (tests/test_cli_imports.py checks the two agree)
TASK_NAMES = ("addition", "count", "sort", "format")
VARIANTS = ("grpo", "dr_grpo", "dapo")
DAPO_EPSILON_HIGH = 0.28


@dataclass
class GRPOConfig:
    steps: int = knob(100, "policy updates; each samples a fresh batch of groups", gt=0)
    prompts_per_step: int = knob(8, "distinct prompts per update", gt=0)
    group_size: int = knob(8, "completions per prompt; advantages are relative to this group", ge=2)
    max_new_tokens: int = knob(16, "tokens per completion", gt=0)
    temperature: float = knob(1.0, "sampling temperature; log-probs are taken at the same one", gt=0)
    variant: str = knob("grpo", "grpo: std-scaled advantages, per-completion token mean; dr_grpo: no std, no "
                        "length normalisation; dapo: token-level loss over the batch, clip-higher",
                        choices=VARIANTS)
    lr: float = knob(1e-4, "AdamW learning rate (constant)", gt=0)
    kl_coef: float = knob(0.0, "weight of the k3 KL to the starting model (0: no reference model is kept)", ge=0)
    epsilon: float = knob(0.2, "clip range of the importance ratio below 1 (and above, but for dapo)", ge=0, lt=1)
    epsilon_high: float | None = knob(None, "clip range above 1 (default: epsilon; dapo: 0.28)", ge=0)
    grad_clip: float = knob(1.0, "clip the gradient norm to this (0: off)", ge=0)
    seed: int = knob(0, "seed for the prompts, the sampling and the update")
    eval_every: int = knob(0, "held-out pass@1 every N steps (a task only; 0: at the end only)", ge=0)
    # at most the web app's bound: the held-out set must stay a small share of a task's prompts, else training
    # prompts cannot be drawn apart from it (1,000,000 for addition, of ~10^6 prompts, failed after minutes)
    eval_prompts: int = knob(200, "held-out prompts for pass@1 (greedy, one completion each)", gt=0, le=100_000)
    save_every: int = knob(10, "checkpoint every N steps (0: only at the end; also on Ctrl-C or SIGTERM)", ge=0)
    device: str = knob("auto", "auto (cuda if available), cpu, cuda, cuda:N")

    def __post_init__(self) -> None:
        validate(self)

    @property
    def clip_high(self) -> float:
        if self.epsilon_high is not None:
            return self.epsilon_high
        return DAPO_EPSILON_HIGH if self.variant == "dapo" else self.epsilon
