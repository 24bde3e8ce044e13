"""End-to-end recipes behind the CLI: train from books, evaluate on texts, and the demo (the main job).

    lmlab demo                                    # ~3 minutes on a 2-core laptop, no network
    lmlab train book.txt --preset gpt2-small --out runs/book --max-steps 2000
    lmlab train --out runs/book --resume          # continue after Ctrl-C or a crash
    lmlab eval runs/book/final other_book.txt
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import TokenDataset, find_documents, prepare, prepare_texts, read_document
from ..models import ModelConfig, Transformer, generate
from ..models.io import load_pretrained
from ..tokenizers import Tokenizer
from .config import TrainConfig
from .demo_corpus import demo_corpus
from .trainer import TrainResult, train


def train_from_sources(out_dir: str | Path, config: TrainConfig, *, sources: Sequence[str | Path] = (),
                       dataset: str | Path | None = None, preset: str | None = None,
                       model_config: ModelConfig | None = None, init: str | Path | None = None,
                       tokenizer: str | Path | None = None, tokenizer_kind: str = "bpe", vocab_size: int = 8192,
                       val_fraction: float = 0.05, weights: dict[str, float] | None = None,
                       callbacks: Sequence[Any] = ()) -> TrainResult:
    """Everything `lmlab train` does for a new run: tokenizer (reused or trained on ALL sources), token
    file, model (preset, config or initial weights), then the trainer. The run directory keeps a copy of
    the tokenizer and records where the data came from, so `resume_run` needs nothing else."""
    out = Path(out_dir)
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ValueError(f"{out} already holds a run; use --resume to continue it or choose another --out")
    if sum(x is not None for x in (preset, model_config, init)) != 1:
        raise ValueError("choose exactly one of --preset, --config or --init")
    if not sources and dataset is None:
        raise ValueError("give data: book files/folders, or --dataset DIR")
    model = None
    if init is not None:
        model, tok = load_pretrained(init)
        if tok is None:
            raise ValueError(f"{init} has no tokenizer.json")
    elif tokenizer is not None:
        tok = Tokenizer.load(tokenizer)
    elif dataset is not None:
        raise ValueError("--dataset needs the tokenizer it was made with: pass --tokenizer or --init")
    else:
        texts = [read_document(p) for p in find_documents(sources)]
        if not any(t.strip() for t in texts):
            raise ValueError("the corpus is empty: no document has any text")
        tok = Tokenizer.train(texts, kind=tokenizer_kind, vocab_size=vocab_size)
    if model is None:
        cfg = model_config or ModelConfig.preset(preset or "", vocab_size=tok.vocab_size)
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                             f"{cfg.vocab_size}")
        torch.manual_seed(config.seed)
        model = Transformer(cfg)
    seq_len = config.seq_len or model.config.block_size
    if dataset is not None:
        ds = TokenDataset.open(dataset, tok)
        data_dir = Path(dataset)
    else:
        data_dir = out / "data"
        ds = prepare(sources, tok, data_dir, val_fraction=val_fraction, weights=weights, seq_len=seq_len)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "tokenizer.json")
    provenance = {"dataset": str(data_dir.resolve()), "sources": [str(s) for s in sources],
                  "init": str(init) if init else None, "data_stats": ds.stats()}
    return train(model, tok, ds, config, out, callbacks, provenance=provenance)


def resume_run(out_dir: str | Path, overrides: dict[str, Any] | None = None,
               callbacks: Sequence[Any] = ()) -> TrainResult:
    """Continue a run from its last checkpoint; `overrides` may change TrainConfig fields (e.g. max_steps)."""
    out = Path(out_dir)
    if not (out / "config.json").is_file():
        raise FileNotFoundError(f"not a run directory (no config.json): {out}")
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config = TrainConfig.from_dict({**saved["train"], **(overrides or {})})
    tok = Tokenizer.load(out / "tokenizer.json")
    ds = TokenDataset.open(saved["dataset"], tok)
    model = Transformer(ModelConfig.from_dict(saved["model"]))
    provenance = {k: v for k, v in saved.items() if k not in ("train", "model")}
    return train(model, tok, ds, config, out, callbacks, resume=True, provenance=provenance)


@torch.no_grad()
def evaluate_texts(model: Transformer, tokenizer: Any, texts: Sequence[str], *, seq_len: int | None = None,
                   batch_size: int = 8) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte of `model` over `texts`, in non-overlapping windows."""
    seq_len = min(seq_len or model.config.block_size, model.config.block_size)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(list(texts)):
        ids += enc + [tokenizer.eos_id]
    if len(ids) < 2:
        raise ValueError("the texts are empty")
    flat = torch.tensor(ids)
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    starts = list(range(0, len(flat) - 1, seq_len))
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        length = min(seq_len, len(flat) - 1 - chunk[-1])  # the last window may be shorter
        rows = [s for s in chunk if len(flat) - 1 - s >= length]
        x = torch.stack([flat[s:s + length] for s in rows]).to(device)
        y = torch.stack([flat[s + 1:s + length + 1] for s in rows]).to(device)
        logits = model(x).logits.float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    loss = total / count
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": total / math.log(2) / n_bytes,
            "tokens": count}


