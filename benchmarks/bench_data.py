"""Batch sampling from a token file: lmlab's `TokenDataset.sample_batch` against nanoGPT's `get_batch` on the
same memmapped tokens, measured in one run.

    python benchmarks/bench_data.py             # ~10 s on a 2-core CPU

nanoGPT's train.py draws `torch.randint` start positions and stacks `torch.from_numpy(data[i:i+T+1])` per row.
lmlab draws a document (weighted by its training tokens) and a start inside it, and gathers every row at once
from a strided window view (src/lmlab/data/dataset.py); it must also keep windows out of the validation
region, which nanoGPT's separate train.bin does by construction. Both produce int64 (x, y) of shape (B, T).
Figures are the median of interleaved repeats (A B A B ...); a batch of 8 x 256 at 2000 calls/s is 4M
tokens/s, far above what the training step consumes on this machine. Target: lmlab >= 1.0x nanoGPT.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmlab.data import prepare_texts
from lmlab.tokenizers import Tokenizer
from lmlab.train.demo_corpus import demo_corpus


def nanogpt_get_batch(data: np.ndarray, batch_size: int, block_size: int,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch (train.py) on the CPU: one slice per row, stacked."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calls", type=int, default=200, help="calls per timed repeat")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text = demo_corpus(n_stories=2000, seed=0)
        tok = Tokenizer.train([text], kind="bpe", vocab_size=1024)
        ds = prepare_texts([text], tok, Path(tmp) / "ds", seq_len=args.seq_len)
        train_tokens = np.asarray(ds.tokens[:ds.train_tokens])
        ours_g, peer_g = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        fns = {"lmlab sample_batch": lambda: ds.sample_batch(args.batch_size, args.seq_len, ours_g),
               "nanoGPT get_batch": lambda: nanogpt_get_batch(train_tokens, args.batch_size, args.seq_len, peer_g)}
        for fn in fns.values():  # warm-up, and the same output shapes
            x, y = fn()
            assert x.shape == y.shape == (args.batch_size, args.seq_len) and x.dtype == torch.int64
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                times[name].append((time.perf_counter() - t0) / args.calls)
    rate = {name: 1 / statistics.median(ts) for name, ts in times.items()}
    print(f"sample a batch of {args.batch_size} x {args.seq_len} tokens ({ds.train_tokens:,} training tokens), "
          f"median of {args.repeats} interleaved repeats of {args.calls} calls")
    for name, r in rate.items():
        print(f"    {name:22}{r:10.0f} calls/s  {r * args.batch_size * args.seq_len / 1e6:8.1f} M tokens/s")
    ratio = rate["lmlab sample_batch"] / rate["nanoGPT get_batch"]
    print(f"    lmlab / nanoGPT: {ratio:.2f}x  target >= 1.0x  {'PASS' if ratio >= 1.0 else 'BELOW'}")


if __name__ == "__main__":
    main()
