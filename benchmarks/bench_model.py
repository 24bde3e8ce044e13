"""Model speed against transformers on the same weights, measured in one run (fp32).

    python benchmarks/bench_model.py            # full
    python benchmarks/bench_model.py --quick    # fewer repeats

1. Batch-1 greedy generation, 128 new tokens, reference config: lmlab vs GPT2LMHeadModel.generate;
   also tokens/s against the memory-bandwidth bound (weight bytes per token / measured bandwidth).
2. Training step (forward + backward + AdamW), tokens/s, lmlab vs GPT2LMHeadModel, reference and tiny
   configs; MFU against a measured fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmlab.interop.hf_mapping import hf_config_dict, to_hf_state_dict
from lmlab.models import ModelConfig, Transformer, generate_ids

REFERENCE = ModelConfig(family="gpt2", n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192)
TINY = ModelConfig(family="gpt2", n_layer=3, n_head=4, n_embd=64, block_size=128, vocab_size=1024)


def timeit(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timeit(lambda: a @ b, 5)


def memory_bandwidth() -> float:
    x = torch.empty(64 * 2**20 // 4)  # 64 MiB, larger than the caches
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / timeit(lambda: y.copy_(x), 10)  # read + write


def pair(cfg: ModelConfig):
    import transformers
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(cfg)))
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    return ours, hf.eval()


def bench_generation(repeats: int) -> None:
    ours, hf = pair(REFERENCE)
    prompt = torch.randint(4, REFERENCE.vocab_size, (1, 16))
    n = 128
    ours_ids = generate_ids(ours, [prompt[0].tolist()], do_sample=False, max_new_tokens=n, stop_at_eos=False)[0]
    kw = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    with torch.inference_mode():
        hf_ids = hf.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)[0, 16:].tolist()
    t_ours = timeit(lambda: generate_ids(ours, [prompt[0].tolist()], do_sample=False, max_new_tokens=n,
                                         stop_at_eos=False), repeats)

    def run_hf():
        with torch.inference_mode():
            hf.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
    t_hf = timeit(run_hf, repeats)
    bw = memory_bandwidth()
    weight_bytes = sum(p.numel() for p in ours.parameters()) * 4
    bound = bw / weight_bytes
    print(f"\n[1] batch-1 greedy generation, {n} new tokens, reference config "
          f"({ours.num_parameters() / 1e6:.1f}M params); same tokens as HF: {ours_ids == hf_ids}")
    print(f"    lmlab          {n / t_ours:8.1f} tok/s")
    print(f"    transformers   {n / t_hf:8.1f} tok/s")
    ratio = t_hf / t_ours
    print(f"    ratio          {ratio:8.2f}x   target >= 3x: {'PASS' if ratio >= 3 else 'BELOW'}")
    print(f"    bandwidth bound {bound:7.1f} tok/s ({weight_bytes / 2**20:.1f} MiB weights / {bw / 1e9:.1f} GB/s); "
          f"lmlab reaches {n / t_ours / bound:.0%} of it")


def bench_training(cfg: ModelConfig, batch: int, target: float, repeats: int, peak: float, label: str) -> None:
    ours, hf = pair(cfg)
    ours.train()
    hf.train()
    T = cfg.block_size
    x = torch.randint(4, cfg.vocab_size, (batch, T + 1))
    inputs, targets = x[:, :-1], x[:, 1:]
    opt_ours = ours.configure_optimizer(lr=3e-4, weight_decay=0.1) if hasattr(ours, "configure_optimizer") \
        else torch.optim.AdamW(ours.parameters(), lr=3e-4, weight_decay=0.1)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=3e-4, weight_decay=0.1)

    def step_ours():
        loss = ours(inputs, targets).loss
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():
        loss = hf(input_ids=inputs, labels=inputs).loss  # HF shifts labels inside
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    tokens = batch * T
    t_ours, t_hf = timeit(step_ours, repeats, warmup=2), timeit(step_hf, repeats, warmup=2)
    mfu = cfg.flops_per_token(T) * tokens / t_ours / peak
    ratio = t_hf / t_ours
    print(f"\n[2] train step (fwd+bwd+AdamW), {label}, batch {batch}x{T}")
    print(f"    lmlab          {tokens / t_ours:10.0f} tok/s   MFU {mfu:.1%} of {peak / 1e9:.0f} GFLOP/s")
    print(f"    transformers   {tokens / t_hf:10.0f} tok/s")
    print(f"    ratio          {ratio:10.2f}x   target >= {target}x: {'PASS' if ratio >= target else 'BELOW'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    import transformers
    peak = matmul_peak()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    bench_generation(repeats)
    bench_training(REFERENCE, 8, 1.0, repeats, peak, "reference (6L, d384, ctx 256, vocab 8192)")
    bench_training(TINY, 32, 1.3, repeats, peak, "tiny (3L, d64, ctx 128, vocab 1024)")


if __name__ == "__main__":
    main()
