"""The arena: SFT, then DPO, IPO, SimPO, ORPO, KTO and GRPO from the same SFT model at an equal budget, on the
shipped rule task (lmlab.tune.preference_task), measured by the rule.

    lmlab tune arena --out runs/arena                 # a ~3.5M llama, ~6 minutes on a 2-core CPU
    lmlab tune arena --out /tmp/arena --quick         # a tiny model and a few steps: seconds

Without --model the base is a fresh llama whose BPE tokenizer is trained on the task's text; SFT on sft.jsonl
(both styles equally often, completion tokens only) is then its only training, so the SFT model follows the rule
about half the time. Every method starts from that SFT model, which is also the reference of DPO, IPO and KTO.

The budget, the same for every method (results.json "budget"): `steps` optimizer steps, each on `sequences`
completions that carry a gradient — DPO/IPO/SimPO/ORPO sequences/2 pairs (chosen and rejected), KTO `sequences`
labelled completions (the unpaired form of the same pairs; its KL estimate scores as many mismatched completions
without a gradient), GRPO sequences/group_size prompts x group_size samples of its own (groups whose samples all
scored the same are dropped, as `tune grpo` does). One optimizer for all: AdamW, the same lr, warm-up and cosine
decay, the same seed. Reference log-probabilities are computed once before the clock starts.

Measured for each method on the held-out prompts (test.jsonl): the rule win-rate of one sampled completion
(temperature 1) and of the greedy one, the mean per-token KL(policy || SFT model) on the policy's own samples,
exact over the vocabulary, and the wall and CPU time of its training. Also: a pairwise table (on each prompt,
one method's sample against another's by the rule; a tie counts half) and, for the preference methods, the
per-token change of log-probability (policy - SFT) on the chosen and on the rejected completion of a few
held-out pairs.
"""

from __future__ import annotations

import dataclasses
import html
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..configs import knob, validate
from ..files import atomic_write_text
from ..models import GenerationConfig, ModelConfig, Transformer, generate_ids
from ..models.io import load_pretrained, save_pretrained
from ..models.scoring import make_batch
from ..tokenizers import Tokenizer
from ..train import TrainConfig
from ..tune import preference as P
from ..tune import preference_task as task

PREFERENCE = ("dpo", "ipo", "simpo", "orpo", "kto")
METHODS = (*PREFERENCE, "grpo")


# the seed goes into the SFT and tuning runs' TrainConfig: its bound, checked before --out is written
SEED_MAX = int(next(f for f in dataclasses.fields(TrainConfig) if f.name == "seed").metadata["le"])


@dataclasses.dataclass
class ArenaConfig:
    steps: int = 60            # optimizer steps per method
    sequences: int = 32        # completions with a gradient per step (the budget's other half)
    group_size: int = 4        # GRPO's samples per prompt
    lr: float = knob(5e-4, "the preference methods' and GRPO's learning rate", gt=0)
    warmup_steps: int = knob(10, "warm-up steps of each method", ge=0)
    sft_steps: int = 1200
    sft_lr: float = knob(2e-3, "the SFT stage's learning rate", gt=0)
    preset: str = "llama-small"   # the base when no --model is given
    block_size: int = knob(48, "context of the fresh base", ge=1)
    pairs: int | None = knob(None, "the first N of pairs.jsonl (None: all)", ge=1)
    heldout: int = 200
    max_new_tokens: int = 24
    shown_pairs: int = knob(3, "held-out pairs in the per-token view", ge=0)
    seed: int = 0

    def __post_init__(self) -> None:
        validate(self)  # types and finite numbers ("3" was a TypeError below, nan passed), the bounds above
        for name in ("steps", "sequences", "group_size", "sft_steps", "heldout", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be a whole number in [0, {SEED_MAX}] (the trainer's bound), "
                             f"not {self.seed!r}")
        if self.sequences % 2 or self.sequences % self.group_size:
            raise ValueError(f"sequences ({self.sequences}) must be even and a multiple of group_size "
                             f"({self.group_size}): pairs and GRPO groups fill it exactly")

    @classmethod
    def quick(cls, **overrides: Any) -> ArenaConfig:
        """Seconds on a CPU: a tiny model, few steps, few pairs and prompts (a smoke run, not a measurement)."""
        return cls(**{**dict(steps=3, sequences=8, sft_steps=40, preset="llama-tiny", pairs=200, heldout=16,
                             shown_pairs=2), **overrides})

    def budget(self) -> dict[str, Any]:
        """The equal budget, per method, as results.json states it."""
        per = {m: {"optimizer_steps": self.steps, "sequences_per_step": self.sequences} for m in METHODS}
        for m in ("dpo", "ipo", "simpo", "orpo"):
            per[m]["unit"] = f"{self.sequences // 2} pairs (chosen + rejected)"
        per["kto"]["unit"] = (f"{self.sequences} labelled completions (+ {self.sequences} mismatched ones without a "
                              "gradient for its KL estimate)")
        per["grpo"]["unit"] = (f"{self.sequences // self.group_size} prompts x {self.group_size} samples (a "
                               "group whose samples all scored the same has no gradient)")
        warmup = (f"warm-up {self.warmup_steps} steps, cosine decay" if self.warmup_steps < self.steps else
                  f"warm-up over all {self.steps} steps (to {self.lr * self.steps / self.warmup_steps:g}), no decay")
        return {"definition": f"{self.steps} optimizer steps x {self.sequences} completions per step (GRPO's sampled: "
                              f"those of groups with no reward spread carry no gradient), AdamW lr {self.lr} "
                              f"({warmup}), seed {self.seed}, for every method",
                "methods": per}


# ---- measuring a policy ---------------------------------------------------------------------------------------

@torch.no_grad()
def complete(model: Transformer, tok: Any, prompts: Sequence[str], *, greedy: bool, max_new_tokens: int = 24,
             seed: int = 0) -> list[list[int]]:
    """One completion per prompt (ids, EOS not included): sampled at temperature 1, or greedy."""
    model.eval()
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, do_sample=not greedy)
    return generate_ids(model, [tok.encode(p) for p in prompts], gen, eos_token_id=tok.eos_id, pad_id=tok.pad_id)


