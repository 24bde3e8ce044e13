"""Model speed against transformers on the same weights, measured in one run (fp32, CPU, default threads).

    python benchmarks/bench_model.py            # full: ~5 min on a 2-core CPU
    python benchmarks/bench_model.py --quick    # fewer repeats: ~2 min

1. Batch-1 greedy generation of 128 new tokens after a 16-token prompt, reference config: lmlab's
   `generate_ids` against `GPT2LMHeadModel.generate`, after checking both emit the same token ids; and
   lmlab against the memory-bandwidth bound (bytes read per token / bandwidth measured here).
2. Training step (forward + backward + AdamW step + zero_grad), tokens/s, lmlab against GPT2LMHeadModel
   (sdpa attention) on the same weights and batch, after checking both compute the same loss; reference
   config at 8x256 and tiny config at 32x128. MFU against an fp32 matmul peak measured here.

Every ratio compares timings taken in this run, ours and the peer's repeats interleaved (A B A B ...) so
that other load on the machine hits both alike; each figure is the median of the timed repeats after
warm-up, and "spread" is their interquartile range over the median (large on a busy machine). Targets
are printed as PASS / BELOW, never asserted. benchmarks/README.md says more.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import unittest.mock
from collections.abc import Callable
from pathlib import Path

import torch

from lmlab.interop.hf_mapping import hf_config_dict, to_hf_state_dict
from lmlab.models import ModelConfig, Transformer, fast, generate_ids, generation

REFERENCE = ModelConfig(family="gpt2", n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192)
TINY = ModelConfig(family="gpt2", n_layer=3, n_head=4, n_embd=64, block_size=128, vocab_size=1024)
PROMPT_LEN, NEW_TOKENS = 16, 128
LOOKUP = 10  # prompt-lookup draft length, for lmlab and transformers alike
ADAMW = dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)


# ---- measurement ----------------------------------------------------------------------------------

class Timing:
    """Seconds per call over the timed repeats: median, and the spread (interquartile range / median)."""

    def __init__(self, times: list[float]) -> None:
        self.median = statistics.median(times)
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [self.median] * 3
        self.spread = (q[2] - q[0]) / self.median


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time each fn, calling them in turn (A B A B ...) rather than A A ... B B ..., so a burst of outside
    load lands on every contender instead of on one of them."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(ts) for name, ts in times.items()}


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def matmul_peak(n: int = 2048, repeats: int = 7) -> float:
    """fp32 FLOP/s of one large square matmul: the most this CPU does with MKL at these threads."""
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    return 2 * n**3 / interleaved({"mm": lambda: torch.mm(a, b, out=c)}, repeats)["mm"].median


def memory_bandwidth(mib: int = 256, repeats: int = 7) -> tuple[float, float]:
    """(read, copy) bytes/s over a buffer of `mib` MiB (the default is far larger than most caches): a sum
    reads it once; a copy reads one buffer and writes another (counted as 2 x size)."""
    x = torch.ones(mib * 2**20 // 4)
    y = torch.empty_like(x)
    t = interleaved({"sum": lambda: x.sum(), "copy": lambda: y.copy_(x)}, repeats)
    size = x.numel() * 4
    return size / t["sum"].median, 2 * size / t["copy"].median


def load_note() -> str:
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    busy = "  (BUSY: other processes share these cores; absolute numbers are low, ratios still paired)" \
        if load > 1.25 * cores else ""
    return f"load average {load:.1f} on {cores} cores{busy}"


def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio >= target else "BELOW"


# ---- models ---------------------------------------------------------------------------------------

def build_pair(cfg: ModelConfig, seed: int = 0):
    """lmlab Transformer and transformers GPT2LMHeadModel holding the same weights."""
    import transformers
    torch.manual_seed(seed)
    ours = Transformer(cfg)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(cfg)))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight transfer failed: missing {missing}, unexpected {unexpected}")
    return ours, hf


def decode_bytes_per_token(model: Transformer, context: float) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) one decoding step must read: every matrix except the embedding tables
    (one row each), plus the head (the tied token table, read whole), norms and biases; and the cached keys
    and values of `context` positions."""
    cfg = model.config
    weights = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("tok_emb", "pos_emb")))
    weights += model.lm_head.weight.numel() if cfg.tie_embeddings else 0  # named tok_emb.weight when tied
    kv = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * context
    return 4 * weights, int(4 * kv)


# ---- 1. generation --------------------------------------------------------------------------------