# ---- the demo ---------------------------------------------------------------------------------------

DEMO_PROMPTS = ["Жили-были", "Однажды лиса", "Once upon a time"]


def run_demo(out_dir: str | Path = "lmlab-demo", *, max_steps: int = 900, time_budget_s: float = 240.0,
             seed: int = 0, echo: Any = print) -> dict[str, Any]:
    """Generate a book, train a tokenizer and a small Llama-style model on it, and show samples from the
    untrained and the trained model. Leaves `out_dir/final`, a model directory for `lmlab generate`."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if (out / "checkpoints").is_dir():
        raise ValueError(f"{out} already holds a demo run; remove it or pass --out elsewhere")
    text = demo_corpus(seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text(text, encoding="utf-8")
    tok = Tokenizer.train([text], kind="bpe", vocab_size=1024)
    cfg = ModelConfig(family="llama", n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=128,
                      vocab_size=tok.vocab_size)
    ds = prepare_texts([text], tok, out / "data", names=["corpus.txt"], seq_len=cfg.block_size)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    echo(f"lmlab demo: a generated book of {len(text):,} characters, {ds.train_tokens:,} training tokens; "
         f"a {cfg.family} model with {model.num_parameters():,} parameters")
    sample = dict(max_new_tokens=40, temperature=0.8, top_k=40, seed=seed)
    before = {p: generate(model, tok, p, **sample) for p in DEMO_PROMPTS}
    with torch.no_grad():
        val_before = sum(model(x, y).loss.item() for x, y in ds.eval_batches(16, cfg.block_size, 8)) / len(
            list(ds.eval_batches(16, cfg.block_size, 8)))
    echo("\nBefore training:")
    for p, s in before.items():
        echo(f"  {p}{s}".replace("\n", " "))
    echo(f"\nTraining for up to {max_steps} steps (stops early after {time_budget_s:.0f} s) ...")
    config = TrainConfig(max_steps=max_steps, time_budget_s=time_budget_s, batch_size=16, lr=3e-3, min_lr=3e-4,
                         warmup_steps=50, weight_decay=0.1, eval_every=300, eval_batches=8, log_every=50,
                         save_every=300, seed=seed, device="cpu")
    tok.save(out / "tokenizer.json")
    result = train(model, tok, ds, config, out, provenance={"dataset": str((out / "data").resolve()),
                                                            "sources": ["lmlab demo corpus"]})
    after = {p: generate(model, tok, p, **sample) for p in DEMO_PROMPTS}
    echo("\nAfter training:")
    for p, s in after.items():
        echo(f"  {p}{s}".replace("\n", " "))
    last = next((m for m in reversed(result.history) if "val_loss" in m), {})
    summary = {"val_loss_before": val_before, "val_loss_after": last.get("val_loss"),
               "unigram_baseline": ds.unigram_entropy(), "steps": result.steps,
               "wall_s": time.perf_counter() - t0, "before": before, "after": after}
    echo(f"\nValidation loss {val_before:.2f} -> {summary['val_loss_after']:.2f} nats/token "
         f"(a model that ignores context scores {summary['unigram_baseline']:.2f}); {result.steps} steps, "
         f"{summary['wall_s']:.0f} s in all.")
    echo(f"Model saved to {out / 'final'}. Try:\n  lmlab generate {out / 'final'} --prompt \"Жили-были\" "
         f"--temperature 0.8 --top-k 40")
    return summary
