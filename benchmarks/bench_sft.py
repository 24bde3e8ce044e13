"""SFT from a demo-sized base on the shipped chats: the share of held-out replies in the right format, and the
minutes it took (target, issue 16: >= 95% within 10 minutes on a 2-core CPU).

    python benchmarks/bench_sft.py                      # trains the base (lmlab demo's model), then SFT
    python benchmarks/bench_sft.py --base lmlab-demo/final --steps 100

The base is `lmlab demo`'s ~1M-parameter Llama trained on its generated tales (--base-steps steps), so it has
never seen a question, "Answer:" or a role token. SFT trains it on the shipped chats (lmlab.tune.chats,
English and Russian; 10% held out) with packing. Every assistant turn of the held-out conversations is then
generated greedily from the turns before it and checked by the rule (`format_ok`: one line, "Answer: " to
an English question or "Ответ: " to a Russian one, a full stop at the end); `answer_ok` also checks the
content. The SFT minutes count training only (tokenising included), as wall time and as CPU time (which a
shared machine inflates less; divided by the threads it is the wall time of an idle machine, roughly); the
load average is printed because the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from lmlab.models.io import load_pretrained
from lmlab.train import TrainConfig
from lmlab.train.console import quiet
from lmlab.train.recipes import run_demo
from lmlab.tune.chat import generate_reply
from lmlab.tune.chats import SHIPPED, answer_ok, format_ok
from lmlab.tune.data import read_sft
from lmlab.tune.sft import encode_examples, run_sft, split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="a base model directory (default: train lmlab demo's model first)")
    p.add_argument("--base-steps", type=int, default=200, help="demo training steps for the base (200)")
    p.add_argument("--steps", type=int, default=200, help="SFT steps (200)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", help="work folder (default: a temporary one)")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_sft."))
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; work folder {work}")
    base = args.base
    if base is None:
        t = time.perf_counter()
        with quiet():
            run_demo(work / "base", max_steps=args.base_steps, device="cpu", echo=lambda s: None)
        base = work / "base" / "final"
        print(f"base: lmlab demo's model, {args.base_steps} steps, {(time.perf_counter() - t) / 60:.1f} min")
    config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10,
                         warmup_steps=20, eval_every=100, eval_batches=4, save_every=0, log_every=50, seed=0,
                         device="cpu")
    t, cpu = time.perf_counter(), time.process_time()
    with quiet():
        result = run_sft(base, SHIPPED, work / "sft", config, packing=True, val_fraction=0.1, echo=print)
    sft_min, sft_cpu = (time.perf_counter() - t) / 60, (time.process_time() - cpu) / 60
    print(f"SFT: {result.steps} steps, val loss {result.best_val_loss:.4f}, {sft_min:.1f} min wall, "
          f"{sft_cpu:.1f} CPU-minutes ({sft_cpu / torch.get_num_threads():.1f} min on {torch.get_num_threads()} idle "
          f"cores), load average now {os.getloadavg()[0]:.2f}")

    model, tok = load_pretrained(work / "sft" / "final")
    kind, rows = read_sft(SHIPPED)
    examples, _ = encode_examples(kind, rows, tok, model.config.block_size)
    held = {e.line for e in split(examples, 0.1, config.seed)[1]}  # the run's own held-out conversations
    t = time.perf_counter()
    n = fmt = right = 0
    bad = []
    for line, messages in rows:
        if line not in held:
            continue
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            question = messages[i - 1]["content"]
            said = generate_reply(model, tok, messages[:i], do_sample=False, max_new_tokens=32)
            n += 1
            fmt += format_ok(question, said)
            right += answer_ok(question, said)
            if not format_ok(question, said) and len(bad) < 5:
                bad.append((question, said))
    print(f"held-out replies: {n}; in the right format {fmt / n:.1%}; right answers {right / n:.1%} "
          f"(generation {(time.perf_counter() - t) / 60:.1f} min)")
    for q, s in bad:
        print(f"  wrong format: {q!r} -> {s!r}")
    print(f"RESULT format_rate={fmt / n:.4f} answer_rate={right / n:.4f} sft_minutes={sft_min:.2f} "
          f"sft_cpu_minutes={sft_cpu:.2f} "
          f"target: format_rate >= 0.95 within 10 minutes")


if __name__ == "__main__":
    main()
