"""End-to-end recipes behind the CLI: train from books, evaluate on texts, and the demo (the main job).

    lmlab demo                                    # ~3 minutes on a 2-core laptop CPU, no network
    lmlab train book.txt --preset gpt2-small --out runs/book --max-steps 2000
    lmlab train --out runs/book --resume          # continue after Ctrl-C or a crash
    lmlab eval runs/book/final other_book.txt
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..data import TokenDataset, find_documents, prepare, prepare_texts, read_document
from ..data.filters import apply_filters
from ..eval import Task, run_task
from ..eval.scorer import bits_per_byte, sequence_nll
from ..files import atomic_write_text, staged_dir
from ..models import ModelConfig, Transformer, generate
from ..models.io import HF_TOKENIZER_DIR, SIDE_FILES, TOKENIZER, copy_side_files, load_pretrained
from ..models.quant import refuse_quantized
from ..tokenizers import Tokenizer
from .checkpoint import RUN_FILES, claim_run, refuse_existing_run, resumed_model, run_folder, unlock_run
from .config import TrainConfig
from .demo_corpus import demo_corpus
from .progress import write_phase
from .trainer import (
    Callback,
    TrainResult,
    check_fits,
    dist_env,
    init_distributed,
    read_run_config,
    resolve_device,
    train,
)


def train_from_sources(out_dir: str | Path, config: TrainConfig, *, sources: Sequence[str | Path] = (),
                       dataset: str | Path | None = None, preset: str | None = None,
                       model_config: ModelConfig | None = None, model_fields: dict[str, Any] | None = None,
                       init: str | Path | None = None,
                       tokenizer: str | Path | None = None, tokenizer_kind: str | None = None,
                       vocab_size: int | None = None, val_fraction: float | None = None,
                       weights: dict[str, float] | None = None,
                       callbacks: Sequence[Any] = (), lora: Any = None, filters: Sequence[Any] = ()) -> TrainResult:
    """Everything `lmlab train` does for a new run: tokenizer (reused, or trained on ALL sources), token
    file, model (preset, config or initial weights), then the trainer. The run directory keeps a copy of
    the tokenizer and records where the data came from, so `resume_run` needs nothing else. The model is a
    preset, a ModelConfig or initial weights; `model_fields` set ModelConfig fields over the preset (or
    alone, over the defaults of their family); the vocabulary is the tokenizer's. `lora` (a LoRAConfig) trains
    adapters on the frozen `init` model instead of all weights (tune/lora.py: RUN/adapter, RUN/final merged).
    `filters` (data.filters.parse_filters) run on the sources first: the tokenizer is trained on what they keep, and
    the token file records their receipts. Bad input fails before anything is written."""
    out = run_folder(out_dir)
    writes = (*RUN_FILES, "tokenizer.json", "data", INIT_FILES)
    refuse_existing_run(out, writes)
    model_fields = dict(model_fields or {})
    if sum(x is not None for x in (preset, model_config, init)) > 1:
        raise ValueError("choose one of --preset, --model-config or --init")
    if model_fields and (model_config is not None or init is not None):
        raise ValueError(f"{'--init brings its own model' if init is not None else 'give model fields in the file'}; "
                         f"drop {', '.join('--' + k.replace('_', '-') for k in model_fields)}")
    if lora is not None and init is None:
        raise ValueError("LoRA adapts a trained model: give it with --init MODEL_DIR")
    if preset is None and model_config is None and init is None and not model_fields:
        raise ValueError("choose a model: --preset, --model-config, --init, or its fields (--family, --n-layer, ...)")
    if not sources and dataset is None:
        raise ValueError("give data: book files/folders, or --dataset DIR")
    if sources and dataset is not None:
        raise ValueError("give either book files/folders or --dataset, not both")
    if filters and dataset is not None:
        raise ValueError("--filters run on book files/folders; a prepared --dataset went through its own "
                         "(lmlab data prepare --filters)")
    # what the data or the model brings with it: a setting for it was taken and silently not used
    new_tokenizer = {"--tokenizer-kind": tokenizer_kind, "--vocab-size": vocab_size}
    unused = {"--init brings its tokenizer": ({"--tokenizer": tokenizer, **new_tokenizer} if init is not None else {}),
              "--tokenizer is trained already": new_tokenizer if tokenizer is not None else {},
              "--dataset holds its split and weights": ({"--val-fraction": val_fraction, "--weight": weights or None}
                                                        if dataset is not None else {})}
    for why, flags in unused.items():
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise ValueError(f"{why}: leave out {', '.join(given)}")
    tokenizer_kind, vocab_size = tokenizer_kind or "bpe", 8192 if vocab_size is None else vocab_size  # 0: refused
    val_fraction = 0.05 if val_fraction is None else val_fraction
    paths = find_documents(sources) if sources else []
    model, texts = None, None
    if init is not None:
        model, tok = load_pretrained(init)
        refuse_quantized(model)  # before anything is written (the Trainer would refuse it after the data)
        if tok is None:
            raise ValueError(f"{init} has no tokenizer.json")
        model.train()
        if lora is not None:  # here, so that a target the model lacks fails before anything is written
            lora.attach(model, config.seed, tok)
    elif tokenizer is not None:
        tok = Tokenizer.load(tokenizer)
    elif dataset is not None:
        raise ValueError("--dataset needs the tokenizer it was made with: pass --tokenizer or --init")
    else:
        texts = [read_document(p) for p in paths]
        if filters:  # the tokenizer learns the text the model will see (prepare filters the same texts again)
            texts = [t for t in apply_filters(texts, [p.name for p in paths], filters)[0] if t is not None]
            if not any(t.strip() for t in texts):
                raise ValueError(f"the filters removed every document ({', '.join(f.name for f in filters)}); "
                                 "see `lmlab data filter` for their receipts")
        if not any(t.strip() for t in texts):
            raise ValueError("the corpus is empty: no document has any text")
    main_process, claimed, created, claim = dist_env()[0] == 0, False, False, None
    try:
        if main_process:  # the folder held from its first file on: a second `lmlab train` into it is refused here
            claim, created = claim_run(out, writes)
            claimed = True
        if texts is not None:
            _phase(out, "tokenizer")
            # under torchrun, rank 0 trains the tokenizer and the others load its file
            tok = _rank0_first(out, lambda: Tokenizer.train(texts, kind=tokenizer_kind, vocab_size=vocab_size),
                               lambda t: t.save(out / "tokenizer.json", overwrite=True),
                               lambda: Tokenizer.load(out / "tokenizer.json"), config)
        if model is None:
            if model_config is not None:
                cfg = model_config
            elif preset is not None:
                cfg = ModelConfig.preset(preset, **{**model_fields, "vocab_size": tok.vocab_size})
            else:
                cfg = ModelConfig(**{**model_fields, "vocab_size": tok.vocab_size})
            if tok.vocab_size > cfg.vocab_size:
                raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                                 f"{cfg.vocab_size}")
        # from the config alone, so that a model too big is refused before it is built
        check_fits(cfg if model is None else model.config, config, world=dist_env()[1])
        if model is None:
            torch.manual_seed(config.seed)
            model = Transformer(cfg)
        seq_len = config.seq_len or model.config.block_size
        if dataset is not None:
            ds = TokenDataset.open(dataset, tok)
        else:
            _phase(out, "data")
            ds = _rank0_first(out, lambda: prepare(paths, tok, out / "data", val_fraction=val_fraction,
                                                   weights=weights, seq_len=seq_len, filters=filters,
                                                   overwrite=True),  # the new run's own folder
                              lambda d: None, lambda: TokenDataset.open(out / "data", tok), config)
        provenance = {"dataset": str(Path(ds.path).resolve()), "sources": [str(p) for p in paths],
                      "init": str(init) if init else None, "data_stats": ds.stats()}
        if init is None and tokenizer is None:  # trained here: --config RUN/config.json trains the same kind
            provenance["tokenizer_kind"] = tokenizer_kind
        elif tokenizer is not None:  # and reads the same file
            provenance["tokenizer"] = str(Path(tokenizer).resolve())
        if lora is not None:
            provenance["lora"] = lora.to_dict()
        if init is not None and main_process:  # what the starting model carries beside its weights
            keep_init_files(init, out)
        return train_with_lora(model, tok, ds, config, out, [*callbacks, *carried(out, init)], lora,
                               provenance=provenance)
    except BaseException:
        # the model too big for the memory, a corpus shorter than one window, or the Trainer's own checks (early
        # stopping without validation text, a tracker not installed), after the first file: a run that never
        # began (no metrics.jsonl) leaves nothing of what it wrote, so starting again is not refused; a folder
        # another process holds (not claimed here) is left as it is
        if claimed and not (out / "metrics.jsonl").exists():
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:  # a folder that was there (the web app's): what this run wrote in it
                shutil.rmtree(out / INIT_FILES, ignore_errors=True)
                if dataset is None:
                    shutil.rmtree(out / "data", ignore_errors=True)
                if texts is not None:
                    (out / "tokenizer.json").unlink(missing_ok=True)
        raise
    finally:
        unlock_run(claim)


# RUN/init_files/: the side files (models.io.SIDE_FILES) of `lmlab train --init`'s model and its tokenizer.json,
# copied when the run starts, so that final/ carries them (and a resume needs no more than the run's folder)
INIT_FILES = "init_files"


def keep_init_files(init: str | Path, out: Path) -> None:
    """Copy the starting model's side files and tokenizer.json into RUN/init_files/ (carried() puts them into
    final/)."""
    with staged_dir(out / INIT_FILES, replace=False) as tmp:
        copy_side_files(init, tmp, (*SIDE_FILES, TOKENIZER))


def carried(out: Path, init: Any) -> list[Callback]:
    """The callback that puts RUN/init_files/ into final/, for a run that started from a model (`init`)."""
    return [CarrySideFiles(out / INIT_FILES)] if init is not None else []


class CarrySideFiles(Callback):
    """final/ of a run that started from a model directory keeps that model's side files (models.io.SIDE_FILES):
    its generation defaults, its chat template (lmlab's, or an imported model's own) and hf_tokenizer/ where it
    has one; they were dropped, so a chat model trained further lost its template in `lmlab export`. Files a later
    hook writes (the chat template of a run on conversations) stay as written. hf_tokenizer/ only while the
    tokenizer is the starting model's size: one that gained tokens (LoRA's chat tokens) no longer matches it."""

    def __init__(self, source: str | Path) -> None:
        self.source = Path(source)

    def on_final(self, trainer: Any, folder: Path) -> None:
        if not self.source.is_dir():
            return
        same_tokenizer = (self.source / TOKENIZER).is_file() and (folder / TOKENIZER).is_file() and (
            Tokenizer.load(self.source / TOKENIZER).vocab_size == Tokenizer.load(folder / TOKENIZER).vocab_size)
        names = [n for n in SIDE_FILES if not (folder / n).exists() and (same_tokenizer or n != HF_TOKENIZER_DIR)]
        copy_side_files(self.source, folder, tuple(names))


def _phase(out: Path, phase: str) -> None:
    """phase.json in a run folder that exists (the web app's, made before the run starts): bad input must
    leave no folder behind."""
    if dist_env()[0] == 0 and out.is_dir():
        write_phase(out, phase)


def _rank0_first(out: Path, make: Any, save: Any, load: Any, config: TrainConfig) -> Any:
    """make() (and save it) on rank 0; under torchrun the other ranks wait, then load() what it wrote."""
    rank, world, _ = dist_env()
    if world == 1:
        return make()
    init_distributed(resolve_device(config.device))
    if rank == 0:
        made = make()
        out.mkdir(parents=True, exist_ok=True)
        save(made)
    dist.barrier()
    return made if rank == 0 else load()


def resume_run(out_dir: str | Path, overrides: dict[str, Any] | None = None,
               callbacks: Sequence[Any] = (), lora: Any = None) -> TrainResult:
    """Continue a run from its last checkpoint with its own settings; `overrides` may change the RESUMABLE
    TrainConfig fields (stop conditions such as max_steps, and how the run is run); others are refused. A run
    that trains LoRA adapters needs its LoRAConfig back: `LoRAConfig.from_section(read_run_config(out_dir)["lora"])`."""
    out = Path(out_dir)
    saved = read_run_config(out)
    if "dataset" not in saved:
        raise ValueError(f"{out / 'config.json'} is not a run config (train, model and dataset)")
    config = TrainConfig.from_dict({**saved["train"], **(overrides or {})})
    tok = Tokenizer.load(out / "tokenizer.json")
    ds = TokenDataset.open(out / saved["dataset"], tok)  # a relative path is inside the run directory
    model = resumed_model(out, saved["model"])  # its size checked against the last checkpoint first
    provenance = {k: v for k, v in saved.items() if k not in ("train", "model")}
    saved_lora = provenance.get("lora") or None
    if lora is not None and saved_lora is not None:  # a section written before a LoRAConfig field: its default
        saved_lora = type(lora).from_section(saved_lora).to_dict()
    if (lora.to_dict() if lora is not None else None) != saved_lora:
        raise ValueError(f"{out} was trained with LoRA settings {provenance.get('lora')}; resume it with the same "
                         "(lmlab train --resume reads them from the run)")
    return train_with_lora(model, tok, ds, config, out, [*callbacks, *carried(out, provenance.get("init"))], lora,
                           resume=True, provenance=provenance)


def train_with_lora(model: Transformer, tok: Any, ds: Any, config: TrainConfig, out: str | Path,
                    callbacks: Sequence[Any], lora: Any, *, resume: bool = False, provenance: dict[str, Any],
                    objective: Any = None) -> TrainResult:
    """train(), with `lora`'s adapters (a tune.lora.LoRAConfig, passed in: train sits below tune) put on the model
    first (the checkpoint of a resumed run holds them) and written out after (RUN/adapter, RUN/final merged).
    Every run on the Trainer that may train adapters (lmlab train, tune dpo, tune grpo) goes through here."""
    if lora is None:
        return train(model, tok, ds, config, out, callbacks, resume=resume, provenance=provenance, objective=objective)
    lora.attach(model, config.seed, tok)
    finish = _LoRAFinal(lora, model, Path(out), tok)  # into final/'s staging folder: merged before it appears
    return train(model, tok, ds, config, out, [*callbacks, finish], resume=resume, provenance=provenance,
                 objective=objective)


class _LoRAFinal(Callback):
    """RUN/adapter, and final/ with the adapters merged, written while final/ is staged (Trainer.save_final)."""

    def __init__(self, lora: Any, model: Any, out: Path, tok: Any) -> None:
        self.lora, self.model, self.out, self.tok = lora, model, out, tok

    def on_final(self, trainer: Any, folder: Path) -> None:
        self.lora.finish(self.model, self.out, self.tok, final=folder)


class TaskEval(Callback):
    """`lmlab train --eval-tasks`: the tasks scored at every evaluation, their metrics added to that step's
    metrics line as TASK/METRIC. One process only: under torchrun every rank would score the same items."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        self.tasks = list(tasks)

    def on_eval(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if trainer.world > 1:
            return
        model = trainer.model
        was_training = model.training
        model.eval()  # no dropout in the scores, nor in a generation task's samples
        for task in self.tasks:
            result = run_task(model, trainer.tokenizer, task, batch_size=trainer.config.batch_size)
            metrics.update({f"{task.name}/{k}": v for k, v in result["metrics"].items()})
        model.train(was_training)


def evaluate_texts(model: Transformer, tokenizer: Any, texts: Sequence[str], *, seq_len: int | None = None,
                   batch_size: int = 8, stride: int | None = None) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte of `model` over `texts` (documents joined by EOS, as in
    training, and the first one after an EOS too, so that every document's first token is scored the same way;
    texts without tokens are left out), in windows of seq_len (default: the model's context) that score each
    token once; with `stride` < seq_len each window after the first scores `stride` tokens after seq_len - stride
    of context. A window may read the end of the document before (as training does). lmlab.eval's sequence_nll
    does the scoring."""
    if (seq_len is not None and seq_len < 1) or batch_size < 1:
        raise ValueError("seq_len and batch_size must be >= 1")
    seq_len = min(seq_len or model.config.block_size, model.config.block_size)
    ids, n_bytes = [tokenizer.eos_id], 0
    for text, enc in zip(texts, tokenizer.encode_batch(list(texts))):
        if enc:
            ids += enc + [tokenizer.eos_id]
            n_bytes += len(text.encode("utf-8"))
    if len(ids) < 2:
        raise ValueError("the texts are empty")
    total, n = sequence_nll(model, ids, seq_len=seq_len, stride=seq_len if stride is None else stride,
                            batch_size=batch_size)
    loss = total / n
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": bits_per_byte(total, n_bytes),
            "tokens": n}


# ---- the demo ---------------------------------------------------------------------------------------

DEMO_PROMPTS = ["Жили-были", "Однажды лиса", "Once upon a time"]
DEMO_SAMPLING = dict(max_new_tokens=40, temperature=0.8, top_k=40)


def demo_model_config(vocab_size: int) -> ModelConfig:
    """A ~1M-parameter Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention). On the generated book, 900
    steps of 16x128 tokens (~2.5 min on 2 cores) take the val loss from 6.9 to ~0.3 nats/token against a
    unigram baseline of 4.8, and the samples from byte salad to grammatical tales."""
    return ModelConfig(family="llama", n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=128,
                       vocab_size=vocab_size)


def _mean_val_loss(model: Transformer, ds: TokenDataset, batch_size: int, seq_len: int, batches: int) -> float:
    """The trainer's validation loss (same windows), for the untrained model."""
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        losses = [model(x.to(device), y.to(device)).loss.item()
                  for x, y in ds.eval_batches(batch_size, seq_len, batches)]
    model.train()
    return sum(losses) / len(losses)


def _seconds_per_step(model: Transformer, config: TrainConfig, seq_len: int, vocab_size: int) -> float:
    """Time a few optimizer steps of a throw-away copy of the model on random tokens."""
    probe = copy.deepcopy(model)
    opt = probe.configure_optimizer(config.lr, config.weight_decay, config.betas)
    device = next(probe.parameters()).device
    x = torch.randint(4, vocab_size, (config.batch_size, seq_len), device=device)
    times = []
    for _ in range(4):
        t = time.perf_counter()
        probe(x, x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[1]  # the median of 3, after a warm-up step


def _printable(text: str) -> str:
    """One line for the terminal: newlines become spaces; control characters (a random model emits
    them) become '?'."""
    return " ".join("".join(ch if ch.isprintable() else "?" for ch in line) for line in text.split("\n") if line)


def run_demo(out_dir: str | Path = "lmlab-demo", *, budget_s: float = 180.0, max_steps: int | None = None,
             seed: int = 0, device: str = "auto", echo: Any = print) -> dict[str, Any]:
    """Generate a book, train a tokenizer and a small Llama-style model on it, and show samples of the
    untrained and the trained model. The number of steps is fitted to `budget_s` (about 3 minutes for the
    whole command) after timing a few steps, unless `max_steps` is given. Leaves `out_dir/final`, a model
    directory for `lmlab generate`."""
    t0 = time.perf_counter()
    out = run_folder(out_dir)
    refuse_existing_run(out, (*RUN_FILES, "tokenizer.json", "data", "corpus.txt", "demo.json"))  # all it writes
    if max_steps is not None and max_steps < 1:  # apart from the budget, which it replaces: one message blamed both
        raise ValueError(f"--max-steps ({max_steps}) must be >= 1")
    if not 0 < budget_s < math.inf:  # nan: a 30-step run said nothing
        raise ValueError(f"--budget ({budget_s}) must be a positive finite number of seconds")
    resolve_device(device)  # a device that is not there is refused before anything is written
    text = demo_corpus(seed=seed)
    tok = Tokenizer.train([text], kind="bpe", vocab_size=1024)
    cfg = demo_model_config(tok.vocab_size)
    config = TrainConfig(max_steps=max_steps or 1, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=30,
                         weight_decay=0.1, eval_every=100, eval_batches=8, log_every=25, save_every=0,
                         seed=seed, device=device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text(text, encoding="utf-8")
    ds = prepare_texts([text], tok, out / "data", names=["corpus.txt"], seq_len=cfg.block_size)
    torch.manual_seed(seed)
    model = Transformer(cfg).to(resolve_device(device))
    unigram = ds.unigram_entropy()
    echo(f"lmlab demo: a generated book of {len(text):,} characters (Russian and English tales), a {tok.kind} "
         f"tokenizer of {tok.vocab_size} tokens, {ds.train_tokens:,} training tokens; a {cfg.family} model with "
         f"{model.num_parameters():,} parameters.")
    before = {p: generate(model, tok, p, seed=seed, **DEMO_SAMPLING) for p in DEMO_PROMPTS}
    val_before = _mean_val_loss(model, ds, config.batch_size, cfg.block_size, config.eval_batches)
    echo("\nBefore training (random weights):")
    for p, s in before.items():
        echo(f"  {p}{_printable(s)}")
    time_budget = None
    if max_steps is None:
        per_step = _seconds_per_step(model, config, cfg.block_size, tok.vocab_size)
        # what is left of the budget, less ~15 s for evaluations, sampling and saving the model; the
        # schedule decays over the steps that fit, and a busy machine is cut off by the clock
        left = budget_s - (time.perf_counter() - t0) - 15.0
        max_steps = int(min(2000, max(30, left / (per_step * 1.08))))
        time_budget = max(30.0, left * 1.1)
    config = dataclasses.replace(config, max_steps=max_steps, eval_every=max(50, max_steps // 4),
                                 time_budget_s=time_budget)
    echo(f"\nTraining {max_steps} steps of {config.batch_size}×{cfg.block_size} tokens "
         f"(val loss now {val_before:.2f}; a model that ignores context scores {unigram:.2f}) ...")
    demo = {"val_loss_before": val_before, "unigram_baseline": unigram, "prompts": DEMO_PROMPTS,
            "samples_before": before}
    result = train(model, tok, ds, config, out, provenance={"sources": ["lmlab demo corpus (generated)"],
                                                            "demo": demo})
    if result.stop_reason in ("stopped", "interrupted"):  # Ctrl-C / SIGTERM: the trainer saved a checkpoint
        echo(f"\nThe demo stopped at step {result.steps}; continue it with `lmlab train --out {out} --resume`.")
        return {**demo, "steps": result.steps, "stop_reason": result.stop_reason}
    after = {p: generate(model, tok, p, seed=seed, **DEMO_SAMPLING) for p in DEMO_PROMPTS}
    echo("\nAfter training:")
    for p, s in after.items():
        echo(f"  {p}{_printable(s)}")
    last = next((m for m in reversed(result.history) if "val_loss" in m), {})
    summary = {**demo, "val_loss_after": last.get("val_loss"), "val_bpb_after": last.get("val_bpb"),
               "steps": result.steps, "samples_after": after, "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    echo(f"\nValidation loss {val_before:.2f} -> {summary['val_loss_after']:.2f} nats/token "
         f"({summary['val_bpb_after']:.2f} bits per byte); unigram baseline {unigram:.2f}. "
         f"{result.steps} steps, {summary['wall_s']:.0f} s in all.")
    echo(f"Model: {out / 'final'}. Try:\n  lmlab generate {out / 'final'} --prompt \"Жили-были\" "
         f"--temperature 0.8 --top-k 40")
    return summary