def _has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def llama_cpp_greedy(model: Transformer, prompt: list[int], workdir: Path, dtype: str = "f32",
                     new_tokens: int = NEW_TOKENS) -> Callable[[], list[int]] | None:
    """Greedy decoding of the same weights in llama.cpp (llama-cpp-python, when installed), from lmlab's GGUF
    export at `dtype`: a C++ engine's speed on this CPU, for scale. None without llama_cpp."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import numpy as np

    from lmlab.interop import export_gguf, llama_cpp_without_repack
    from lmlab.models.io import save_pretrained
    from lmlab.tokenizers import Tokenizer

    # the export embeds a tokenizer; ids are fed directly, so any small one will do
    tok = Tokenizer.train(["the cat sat on the mat. " * 20], kind="bpe", vocab_size=300)
    path = export_gguf(save_pretrained(workdir / "model", model, tok), workdir / f"model-{dtype}.gguf",
                       dtype=dtype).path
    # llama-cpp-python 0.3.36 segfaults in the first decode of a quantized file on AMX CPUs unless llama.cpp's
    # extra CPU buffer types (its repacked layouts) are off: llama.cpp then runs its plain CPU kernels there
    with llama_cpp_without_repack(llama_cpp) if dtype != "f32" and _has_amx() else contextlib.nullcontext():
        # n_threads_batch (the prompt's threads) defaults to every CPU in llama-cpp-python: both are torch's
        # count, so llama.cpp uses the cores lmlab and transformers are given
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=PROMPT_LEN + new_tokens,
                              n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(),
                              verbose=False)
    vocab = (llm.n_vocab(),)

    def run() -> list[int]:
        llm.reset()
        llm.eval(prompt)
        out: list[int] = []
        for _ in range(new_tokens):  # the last position's logits (llama.cpp keeps no others here)
            out.append(int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=vocab).argmax()))
            llm.eval(out[-1:])
        return out
    return run


def bench_generation(repeats: int, bandwidth: float) -> list[tuple[str, float, float]]:
    cfg = REFERENCE
    ours, hf = build_pair(cfg)
    ours.eval()
    hf.eval()
    w_bytes, kv_bytes = decode_bytes_per_token(ours, PROMPT_LEN + NEW_TOKENS / 2)
    # What one decoding step reads (~54 MiB) may stay in a large last-level cache between steps: then
    # the bound is the read bandwidth over a buffer of that size, not DRAM's.
    resident_bw = memory_bandwidth(mib=max(1, round((w_bytes + kv_bytes) / 2**20)))[0]
    prompt = torch.randint(4, cfg.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    prompt_list = prompt[0].tolist()
    hf_kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=NEW_TOKENS,
                 min_new_tokens=NEW_TOKENS, pad_token_id=0)

    def run_ours() -> list[int]:
        return generate_ids(ours, [prompt_list], do_sample=False, max_new_tokens=NEW_TOKENS, stop_at_eos=False)[0]

    def run_hf() -> list[int]:
        with torch.inference_mode():
            return hf.generate(prompt, **hf_kw)[0, PROMPT_LEN:].tolist()

    def run_ours_modules() -> list[int]:
        # one-token steps through the nn.Modules of model.py, without fast.Decoder
        with unittest.mock.patch.object(generation, "decoder", lambda model, keep=True: None):
            return run_ours()

    def run_ours_lookup() -> list[int]:
        return generate_ids(ours, [prompt_list], do_sample=False, max_new_tokens=NEW_TOKENS, stop_at_eos=False,
                            prompt_lookup=LOOKUP)[0]

    def run_hf_lookup() -> list[int]:
        with torch.inference_mode():
            return hf.generate(prompt, prompt_lookup_num_tokens=LOOKUP, **hf_kw)[0, PROMPT_LEN:].tolist()

    (ids_ours, first_ours), (ids_hf, first_hf) = timed(run_ours), timed(run_hf)  # first calls: warm-up
    agree = sum(a == b for a, b in zip(ids_ours, ids_hf))
    same_modules = run_ours_modules() == ids_ours
    contenders = {"lmlab": run_ours, "transformers": run_hf, "lmlab_modules": run_ours_modules,
                  "lmlab_lookup": run_ours_lookup, "transformers_lookup": run_hf_lookup}
    with tempfile.TemporaryDirectory() as tmp:
        run_cpp = llama_cpp_greedy(ours, prompt_list, Path(tmp))
        same_cpp = run_cpp is not None and run_cpp() == ids_ours
        if run_cpp is not None:
            contenders["llama.cpp"] = run_cpp
        t = interleaved(contenders, repeats)
        contenders.pop("llama.cpp", None)
        del run_cpp  # the last references to the llama.cpp model: it is freed before its file goes
    same_lookup = run_ours_lookup() == ids_ours and run_hf_lookup() == ids_hf
    tps_ours, tps_hf = NEW_TOKENS / t["lmlab"].median, NEW_TOKENS / t["transformers"].median
    bound = bandwidth / (w_bytes + kv_bytes)
    bound_resident = resident_bw / (w_bytes + kv_bytes)

    print(f"\n[1] batch-1 greedy generation: {PROMPT_LEN}-token prompt + {NEW_TOKENS} new tokens, reference "
          f"config ({ours.num_parameters() / 1e6:.1f}M parameters)")
    same = "yes" if ids_ours == ids_hf else f"NO ({agree}/{NEW_TOKENS} positions agree)"
    print(f"    same token ids as transformers: {same}")
    print(f"    {'':26}{'tok/s':>9}{'ms/token':>10}{'spread':>8}{'vs HF':>8}{'first call':>12}")
    print(f"    {'lmlab generate_ids':26}{tps_ours:9.1f}{1e3 / tps_ours:10.2f}{t['lmlab'].spread:8.0%}"
          f"{tps_ours / tps_hf:7.2f}x{first_ours:11.2f}s")
    tpm = NEW_TOKENS / t["lmlab_modules"].median
    print(f"    {'lmlab, module path':26}{tpm:9.1f}{1e3 / tpm:10.2f}{t['lmlab_modules'].spread:8.0%}"
          f"{tpm / tps_hf:7.2f}x   (one-token steps through model.py's modules, not fast.Decoder; same ids: "
          f"{'yes' if same_modules else 'NO'})")
    print(f"    {'transformers generate':26}{tps_hf:9.1f}{1e3 / tps_hf:10.2f}{t['transformers'].spread:8.0%}"
          f"{1.0:7.2f}x{first_hf:11.2f}s")
    if "llama.cpp" in t:
        tpc = NEW_TOKENS / t["llama.cpp"].median
        print(f"    {'llama.cpp, GGUF f32':26}{tpc:9.1f}{1e3 / tpc:10.2f}{t['llama.cpp'].spread:8.0%}"
              f"{tpc / tps_hf:7.2f}x   (llama-cpp-python on lmlab's f32 export of the same weights, fed ids, "
              f"argmax in numpy; same ids: {'yes' if same_cpp else 'NO'}; a C++ engine, for scale)")
    else:
        print("    llama.cpp row skipped: llama-cpp-python is not installed (it comes with pip install -e '.[dev]')")
    print(f"    {'bound, DRAM bandwidth':26}{bound:9.1f}{1e3 / bound:10.2f}   ({w_bytes / 2**20:.1f} MiB weights + "
          f"{kv_bytes / 2**20:.1f} MiB KV cache read per token at {bandwidth / 1e9:.1f} GB/s)")
    print(f"    {'bound, cache-resident':26}{bound_resident:9.1f}{1e3 / bound_resident:10.2f}   (the same bytes at "
          f"{resident_bw / 1e9:.1f} GB/s: a sum over a buffer of that size, which this CPU's caches may hold; "
          f"{bound_resident / tps_hf:.2f}x transformers)")
    print(f"    lmlab reaches {tps_ours / bound:.0%} of the DRAM bound and {tps_ours / bound_resident:.0%} of the "
          f"cache-resident one, transformers {tps_hf / bound:.0%} and {tps_hf / bound_resident:.0%}. "
          "(first call: lmlab also builds its transposed decode weights, kept while the model stays in eval mode)")
    tpl_ours, tpl_hf = NEW_TOKENS / t["lmlab_lookup"].median, NEW_TOKENS / t["transformers_lookup"].median
    print(f"    with prompt lookup ({LOOKUP}-token drafts; the same ids as plain greedy: "
          f"{'yes' if same_lookup else 'NO'}): lmlab {tpl_ours:.1f} tok/s ({tpl_ours / tps_hf:.2f}x plain HF), "
          f"transformers prompt_lookup_num_tokens={LOOKUP} {tpl_hf:.1f} tok/s; lmlab / HF both with lookup "
          f"{tpl_ours / tpl_hf:.2f}x")
    print("    (random weights decode greedily into loops that lookup drafts well: not a plain-greedy speed-up, "
          "and not counted against the target)")
    return [("generation: lmlab / transformers tok/s", tps_ours / tps_hf, 3.0)]


# ---- 2. training step -----------------------------------------------------------------------------

def bench_training(cfg: ModelConfig, batch: int, target: float, repeats: int, peak: float,
                   label: str) -> list[tuple[str, float, float]]:
    ours, hf = build_pair(cfg)
    fast.for_training(ours)  # the CPU fast paths the Trainer applies
    ours.train()
    hf.train()
    T = cfg.block_size
    x = torch.randint(4, cfg.vocab_size, (batch, T + 1), generator=torch.Generator().manual_seed(2))
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    # Both optimizers: the same hyper-parameters and the same groups (no decay on biases and norms).
    # Ours is the library's configure_optimizer (fused kernel). The peer gets torch.optim.AdamW's default
    # implementation (on CPU the per-tensor for-loop), and, as a second row, fused=True: the optimizer
    # transformers' own Trainer picks by default on torch >= 2.8 (TrainingArguments.optim).
    opt_ours = ours.configure_optimizer(**ADAMW)
    groups = [{"params": [p for p in hf.parameters() if p.dim() >= 2], "weight_decay": ADAMW["weight_decay"]},
              {"params": [p for p in hf.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt_hf = torch.optim.AdamW(groups, lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"])
    opt_hf_fused = torch.optim.AdamW(groups, lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"], fused=True)

    def step_ours() -> torch.Tensor:
        loss = ours(inputs, targets).loss
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss

    def hf_step(opt: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            # labels are already the next tokens; shift_labels tells HF's loss not to shift them again,
            # so both models average the same B*T cross-entropies.
            loss = hf(input_ids=inputs, labels=targets, shift_labels=targets).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return step

    loss_ours, loss_hf = step_ours().item(), hf_step(opt_hf)().item()  # first step: identical weights
    t = interleaved({"lmlab": step_ours, "hf": hf_step(opt_hf), "hf_fused": hf_step(opt_hf_fused)},
                    repeats, warmup=2)
    tokens, flops = batch * T, cfg.flops_per_token(T)
    print(f"\n[2] training step (forward + backward + AdamW + zero_grad), {label}, batch {batch}x{T}, "
          f"{flops / 1e6:.1f} MFLOP/token")
    print(f"    same loss on the first step: {'yes' if abs(loss_ours - loss_hf) < 1e-5 else 'NO'} "
          f"(lmlab {loss_ours:.6f}, transformers {loss_hf:.6f})")
    print(f"    {'':36}{'tok/s':>9}{'ms/step':>9}{'spread':>8}{'MFU':>7}{'vs HF':>8}")
    rows = [("lmlab (configure_optimizer)", "lmlab"), ("transformers + AdamW (torch default)", "hf"),
            ("transformers + AdamW(fused=True)", "hf_fused")]
    for name, key in rows:
        m = t[key].median
        print(f"    {name:36}{tokens / m:9.0f}{1e3 * m:9.1f}{t[key].spread:8.0%}{flops * tokens / m / peak:7.1%}"
              f"{t['hf'].median / m:7.2f}x")
    short = label.split(" ")[0]
    return [(f"train {short}: lmlab / transformers (torch-default AdamW)", t["hf"].median / t["lmlab"].median,
             target),
            (f"train {short}: lmlab / transformers (fused AdamW)", t["hf_fused"].median / t["lmlab"].median, target)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed repeats (3 instead of 7)")
    parser.add_argument("--only", choices=["generation", "training"], help="run one of the two parts")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    import transformers
    print(f"lmlab model benchmark: fp32, CPU, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, {'quick' if args.quick else 'full'} ({repeats} timed repeats)")
    print(f"    {load_note()}")
    peak = matmul_peak()
    read_bw, copy_bw = memory_bandwidth()
    print(f"    fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3); memory bandwidth {read_bw / 1e9:.1f} GB/s read "
          f"(sum), {copy_bw / 1e9:.1f} GB/s copy (read + write), 256 MiB buffers")
    results = []
    if args.only != "training":
        results += bench_generation(repeats, max(read_bw, copy_bw))
    if args.only != "generation":
        results += bench_training(REFERENCE, 8, 1.0, repeats, peak, "reference (6L, d384, ctx 256, vocab 8192)")
        # a tiny step is ~10x shorter, so it gets more repeats to average out the machine's noise
        results += bench_training(TINY, 32, 1.3, 2 * repeats + 1, peak, "tiny (3L, d64, ctx 128, vocab 1024)")
    print(f"\nTargets (speed-ups measured above)    {load_note()}")
    for name, ratio, target in results:
        print(f"    {name:58}{ratio:6.2f}x  target >= {target:.1f}x  {verdict(ratio, target)}")


if __name__ == "__main__":
    main()
