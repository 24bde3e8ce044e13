"""Distillation at equal steps: a student trained from scratch, by logit KD and by sequence-level KD from a larger
teacher, on the built-in tales; held-out loss and KL to the teacher, mean ± std over seeds (issue 19's target: the
distilled student at ~1/4 of the teacher's parameters reaches a validation loss >= 3% lower than from scratch).

    python benchmarks/bench_distill.py                            # ~5 minutes on a quiet 2-core CPU
    python benchmarks/bench_distill.py --steps 100 --seeds 0      # a quick look

The teacher (llama, 4 layers, width 128) trains --teacher-steps steps on lmlab.train.demo_corpus; the student
has half its layers and half its width (about a quarter of its parameters). Every student run starts from the
same initial weights for a seed and sees the same number of steps and rows: scratch is alpha 0 (plain training
on the books), logits is alpha --alpha at temperature --temperature, sequence trains on --samples teacher
continuations of book windows. val_loss is on the books' held-out part; val_kl = KL(teacher || student) per
held-out token at T = 1 (the Trainer's last evaluation in each run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from lmlab.configs import parse_seeds
from lmlab.data import prepare_texts
from lmlab.models import ModelConfig
from lmlab.tokenizers import Tokenizer
from lmlab.train import TrainConfig, train
from lmlab.train.console import quiet
from lmlab.train.demo_corpus import demo_corpus
from lmlab.tune.distill import DistillConfig, run_distill


def shape(n_layer: int, n_embd: int, vocab: int) -> ModelConfig:
    return ModelConfig(family="llama", n_layer=n_layer, n_head=4, n_embd=n_embd, block_size=64, vocab_size=vocab)


def params(cfg: ModelConfig) -> int:
    from lmlab.models import Transformer
    return sum(p.numel() for p in Transformer(cfg).parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-steps", type=int, default=800)
    p.add_argument("--steps", type=int, default=300, help="student steps, every method")
    p.add_argument("--seeds", default="0,1,2", help="0,1,2 (a list), 0-4 (a range) or 3 (default 0,1,2)")
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--samples", type=int, default=512, help="sequence KD: teacher continuations")
    p.add_argument("--out", help="keep the runs here (default: a temporary folder); a finished teacher there is "
                   "reused, student runs are not overwritten")
    a = p.parse_args()
    try:
        seeds = parse_seeds(a.seeds)
    except ValueError as e:
        p.error(str(e))
    methods = ("scratch", "logits", "sequence")
    if a.out:
        # checked before the teacher trains (minutes): run_distill refuses a folder that holds a run only when
        # it gets there
        held = [f"{m}-{s}" for s in seeds for m in methods
                if (Path(a.out) / f"{m}-{s}").is_dir() and any((Path(a.out) / f"{m}-{s}").iterdir())]
        if held:
            p.error(f"{a.out} already holds student runs ({', '.join(held)}); choose another --out or other --seeds")
    root = Path(a.out or tempfile.mkdtemp(prefix="bench-distill-"))
    t0 = time.perf_counter()
    text = demo_corpus()
    tok = Tokenizer.train([text], kind="bpe", vocab_size=1024)
    book = root / "tales.txt"
    root.mkdir(parents=True, exist_ok=True)
    book.write_text(text, encoding="utf-8")
    base = dict(batch_size=16, seq_len=64, lr=3e-3, warmup_steps=20, eval_batches=40, log_every=50, device="cpu")
    teacher_cfg, student_cfg = shape(4, 128, len(tok)), shape(2, 64, len(tok))
    with quiet():
        if not (root / "teacher" / "final").is_dir():
            ds = prepare_texts([text], tok, root / "teacher-data", seq_len=64, overwrite=True)  # a rerun's own
            train(teacher_cfg, tok, ds, TrainConfig(**base, max_steps=a.teacher_steps, eval_every=0, save_every=0),
                  root / "teacher")
        teacher_val = next(json.loads(line) for line in reversed(
            (root / "teacher" / "metrics.jsonl").read_text().splitlines()) if "val_loss" in line)["val_loss"]
        print(f"teacher {params(teacher_cfg):,} params, val loss {teacher_val:.4f}; student {params(student_cfg):,} "
              f"params ({params(student_cfg) / params(teacher_cfg):.2f}x); {time.perf_counter() - t0:.0f}s",
              flush=True)
        configs = {"scratch": DistillConfig(alpha=0.0),
                   "logits": DistillConfig(alpha=a.alpha, temperature=a.temperature),
                   "sequence": DistillConfig(mode="sequence", teacher_samples=a.samples, continuation_tokens=64)}
        results: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
        for seed in seeds:
            for name, cfg in configs.items():
                out = root / f"{name}-{seed}"
                run_distill(root / "teacher" / "final", [book], out, TrainConfig(
                    **base, max_steps=a.steps, eval_every=a.steps, save_every=0, seed=seed), cfg,
                    model_config=student_cfg, echo=lambda *_: None)
                last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
                results[name].append((last["val_loss"], last["val_kl"]))
                print(f"seed {seed} {name:9s} val loss {last['val_loss']:.4f} val KL {last['val_kl']:.4f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)

    def ms(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"

    scratch = statistics.mean(v for v, _ in results["scratch"])
    print(f"\n{a.steps} student steps, {len(results['scratch'])} seeds, load average {os.getloadavg()[0]:.1f}")
    print("method    | val loss        | KL to teacher   | val loss vs scratch")
    for name, rows in results.items():
        gain = 1 - statistics.mean(v for v, _ in rows) / scratch
        print(f"{name:9s} | {ms([v for v, _ in rows])} | {ms([k for _, k in rows])} | {gain:+.1%} lower")
    print(f"total {time.perf_counter() - t0:.0f}s; runs in {root}")


if __name__ == "__main__":
    main()
