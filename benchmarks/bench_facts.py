"""Knowledge lab: wall time and steps/s of the experiments at CPU scale (target: three phases <= 5 min).

    python benchmarks/bench_facts.py                      # three phases at the default scale (3 seeds)
    python benchmarks/bench_facts.py --experiments all --quick
    python benchmarks/bench_facts.py --threads-vs-processes   # 1 run x 2 threads against 2 runs x 1 thread

Prints, per experiment, the wall time, the steps of all its runs per second, and the per-run steps/s; also
the machine's load average, since other work on a shared 2-core machine slows everything down.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from lmlab.configs import parse_seeds
from lmlab.lab.facts.experiments import EXPERIMENTS, Scale, run_experiment
from lmlab.lab.facts.runner import run_many

TARGET_SEEDS = [0, 1, 2]  # the target's "default CPU scale": three phases, these seeds, not --quick


def threads_vs_processes(steps: int) -> None:
    """The peer for run_many's choice: one 2-thread run against two 1-thread runs at once, same total work."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Scale(steps=steps, eval_every=steps).run(0, probes=False)
        torch.set_num_threads(2)
        from lmlab.lab.facts.runner import run_one
        t0 = time.perf_counter()
        run_one(cfg, Path(tmp) / "a")
        one = 2 * (time.perf_counter() - t0)  # two runs in a row
        t0 = time.perf_counter()
        run_many([(cfg, Path(tmp) / "b"), (cfg, Path(tmp) / "c")], workers=2)
        two = time.perf_counter() - t0
    print(f"2 runs x {steps} steps: sequential with 2 threads {one:.1f} s, parallel 1 thread each {two:.1f} s "
          f"(ratio {one / two:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiments", default="phases", help=f"comma list of {', '.join(EXPERIMENTS)} or all")
    p.add_argument("--seeds", default="0,1,2", help="seeds: 0,1,2 (a list), 0-4 (a range) or 3 (default 0,1,2)")
    p.add_argument("--quick", action="store_true", help="the --quick sizes")
    p.add_argument("--out", help="keep the results here (default: a temporary folder)")
    p.add_argument("--threads-vs-processes", action="store_true", help="also time 2 threads vs 2 processes")
    args = p.parse_args()
    names = list(EXPERIMENTS) if args.experiments == "all" else args.experiments.split(",")
    # both checked before any run, so a typo costs nothing
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        p.error(f"unknown experiment {unknown[0]!r}; known: {', '.join(EXPERIMENTS)} or all")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    if args.threads_vs_processes:
        threads_vs_processes(300)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for name in names:
            t0 = time.perf_counter()
            res = run_experiment(name, seeds, root / name, args.quick)
            wall = time.perf_counter() - t0
            speed = res.get("speed", {})
            per_run = speed.get("steps_per_s_per_run")
            total = speed.get("steps_per_s_total")
            print(f"{name:14s} wall {wall:7.1f} s | steps/s all runs {total or float('nan'):7.1f} | per run "
                  f"{per_run or float('nan'):6.1f} | {res.get('holds')} | load {os.getloadavg()[0]:.2f}")
            if name == "phases" and seeds == TARGET_SEEDS and not args.quick:
                print(f"  three phases {'within' if wall <= 300 else 'OVER'} the 5-minute target ({wall:.0f} s)")
            elif name == "phases":
                print(f"  three phases in {wall:.0f} s; not the target's setting (seeds 0,1,2, not --quick)")


if __name__ == "__main__":
    main()
