"""Preference optimisation on the shipped rule task (lmlab.tune.preference_task): what a DPO step costs, and
whether DPO teaches the rule.

    python benchmarks/bench_dpo.py --part step          # (a) ~1 minute on a 2-core CPU
    python benchmarks/bench_dpo.py --part winrate       # (b) SFT then DPO, ~15 minutes

(a) One optimizer step of DPO with cached reference log-probabilities against an SFT step (mean NLL over the
completion tokens) on the same batch: the same 2B rows (chosen and rejected; the same forward shape) and the B
chosen rows alone. lmlab.fast's fused CPU head serves the SFT step's model(x, targets), as in the Trainer.
Interleaved, median of --reps. Target: DPO <= 1.1x the SFT step on the same rows.
(b) A ~5M llama learns the task's format from sft.jsonl (both styles equally often), then DPO on pairs.jsonl
from it: the rule win-rate on 200 held-out prompts (sampled at temperature 1) before and after, and the mean
per-token KL(policy || SFT model) on the policy's own samples, exact over the vocabulary. Target: ~50% ->
>= 85% at KL <= 0.5 nats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmlab.lab.arena import win_rate_and_kl  # the arena's measure: sampled win-rate and exact KL
from lmlab.models import ModelConfig, Transformer, fast
from lmlab.models.io import save_pretrained
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


def part_winrate(sft_minutes: float, dpo_minutes: float, beta: float) -> None:
    tok, model = setup()
    tmp = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    rows = [json.loads(x) for x in (task.shipped() / "sft.jsonl").read_text(encoding="utf-8").splitlines()]
    seqs = [P.render(tok, r["prompt"], r["completion"]) for r in rows]
    ids, mask, _ = P._pack(seqs, model.config.block_size, [f"sft.jsonl:{i}" for i in range(1, len(rows) + 1)], 0)
    fast.for_training(model.train())
    opt = model.configure_optimizer(2e-3)
    g, t0, step = torch.Generator().manual_seed(0), time.perf_counter(), 0
    while time.perf_counter() - t0 < sft_minutes * 60:
        idx = torch.randint(len(rows), (32,), generator=g)
        loss = sft_loss(model, ids[idx], mask[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
    print(f"SFT: {step} steps in {time.perf_counter() - t0:.0f} s, last loss {loss.item():.4f}")
    sft_dir = save_pretrained(tmp / "sft", model.eval(), tok)
    ref = Transformer(model.config).eval()
    ref.load_state_dict(model.state_dict())
    prompts = [json.loads(x)["prompt"] for x in (task.shipped() / "test.jsonl").read_text().splitlines()]
    before, _, _ = win_rate_and_kl(model, ref, tok, prompts)
    print(f"before DPO: rule win-rate {before:.1%}")
    t0 = time.perf_counter()
    result = P.run_preference(tmp / "dpo", TrainConfig(batch_size=16, lr=5e-4, warmup_steps=10, log_every=10,
                                                       time_budget_s=dpo_minutes * 60, eval_every=0, save_every=0,
                                                       device="cpu", seed=0),
                              model_dir=sft_dir, data=task.shipped() / "pairs.jsonl",
                              cfg=P.PreferenceConfig("dpo", beta=beta), cache_dir=None)
    from lmlab.models.io import load_pretrained
    tuned, _ = load_pretrained(tmp / "dpo" / "final")
    after, kl, _ = win_rate_and_kl(tuned, ref, tok, prompts)
    print(f"DPO: {result.steps} steps in {time.perf_counter() - t0:.0f} s (beta {beta})")
    print(f"after DPO: rule win-rate {after:.1%}, mean per-token KL to the SFT model {kl:.3f} nats "
          f"(targets: >= 85%, <= 0.5)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["step", "winrate"], default="step")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sft-minutes", type=float, default=5.0)
    ap.add_argument("--dpo-minutes", type=float, default=8.0)
    ap.add_argument("--beta", type=float, default=0.1)
    a = ap.parse_args()
    if a.part == "step":
        part_step(a.batch_size, a.reps)
    else:
        part_winrate(a.sft_minutes, a.dpo_minutes, a.beta)
