"""MinHash dedup: lmlab's `dedup_texts` against datasketch (MinHash + MinHashLSH) on the same 1 KB documents,
measured in one run, and peak memory while deduplicating a large corpus in a child process.

    python benchmarks/bench_dedup.py                 # throughput on 4,000 documents, then 100 MB (~2 min, 2 cores)
    python benchmarks/bench_dedup.py --mb 20 --docs 2000   # smaller, on a loaded machine

Both sides do the same work on one thread: split into words, hash every distinct word 5-gram once (SHA-1),
112 permutations (14 bands x 8 rows), LSH buckets, candidate pairs. datasketch: `MinHash.generator` (the
permutations made once, `update_batch` per document), `MinHashLSH.insert`, then `query` for every document;
lmlab additionally finds exact duplicates and builds the clusters. The candidate pairs must be equal (the
signatures are bit-identical). Figures are the median of interleaved repeats (A B A B ...), per wall second and
per CPU-second of the process (on a loaded machine the latter is the per-core figure). Targets (issue 18):
>= 2,000 documents of 1 KB per second per core; 100 MB deduplicated with peak RSS under 2 GB (ru_maxrss of a
child that generates the corpus and deduplicates it; the corpus itself, as Python strings, is part of that
peak), judged only at --mb 100.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from lmlab.data.dedup import DedupConfig, candidate_pairs, dedup_texts, shingles

TARGET_MB = 100  # issue 18: 100 MB deduplicated under 2 GB


def corpus(n_docs: int, seed: int = 0, doc_bytes: int = 1000) -> list[str]:
    """Documents of ~doc_bytes from a Zipf-like vocabulary; 5% are exact copies and 10% near copies (3% of
    words replaced) of earlier documents, so there is something to find."""
    rng = np.random.default_rng(seed)
    vocab = np.array(["".join(rng.choice(list("etaoinshrdlucmfwyp"), rng.integers(2, 9))) for _ in range(20000)])
    p = 1 / np.arange(1, len(vocab) + 1)
    words_per_doc = doc_bytes // 6
    docs: list[str] = []
    for i in range(n_docs):
        if i % 1000 == 0:  # one draw per thousand documents: choice(p=...) costs O(vocabulary) per call
            drawn = rng.choice(len(vocab), (1000, words_per_doc), p=p / p.sum())
        r = rng.random()
        if i > 10 and r < 0.05:
            docs.append(docs[rng.integers(i)])
            continue
        if i > 10 and r < 0.15:
            w = docs[rng.integers(i)].split()
            for k in rng.integers(0, len(w), max(1, len(w) * 3 // 100)):
                w[k] = vocab[rng.integers(len(vocab))]
        else:
            w = vocab[drawn[i % 1000]].tolist()
        docs.append(" ".join(w)[:doc_bytes])
    return docs


def datasketch_pairs(texts: list[str], cfg: DedupConfig) -> set[tuple[int, int]]:
    from datasketch import MinHash, MinHashLSH
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
    # MinHash.generator makes the permutations once and copies them per document, as lmlab does; a new
    # MinHash(...) per document regenerates them (113 us per document here).
    sketches = list(MinHash.generator(([s.encode() for s in shingles(t, cfg.ngram)] for t in texts),
                                      num_perm=cfg.num_perm, seed=cfg.seed))
    for i, m in enumerate(sketches):
        lsh.insert(i, m)
    return {(min(i, j), max(i, j)) for i, m in enumerate(sketches) for j in lsh.query(m) if j != i}


def lmlab_pairs(texts: list[str], cfg: DedupConfig) -> set[tuple[int, int]]:
    from lmlab.data.dedup import signatures
    return {tuple(p) for p in candidate_pairs(signatures(texts, cfg), cfg.bands, cfg.rows).tolist()}


def memory_child(mb: float) -> None:
    t0 = time.perf_counter()
    texts = corpus(int(mb * 1000), seed=1)
    size = sum(len(t.encode()) for t in texts)
    rss_corpus = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t1, c1 = time.perf_counter(), time.process_time()
    r = dedup_texts(texts)
    t2, c2 = time.perf_counter(), time.process_time()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"    {size / 1e6:.1f} MB in {len(texts):,} documents (generated in {t1 - t0:.0f} s, peak RSS "
          f"{rss_corpus:.0f} MiB): dedup {t2 - t1:.1f} s = {len(texts) / (t2 - t1):,.0f} docs/s "
          f"({len(texts) / (c2 - c1):,.0f} per CPU-second), removed "
          f"{r.stats['removed']:,} ({r.stats['exact_duplicates']:,} exact), {r.stats['clusters']:,} clusters")
    # The target is for 100 MB; a smaller corpus passing says nothing about it.
    verdict = (('PASS' if rss < 2048 else 'ABOVE') if mb == TARGET_MB
               else f"not the target's setting ({TARGET_MB} MB)")
    print(f"    peak RSS {rss:,.0f} MiB  target < 2048 MiB at {TARGET_MB} MB: {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=4000, help="documents of ~1 KB in the throughput run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mb", type=float, default=TARGET_MB, help="corpus size of the memory run (0: skip it)")
    ap.add_argument("--memory-child", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    cfg = DedupConfig()
    texts = corpus(args.docs)
    ours, theirs = lmlab_pairs(texts, cfg), datasketch_pairs(texts, cfg)
    assert ours == theirs, f"candidate pairs differ: {len(ours ^ theirs)}"
    fns = {"lmlab dedup_texts": lambda: dedup_texts(texts, cfg), "datasketch LSH": lambda: datasketch_pairs(texts, cfg)}
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    rate = {name: args.docs / statistics.median(ts) for name, ts in times.items()}
    cpu_rate = {name: args.docs / statistics.median(ts) for name, ts in cpu.items()}
    mean_bytes = sum(len(t.encode()) for t in texts) / len(texts)
    print(f"MinHash dedup, {args.docs:,} documents of {mean_bytes:.0f} bytes, 14 bands x 8 rows, one thread, "
          f"median of {args.repeats} interleaved repeats; {len(ours):,} candidate pairs, equal in both")
    for name, r in rate.items():
        print(f"    {name:20}{r:10,.0f} docs/s wall  {cpu_rate[name]:10,.0f} docs per CPU-second")
    wall, per_cpu = rate["lmlab dedup_texts"], cpu_rate["lmlab dedup_texts"]
    print(f"    lmlab / datasketch: {wall / rate['datasketch LSH']:.2f}x wall, "
          f"{per_cpu / cpu_rate['datasketch LSH']:.2f}x CPU; target >= 2,000 docs/s per core: "
          f"{'PASS' if wall >= 2000 else 'BELOW'} wall, {'PASS' if per_cpu >= 2000 else 'BELOW'} per CPU-second")
    if args.mb:
        print(f"memory: {args.mb:g} MB of ~1 KB documents in a child process")
        subprocess.run([sys.executable, __file__, "--memory-child", str(args.mb)], check=True)


if __name__ == "__main__":
    main()
