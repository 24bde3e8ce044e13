"""Absolute Zero (Zhao et al. 2025, arXiv 2505.03335) in miniature: one tiny from-scratch Transformer
proposes and solves deduction / abduction / induction tasks over the program DSL in dsl.py, the DSL's
interpreter validates and grades them, and both roles are trained with TRR++ (REINFORCE with advantages
normalised per task type x role).

    lmlab selfplay azr --out runs/azr --seeds 2          # the CPU-scale arms, ~17 min on 2 cores
    lmlab selfplay azr --out /tmp/azr --quick --seeds 1  # a smoke run in well under a minute

What differs from the paper, on purpose (each also goes into results.json):
- a warm-up of next-token training on triples of *random programs run through the interpreter* stands in
  for pre-training (a from-scratch model proposes and solves nothing, so every reward would be flat);
- proposals and answers are DSL token strings, not Python in <think>/<answer> tags; "format" means parses;
- induction has no natural-language message; the solver sees half of the N pairs, the rest are hidden;
- the solver batch of an iteration uses the tasks validated in that iteration (AZR: the previous step);
- the solver samples at temperature 0.5 (AZR: 1.0; the proposer keeps 1.0): at 1.0 this model's samples
  solve far fewer tasks than its greedy answers, and RL raised the sampled rate without moving the greedy
  held-out rate (docs/LOG.md).

Sequences (role/task tokens mark what the model is asked to do):

    <PROP_DED> <REF> P: REV I: [ 1 2 ] O: [ 2 1 ] <REF> ... <REF> P:   -> SORT INC I: [ 3 1 ] <EOS>
    <PROP_IND> P: SORT INC I:                                          -> [ 3 1 ] I: [ 5 ] I: ... <EOS>
    <SOLVE_DED> P: SORT INC I: [ 3 1 ] O:                              -> [ 2 4 ] <EOS>
    <SOLVE_ABD> P: SORT INC O: [ 2 4 ] I:                              -> [ 1 3 ] <EOS>
    <SOLVE_IND> I: [ 3 1 ] O: [ 2 4 ] I: [ 5 ] O: [ 6 ] P:             -> SORT INC <EOS>
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...models import GenerationConfig, Transformer, generate_ids
from ...models.scoring import make_batch, token_logprobs
from ...tune.rl import grouped_advantages, learnability, reinforce_loss
from ..parallel import process_map
from . import dsl
from .config import ARMS, AZRConfig
from .dsl import EOS_ID, PAD_ID, VOCABULARY, DSLError, Triple

KINDS = ("ded", "abd", "ind")
ARM_HELP = {
    "warmup_only": "warm-up only (no RL)",
    "solver_rl_random": "solver-only RL on uniformly random tasks",
    "azr_frozen_proposer": "AZR, proposer samples not trained",
    "azr": "full AZR (proposer and solver trained, TRR++)",
}
HELDOUT_SEED = 20250506  # fixed: the held-out set never depends on the training seeds


# ---- tasks and their text -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    kind: str                                                  # "ded" | "abd" | "ind"
    program: tuple[str, ...]
    pairs: tuple[tuple[tuple[int, ...], int | tuple[int, ...]], ...]  # (input, output); ind: first half shown

    @property
    def visible(self):
        return self.pairs[: max(1, len(self.pairs) // 2)] if self.kind == "ind" else self.pairs

    @property
    def hidden(self):
        return self.pairs[len(self.pairs) // 2:] if self.kind == "ind" else self.pairs


def longest_sequence(cfg: AZRConfig) -> int:
    """Tokens of the longest text the run can feed the model (BOS, prompt and the most new tokens allowed): a
    proposer prompt whose references are the longest tasks a buffer can hold (MAX_OPS ops, lists of MAX_LIST
    of the widest values), or an induction solver prompt showing half of ind_inputs such pairs. Warm-up texts
    are prompts with their answers, never longer."""
    widest = (dsl.MAX_INT,) * dsl.MAX_LIST
    ops = (dsl.OPS[0],) * dsl.MAX_OPS

    def task(kind: str, pairs: int) -> Task:
        return Task(kind, ops, ((widest, widest),) * pairs)

    def tokens(text: str) -> int:
        return len(VOCABULARY.encode(text))

    def linear(count: int, length: Any) -> int:
        # every reference (pair) is the same widest one, so past the first each adds the same tokens: counted on
        # two and extrapolated, a huge setting is refused by the length it implies (2**63 references were
        # multiplied out into a list, an OverflowError)
        return length(count) if count <= 2 else length(1) + (count - 1) * (length(2) - length(1))

    lengths = [linear(cfg.references, lambda n, k=k: tokens(proposer_prompt(k, [task(k, 1)] * n, ops)))
               + max_new(k, "propose", cfg) for k in KINDS]
    lengths += [tokens(solver_prompt(task(k, 1))) + max_new(k, "solve", cfg) for k in ("ded", "abd")]
    lengths.append(linear(cfg.ind_inputs // 2, lambda n: tokens(solver_prompt(task("ind", 2 * n))))
                   + max_new("ind", "solve", cfg))  # the first half of the pairs is shown
    return 1 + max(lengths)


def task_from_triple(kind: str, t: Triple) -> Task:
    return Task(kind, t.program, ((t.input, t.output),))


def solver_prompt(task: Task) -> str:
    (i, o) = task.pairs[0]
    if task.kind == "ded":
        return f"<SOLVE_DED> P: {dsl.show_program(task.program)} I: {dsl.show(i)} O:"
    if task.kind == "abd":
        return f"<SOLVE_ABD> P: {dsl.show_program(task.program)} O: {dsl.show(o)} I:"
    shown = " ".join(f"I: {dsl.show(a)} O: {dsl.show(b)}" for a, b in task.visible)
    return f"<SOLVE_IND> {shown} P:"


def solver_answer(task: Task) -> str:
    """The reference answer (warm-up text); abduction has many right answers, this is the proposer's."""
    (i, o) = task.pairs[0]
    return {"ded": dsl.show(o), "abd": dsl.show(i), "ind": dsl.show_program(task.program)}[task.kind]


