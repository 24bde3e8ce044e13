"""Web-app generation latency while a training job runs, and 20 concurrent generation requests.

    python benchmarks/bench_server.py            # ~2-3 minutes on a 2-core CPU
    python benchmarks/bench_server.py --quick    # fewer requests

Starts a real `lmlab serve` (uvicorn, loopback only) on a temporary workspace, trains a tiny model
(gpt2-tiny, 30 steps) so there is something to serve, then measures POST /api/v1/generate for 64 new
tokens (EOS ignored, so every request does exactly 64 decoding steps):

1. idle server: sequential requests, p50/p95 latency;
2. the same while a training job (another tiny model, its own process) runs beside it;
3. 20 concurrent requests while the job runs: all must return 200; p50/p95 and wall time.

The peer measured in the same run is the library itself: `lmlab.generate` on the same weights in this
process, no HTTP, one intra-op thread like the server (`lmlab serve --torch-threads 1`); the ratio is
what serving adds (HTTP, JSON, thread hand-off, and the CPU the training job takes). Targets are
printed, not asserted: every request succeeds; p95 under training stays within 5x the in-process time
on this 2-core machine (the job takes half the cores).
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
from test_server_support import BOOK, ServerProcess, kill_run_process, wait_for  # noqa: E402

from lmlab.models import GenerationConfig, generate  # noqa: E402
from lmlab.models.io import load_pretrained  # noqa: E402

TOKENS = 64
REQUEST = {"model": "served", "prompt": "Once upon a time", "max_new_tokens": TOKENS, "temperature": 0.8,
           "top_k": 40, "stop_at_eos": False, "seed": 1}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def timed_request(c, body) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    r = c.post("/api/v1/generate", json=body)
    dt = time.perf_counter() - t0
    return dt, r.status_code, (r.json().get("new_tokens", 0) if r.status_code == 200 else 0)


def sequential(c, n: int) -> list[float]:  # (warm-up)
    out = []
    for i in range(n):
        dt, status, tokens = timed_request(c, {**REQUEST, "seed": i})
        assert status == 200 and tokens == TOKENS, (status, tokens)
        out.append(dt)
    return out


def report(label: str, times: list[float]) -> None:
    print(f"{label:<44} n={len(times):>3}  p50 {1000 * pct(times, .5):7.1f} ms  p95 {1000 * pct(times, .95):7.1f} ms"
          f"  ({TOKENS / pct(times, .5):6.0f} tokens/s at p50)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sequential requests")
    args = ap.parse_args()
    n = 10 if args.quick else 30
    ws = Path(tempfile.mkdtemp(prefix="lmlab-bench-server-"))
    server = ServerProcess(ws, "--max-jobs", "2").start()
    job_pid = None
    try:
        with server.client() as c:
            c.post("/api/v1/books", files={"file": ("tales.txt", BOOK.encode(), "text/plain")})
            for name in ("served", "training"):
                c.post("/api/v1/models", json={"name": name, "preset": "gpt2-tiny", "vocab_size": 512})
            run = c.post("/api/v1/runs", json={"model": "served", "books": ["tales.txt"], "max_steps": 30,
                                               "batch_size": 8, "seq_len": 64, "eval_batches": 2}).json()
            wait_for(lambda: c.get(f"/api/v1/runs/{run['id']}").json()["status"] == "completed", 300, 0.5,
                     "the model to serve")

            # the peer: the library in this process, same weights, same settings, same threads as the server
            torch.set_num_threads(1)
            model, tok = load_pretrained(ws / "models" / "served")
            cfg = GenerationConfig(max_new_tokens=TOKENS, temperature=0.8, top_k=40, stop_at_eos=False, seed=1)

            def library() -> float:
                t0 = time.perf_counter()
                generate(model, tok, REQUEST["prompt"], cfg)
                return time.perf_counter() - t0

            def interleaved() -> tuple[list[float], list[float]]:
                """Peer and server in turn (A B A B ...), so load from elsewhere hits both alike."""
                lib, srv = [], []
                for i in range(n):
                    lib.append(library())
                    dt, status, tokens = timed_request(c, {**REQUEST, "seed": i})
                    assert status == 200 and tokens == TOKENS, (status, tokens)
                    srv.append(dt)
                return lib, srv

            library()
            sequential(c, 2)  # warm-up: the server loads the model once
            lib_idle, idle = interleaved()

            job = c.post("/api/v1/runs", json={"model": "training", "books": ["tales.txt"], "max_steps": 1_000_000,
                                               "batch_size": 8, "seq_len": 64, "eval_every": 0,
                                               "save_every": 0}).json()
            wait_for(lambda: c.get(f"/api/v1/runs/{job['id']}").json()["current_step"] >= 5, 300, 0.5,
                     "the training job to run")
            job_pid = c.get(f"/api/v1/runs/{job['id']}").json()["pid"]
            lib_busy, busy = interleaved()

            with ThreadPoolExecutor(20) as pool:
                t0 = time.perf_counter()
                results = list(pool.map(lambda i: timed_request(c, {**REQUEST, "seed": 100 + i}), range(20)))
                wall = time.perf_counter() - t0
            job_state = c.get(f"/api/v1/runs/{job['id']}").json()
            c.post(f"/api/v1/runs/{job['id']}/cancel")

        print(f"lmlab serve, tiny model ({model.num_parameters():,} parameters), {TOKENS} new tokens per request")
        report("library generate(), idle (peer)", lib_idle)
        report("POST /api/v1/generate, idle server", idle)
        report("library generate(), training running (peer)", lib_busy)
        report("POST /api/v1/generate, training running", busy)
        conc = [dt for dt, _, _ in results]
        ok = sum(status == 200 and tokens == TOKENS for _, status, tokens in results)
        report("20 concurrent requests, training running", conc)
        print(f"20 concurrent: {ok}/20 succeeded with {TOKENS} tokens, wall {wall:.2f} s "
              f"({20 * TOKENS / wall:.0f} tokens/s aggregate); training job at step {job_state['current_step']}, "
              f"status {job_state['status']}")
        ratio_idle = pct(idle, .5) / pct(lib_idle, .5)
        ratio_busy = pct(busy, .5) / pct(lib_busy, .5)
        ratio_p95 = pct(busy, .95) / pct(lib_idle, .5)
        print(f"ratios (server / library, same run): idle p50 {ratio_idle:.2f}x; training p50 {ratio_busy:.2f}x; "
              f"training p95 / idle library p50 {ratio_p95:.2f}x "
              f"[{'PASS' if ratio_p95 <= 5 else 'BELOW'} target <= 5x]")
        print(f"all concurrent requests succeeded: {'PASS' if ok == 20 else 'FAIL'}")
    finally:
        kill_run_process(job_pid)
        server.stop()


if __name__ == "__main__":
    main()