@torch.no_grad()
def exact_kl(model: Transformer, ref: Transformer, tok: Any, prompts: Sequence[str],
             completions: Sequence[Sequence[int]], max_new_tokens: int, batch: int = 64) -> float:
    """Mean over the completions' tokens (and the EOS that ended one) of KL(model || ref) at that position,
    summed over the whole vocabulary: exact, not a sampled estimate."""
    total, count = 0.0, 0
    for i in range(0, len(prompts), batch):
        ps = [tok.encode(p) for p in prompts[i:i + batch]]
        cs = [list(c) + [tok.eos_id] * (len(c) < max_new_tokens) for c in completions[i:i + batch]]
        b = make_batch(ps, cs, tok.pad_id, next(model.parameters()).device)
        lp = F.log_softmax(model.eval()(b.inputs).logits.float(), -1)   # (B, T-1, V)
        lq = F.log_softmax(ref.eval()(b.inputs.to(next(ref.parameters()).device)).logits.float(), -1)
        kl = (lp.exp() * (lp - lq.to(lp.device))).sum(-1)               # (B, T-1)
        total += float(kl[b.mask].sum())
        count += int(b.mask.sum())
    return max(total / max(count, 1), 0.0)  # >= 0 exactly; float rounding gave -3.6e-10 for an unchanged model


def win_rate(prompts: Sequence[str], texts: Sequence[str]) -> float:
    return sum(task.follows_rule(p, t) for p, t in zip(prompts, texts)) / max(len(prompts), 1)


