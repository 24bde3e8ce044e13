"""lmlab's Trainer against the bare model step on the same config: is the data path the bottleneck?

    python benchmarks/bench_train.py [--steps 30]

Reference config (gpt2 family, 6 layers, 6 heads, d 384, context 256, vocab 8192), batch 8 x 256, fp32 CPU.
The bare step is forward + backward + fused AdamW on a fixed random batch; the Trainer adds window sampling
from a memmapped token file, the schedule, clipping, metrics and logging. Target: Trainer >= 90% of bare.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmlab.data import prepare_texts
from lmlab.models import ModelConfig, Transformer
from lmlab.tokenizers import Tokenizer
from lmlab.train import Callback, TrainConfig, train
from lmlab.train.demo_corpus import demo_corpus

REFERENCE = dict(family="gpt2", n_layer=6, n_head=6, n_embd=384, block_size=256)


class StepTimes(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step(self, trainer, metrics) -> None:
        self.times.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after 5 warm-up steps)")
    args = parser.parse_args()
    text = demo_corpus(n_stories=6000)
    tok = Tokenizer.train([text], vocab_size=8192)
    cfg = ModelConfig(**REFERENCE, vocab_size=8192)
    batch, T = 8, cfg.block_size
    with tempfile.TemporaryDirectory() as tmp:
        ds = prepare_texts([text], tok, Path(tmp) / "ds", seq_len=T)
        torch.manual_seed(0)
        model = Transformer(cfg)
        opt = model.configure_optimizer(lr=3e-4, weight_decay=0.1)
        x, y = ds.sample_batch(batch, T, torch.Generator().manual_seed(0))
        times = []
        for i in range(args.steps + 5):
            t0 = time.perf_counter()
            loss = model(x, y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 5:
                times.append(time.perf_counter() - t0)
        bare = batch * T / statistics.median(times)

        rec = StepTimes()
        config = TrainConfig(max_steps=args.steps + 5, batch_size=batch, warmup_steps=5, eval_every=0,
                             save_every=0, log_every=10, device="cpu")
        train(Transformer(cfg), tok, ds, config, Path(tmp) / "run", [rec])
        steps = [b - a for a, b in zip(rec.times[5:], rec.times[6:])]
        trainer = batch * T / statistics.median(steps)
    peak_note = f"{cfg.flops_per_token(T) * trainer / 1e9:.1f} GFLOP/s achieved by the Trainer"
    print(f"\nreference config, batch {batch}x{T}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  bare model step   {bare:8.0f} tok/s")
    print(f"  lmlab Trainer     {trainer:8.0f} tok/s   ({peak_note})")
    ratio = trainer / bare
    print(f"  ratio             {ratio:8.1%}   target >= 90%: {'PASS' if ratio >= 0.9 else 'BELOW'}")


if __name__ == "__main__":
    main()
