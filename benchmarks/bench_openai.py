"""The OpenAI-compatible API under load: 20 chat requests of 64 new tokens each, sent at once (decoded
together by the batching engine) against the same 20 requests sent one by one.

    python benchmarks/bench_openai.py            # about a minute on a 2-core CPU
    python benchmarks/bench_openai.py --requests 8 --tokens 32

Starts a real `lmlab serve` (uvicorn, loopback only, an API token, one intra-op thread as it runs by default)
on a temporary workspace holding a model of the reference config of bench_model.py (GPT-2, 6 layers, d384,
context 256, vocabulary 8192; random weights, a byte-level BPE tokenizer of 8192 tokens trained on the demo book
and lmlab's own source files), and drives it with the official `openai` client. Every request samples with its
own seed, so both runs generate the same tokens (checked); throughput is the completion tokens of all requests
(usage) over the wall time. Target: the concurrent run has at least 3x the throughput of the one-by-one run,
judged only at its setting (20 requests x 64 tokens).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from bench_model import REFERENCE  # noqa: E402
from test_server_support import BOOK, ServerProcess  # noqa: E402

import lmlab  # noqa: E402
from lmlab.models import Transformer  # noqa: E402
from lmlab.models.io import save_pretrained  # noqa: E402
from lmlab.tokenizers import Tokenizer  # noqa: E402

TOKEN = "bench-openai-token"
TARGET_REQUESTS, TARGET_TOKENS = 20, 64


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=TARGET_REQUESTS, help="requests in each run (default 20)")
    p.add_argument("--tokens", type=int, default=TARGET_TOKENS, help="max_tokens of each request (default 64)")
    args = p.parse_args()
    from openai import OpenAI

    with tempfile.TemporaryDirectory(prefix="lmlab-bench-openai-") as tmp:
        ws = Path(tmp)
        # the demo book alone (18 KB) makes only ~900 tokens, lmlab's source (1.7 MB, up to ~12,000) makes
        # the reference config's 8192: the head, a large share of a step's work, is the reference's
        texts = [BOOK] + [p.read_text(encoding="utf-8") for p in sorted(Path(lmlab.__file__).parent.rglob("*.py"))]
        tok = Tokenizer.train(texts, kind="bpe", vocab_size=REFERENCE.vocab_size)
        if tok.vocab_size != REFERENCE.vocab_size:
            raise SystemExit(f"the tokenizer has {tok.vocab_size} tokens, not the reference's {REFERENCE.vocab_size}")
        cfg = REFERENCE
        torch.manual_seed(0)
        save_pretrained(ws / "models" / "reference", Transformer(cfg), tok)
        server = ServerProcess(ws, token=TOKEN).start()
        try:
            client = OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=600)
            prompts = [f"Story {i}: once upon a time" + " there was a fox" * (i % 4) for i in range(args.requests)]

            def ask(i: int) -> tuple[str, int]:
                messages = [{"role": "user", "content": prompts[i]}]
                r = client.chat.completions.create(model="reference", messages=messages, max_tokens=args.tokens,
                                                   temperature=0.8, seed=i)
                return r.choices[0].message.content, r.usage.completion_tokens

            ask(0)  # load the model and start its engine
            t0 = time.perf_counter()
            alone = [ask(i) for i in range(args.requests)]
            t_alone = time.perf_counter() - t0
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.requests) as pool:
                together = list(pool.map(ask, range(args.requests)))
            t_together = time.perf_counter() - t0
            with server.client() as c:
                stats = c.get("/v1/batching").json()["data"][0]
        finally:
            server.stop()
    assert together == alone, "the concurrent run generated other text than the one-by-one run"
    tokens = sum(n for _, n in alone)
    print(f"{args.requests} chat requests x {args.tokens} tokens (reference config, vocabulary {cfg.vocab_size}, "
          f"random weights; "
          f"{tokens} completion tokens in each run, identical text)")
    print(f"  one by one:  {t_alone:7.2f} s  {tokens / t_alone:8.1f} tok/s")
    print(f"  concurrent:  {t_together:7.2f} s  {tokens / t_together:8.1f} tok/s  (most rows in one step: "
          f"{stats['max_rows']})")
    ratio = t_alone / t_together
    if (args.requests, args.tokens) == (TARGET_REQUESTS, TARGET_TOKENS):
        verdict = "met" if ratio >= 3 else "NOT met"
    else:
        verdict = f"not the target's setting ({TARGET_REQUESTS} requests x {TARGET_TOKENS} tokens)"
    print(f"  throughput ratio concurrent / one by one: {ratio:.2f}x (target >= 3x: {verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
