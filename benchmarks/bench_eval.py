"""Multiple-choice scoring: lmlab's native scorer against the lm-evaluation-harness bridge (`--model lmlab`) and
lm-eval's own `hf` model on the `lmlab export hf` copy of the same weights, measured in one run.

    python benchmarks/bench_eval.py             # 1,000 items; a few minutes on a 2-core CPU
    python benchmarks/bench_eval.py --quick     # 200 items

The model is the demo's (`lmlab demo`: a ~1M-parameter Llama, context 128) with untrained weights, which
score at the same speed as trained ones; the items are cloze items cut from the demo book by `lmlab eval
make-task`'s builder (4 choices each). All three use the same batch size and one process. Targets (issue 15):
bridge / native wall time <= 1.2x; native items/s >= 2x lm-eval's hf model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 items instead of 1,000")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    from lm_eval import simple_evaluate
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
        t0 = time.perf_counter()
        native = run_task(model, tok, Task("bench", "multiple_choice", items), batch_size=args.batch_size)
        t_native = time.perf_counter() - t0

        def harness(model, **kw):
            # lm-eval's first call in a process builds its task and dataset caches: a warm-up keeps that
            # fixed cost out of both timed runs
            simple_evaluate(model=model, tasks=["bench_mc"], task_manager=manager, bootstrap_iters=0,
                            log_samples=False, limit=4, **kw)
            t0 = time.perf_counter()
            out = simple_evaluate(model=model, tasks=["bench_mc"], task_manager=manager, bootstrap_iters=0,
                                  log_samples=False, **kw)
            return time.perf_counter() - t0, out["results"]["bench_mc"]["acc,none"]

        bridge = LmlabLM(path=str(root / "model"), batch_size=args.batch_size)
        scoring = [0.0]
        inner = bridge.loglikelihood

        def timed(requests, disable_tqdm=False):
            t0 = time.perf_counter()
            out = inner(requests)
            scoring[0] += time.perf_counter() - t0
            return out

        bridge.loglikelihood = timed
        t_bridge, acc_bridge = harness(bridge)
        t_hf, acc_hf = harness("hf", model_args=dict(pretrained=str(root / "hf"), dtype="float32"), device="cpu",
                               batch_size=args.batch_size)
    print(f"{n} items x 4 choices, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"native scorer     {t_native:7.2f} s  {n / t_native:8.1f} items/s  acc {native['metrics']['acc']:.3f}")
    print(f"lm-eval + lmlab   {t_bridge:7.2f} s  {n / t_bridge:8.1f} items/s  acc {acc_bridge:.3f}")
    print(f"lm-eval + hf      {t_hf:7.2f} s  {n / t_hf:8.1f} items/s  acc {acc_hf:.3f}")
    print(f"bridge / native wall time: {t_bridge / t_native:.2f}x (target <= 1.2x); inside the bridge's "
          f"loglikelihood: {scoring[0]:.2f} s ({scoring[0] / t_native:.2f}x native), the rest is lm-eval's own")
    print(f"native / hf items per second: {t_hf / t_native:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