def wilson(rate: float, n: int, z: float = 1.959964) -> list[float]:
    """The Wilson score interval (Wilson 1927, "Probable inference, the law of succession, and statistical
    inference") of a win-rate over n prompts, 95% by default: the table's rates come from 200 prompts, where 95%
    is 92-97%. (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    if n == 0:
        return [0.0, 1.0]
    centre, half = rate + z * z / (2 * n), z * (rate * (1 - rate) / n + z * z / (4 * n * n)) ** 0.5
    scale = 1 + z * z / n
    return [round(max(0.0, (centre - half) / scale), 4), round(min(1.0, (centre + half) / scale), 4)]


def win_rate_and_kl(model: Transformer, ref: Transformer, tok: Any, prompts: Sequence[str], *,
                    max_new_tokens: int = 24, seed: int = 0) -> tuple[float, float, list[str]]:
    """The rule win-rate of one completion per prompt sampled at temperature 1, the exact mean per-token
    KL(model || ref) on those samples, and the samples."""
    outs = complete(model, tok, prompts, greedy=False, max_new_tokens=max_new_tokens, seed=seed)
    texts = [tok.decode(o) for o in outs]
    return win_rate(prompts, texts), exact_kl(model, ref, tok, prompts, outs, max_new_tokens), texts


def pairwise(prompts: Sequence[str], samples: dict[str, Sequence[str]]) -> list[dict[str, Any]]:
    """Rows of a table: the share of prompts on which the row's sample follows the rule and the column's does
    not, plus half the ties."""
    ok = {m: [task.follows_rule(p, t) for p, t in zip(prompts, s)] for m, s in samples.items()}
    n = max(len(prompts), 1)
    return [{"method": a, **{f"vs {b}": sum(1.0 if x > y else 0.5 if x == y else 0.0
                                            for x, y in zip(ok[a], ok[b])) / n for b in samples}} for a in samples]


def token_changes(policy: Transformer, sft: Transformer, tok: Any, prompt: str, completion: str) -> dict[str, Any]:
    """Per-token log-probability change policy - SFT on one completion (with its EOS), tokens as the preference
    losses score them (preference.render)."""
    p, c = P.render(tok, prompt, completion)
    ids = torch.tensor([p + c])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(p):] = True
    delta = (P.token_logps(policy, ids, mask, grad=False) - P.token_logps(sft, ids, mask, grad=False))[0, len(p) - 1:]
    return {"prompt": prompt, "completion": completion, "prompt_ids": p, "ids": c,
            "tokens": [tok.decode([t]) if t != tok.eos_id else "<EOS>" for t in c],
            "delta": delta.tolist(), "sum": float(delta.sum())}


def token_view(changes: dict[str, list[dict[str, Any]]]) -> str:
    """HTML: each completion's tokens, green where the policy raised their log-probability, red where it lowered
    it (full colour at |change| >= 2 nats); the value on hover."""
    def span(t: str, d: float) -> str:
        a = min(abs(d) / 2.0, 1.0)
        rgb = "26,127,55" if d > 0 else "207,34,46"
        return (f'<span title="{d:+.3f}" style="background:rgba({rgb},{a:.2f});padding:0 1px;'
                f'white-space:pre">{html.escape(t)}</span>')
    out = ["<h2>What moved: log p(policy) - log p(SFT) per token</h2>"
           "<p>Each held-out pair's chosen (rule) and rejected (bare words) completion, scored after the prompt; "
           "green: raised, red: lowered; hover for the value in nats; the sum is the sequence's change.</p>"]
    for method, rows in changes.items():
        out.append(f"<h3>{method}</h3><table>")
        for r in rows:
            toks = "".join(span(t, d) for t, d in zip(r["tokens"], r["delta"]))
            out.append(f"<tr><td>{r['side']}</td><td><code>{html.escape(r['prompt'])}</code></td>"
                       f"<td>{toks}</td><td>{r['sum']:+.2f}</td></tr>")
        out.append("</table>")
    return "".join(out)


# ---- the run ------------------------------------------------------------------------------------------------

def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]  # not at U+2028


def _dump(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def write_data(out: Path, cfg: ArenaConfig) -> dict[str, Path]:
    """The task's files the arena trains on, in out/data: pairs, the unpaired (KTO) form of the same pairs
    (shuffled, so that KTO's mismatched KL completions come from other prompts), the SFT examples."""
    src = task.shipped()
    pairs = _rows(src / "pairs.jsonl")[:cfg.pairs]
    kto = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
           for r in pairs for side in ("chosen", "rejected")]
    random.Random(cfg.seed).shuffle(kto)
    sft = _rows(src / "sft.jsonl")[:cfg.pairs]
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    return {"pairs": _dump(data / "pairs.jsonl", pairs), "kto": _dump(data / "kto.jsonl", kto),
            "sft": _dump(data / "sft.jsonl", sft)}


def make_base(out: Path, cfg: ArenaConfig) -> Path:
    """A fresh llama (cfg.preset) with a BPE tokenizer trained on the task's text."""
    rows = _rows(task.shipped() / "pairs.jsonl")
    tok = Tokenizer.train([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], kind="bpe", vocab_size=512)
    torch.manual_seed(cfg.seed)
    model = Transformer(ModelConfig.preset(cfg.preset, vocab_size=len(tok), block_size=cfg.block_size, dropout=0.0))
    return save_pretrained(out / "base", model.eval(), tok)