def grade(task: Task, answer: str) -> tuple[bool, bool]:
    """(answer parses, answer is right), checked by running the interpreter as AZR's executor does."""
    words = answer.split()
    try:
        if task.kind == "ded":
            return True, dsl.parse_value(words) == task.pairs[0][1]
        if task.kind == "abd":
            guess = dsl.parse_list(words)
        else:
            program = dsl.parse_program(words)
    except DSLError:
        return False, False
    try:
        if task.kind == "abd":
            return True, dsl.run(task.program, guess) == task.pairs[0][1]
        return True, all(dsl.run(program, i) == o for i, o in task.hidden)
    except DSLError:
        return True, False


def proposer_prompt(kind: str, references: Sequence[Task], program: Sequence[str] = ()) -> str:
    if kind == "ind":
        return f"<PROP_IND> P: {dsl.show_program(program)} I:"
    refs = " ".join(f"<REF> {dsl.show_triple(t.program, *t.pairs[0])}" for t in references)
    return f"<PROP_{kind.upper()}> {refs} <REF> P:".replace("  ", " ")


def proposal_text(task: Task) -> str:
    """What a perfect proposer writes after its prompt for `task` (used by the warm-up corpus)."""
    if task.kind == "ind":
        return " I: ".join(dsl.show(i) for i, _ in task.pairs)
    return f"{dsl.show_program(task.program)} I: {dsl.show(task.pairs[0][0])}"


def parse_proposal(kind: str, text: str, program: Sequence[str], n_inputs: int) -> Task:
    """A proposal's completion -> a validated Task, or DSLError saying why it is rejected."""
    if kind == "ind":
        inputs = dsl.parse_inputs(text, program, n_inputs)
        return Task("ind", tuple(program), tuple((i, dsl.run(program, i)) for i in inputs))
    return task_from_triple(kind, dsl.parse_proposal(text))


def identity_seeds(n_inputs: int) -> dict[str, list[Task]]:
    """AZR seeds every buffer from one identity triple (`def f(a): return a`); induction gets the identity
    program with several varied inputs."""
    one = dsl.validate(dsl.IDENTITY, (1, 2, 3))
    inputs = [(4, 2), (7,), (1, 5, 9), (3, 3, 0, 8), (6, 1, 2), (0, 9)][:n_inputs]
    while len(inputs) < n_inputs:
        inputs.append(tuple(range(len(inputs))))
    ind = Task("ind", dsl.IDENTITY, tuple((i, i) for i in inputs))
    return {"ded": [task_from_triple("ded", one)], "abd": [task_from_triple("abd", one)], "ind": [ind]}


