"""`lmlab lab ttc`: test-time compute on a verifiable task, measured end to end on a CPU.

    lmlab lab ttc --out runs/ttc --quick        # a few minutes on 2 cores
    lmlab lab ttc --out runs/ttc                # the full-size run

Two models of different sizes are pre-trained here (lmlab's Trainer) on one of the post-training tasks
(lmlab.tune.rewards: prompt + right answer, one example per row), for the same steps, so that each gets the task
right only sometimes. On held-out prompts each model draws 16 samples per prompt (temperature 0.7, seeds 0..15,
or 16s..16s+15 with --seed s, models/ttc.py's sample_n) and every strategy is scored from them at N = 1, 2, 4, 8,
16 using disjoint groups of N samples (16/N groups per prompt, averaged), so that every N uses the same samples:

- sample: one try (N = 1): pass@1 of sampling;
- vote: self-consistency, the majority answer of N samples (Wang et al. 2023);
- best-of-N (verifier): the task's exact checker picks (with an exact checker this is pass@N, an upper bound for
  any verifier; Brown et al. 2024);
- best-of-N (log-prob): the sample the model itself finds likeliest (no verifier);
- beam (log-prob), beam (verifier): step-wise beam search of width N (models/ttc.py);
- greedy: one deterministic try.

Compute is counted in generated tokens (each sample's tokens, plus its EOS where it ended on one; a beam's every
branch) and in inference FLOPs: the forward pass's share of ModelConfig.flops_per_token (2N + 4·L·T·d per token, a
third of the training 6N + 12·L·T·d of Kaplan et al. 2020). Prompts are not counted, for either model: sample_n
prefills the prompt again for every sample, which a shared prefill would avoid, and the prompts here are a few
tokens. The comparison "small model + N tries" against "large model + 1 try" sets N so that the small model's
measured compute (generated tokens x FLOPs per token) equals the large model's one sample; its accuracy there is
interpolated (linear in log2 N) when that N falls between the measured ones, and says so.

The check on test-time compute itself is the issue's "best-of-N or voting with N = 8 raises accuracy by >= 15
points over N = 1", on the two strategies that need no verifier: the vote and best-of-N by the model's own
log-probability (each gain is reported; the check holds when either reaches 15 points). Best-of-N with the exact
checker is pass@N, reported beside them as the ceiling (it rises with N by construction), and no check rests on it.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..configs import knob, validate
from ..models import GenerationConfig, ModelConfig, Transformer, ttc
from ..models.io import load_pretrained
from ..tokenizers import Tokenizer
from ..train import TrainConfig, train
from ..train.console import quiet
from ..tune.rewards import get_task
from .facts.report import line_plot, new_report, write_report

NS = (1, 2, 4, 8, 16)
SAMPLES = max(NS)
STRATEGIES = ("vote", "best-of (verifier)", "best-of (log-prob)", "beam (log-prob)", "beam (verifier)")


class TaskText:
    """The Trainer's dataset: one task example per row, <BOS> prompt completion <EOS>, padded (targets -100);
    the last 256 rows are held back for its evaluation."""

    def __init__(self, tok: Tokenizer, texts: list[str], seq_len: int) -> None:
        rows = [[tok.bos_id, *tok.encode(t), tok.eos_id][: seq_len + 1] for t in texts]
        self.ids = torch.full((len(rows), seq_len + 1), tok.pad_id, dtype=torch.long)
        self.targets = torch.full((len(rows), seq_len), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            self.ids[i, : len(r)] = torch.tensor(r)
            self.targets[i, : len(r) - 1] = torch.tensor(r[1:])
        self.train_tokens = int((self.targets != -100).sum())

    def sample_batch(self, batch_size: int, seq_len: int, generator: torch.Generator):
        i = torch.randint(len(self.ids) - 256, (batch_size,), generator=generator)
        return self.ids[i, :seq_len], self.targets[i, :seq_len]

    def eval_batches(self, batch_size: int, seq_len: int, n: int):
        for k in range(min(n, 256 // batch_size)):
            i = torch.arange(len(self.ids) - 256 + k * batch_size, len(self.ids) - 256 + (k + 1) * batch_size)
            yield self.ids[i, :seq_len], self.targets[i, :seq_len]

    def bytes_per_token(self) -> float:
        return 1.0


MAX_PROMPTS = 10_000


@dataclasses.dataclass
class Scale:
    task: str = "sort"
    # 600 steps left the small model right on 81-93% of prompts at one sample (seeds 0-2, docs/LOG.md): too
    # little room for more tries to show; at 300 it is right only sometimes, as the experiment needs
    steps: int = knob(300, "pre-training steps of each model", ge=1)
    prompts: int = knob(150, "held-out prompts scored", ge=1)
    small: tuple[int, int] = (2, 48)                         # (n_layer, n_embd)
    large: tuple[int, int] = (4, 128)
    max_new_tokens: int = knob(16, "tokens generated per answer", ge=1)
    step_tokens: int = knob(4, "tokens per step of the beam search", ge=1)
    # Wang et al. 2023 sample at 0.5-0.7 for voting
    temperature: float = knob(0.7, "sampling temperature", ge=0)
    # samples use seeds 16s..16s+15: below 2^31, as parse_seeds, so that every seed derived from it is one torch takes
    seed: int = knob(0, "the models' training prompts and initialisation", ge=0, lt=2**31)

    def __post_init__(self) -> None:
        validate(self)  # types ("3" was a TypeError or reached the trainer), finite numbers, the bounds above
        for name in ("small", "large"):
            size = getattr(self, name)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"{name} ({size!r}) must be (n_layer, n_embd), both >= 1")
        if self.prompts > MAX_PROMPTS:
            raise ValueError(f"prompts ({self.prompts}) must be at most {MAX_PROMPTS:,}: the scored prompts are "
                             "held out of training, and on sort (111,000 prompts, drawn unevenly) that many already "
                             "cover about half of all draws")

    @classmethod
    def default(cls, quick: bool) -> Scale:
        return cls(steps=300, prompts=40) if quick else cls()


def training_prompts(task_name: str, scored: int, seed: int = 0, n: int = 20000) -> list[str]:
    """n training prompts, none of them among the held-out ones: the first max(1000, scored) of task.heldout, so
    that every prompt scored (the first `scored`) is one the models never trained on."""
    task = get_task(task_name)
    return task.train_prompts(random.Random(seed), n, set(task.heldout(max(1000, scored))))


def pretrain(task_name: str, size: tuple[int, int], steps: int, out: Path, seed: int = 0, scored: int = 1000) -> Path:
    """A model that knows the task's format and gets some answers right: the Trainer on prompt + answer text."""
    task = get_task(task_name)
    texts = [f"{p}{task.answer(p)}" for p in training_prompts(task_name, scored, seed)]
    tok = Tokenizer.train(texts[:2000], kind="char", vocab_size=64)
    longest = max(len(tok.encode(t)) for t in texts) + 2
    n_layer, n_embd = size
    torch.manual_seed(seed)  # the initialisation (the Trainer seeds the data order and dropout, not a built model)
    model = Transformer(ModelConfig(family="gpt2", vocab_size=len(tok), n_layer=n_layer, n_head=4, n_embd=n_embd,
                                    block_size=64, dropout=0.0))
    with quiet():
        train(model, tok, TaskText(tok, texts, longest), TrainConfig(
            batch_size=64, seq_len=longest, lr=3e-3, warmup_steps=min(50, steps // 10), max_steps=steps,
            eval_every=0, save_every=0, log_every=100, sample_every=0, device="cpu", seed=seed), out)
    return out / "final"


def score_samples(right: list[bool], answers: list[str], truth: str, logp: list[float],
                  spent: list[int]) -> dict[str, list[tuple[float, float]]]:
    """One prompt's samples scored per sampling strategy at each N (module docstring): (accuracy, generated
    tokens), each averaged over the disjoint groups of N samples."""
    out: dict[str, list[tuple[float, float]]] = {s: [] for s in ("sample", *STRATEGIES[:3])}
    for n in NS:
        groups = [range(g * n, (g + 1) * n) for g in range(len(right) // n)]
        cost = float(np.mean([sum(spent[i] for i in g) for g in groups]))
        accs = (np.mean(right), np.mean([ttc.majority_vote([answers[i] for i in g])[0] == truth for g in groups]),
                np.mean([any(right[i] for i in g) for g in groups]),
                np.mean([right[max(g, key=lambda i: (logp[i], -i))] for g in groups]))
        for s, a in zip(out, accs):
            out[s].append((float(a), cost))
    return out


def score_model(model_dir: Path, task_name: str, prompts: list[str], scale: Scale, beam: bool) -> dict[str, Any]:
    """Per strategy and N: accuracy and mean generated tokens per prompt (module docstring)."""
    task = get_task(task_name)
    model, tok = load_pretrained(model_dir)
    cfg = GenerationConfig(max_new_tokens=scale.max_new_tokens, temperature=scale.temperature,
                           seed=scale.seed * SAMPLES)
    acc = {s: np.zeros(len(NS)) for s in ("sample", *STRATEGIES)}
    tokens = {s: np.zeros(len(NS)) for s in acc}
    greedy = [0.0, 0.0]
    ctx: list[int] = []
    for prompt in prompts:
        texts, rows, ended, _ = ttc.sample_n(model, tok, prompt, cfg, SAMPLES, add_bos=True)
        spent = [len(r) + e for r, e in zip(rows, ended)]  # EOS counted (and scored) only where a sample ended on it
        bos_prompt = [tok.bos_id, *tok.encode(prompt)]
        logp = ttc.mean_logprobs(model, bos_prompt, [r + [tok.eos_id] if e else r for r, e in zip(rows, ended)])
        ctx += [len(bos_prompt) + s for s in spent]
        scored = score_samples([task.check(prompt, t) for t in texts], [task.extract(t) for t in texts],
                               task.answer(prompt), logp, spent)
        for s, curve in scored.items():
            acc[s] += [a for a, _ in curve]
            tokens[s] += [t for _, t in curve]
        for k, n in enumerate(NS):
            if beam:
                for s, reward in (("beam (log-prob)", None), ("beam (verifier)", lambda p, t: float(task.check(p, t)))):
                    res = ttc.step_beam_search(model, tok, prompt, n, step_tokens=scale.step_tokens,
                                               max_new_tokens=scale.max_new_tokens, reward=reward, add_bos=True)
                    acc[s][k] += task.check(prompt, res.text)
                    tokens[s][k] += res.tokens
        g = ttc.step_beam_search(model, tok, prompt, 1, step_tokens=scale.max_new_tokens,
                                 max_new_tokens=scale.max_new_tokens, add_bos=True)  # width 1: greedy decoding
        greedy[0] += task.check(prompt, g.text)
        greedy[1] += g.tokens
    P = len(prompts)
    T = int(round(np.mean(ctx)))
    flops = model.config.flops_per_token(T) / 3
    return {"model": str(model_dir), "parameters": model.num_parameters(), "context_tokens": T,
            "inference_flops_per_token": flops, "greedy": {"acc": greedy[0] / P, "tokens": greedy[1] / P},
            "strategies": {s: {"acc": (acc[s] / P).tolist(), "tokens": (tokens[s] / P).tolist()}
                           for s in acc if beam or not s.startswith("beam")}}


def _at(curve: dict[str, list[float]], n: float) -> float:
    """Accuracy at N tries, linear in log2 N between the measured Ns."""
    return float(np.interp(np.log2(n), np.log2(NS), curve["acc"]))


def compare(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """The checks on two models' score_model results: the gain at N=8 of the vote or of best-of by log-prob (the
    best-of with the exact checker is the ceiling, reported, not checked), and the small model's N tries against
    the large model's one at equal compute per prompt (module docstring)."""
    s, s1 = small["strategies"], small["strategies"]["sample"]["acc"][0]
    l1 = large["strategies"]["sample"]["acc"][0]
    # compute per prompt = measured generated tokens x FLOPs per token; N tries of the small model cost N times
    # its one try (disjoint groups of the same samples), so equal compute is at N = large / small
    large_one = large["strategies"]["sample"]["tokens"][0] * large["inference_flops_per_token"]
    small_one = s["vote"]["tokens"][0] * small["inference_flops_per_token"]
    n_eq = float(np.clip(large_one / small_one, 1, max(NS)))
    lo, hi = max(n for n in NS if n <= n_eq), min(n for n in NS if n >= n_eq)
    where = f"N = {n_eq:.0f}, measured" if lo == hi else f"N = {n_eq:.2f}, interpolated between N = {lo} and {hi}"
    if n_eq != large_one / small_one:
        where += f"; equal compute would be N = {large_one / small_one:.2f}, outside the measured 1..{max(NS)}"
    i8 = NS.index(8)
    gain8 = {k: s[k]["acc"][i8] - s1 for k in STRATEGIES[:3]}
    equal = {k: _at(s[k], n_eq) for k in STRATEGIES[:3]}
    checks = {"N=8 vote or best-of (log-prob), neither with a verifier, raises accuracy >= 15 points over N=1 "
              "(small model)": max(gain8["vote"], gain8["best-of (log-prob)"]) >= 0.15,
              "small + N tries (vote, no verifier) beats large + 1 sampled try at equal compute "
              "(generated tokens x FLOPs per token)": equal["vote"] > l1}
    return {"flops_ratio": large["inference_flops_per_token"] / small["inference_flops_per_token"],
            "large_one_try_flops": large_one, "small_one_try_flops": small_one, "n": n_eq, "where": where,
            "small": equal, "large_one_sample": l1, "gain_at_8": gain8, "checks": checks}


def run(out: str | Path, quick: bool = False, scale: Scale | None = None, command: str = "") -> dict[str, Any]:
    out = new_report(out)
    scale = scale or Scale.default(quick)
    t0 = time.perf_counter()
    prompts = get_task(scale.task).heldout(scale.prompts)
    if len(prompts) < scale.prompts:  # heldout gives fewer where the task has fewer
        raise ValueError(f"task {scale.task} gives {len(prompts)} distinct prompts, fewer than the {scale.prompts} "
                         "asked; ask for fewer")
    models = {name: pretrain(scale.task, size, scale.steps, out / "models" / name, seed=scale.seed,
                             scored=scale.prompts)
              for name, size in (("small", scale.small), ("large", scale.large))}
    t_train = time.perf_counter() - t0
    res = {name: score_model(path, scale.task, prompts, scale, beam=name == "small") for name, path in models.items()}
    small, large = res["small"], res["large"]
    cmp = compare(small, large)
    ratio, where, gain8, equal = cmp["flops_ratio"], cmp["where"], cmp["gain_at_8"], cmp["small"]
    s, s1, l1, i8 = small["strategies"], small["strategies"]["sample"]["acc"][0], cmp["large_one_sample"], NS.index(8)
    table = []
    for name, r in res.items():
        for strat, v in r["strategies"].items():
            table.append({"model": name, "strategy": strat,
                          **{f"N={n}": f"{a:.3f} ({t:.0f} tok)" for n, a, t in zip(NS, v["acc"], v["tokens"])}})
        table.append({"model": name, "strategy": "greedy", "N=1": f"{r['greedy']['acc']:.3f} "
                      f"({r['greedy']['tokens']:.0f} tok)", **{f"N={n}": "" for n in NS[1:]}})
    sizes = [{"model": n, "parameters": r["parameters"], "FLOPs/token": f"{r['inference_flops_per_token']:.3g}",
              "sampled pass@1": round(r["strategies"]["sample"]["acc"][0], 3), "greedy": round(r["greedy"]["acc"], 3)}
             for n, r in res.items()]
    plots = [line_plot(out / f"accuracy_tokens_{name}.png", f"{scale.task}: accuracy against generated tokens "
                       f"({name} model)", "generated tokens per prompt", "accuracy",
                       [(strat, [(np.array(v["tokens"]), np.array(v["acc"]))]) for strat, v in r["strategies"].items()
                        if strat != "sample"] + [("greedy", [(np.array([r["greedy"]["tokens"]]),
                                                              np.array([r["greedy"]["acc"]]))])],
                       hlines=[("one sample", r["strategies"]["sample"]["acc"][0])], logx=True)
             for name, r in res.items()]
    def by_flops(r: dict[str, Any], strat: str) -> tuple[np.ndarray, np.ndarray]:
        v = r["strategies"][strat]
        return np.array(v["tokens"]) * r["inference_flops_per_token"], np.array(v["acc"])

    plots.append(line_plot(out / "small_vs_large.png", "small model + N tries against large model + 1 try",
                           "inference FLOPs per prompt (generated tokens)", "accuracy",
                           [(f"{name}: {strat}", [by_flops(r, strat)]) for name, r in res.items()
                            for strat in ("vote", "best-of (verifier)")],
                           hlines=[("large, one sample", l1)], logx=True))
    at8 = ", ".join(f"{k} {s[k]['acc'][i8]:.3f}" for k in STRATEGIES)
    measured = (f"task {scale.task}, {len(prompts)} held-out prompts; small model {small['parameters']:,} parameters, "
                f"large {large['parameters']:,} ({ratio:.1f}x the FLOPs per token). Small: one sample {s1:.3f}, "
                f"greedy {small['greedy']['acc']:.3f}; N=8: {at8}; gain over one sample at N=8: vote "
                f"{gain8['vote']:+.3f}, best-of (log-prob) {gain8['best-of (log-prob)']:+.3f}, best-of (verifier) "
                f"{gain8['best-of (verifier)']:+.3f} (the ceiling: an exact "
                f"checker, pass@N). Large: one sample {l1:.3f}, greedy {large['greedy']['acc']:.3f}. At equal compute "
                f"(the large model's one try, {cmp['large_one_try_flops']:.3g} FLOPs per prompt; small {where}): vote "
                f"{equal['vote']:.3f}, best-of (log-prob) {equal['best-of (log-prob)']:.3f}, ceiling best-of "
                f"(verifier) {equal['best-of (verifier)']:.3f}, against the large model's {l1:.3f}")
    results = {"task": scale.task, "scale": dataclasses.asdict(scale), "models": res, "flops_ratio": ratio,
               "equal_compute": {k: cmp[k] for k in ("large_one_try_flops", "small_one_try_flops", "n", "where",
                                                     "small")},
               "large_one_sample": l1, "gain_at_8": gain8,
               "speed": {"train_s": round(t_train, 1), "wall_s": round(time.perf_counter() - t0, 1)}}
    write_report(out, "test-time compute", "More inference on one prompt (many samples with a verifier or a vote, "
                 "or search) raises accuracy, and a small model with enough tries can beat a larger one at equal "
                 "inference compute (Wang et al. 2023; Snell et al. 2024; Beeching et al. 2024).", measured,
                 cmp["checks"],
                 table, plots, results, command, [("models", sizes)], title="lmlab lab ttc",
                 claim_label="<b>Claim</b>",
                 note="best-of (verifier) uses the task's exact checker: an oracle, so it is "
                 "pass@N, the ceiling for any verifier, and no check rests on it. N tries are disjoint groups of the "
                 "16 samples per prompt. Compute counts generated tokens only, for both models (each sample prefills "
                 "its few prompt tokens again; they are left out). Numbers in results.json.")
    return results