def train_sft(base: Path, sft_file: Path, out: Path, cfg: ArenaConfig, say: Any = print) -> Path:
    """The arena's SFT stage (tune sft, completion-only, cfg.sft_steps peaking at cfg.sft_lr) of base on sft_file
    into out. -> the SFT model's directory.

    The rate warms up over the first tenth of the steps, then decays (cosine) to a tenth of the peak. A fresh
    model started at the full rate learnt to copy the prompt's words on some seeds only (docs/LOG.md): it stayed
    at ~23% rule-following, with dropped and repeated words, where the warmed-up one reaches ~50% with ~98% of
    its samples copied right, the "~50% SFT model" preference tuning starts from."""
    from ..tune.sft import run_sft

    tok = Tokenizer.load(base / "tokenizer.json")
    # rows as long as the longest example (sft.py pads every row to seq_len): ~2x less compute than the context
    block = json.loads((base / "config.json").read_text(encoding="utf-8"))["block_size"]
    longest = max(len(tok.encode(r["prompt"])) + len(tok.encode(r["completion"])) + 1 for r in _rows(sft_file))
    run_sft(base, sft_file, out, TrainConfig(
        batch_size=32, seq_len=min(longest - 1, block), lr=cfg.sft_lr, schedule="cosine",
        warmup_steps=max(1, cfg.sft_steps // 10), max_steps=cfg.sft_steps, eval_every=0, save_every=0,
        log_every=max(1, cfg.sft_steps // 10), seed=cfg.seed,
        device="cpu", sample_every=0), completion_only=True, val_fraction=0.05, echo=say)
    return out / "final"


def run_arena(out: str | Path, cfg: ArenaConfig, *, model_dir: str | Path | None = None,
              command: str = "lmlab tune arena", say: Any = print) -> dict[str, Any]:
    """Run the arena into `out` (which must not hold a run yet) and write results.json, frontier.png and
    report.html there. -> the results."""
    from ..tune.grpo import GRPOConfig, PromptSource, train_grpo
    from .facts.report import line_plot, write_report

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; the arena writes a new folder (choose another --out)")
    if model_dir is not None:
        if not (Path(model_dir) / "config.json").is_file():
            raise ValueError(f"{model_dir} is not a model directory (no config.json)")
        if load_pretrained(model_dir)[1] is None:  # a whole model (a run folder's config.json is not one)
            raise ValueError(f"{model_dir} has no tokenizer.json")
    out.mkdir(parents=True, exist_ok=True)
    files = write_data(out, cfg)
    base = Path(model_dir) if model_dir is not None else make_base(out, cfg)
    shared = TrainConfig(batch_size=cfg.sequences, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.steps,
                         eval_every=0, save_every=0, log_every=max(1, cfg.steps // 10), seed=cfg.seed, device="cpu",
                         sample_every=0)

    say(f"SFT: {cfg.sft_steps} steps on {files['sft']}")
    t0, c0 = time.perf_counter(), time.process_time()
    sft_dir = train_sft(base, files["sft"], out / "sft", cfg, say)
    timing = {"sft": {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}}
    sft, tok = load_pretrained(sft_dir)

    # reference log-probabilities once, before any clock starts (SimPO and ORPO do not use them)
    cache = out / "reference"
    for kind, data in (("pairs", files["pairs"]), ("kto", files["kto"])):
        ds = P.PreferenceData(data, tok, kind, sft.config.block_size, pad_id=tok.pad_id)
        ds.attach_reference(P.no_dropout(sft), cache)

    for method in METHODS:
        say(f"{method}: {cfg.steps} steps")
        t0, c0 = time.perf_counter(), time.process_time()
        if method == "grpo":
            policy, _ = load_pretrained(sft_dir)
            gcfg = GRPOConfig(steps=cfg.steps, prompts_per_step=cfg.sequences // cfg.group_size,
                              group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, lr=cfg.lr,
                              save_every=0, seed=cfg.seed, device="cpu")
            source = PromptSource(tok, policy.config.block_size, cfg.max_new_tokens,
                                  prompts=[r["prompt"] for r in _rows(files["pairs"])])
            rule = lambda ps, ts, ids: [float(task.follows_rule(p, t)) for p, t in zip(ps, ts)]  # noqa: E731
            seq_len = min(policy.config.block_size, source.longest() + cfg.max_new_tokens)
            # the shared optimizer and schedule, not tune grpo's constant lr: the budget is the same for all
            train_grpo(policy, tok, out / "grpo", gcfg, source, rule, log=None,
                       provenance={"arena": "grpo", "grpo": dataclasses.asdict(gcfg)},
                       train_settings=dataclasses.replace(shared, seq_len=seq_len))
        else:
            pcfg = P.PreferenceConfig(method)
            batch = cfg.sequences if method == "kto" else cfg.sequences // 2
            P.run_preference(out / method, dataclasses.replace(shared, batch_size=batch), model_dir=sft_dir,
                             data=files["kto" if method == "kto" else "pairs"], cfg=pcfg, cache_dir=cache, say=say)
        timing[method] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}

    say(f"measuring on {cfg.heldout} held-out prompts")
    prompts = [r["prompt"] for r in _rows(task.shipped() / "test.jsonl")][:cfg.heldout]
    models = {"sft": sft, **{m: load_pretrained(out / m / "final")[0] for m in METHODS}}
    table, samples, greedy = [], {}, {}
    for name, model in models.items():
        rate, kl, samples[name] = win_rate_and_kl(model, sft, tok, prompts, max_new_tokens=cfg.max_new_tokens,
                                                  seed=cfg.seed)
        greedy[name] = [tok.decode(o) for o in complete(model, tok, prompts, greedy=True,
                                                        max_new_tokens=cfg.max_new_tokens)]
        table.append({"method": name, "win_rate_sampled": rate, "sampled_95ci": wilson(rate, len(prompts)),
                      "win_rate_greedy": win_rate(prompts, greedy[name]),
                      "kl_to_sft": kl, "steps": cfg.sft_steps if name == "sft" else cfg.steps,
                      "wall_s": timing[name]["wall_s"], "cpu_s": timing[name]["cpu_s"]})
        say(f"  {name:6s} win-rate {rate:.1%} sampled, {table[-1]['win_rate_greedy']:.1%} greedy; KL {kl:.3f}")

    changes = {}
    for m in PREFERENCE:
        changes[m] = [{"side": side, **token_changes(models[m], sft, tok, p, getattr(task, fn)(task.words_of(p)))}
                      for p in prompts[:cfg.shown_pairs] for side, fn in (("chosen", "preferred"),
                                                                          ("rejected", "rejected"))]

    plot = line_plot(out / "frontier.png", "rule win-rate against KL to the SFT model",
                     "mean per-token KL(policy || SFT), nats (exact, on its samples)", "rule win-rate (T = 1)",
                     [(r["method"], [(np.array([r["kl_to_sft"]]), np.array([r["win_rate_sampled"]]))])
                      for r in table], hlines=[("target 85%", 0.85)], vlines=[("KL 0.5", 0.5)])
    dpo, base_rate = next(r for r in table if r["method"] == "dpo"), table[0]["win_rate_sampled"]
    budget = cfg.budget()
    # GRPO learns only from groups whose samples scored differently: how many it had, from its run's metrics
    rows = _rows(out / "grpo" / "metrics.jsonl")
    flat = int(next(r["zero_spread_groups_total"] for r in reversed(rows) if "zero_spread_groups_total" in r))
    groups = cfg.steps * (cfg.sequences // cfg.group_size)
    budget["methods"]["grpo"]["completions_with_gradient"] = (groups - flat) * cfg.group_size
    budget["methods"]["grpo"]["completions_sampled"] = groups * cfg.group_size
    results = {"config": dataclasses.asdict(cfg), "model": str(base), "budget": budget, "prompts": prompts,
               "samples": samples, "greedy": greedy, "token_changes": changes, "pairwise": pairwise(prompts, samples)}
    write_report(out, "rule task", "DPO on a ~5M model takes the rule win-rate from ~50% (the SFT model) to >= 85% "
                 "at mean per-token KL <= 0.5 nats (issue 16)",
                 f"SFT {base_rate:.1%}; DPO {dpo['win_rate_sampled']:.1%} at KL {dpo['kl_to_sft']:.3f}. "
                 f"Budget: {budget['definition']}.",
                 {"dpo_win_rate_at_least_85": dpo["win_rate_sampled"] >= 0.85, "dpo_kl_at_most_0.5":
                  dpo["kl_to_sft"] <= 0.5}, table, [plot], results, command,
                 extra_tables=[("pairwise by the rule (sampled, T = 1): the row's share of prompts won against the "
                                "column, ties half", results["pairwise"]),
                               (f"the budget: {budget['definition']}", [{"method": m, **b} for m, b in
                                                                         budget["methods"].items()])],
                 title="lmlab tune arena", claim_label="<b>Target</b>", extra_html=token_view(changes),
                 note="Win-rates: one completion per held-out prompt, checked by the task's rule; sampled_95ci: "
                      "the Wilson 95% interval of the sampled rate. KL: exact over "
                      "the vocabulary on the policy's own samples at temperature 1. Times: training only (the "
                      "reference log-probabilities are computed once before). Numbers in results.json.")
    return results