def random_task(rng: random.Random, kind: str, n_ops: int, n_inputs: int) -> Task:
    if kind != "ind":
        return task_from_triple(kind, dsl.random_triple(rng, n_ops))
    while True:
        t = dsl.random_triple(rng, n_ops)
        inputs = {t.input}
        for _ in range(20 * n_inputs):
            if len(inputs) == n_inputs:
                break
            inp = dsl.random_input(rng)
            try:
                dsl.run(t.program, inp)
                inputs.add(inp)
            except DSLError:
                pass
        if len(inputs) == n_inputs:
            ordered = sorted(inputs)
            rng.shuffle(ordered)
            return Task("ind", t.program, tuple((i, dsl.run(t.program, i)) for i in ordered))


def heldout_tasks(cfg: AZRConfig) -> list[Task]:
    """Fixed-seed held-out set, stratified by task type and program length 1..heldout_max_ops; lengths
    above train_max_ops were never seen in warm-up or by the random-task baseline."""
    rng = random.Random(HELDOUT_SEED)
    tasks, seen = [], set()
    for kind in KINDS:
        for n_ops in range(1, cfg.heldout_max_ops + 1):
            made = 0
            for _ in range(50 * cfg.heldout_per_stratum):
                t = random_task(rng, kind, n_ops, cfg.ind_inputs)
                if (kind, t.program, t.pairs) in seen:
                    continue
                seen.add((kind, t.program, t.pairs))
                tasks.append(t)
                made += 1
                if made == cfg.heldout_per_stratum:
                    break
    return tasks


# ---- sampling with the project's KV-cache generation -----------------------------------------------------

def sample(model: Transformer, prompts: Sequence[str], max_new_tokens: int, rng: random.Random, *,
           temperature: float = 1.0, greedy: bool = False) -> list[list[int]]:
    """Completion ids per prompt, with the EOS appended when the model emitted one (it is trained on)."""
    if not prompts:
        return []
    ids = [[dsl.BOS_ID, *VOCABULARY.encode(p)] for p in prompts]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=temperature,
                           seed=rng.randrange(2**31))
    rows = generate_ids(model, ids, cfg, eos_token_id=EOS_ID, pad_id=PAD_ID)
    return [r + [EOS_ID] if len(r) < max_new_tokens else r for r in rows]


def max_new(kind: str, role: str, cfg: AZRConfig) -> int:
    list_len = dsl.MAX_LIST + 2
    if role == "propose":
        return cfg.ind_inputs * (list_len + 1) if kind == "ind" else dsl.MAX_OPS + 1 + list_len + 1
    return dsl.MAX_OPS + 1 if kind == "ind" else list_len + 1


def solve_many(model: Transformer, tasks: Sequence[Task], rng: random.Random, cfg: AZRConfig, *,
               greedy: bool = False) -> tuple[list[str], list[list[int]], list[tuple[bool, bool]]]:
    """Answer every task once (batched per kind): prompts, completion ids and (parses, right)."""
    prompts = [solver_prompt(t) for t in tasks]
    comps: list[list[int]] = [[] for _ in tasks]
    for kind in KINDS:
        idx = [i for i, t in enumerate(tasks) if t.kind == kind]
        out = sample(model, [prompts[i] for i in idx], max_new(kind, "solve", cfg), rng,
                     temperature=cfg.temperature, greedy=greedy)
        for i, c in zip(idx, out):
            comps[i] = c
    grades = [grade(t, VOCABULARY.decode(c)) for t, c in zip(tasks, comps)]
    return prompts, comps, grades


def evaluate(model: Transformer, tasks: Sequence[Task], cfg: AZRConfig) -> dict[str, Any]:
    """Greedy held-out solve rate: overall (strata have equal size), per type and per program length."""
    _, _, grades = solve_many(model, tasks, random.Random(0), cfg, greedy=True)
    right = [g[1] for g in grades]
    out: dict[str, Any] = {"solve_rate": sum(right) / len(right)}
    for kind in KINDS:
        sel = [r for r, t in zip(right, tasks) if t.kind == kind]
        out[f"solve_{kind}"] = sum(sel) / len(sel)
    for n in range(1, cfg.heldout_max_ops + 1):
        sel = [r for r, t in zip(right, tasks) if len(t.program) == n]
        out[f"solve_len{n}"] = sum(sel) / len(sel)
    ood = [r for r, t in zip(right, tasks) if len(t.program) > cfg.train_max_ops]
    out["solve_ood"] = sum(ood) / len(ood) if ood else None
    return out


