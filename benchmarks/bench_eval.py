"""Multiple-choice scoring: lmlab's native scorer against the lm-evaluation-harness bridge (`--model lmlab`) and
lm-eval's own `hf` model on the `lmlab export hf` copy of the same weights, measured in one run.

    python benchmarks/bench_eval.py             # 1,000 items; a few minutes on a 2-core CPU
    python benchmarks/bench_eval.py --quick     # 200 items

The model is the demo's (`lmlab demo`: a ~1M-parameter Llama, context 128) with untrained weights, which
score at the same speed as trained ones; the items are cloze items cut from the demo book by `lmlab eval
make-task`'s builder (4 choices each). All three use the same batch size and one process, and are built before
the timer. After a warm-up on a few items, the three are timed in turn (A B C A B C ...) and each figure is the
median of the repeats, as in bench_model.py. Targets (issue 15): bridge / native wall time <= 1.2x; native
items/s >= 2x lm-eval's hf model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_model import interleaved

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 items instead of 1,000")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved (default 3)")
    args = ap.parse_args()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lmlab.eval import Task, run_task
    from lmlab.eval.harness import LmlabLM
    from lmlab.eval.maketask import make_items
    from lmlab.interop import export_hf
    from lmlab.models import Transformer
    from lmlab.models.io import load_pretrained, save_pretrained
    from lmlab.tokenizers import Tokenizer
    from lmlab.train.demo_corpus import demo_corpus
    from lmlab.train.recipes import demo_model_config

    n = 200 if args.quick else 1000
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    text = demo_corpus(seed=0)
    tok = Tokenizer.train([text], kind="bpe", vocab_size=1024)
    torch.manual_seed(0)
    items = make_items([text[len(text) // 2:]], "cloze", n=n)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_pretrained(root / "model", Transformer(demo_model_config(tok.vocab_size)), tok)
        export_hf(root / "model", root / "hf")
        (root / "tasks").mkdir()
        (root / "tasks" / "items.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
        (root / "tasks" / "bench_mc.yaml").write_text(
            "task: bench_mc\ndataset_path: json\ndataset_kwargs:\n"
            f"  data_files: {{train: {root / 'tasks/items.jsonl'}}}\ntest_split: train\n"
            "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
            "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
        manager = TaskManager(include_path=str(root / "tasks"), include_defaults=False)

        model, tok = load_pretrained(root / "model")
        task = Task("bench", "multiple_choice", items)
        bridge = LmlabLM(path=str(root / "model"), batch_size=args.batch_size)
        # built here, outside the timer, as the bridge is: loading the model is not scoring
        hf = HFLM(pretrained=str(root / "hf"), dtype="float32", device="cpu", batch_size=args.batch_size)
        scoring = [0.0]
        inner = bridge.loglikelihood

        def timed(requests, disable_tqdm=False):
            t0 = time.perf_counter()
            out = inner(requests)
            scoring[0] += time.perf_counter() - t0
            return out

        bridge.loglikelihood = timed
        results: dict[str, object] = {}
        scoring_runs: list[float] = []

        def run_native() -> None:
            results["native"] = run_task(model, tok, task, batch_size=args.batch_size)["metrics"]["acc"]

        def run_harness(name: str, lm: object) -> None:
            scoring[0] = 0.0
            out = simple_evaluate(model=lm, tasks=["bench_mc"], task_manager=manager, bootstrap_iters=0,
                                  log_samples=False)
            results[name] = out["results"]["bench_mc"]["acc,none"]
            if lm is bridge:
                scoring_runs.append(scoring[0])

        # Warm-up on a few items: lm-eval's first call in a process builds its task and dataset caches, and
        # each model's first batches pay for the allocator and kernels; a full run as warm-up would double
        # the bench for nothing.
        run_task(model, tok, Task("bench", "multiple_choice", items[:8]), batch_size=args.batch_size)
        for lm in (bridge, hf):
            simple_evaluate(model=lm, tasks=["bench_mc"], task_manager=manager, bootstrap_iters=0,
                            log_samples=False, limit=4)
        timing = interleaved({"native": run_native, "bridge": lambda: run_harness("bridge", bridge),
                              "hf": lambda: run_harness("hf", hf)}, args.repeats, warmup=0)
    t_native, t_bridge, t_hf = (timing[k].median for k in ("native", "bridge", "hf"))
    t_scoring = statistics.median(scoring_runs)
    print(f"{n} items x 4 choices, batch {args.batch_size}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} interleaved repeats (spread: interquartile range / median)")
    for label, key, t in (("native scorer", "native", t_native), ("lm-eval + lmlab", "bridge", t_bridge),
                          ("lm-eval + hf", "hf", t_hf)):
        print(f"{label:17} {t:7.2f} s  {n / t:8.1f} items/s  acc {results[key]:.3f}  "
              f"spread {timing[key].spread:.0%}")
    print(f"bridge / native wall time: {t_bridge / t_native:.2f}x (target <= 1.2x); inside the bridge's "
          f"loglikelihood: {t_scoring:.2f} s ({t_scoring / t_native:.2f}x native), the rest is lm-eval's own")
    print(f"native / hf items per second: {t_hf / t_native:.2f}x (target >= 2x)")

if __name__ == "__main__":
    main()
