"""Preference optimisation on the shipped rule task (lmlab.tune.preference_task): what a DPO step costs, and
whether DPO teaches the rule.

    python benchmarks/bench_dpo.py --part step          # (a) ~1 minute on a 2-core CPU
    python benchmarks/bench_dpo.py --part winrate       # (b) SFT then DPO + NLL; ~4 CPU-minutes, one thread

(a) One optimizer step of DPO with cached reference log-probabilities against an SFT step (mean NLL over the
completion tokens) on the same batch: the same 2B rows (chosen and rejected; the same forward shape) and the B
chosen rows alone. lmlab.fast's fused CPU head serves the SFT step's model(x, targets), as in the Trainer.
Interleaved, median of --reps. Target: DPO <= 1.1x the SFT step on the same rows.
(b) The arena's SFT stage (lmlab.lab.arena.train_sft: a fresh llama-small, 3.46M params, --sft-steps on sft.jsonl,
by default the arena's ArenaConfig.sft_steps (docs/LOG.md's five-seed DPO runs used --sft-steps 2000), where both
styles are equally common; warm-up then cosine decay), then DPO on pairs.jsonl from it, by default with
an added NLL term on the chosen completions (--sft-weight 1: DPO + NLL, Pang et al. 2024's RPO, TRL's loss_type
["sigmoid", "sft"]; --sft-weight 0 is plain DPO, which stalled at ~65% from the weak SFT models of an SFT without
warm-up: docs/LOG.md). The rule win-rate on 200 held-out prompts (sampled at temperature 1) before and after, and
the mean per-token KL(policy || SFT model) on the policy's own samples, exact over the vocabulary. Target: ~50% ->
>= 85% at KL <= 0.5 nats, SFT + DPO within 15 minutes. Wall and CPU time are printed (on a shared machine wall
time says little). --on-policy K: DPO on pairs built from the SFT model's own samples (on_policy_pairs; the
sampling counts in DPO's time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmlab.lab import arena
from lmlab.lab.arena import ArenaConfig, win_rate_and_kl  # the arena's measure: sampled win-rate and exact KL
from lmlab.models import ModelConfig, Transformer, fast
from lmlab.models.io import load_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.train import TrainConfig
from lmlab.tune import preference as P
from lmlab.tune import preference_task as task


def setup(block_size: int = 48) -> tuple[Tokenizer, Transformer]:
    rows = [json.loads(x) for x in (task.shipped() / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    tok = Tokenizer.train([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], kind="bpe", vocab_size=512)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("llama-small", vocab_size=len(tok), block_size=block_size, dropout=0.0)
    return tok, Transformer(cfg)


def sft_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(ids[:, :-1], ids[:, 1:].masked_fill(~mask[:, 1:], -100)).loss


def part_step(batch_size: int, reps: int) -> None:
    tok, model = setup()
    fast.for_training(model.train())
    ds = P.PreferenceData(task.shipped() / "pairs.jsonl", tok, "pairs", model.config.block_size)
    ds.attach_reference(model, None)
    batch = ds.sample_batch(batch_size, 0, torch.Generator().manual_seed(0))
    both = P._stack(batch["chosen"], batch["rejected"]), P._stack(batch["chosen_mask"], batch["rejected_mask"])
    opt = model.configure_optimizer(1e-4)
    objective = P.PreferenceObjective(P.PreferenceConfig("dpo"))
    steps = {"dpo": lambda: objective.loss(model, batch)[0],
             "sft_same_rows": lambda: sft_loss(model, *both),
             "sft_chosen_rows": lambda: sft_loss(model, batch["chosen"], batch["chosen_mask"])}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(reps + 2):
        for name, loss_of in steps.items():
            t0 = time.perf_counter()
            loss = loss_of()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if rep >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {model.num_parameters() / 1e6:.2f}M params, batch {batch_size} pairs, rows of "
          f"{both[0].shape[1]} tokens, {torch.get_num_threads()} threads, median of {reps}")
    for k, v in med.items():
        print(f"  {k:16s} {v * 1e3:8.1f} ms/step")
    print(f"DPO / SFT on the same {2 * batch_size} rows: {med['dpo'] / med['sft_same_rows']:.3f}x (target <= 1.1)")
    print(f"DPO / SFT on the {batch_size} chosen rows: {med['dpo'] / med['sft_chosen_rows']:.3f}x")


def on_policy_pairs(model: Transformer, tok: Tokenizer, pairs: Path, k: int, seed: int) -> Path:
    """Pairs from the model's own samples (online / iterative DPO: Xu et al. 2023, "Some things are more CRINGE
    than others"; Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"): k samples (T = 1)
    per training prompt, labelled by the rule; chosen a following sample (else the shipped chosen), rejected a
    failing one (else the shipped rejected). The SFT model's failures are mostly copying errors, which the
    shipped pairs (list against bare words) never show."""
    rows = [json.loads(x) for x in pairs.read_text(encoding="utf-8").splitlines()]
    samples = [[] for _ in rows]
    for j in range(k):
        for s, ids in zip(samples, arena.complete(model, tok, [r["prompt"] for r in rows], greedy=False,
                                                  seed=seed * 100 + j)):
            s.append(tok.decode(ids))
    rng, out = random.Random(seed), []
    for r, s in zip(rows, samples):
        good = [t for t in s if task.follows_rule(r["prompt"], t)]
        bad = [t for t in s if t.strip() and not task.follows_rule(r["prompt"], t)]
        chosen, rejected = rng.choice(good) if good else r["chosen"], rng.choice(bad) if bad else r["rejected"]
        out.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected})
    same = sum(r == x for r, x in zip(out, rows))
    print(f"on-policy pairs: {len(rows) - same} of {len(rows)} differ from the shipped ones")
    return arena._dump(pairs.with_name("pairs_on_policy.jsonl"), out)


def part_winrate(a: argparse.Namespace) -> None:
    cfg = ArenaConfig(sft_steps=a.sft_steps, seed=a.seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    files = arena.write_data(tmp, cfg)
    loads = [os.getloadavg()[0]]
    t0, c0 = time.perf_counter(), time.process_time()
    kept = Path(a.sft_dir) if a.sft_dir else None
    if kept is not None and (kept / "model.safetensors").is_file():
        sft_dir = kept
        print(f"SFT: the model in {kept} (its time not counted here)")
    else:
        sft_dir = arena.train_sft(arena.make_base(tmp, cfg), files["sft"], tmp / "sft", cfg, say=lambda s: None)
        if kept is not None:
            shutil.copytree(sft_dir, kept)
    sft_s = (time.perf_counter() - t0, time.process_time() - c0)
    sft, tok = load_pretrained(sft_dir)
    print(f"SFT: {sft.num_parameters() / 1e6:.2f}M params, {a.sft_steps} steps in {sft_s[0]:.0f} s wall, "
          f"{sft_s[1]:.0f} s CPU")
    prompts = [json.loads(x)["prompt"] for x in (task.shipped() / "test.jsonl").read_text().splitlines()]
    before, _, _ = win_rate_and_kl(sft, sft, tok, prompts, seed=a.seed)
    print(f"before DPO: rule win-rate {before:.1%}")
    t0, c0 = time.perf_counter(), time.process_time()
    policy_dir = sft_dir
    for r in range(a.rounds):  # iterative: each round's pairs come from the policy the last one made
        policy = sft if r == 0 else load_pretrained(policy_dir)[0]
        pairs = (on_policy_pairs(policy, tok, files["pairs"], a.on_policy, a.seed + 1000 * r) if a.on_policy
                 else files["pairs"])
        out = tmp / f"dpo-{r}"
        P.run_preference(out, TrainConfig(batch_size=16, lr=a.lr, warmup_steps=10, max_steps=a.dpo_steps,
                                          log_every=50, eval_every=0, save_every=0, device="cpu", seed=a.seed + r,
                                          sample_every=0),
                         model_dir=policy_dir, data=pairs, cfg=P.PreferenceConfig(
                             "dpo", beta=a.beta, sft_weight=a.sft_weight), cache_dir=None, say=lambda s: None)
        policy_dir = out / "final"
        if a.rounds > 1:
            mid, kl_mid, _ = win_rate_and_kl(load_pretrained(policy_dir)[0], sft, tok, prompts, seed=a.seed)
            print(f"  round {r + 1}: rule win-rate {mid:.1%}, KL to the SFT model {kl_mid:.3f} nats "
                  f"({time.perf_counter() - t0:.0f} s wall so far)", flush=True)
    dpo_s = (time.perf_counter() - t0, time.process_time() - c0)
    loads.append(os.getloadavg()[0])
    tuned, _ = load_pretrained(policy_dir)
    after, kl, _ = win_rate_and_kl(tuned, sft, tok, prompts, seed=a.seed)
    rounds = f" x {a.rounds} rounds" if a.rounds > 1 else ""
    print(f"DPO (lr {a.lr}, beta {a.beta}, sft weight {a.sft_weight}): {a.dpo_steps} steps{rounds} in {dpo_s[0]:.0f} "
          f"s wall, {dpo_s[1]:.0f} s CPU")
    print(f"after DPO: rule win-rate {after:.1%}, mean per-token KL to the SFT model {kl:.3f} nats "
          f"(targets: >= 85%, <= 0.5)")
    print(f"SFT + DPO: {sft_s[0] + dpo_s[0]:.0f} s wall, {sft_s[1] + dpo_s[1]:.0f} s CPU (target 15 minutes); "
          f"load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["step", "winrate"], default="step")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sft-steps", type=int, default=ArenaConfig.sft_steps,
                    help=f"SFT steps (default {ArenaConfig.sft_steps}, the arena's: ArenaConfig.sft_steps)")
    ap.add_argument("--dpo-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-4, help="DPO's peak lr (10 warm-up steps, cosine)")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--sft-weight", type=float, default=1.0, help="the NLL term's weight (DPO + NLL, RPO)")
    ap.add_argument("--on-policy", type=int, default=0, metavar="K", help="DPO on pairs built from K samples per "
                    "training prompt from the SFT model, labelled by the rule (0: the shipped pairs)")
    ap.add_argument("--rounds", type=int, default=1, help="with --on-policy: rounds of DPO, each on pairs sampled from "
                    "the policy the last round made, with that policy as its reference (iterative DPO)")
    ap.add_argument("--sft-dir", help="keep the SFT model here, or reuse the one already here (its time is then not "
                    "counted)")
    ap.add_argument("--seed", type=int, default=0, help="base, data order and sampling")
    a = ap.parse_args()
    if a.part == "step":
        part_step(a.batch_size, a.reps)
    else:
        part_winrate(a)
