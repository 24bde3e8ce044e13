"""GRPO on a verifiable task: held-out pass@1 before and after `lmlab tune grpo`, from a tiny model pre-trained
here on the task's text.

    python benchmarks/bench_grpo.py             # target: held-out pass@1 up by >= 20 points in < 30 min, 2 cores

The task is `format` ("wrap kotime:" -> "[kotime]"). The base model is pre-trained (lmlab's Trainer, a few
hundred steps) on task text whose answers come in four formats: the plain word (35%), [word] (25%), (word)
and {word} (20% each). So it can copy a word but prefers the wrong format: greedy decoding writes the plain
word, and one sample in four is right. RL with the checker as the reward is to make the right format the one it
writes: the RL-from-a-base setting of DeepSeek-R1-Zero and "Understanding R1-Zero-Like Training", where the
capability is in the base model's distribution and the reward selects it. Held-out prompts are made-up words
that pre-training and GRPO never see (tune.rewards: the held-out seed).

Printed: greedy pass@1 (tune.grpo.pass_at_1, what `lmlab tune grpo` logs as heldout_pass1) and sampled pass@1
(temperature 1, the mean over 4 samples per prompt) on 200 held-out prompts, before and after, with wall times.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from lmlab.lab.ttc import TaskText
from lmlab.models import ModelConfig, Transformer, generate_ids
from lmlab.models.io import load_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.train import TrainConfig, train
from lmlab.train.console import quiet
from lmlab.tune.grpo import GRPOConfig, PromptSource, pass_at_1, run_grpo
from lmlab.tune.rewards import get_task

FORMATS = (("{}", 0.35), ("[{}]", 0.25), ("({})", 0.20), ("{{{}}}", 0.20))


@torch.no_grad()
def sampled_pass(model, tok, source: PromptSource, prompts: list[str], samples: int = 4) -> float:
    model.eval()
    rows = [p for p in prompts for _ in range(samples)]
    comps = generate_ids(model, source.encode(rows), max_new_tokens=source.max_new_tokens, temperature=1.0,
                         seed=1234, eos_token_id=tok.eos_id, pad_id=tok.pad_id)
    return sum(source.task.check(p, tok.decode(c)) for p, c in zip(rows, comps)) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=30, help="GRPO steps")
    ap.add_argument("--variant", default="grpo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task("format")
    heldout = task.heldout(200)
    rng = random.Random(0)
    prompts = task.train_prompts(rng, 20000, set(heldout))
    texts = [p + rng.choices([f for f, _ in FORMATS], [w for _, w in FORMATS])[0].format(task.answer(p)[1:-1])
             for p in prompts]
    tok = Tokenizer.train(texts[:2000], kind="char", vocab_size=64)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        t0 = time.perf_counter()
        data = TaskText(tok, texts, 32)
        model = Transformer(ModelConfig(family="gpt2", vocab_size=len(tok), n_layer=2, n_head=4, n_embd=96,
                                        block_size=48, dropout=0.0))
        with quiet():
            train(model, tok, data, TrainConfig(batch_size=64, seq_len=32, lr=3e-3, warmup_steps=50,
                                                max_steps=args.pretrain_steps, eval_every=0, save_every=0,
                                                log_every=100, sample_every=0, device="cpu"), root / "base")
        t_pre = time.perf_counter() - t0
        base, _ = load_pretrained(root / "base" / "final")
        source = PromptSource(tok, 48, 16, task=task, heldout=heldout)
        before = pass_at_1(base, tok, source, heldout), sampled_pass(base, tok, source, heldout)
        print(f"pre-training: {args.pretrain_steps} steps in {t_pre:.0f} s")
        print(f"before GRPO: held-out pass@1 greedy {before[0]:.3f}, sampled {before[1]:.3f}")
        t1 = time.perf_counter()
        cfg = GRPOConfig(steps=args.steps, prompts_per_step=8, group_size=8, max_new_tokens=16, lr=1e-3,
                         variant=args.variant, eval_every=10, save_every=0, device="cpu")
        with quiet():
            result = run_grpo(root / "base" / "final", root / "grpo", cfg, task="format", log=print)
        t_rl = time.perf_counter() - t1
        after_model, _ = load_pretrained(root / "grpo" / "final")
        after = pass_at_1(after_model, tok, source, heldout), sampled_pass(after_model, tok, source, heldout)
        logged = [m["heldout_pass1"] for m in result.history if "heldout_pass1" in m]
        print(f"after {args.steps} GRPO steps ({args.variant}, {t_rl:.0f} s): held-out pass@1 greedy {after[0]:.3f}, "
              f"sampled {after[1]:.3f} (logged at evaluations: {', '.join(f'{x:.3f}' for x in logged)})")
        print(f"change: greedy {100 * (after[0] - before[0]):+.1f} points, sampled {100 * (after[1] - before[1]):+.1f} "
              f"points; total {time.perf_counter() - t0:.0f} s (target: +20 points within 30 min)")


if __name__ == "__main__":
    main()
