"""lmlab's Trainer against a bare training step on the same model: what does the loop cost?

    python benchmarks/bench_train.py              # ~2 minutes on a 2-core CPU
    python benchmarks/bench_train.py --steps 50 --batch-size 16

Reference config: gpt2 family, 6 layers, 6 heads, d 384, context 256, vocab 8192 (~16M parameters),
batch 8 x 256, fp32 on CPU (bf16 autocast on CUDA). The bare step is forward + backward + clip + fused
AdamW on random tokens in a plain loop; the Trainer adds window sampling from a memmapped token file, the
schedule, metrics, logging and the stop checks. Both run in this process, alternating, so they share the
machine's state. Target: Trainer >= 90% of the bare step's tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmlab.data import prepare_texts
from lmlab.models import ModelConfig, Transformer, fast
from lmlab.tokenizers import Tokenizer
from lmlab.train import Callback, TrainConfig, train
from lmlab.train.demo_corpus import demo_corpus
from lmlab.train.trainer import measured_peak_flops, resolve_device

REFERENCE = dict(family="gpt2", n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192)


class StepTimes(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step(self, trainer, metrics) -> None:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def bare_step_times(cfg: ModelConfig, batch: int, steps: int, device: torch.device) -> list[float]:
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    if device.type == "cpu":
        fast.for_training(model)  # as the Trainer does
    opt = model.configure_optimizer(lr=3e-4, weight_decay=0.1)
    autocast = device.type == "cuda"
    times = []
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
        y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def trainer_step_times(cfg: ModelConfig, tok: Tokenizer, ds, batch: int, steps: int, device: torch.device,
                       out: Path) -> list[float]:
    """The times of `steps` steps, as bare_step_times gives: a step's time is the interval between its end and
    the previous step's, so the run has one step more (the first, untimed) and one after (its interval holds the
    final evaluation)."""
    rec = StepTimes()
    # eval only at the end (not timed: the last step's interval is dropped), no checkpoints until the end
    config = TrainConfig(max_steps=steps + 2, batch_size=batch, warmup_steps=5, eval_every=0, eval_batches=1,
                         save_every=0, log_every=10, device=str(device))
    train(cfg, tok, ds, config, out, [rec])
    intervals = [b - a for a, b in zip(rec.times, rec.times[1:])]
    return intervals[:-1]  # the last one includes the final evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default 20)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating bare/Trainer rounds (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cfg = ModelConfig(**REFERENCE)
    batch, T = args.batch_size, cfg.block_size
    text = demo_corpus(n_stories=6000)
    tok = Tokenizer.train([text], vocab_size=cfg.vocab_size)
    bare, trainer = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ds = prepare_texts([text], tok, Path(tmp) / "ds", seq_len=T)
        for r in range(args.rounds):  # alternate, so a change in machine load hits both
            bare += bare_step_times(cfg, batch, args.steps + 2, device)[2:]  # drop warm-up steps
            trainer += trainer_step_times(cfg, tok, ds, batch, args.steps + 2, device, Path(tmp) / f"run{r}")[2:]
    tps_bare = batch * T / statistics.median(bare)
    tps_trainer = batch * T / statistics.median(trainer)
    peak = measured_peak_flops(device.type)
    flops = cfg.flops_per_token(T)
    print(f"\nreference config ({cfg.num_parameters() / 1e6:.1f}M parameters), batch {batch}x{T}, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
          + (f"{len(bare)} steps each" if len(bare) == len(trainer)
             else f"{len(bare)} bare and {len(trainer)} Trainer steps"))
    print(f"  measured matmul peak {peak / 1e9:8.1f} GFLOP/s ({'fp32' if device.type == 'cpu' else 'bf16'})")
    print(f"  bare model step      {tps_bare:8.0f} tok/s   MFU {flops * tps_bare / peak:6.1%}")
    print(f"  lmlab Trainer        {tps_trainer:8.0f} tok/s   MFU {flops * tps_trainer / peak:6.1%}")
    ratio = tps_trainer / tps_bare
    print(f"  Trainer / bare       {ratio:8.1%}   target >= 90%: {'PASS' if ratio >= 0.9 else 'BELOW'}")


if __name__ == "__main__":
    main()
