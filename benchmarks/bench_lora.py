"""LoRA against full fine-tuning on the same data and steps: validation loss, and the share of trained parameters.

    python benchmarks/bench_lora.py                        # ~10 minutes on a 2-core CPU
    python benchmarks/bench_lora.py --base lmlab-demo/final --steps 300

The base is a demo-sized model (the `lmlab demo` Llama: 4 layers, d 128, vocab 1024) pre-trained on the generated
tales (or given with --base). Both contenders fine-tune a copy of it with the Trainer on a different text, this
repository's own documentation (README.md, docs/*.md: technical English the tales never show), for the same
steps, batch, schedule and seed; LoRA trains rank-8 adapters on every block linear (alpha 16) with the base frozen,
full fine-tuning trains every weight. Each gets its usual learning rate (LoRA's is higher: its update starts at
zero and is scaled by alpha / r; Hu et al. 2021 tune it per method too). The validation loss is the mean over
every held-out window of the documentation. Target (issue 16): LoRA within 5% of full fine-tuning at rank 8 and
<= 2% trainable parameters; the script also prints the largest rank that stays within 2% for this model.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import torch

from lmlab.data import TokenDataset, prepare_texts
from lmlab.models import Transformer
from lmlab.models.io import load_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.train import TrainConfig, train
from lmlab.train.demo_corpus import demo_corpus
from lmlab.train.recipes import demo_model_config
from lmlab.tune.lora import LoRAConfig, apply_lora, count_parameters

ROOT = Path(__file__).resolve().parent.parent


def val_loss(model: Transformer, ds: TokenDataset, seq_len: int) -> float:
    model.eval()
    with torch.no_grad():
        losses = [(model(x, y).loss.item(), x.shape[0]) for x, y in ds.eval_batches(16, seq_len)]
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


def pretrained_base(steps: int, work: Path) -> tuple[Transformer, Tokenizer]:
    text = demo_corpus(seed=0)
    tok = Tokenizer.train([text], kind="bpe", vocab_size=1024)
    cfg = demo_model_config(tok.vocab_size)
    ds = prepare_texts([text], tok, work / "tales", seq_len=cfg.block_size)
    torch.manual_seed(0)
    model = Transformer(cfg)
    train(model, tok, ds, TrainConfig(max_steps=steps, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=30,
                                      eval_every=steps, eval_batches=8, log_every=steps, save_every=0, seed=0),
          work / "base")
    return load_pretrained(work / "base" / "final")


def fine_tune(base: Transformer, tok: Tokenizer, ds: TokenDataset, out: Path, steps: int, lr: float,
              lora: LoRAConfig | None) -> tuple[float, int, int]:
    model = copy.deepcopy(base).train()
    if lora is not None:
        torch.manual_seed(0)
        apply_lora(model, lora)
    trainable, total = count_parameters(model)
    train(model, tok, ds, TrainConfig(max_steps=steps, batch_size=16, lr=lr, min_lr=lr / 10, warmup_steps=10,
                                      weight_decay=0.0 if lora else 0.1, eval_every=steps, eval_batches=4,
                                      log_every=steps, save_every=0, seed=1), out)
    return val_loss(model, ds, base.config.block_size), trainable, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", help="a model directory to fine-tune (default: pre-train the demo model here)")
    p.add_argument("--base-steps", type=int, default=600, help="pre-training steps of the demo base")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps, both contenders")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr-full", type=float, default=1e-3)
    p.add_argument("--lr-lora", type=float, default=1e-2)
    args = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, tok = load_pretrained(args.base) if args.base else pretrained_base(args.base_steps, work)
        docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        ds = prepare_texts([d.read_text(encoding="utf-8") for d in docs], tok, work / "docs",
                           names=[d.name for d in docs], val_fraction=0.1, seq_len=base.config.block_size)
        print(f"fine-tuning text: {len(docs)} documentation files, {ds.train_tokens:,} train / {ds.val_tokens:,} "
              f"val tokens; base: {base.num_parameters():,} parameters, val loss {val_loss(base, ds, 128):.4f}")
        full, _, total = fine_tune(base, tok, ds, work / "full", args.steps, args.lr_full, None)
        lora_cfg = LoRAConfig(rank=args.rank)
        lora, trainable, with_adapters = fine_tune(base, tok, ds, work / "lora", args.steps, args.lr_lora, lora_cfg)
    share = trainable / with_adapters
    fits = [r for r in range(1, 65) if (lambda n: n[0] / n[1])(count_parameters(apply_lora(
        copy.deepcopy(base), LoRAConfig(rank=r)))) <= 0.02]
    print(f"full fine-tuning  lr {args.lr_full:g}: val loss {full:.4f} ({total:,} trainable parameters)")
    print(f"LoRA rank {args.rank} alpha {lora_cfg.alpha:g} lr {args.lr_lora:g}: val loss {lora:.4f} "
          f"({trainable:,} trainable = {share:.2%} of {with_adapters:,})")
    print(f"LoRA / full val loss: {lora / full:.4f} (target <= 1.05); {args.steps} steps each")
    print(f"largest all-linear rank with <= 2% trainable parameters on this model: "
          f"{max(fits) if fits else 'none (rank 1 is above 2%)'}")


if __name__ == "__main__":
    main()