# ---- warm-up: next-token training on random-program triples (stands in for pre-training) --------------

def training_task(rng: random.Random, kind: str, cfg: AZRConfig, exclude: set) -> Task:
    """A random task of 1..train_max_ops ops that is none of the held-out tasks in `exclude`: the warm-up and
    the random-task baseline never train on what they are scored on."""
    while True:
        task = random_task(rng, kind, rng.randint(1, cfg.train_max_ops), cfg.ind_inputs)
        if (kind, task.program, task.pairs) not in exclude:
            return task


def warmup_sequence(rng: random.Random, cfg: AZRConfig, exclude: set) -> str:
    """One training text in one of the six formats, built from random programs and the interpreter."""
    kind = rng.choice(KINDS)
    task = training_task(rng, kind, cfg, exclude)
    if rng.random() < 0.5:
        return f"{solver_prompt(task)} {solver_answer(task)}"
    refs = [random_task(rng, kind, rng.randint(1, cfg.train_max_ops), 1) for _ in range(cfg.references)]
    return f"{proposer_prompt(kind, refs, task.program)} {proposal_text(task)}"


def warmup(model: Transformer, cfg: AZRConfig, seed: int, exclude: set) -> list[float]:
    """AdamW, linear warm-up then cosine decay per step; returns the loss every 10 steps."""
    rng = random.Random(seed)
    opt = model.configure_optimizer(cfg.warmup_lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(cfg.warmup_steps):
        lr = cfg.warmup_lr * min(1.0, (step + 1) / 50) * (
            0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, cfg.warmup_steps))))
        for g in opt.param_groups:
            g["lr"] = lr
        rows = [[dsl.BOS_ID, *VOCABULARY.encode(warmup_sequence(rng, cfg, exclude)), EOS_ID]
                for _ in range(cfg.warmup_batch)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
        loss = model(ids[:, :-1], ids[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == cfg.warmup_steps - 1:
            losses.append(round(loss.item(), 4))
    # a warm-up that made the model worse than its random start leaves every arm at nothing to learn from: the
    # verdict would compare broken models (--warmup-lr 10 took the loss from 4.9 to 118 and the run went on). A nat
    # above the start: a learning rate too small to move the loss ends a little above it by batch noise alone
    if not all(math.isfinite(x) for x in losses) or (len(losses) > 2 and losses[-1] > losses[0] + 1.0):
        raise ValueError(f"the warm-up diverged: its loss went from {losses[0]} to {losses[-1]} in "
                         f"{cfg.warmup_steps} steps; lower --warmup-lr ({cfg.warmup_lr:g})")
    return losses


# ---- one self-play iteration --------------------------------------------------------------------------

@dataclass
class Sample:
    prompt: str
    completion: list[int]
    reward: float
    kind: str
    role: str  # "propose" | "solve"


@dataclass
class Buffers:
    tasks: dict[str, list[Task]] = field(default_factory=dict)

    def programs(self) -> list[tuple[str, ...]]:
        return [t.program for k in ("ded", "abd") for t in self.tasks[k]]


def propose(model: Transformer, buffers: Buffers, cfg: AZRConfig, rng: random.Random, n: int
            ) -> tuple[list[Sample], dict[str, list[Task | None]]]:
    """n proposals per task type; returns the unscored proposer samples and the validated task (or None)."""
    samples: list[Sample] = []
    tasks: dict[str, list[Task | None]] = {}
    for kind in KINDS:
        programs = [rng.choice(buffers.programs()) for _ in range(n)] if kind == "ind" else [()] * n
        prompts = []
        for program in programs:  # induction prompts show their program instead of references
            refs = [] if kind == "ind" else [rng.choice(buffers.tasks[kind]) for _ in range(cfg.references)]
            prompts.append(proposer_prompt(kind, refs, program))
        comps = sample(model, prompts, max_new(kind, "propose", cfg), rng, temperature=cfg.propose_temperature)
        tasks[kind] = []
        for prompt, comp, program in zip(prompts, comps, programs):
            try:
                task = parse_proposal(kind, VOCABULARY.decode(comp), program, cfg.ind_inputs)
            except DSLError:
                task = None
            tasks[kind].append(task)
            samples.append(Sample(prompt, comp, cfg.invalid_penalty, kind, "propose"))
    return samples, tasks


def score_learnability(model: Transformer, proposals: dict[str, list[Task | None]], cfg: AZRConfig,
                       rng: random.Random) -> dict[str, list[list[float] | None]]:
    """G solver outcomes (1/0) for every valid proposal; these rollouts only score, they are not trained."""
    valid = [t for kind in KINDS for t in proposals[kind] if t is not None]
    _, _, grades = solve_many(model, [t for t in valid for _ in range(cfg.group)], rng, cfg)
    outcomes = iter([[float(g[1]) for g in grades[i:i + cfg.group]] for i in range(0, len(grades), cfg.group)])
    return {kind: [next(outcomes) if t is not None else None for t in proposals[kind]] for kind in KINDS}


def proposer_reward(outcomes: Sequence[float] | None, cfg: AZRConfig) -> float:
    """AZR's gating: invalid proposal (None) -> invalid_penalty; else the learnability 1 - p if it is > 0,
    else trivial_reward (p in {0, 1})."""
    if outcomes is None:
        return cfg.invalid_penalty
    r = learnability(outcomes)
    return r if r > 0 else cfg.trivial_reward


def solver_samples(model: Transformer, tasks: Sequence[Task], cfg: AZRConfig, rng: random.Random) -> list[Sample]:
    prompts, comps, grades = solve_many(model, tasks, rng, cfg)
    return [Sample(p, c, (1.0 if right else 0.0) if ok else cfg.format_penalty, t.kind, "solve")
            for p, c, (ok, right), t in zip(prompts, comps, grades, tasks)]


def update(model: Transformer, opt: torch.optim.Optimizer, samples: Sequence[Sample], cfg: AZRConfig) -> float:
    """One TRR++ step: advantages normalised within each (task type, role) batch, then one REINFORCE
    update over all of them together, as AZR concatenates its six batches into one actor update."""
    if not samples:
        return 0.0
    adv = grouped_advantages([s.reward for s in samples], [(s.kind, s.role) for s in samples])
    prompts = [[dsl.BOS_ID, *VOCABULARY.encode(s.prompt)] for s in samples]
    batch = make_batch(prompts, [s.completion for s in samples], PAD_ID)
    model.train()
    temps = torch.tensor([cfg.propose_temperature if s.role == "propose" else cfg.temperature for s in samples])
    logp, entropy = token_logprobs(model, batch, with_entropy=cfg.entropy_coef > 0, temperature=temps)
    loss = reinforce_loss(logp, batch.mask, torch.tensor(adv), entropy, cfg.entropy_coef)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    if not math.isfinite(loss.item()) or not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise ValueError(f"the RL update diverged (loss {loss.item():.4g}; weights no longer finite): lower --lr "
                         f"({cfg.lr:g})")
    return loss.item()


def seed_buffers(model: Transformer, cfg: AZRConfig, rng: random.Random) -> tuple[Buffers, dict[str, Any]]:
    """AZR's seeding phase: start from the identity triple, let the (warmed-up) model propose with no
    gradient, and keep every valid proposal until each buffer holds seed_buffer tasks (or seed_rounds)."""
    buffers = Buffers(identity_seeds(cfg.ind_inputs))
    tried = valid = 0
    for _ in range(cfg.seed_rounds):
        if all(len(buffers.tasks[k]) >= cfg.seed_buffer for k in KINDS):
            break
        _, proposals = propose(model, buffers, cfg, rng, max(cfg.propose_batch, 4))
        for kind in KINDS:
            for t in proposals[kind]:
                tried += 1
                valid += t is not None
                if t is not None and len(buffers.tasks[kind]) < cfg.seed_buffer:
                    buffers.tasks[kind].append(t)
    return buffers, {"seeding_proposals": tried, "seeding_valid": valid,
                     "buffer_sizes": {k: len(v) for k, v in buffers.tasks.items()}}


def azr_iteration(model: Transformer, opt: torch.optim.Optimizer, buffers: Buffers, cfg: AZRConfig,
                  rng: random.Random, *, train_proposer: bool) -> dict[str, Any]:
    prop_samples, proposals = propose(model, buffers, cfg, rng, cfg.propose_batch)
    outcomes = score_learnability(model, proposals, cfg, rng)
    flat = [(kind, t, None if o is None else sum(o) / len(o))
            for kind in KINDS for t, o in zip(proposals[kind], outcomes[kind])]
    for sample_, o in zip(prop_samples, [o for k in KINDS for o in outcomes[k]]):
        sample_.reward = proposer_reward(o, cfg)
    # solver batches: this iteration's new tasks first, topped up uniformly from the buffer (max_new)
    solve_tasks: list[Task] = []
    for kind in KINDS:
        new = [t for t in proposals[kind] if t is not None]
        buffers.tasks[kind].extend(new)
        picked = new[: cfg.solve_batch]
        picked += [rng.choice(buffers.tasks[kind]) for _ in range(cfg.solve_batch - len(picked))]
        solve_tasks += picked
    solve = solver_samples(model, solve_tasks, cfg, rng)
    loss = update(model, opt, (prop_samples if train_proposer else []) + solve, cfg)
    valid = [(kind, t, p) for kind, t, p in flat if t is not None]
    programs = [t.program for kind, t, _ in valid if kind != "ind"]  # the programs the proposer wrote
    return {
        "loss": round(loss, 5),
        "validity": sum(t is not None for _, t, _ in flat) / len(flat),
        **{f"validity_{k}": sum(t is not None for kk, t, _ in flat if kk == k) / cfg.propose_batch for k in KINDS},
        "informative": sum(0 < p < 1 for _, _, p in valid) / len(flat),  # share of all proposals
        "proposer_reward": sum(s.reward for s in prop_samples) / len(prop_samples),
        "proposer_reward_nonzero": sum(s.reward > 0 for s in prop_samples) / len(prop_samples),
        "solver_reward": sum(s.reward for s in solve) / len(solve),
        "program_length": sum(map(len, programs)) / len(programs) if programs else None,
        "diversity": len(set(programs)) / len(programs) if programs else None,  # unique / valid
        "buffer": sum(len(v) for v in buffers.tasks.values()),
        "trained_sequences": len(solve) + (len(prop_samples) if train_proposer else 0),
        "rollouts": len(prop_samples) + len(valid) * cfg.group + len(solve),
        "solver_lengths": Counter(len(t.program) for t in solve_tasks),
    }


def random_iteration(model: Transformer, opt: torch.optim.Optimizer, cfg: AZRConfig, rng: random.Random,
                     exclude: set) -> dict[str, Any]:
    """The no-self-play baseline: solver-only REINFORCE on tasks from the uniform random generator, with
    as many trained sequences per step as full AZR trains (proposals + solver answers)."""
    n = cfg.propose_batch + cfg.solve_batch
    tasks = [training_task(rng, kind, cfg, exclude) for kind in KINDS for _ in range(n)]
    solve = solver_samples(model, tasks, cfg, rng)
    loss = update(model, opt, solve, cfg)
    return {"loss": round(loss, 5), "solver_reward": sum(s.reward for s in solve) / len(solve),
            "trained_sequences": len(solve), "rollouts": len(solve),
            "solver_lengths": Counter(len(t.program) for t in tasks)}


# ---- one arm, one seed ---------------------------------------------------------------------------------

def new_model(cfg: AZRConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg.model_config())


def run_arm(arm: str, model: Transformer, cfg: AZRConfig, seed: int, heldout: Sequence[Task]) -> dict[str, Any]:
    """Train `model` (already warmed up) with one arm; the held-out set is scored every eval_every steps."""
    if arm not in ARMS:
        raise ValueError(f"arm ({arm!r}) must be one of {', '.join(ARMS)}")
    rng = random.Random(seed * 1000 + ARMS.index(arm))
    torch.manual_seed(seed * 1000 + ARMS.index(arm))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    t0 = time.perf_counter()
    history: list[dict[str, Any]] = [{"iteration": 0, **evaluate(model, heldout, cfg)}]
    info: dict[str, Any] = {}
    buffers = None
    lengths: Counter = Counter()  # program lengths of the tasks the solver trained on
    exclude = {(t.kind, t.program, t.pairs) for t in heldout}
    if arm in ("azr", "azr_frozen_proposer"):
        buffers, info = seed_buffers(model, cfg, rng)
    for it in range(1, cfg.iterations + 1):
        evaluate_now = it % cfg.eval_every == 0 or it == cfg.iterations
        if arm == "warmup_only":  # no updates: the model, hence its score, stays the warm-up's
            row: dict[str, Any] = {"trained_sequences": 0, "rollouts": 0}
            if evaluate_now:
                row.update({k: v for k, v in history[0].items() if k != "iteration"})
        else:
            if arm == "solver_rl_random":
                row = random_iteration(model, opt, cfg, rng, exclude)
            else:
                row = azr_iteration(model, opt, buffers, cfg, rng, train_proposer=arm == "azr")
            lengths.update(row.pop("solver_lengths"))
            if evaluate_now:
                row.update(evaluate(model, heldout, cfg))
        history.append({"iteration": it, **row})
    return {"arm": arm, "seed": seed, "history": history, "wall_s": round(time.perf_counter() - t0, 1),
            "solver_lengths": {str(n): lengths[n] for n in sorted(lengths)}, **info}


def _seed_job(args: tuple[AZRConfig, int, str]) -> dict[str, Any]:
    """Warm up one seed's model once, then run every arm from a copy of it (runs in a worker process)."""
    cfg, seed, out = args
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # seeds run side by side, one core each; tiny models gain nothing from more
    try:
        return _warm_and_run_arms(cfg, seed, out)
    finally:
        torch.set_num_threads(threads)


def _warm_and_run_arms(cfg: AZRConfig, seed: int, out: str) -> dict[str, Any]:
    heldout = heldout_tasks(cfg)
    exclude = {(t.kind, t.program, t.pairs) for t in heldout}
    model = new_model(cfg, seed)
    t0 = time.perf_counter()
    losses = warmup(model, cfg, seed, exclude) if cfg.warmup_steps else []
    warm_s = time.perf_counter() - t0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    arms = []
    for arm in cfg.arms:
        model.load_state_dict(state)
        result = run_arm(arm, model, cfg, seed, heldout)
        arms.append(result)
        line = {"seed": seed, "arm": arm, "wall_s": result["wall_s"],
                "final_solve_rate": result["history"][-1].get("solve_rate")}
        with open(Path(out) / "progress.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    return {"seed": seed, "warmup_losses": losses, "warmup_s": round(warm_s, 1), "arms": arms}


OUTPUTS = ("results.json", "report.html", "progress.jsonl", "*.png")  # what run_experiment writes into its folder


def run_experiment(cfg: AZRConfig, seeds: Sequence[int], out: str | Path, workers: int = 2) -> dict[str, Any]:
    """Every arm for every seed (seeds in parallel processes, 1 thread each); writes results.json, PNGs
    and report.html into `out` and returns the results."""
    from .report import summarize, write_report

    if not seeds:
        raise ValueError("give at least one seed")
    if workers < 1:
        raise ValueError(f"workers ({workers}) must be >= 1")
    out = Path(out)
    held = [p.name for pattern in OUTPUTS for p in sorted(out.glob(pattern))] if out.is_dir() else []
    if held:  # an earlier run's results (a server's run folder holds its log.txt, hence no "is not empty")
        raise ValueError(f"{out} holds {held[0]}, which this run would overwrite; choose a new folder")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    (out / "progress.jsonl").write_text("")
    t0 = time.perf_counter()
    jobs = [(cfg, s, str(out)) for s in seeds]
    try:  # a run that stops (a refusal in a worker, a Ctrl-C) leaves --out as it was, so it can run again
        if workers == 1 or len(seeds) == 1:
            per_seed = [_seed_job(j) for j in jobs]
        else:
            per_seed = process_map(_seed_job, jobs, min(workers, len(seeds)))
    except BaseException:
        (out / "progress.jsonl").unlink(missing_ok=True)
        if made and not any(out.iterdir()):
            out.rmdir()
        raise
    results = {
        "experiment": "selfplay-azr",
        "claim": ("Absolute Zero (Zhao et al. 2025): self-play with a learnability-rewarded proposer and TRR++ "
                  "raises held-out solve rate above matched-compute baselines (random tasks; frozen proposer)."),
        "warmup_note": ("Every arm starts from the same warm-up per seed: next-token training on triples of "
                        "random DSL programs run through the interpreter. It stands in for pre-training."),
        "config": dataclasses.asdict(cfg),
        "seeds": list(seeds),
        "heldout_size": len(heldout_tasks(cfg)),
        "wall_s": round(time.perf_counter() - t0, 1),
        "per_seed": per_seed,
    }
    results["summary"] = summarize(results)
    write_report(results, out)
    return results
