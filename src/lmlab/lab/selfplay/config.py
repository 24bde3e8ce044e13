"""The self-play labs' settings (AZRConfig, TextSelfPlayConfig): here, apart from the runs, so that the command line
builds their flags (`lmlab selfplay --help`) without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...configs import knob, validate
from ...models.config import ModelConfig
from ...tune.config import REWARDS, GRPOConfig
from . import dsl
from .dsl import PAD_ID, VOCABULARY

ARMS = ("warmup_only", "solver_rl_random", "azr_frozen_proposer", "azr")


@dataclass
class AZRConfig:
    # model: the project's Transformer, a tiny llama-style config over the DSL vocabulary
    n_layer: int = knob(2, "transformer blocks", gt=0)
    n_head: int = knob(4, "attention heads", gt=0)
    n_embd: int = knob(64, "model width", gt=0)
    block_size: int = knob(128, "context length", gt=0)
    # warm-up (stands in for pre-training)
    warmup_steps: int = knob(1500, "next-token warm-up steps on random-program triples", ge=0)
    warmup_batch: int = knob(64, "warm-up batch size", gt=0)
    # at most 10, the web app's bound on a learning rate: 1e30 made the weights NaN, and sampling from them failed
    warmup_lr: float = knob(3e-3, "warm-up learning rate", gt=0, le=10)
    train_max_ops: int = knob(4, "programs of 1..N ops in warm-up, baseline and seeds", gt=0)
    # self-play
    iterations: int = knob(200, "self-play iterations, one gradient step each", ge=0)
    propose_batch: int = knob(64, "proposals per task type per iteration (AZR: 64 per task x role)", gt=0)
    # at 16 the policy gradients of two independent batches have cosine ~0
    solve_batch: int = knob(64, "solver answers trained per task type per iteration (AZR: 64)", gt=0)
    group: int = knob(4, "solver samples G that score a proposal's learnability (AZR: 8)", gt=0)
    references: int = knob(2, "K reference triples in each proposer prompt (AZR: 6)", ge=0)
    ind_inputs: int = knob(4, "N inputs an induction proposal writes, half of them shown; even (AZR: 10)", ge=2)
    seed_buffer: int = knob(16, "per task type, filled by a no-gradient seeding phase (AZR: 256)", ge=0)
    seed_rounds: int = knob(20, "at most this many proposal rounds to fill the seed buffers", ge=0)
    # AZR uses 1e-6 on 7B; 3e-4 beat 1e-3 in a pilot at this size (docs/LOG.md)
    lr: float = knob(3e-4, "Adam learning rate of the RL phase", gt=0, le=10)
    entropy_coef: float = knob(1e-3, "entropy bonus weight")
    grad_clip: float = knob(1.0, "clip the gradient norm to this", gt=0)
    # AZR: 1.0. At 1.0 this model's samples solve 0.14 of held-out tasks, greedy 0.21, and RL raises the sampled
    # rate without moving greedy (docs/LOG.md)
    temperature: float = knob(0.5, "solver sampling temperature (trained answers, learnability rollouts)", gt=0)
    propose_temperature: float = knob(1.0, "proposer sampling temperature (AZR samples both roles at 1.0)", gt=0)
    invalid_penalty: float = knob(-1.0, "reward of a proposal that does not parse or validate (AZR: -1)")
    format_penalty: float = knob(-0.5, "reward of a solver answer that does not parse")
    trivial_reward: float = knob(0.0, "reward of a valid proposal with p in {0, 1} (the released AZR code: -0.5)")
    # measurement
    eval_every: int = knob(25, "score the held-out set every N iterations", gt=0)
    heldout_per_stratum: int = knob(24, "held-out tasks per (type, program length)", gt=0)
    heldout_max_ops: int = knob(5, "held-out program lengths 1..N; above train_max_ops is out of distribution",
                                gt=0)
    arms: tuple[str, ...] = knob(ARMS, "arms to run (default all: " + ",".join(ARMS) + ")", choices=None)

    def __post_init__(self) -> None:
        self.arms = tuple(self.arms)
        validate(self)
        if self.ind_inputs % 2:
            raise ValueError(f"ind_inputs ({self.ind_inputs}) must be an even number >= 2")
        if not self.train_max_ops <= self.heldout_max_ops <= dsl.MAX_OPS:
            raise ValueError(f"need train_max_ops <= heldout_max_ops <= {dsl.MAX_OPS}")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"arms ({', '.join(unknown) or 'none'}) must be among {', '.join(ARMS)}")
        from .azr import longest_sequence  # azr.py needs torch; the flags and the web app's forms do not

        need = longest_sequence(self)
        if self.block_size < need:  # found here, not minutes into the run when the first long prompt comes
            raise ValueError(f"block_size ({self.block_size}) must be at least {need}: the longest prompt and answer "
                             f"these settings allow (references {self.references}, ind_inputs {self.ind_inputs})")

    @classmethod
    def quick(cls, **overrides: Any) -> AZRConfig:
        """Seconds, for tests and smoke runs: the numbers it gives mean nothing."""
        base = dict(warmup_steps=60, iterations=3, propose_batch=4, solve_batch=4, group=2, seed_buffer=4,
                    seed_rounds=3, eval_every=3, heldout_per_stratum=3)
        return cls(**{**base, **overrides})

    def model_config(self) -> ModelConfig:
        return ModelConfig(family="llama", vocab_size=len(VOCABULARY), n_layer=self.n_layer, n_head=self.n_head,
                           n_embd=self.n_embd, block_size=self.block_size, pad_token_id=PAD_ID)


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

    def grpo(self) -> GRPOConfig:
        """The GRPO run this is: dapo's token mean over the batch, one update per batch."""
        return GRPOConfig(steps=self.iterations, prompts_per_step=self.prompts_per_iteration,
                          group_size=self.group_size, max_new_tokens=self.max_new_tokens,
                          temperature=self.temperature, variant="dapo", lr=self.lr, kl_coef=self.kl_coef,
                          grad_clip=self.grad_clip, seed=self.seed, save_every=self.save_every)
