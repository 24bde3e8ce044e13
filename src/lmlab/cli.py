"""The `lmlab` command. Parses flags, calls library functions, prints. No logic of its own.

    lmlab info --preset llama-small            # parameters, FLOPs/token, memory for a preset
    lmlab info runs/demo/final                 # ... or for a model directory
    lmlab generate runs/demo/final --prompt "Once upon a time" --temperature 0.8 --top-k 40

Bad input prints one line `lmlab: error: ...` and exits with code 2 (`--debug` adds the traceback); any other
error is a bug in lmlab: its traceback, a line saying so, and exit code 1.
"""

from __future__ import annotations

import argparse
import dis
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

# Subcommands register here: name -> (add_arguments, run). Each run(args) returns an exit code.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, arguments, fn)
        return fn
    return register


def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    return name


# ---- info -------------------------------------------------------------------------------------------

def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", help="a model directory (config.json + model.safetensors)")
    p.add_argument("--preset", help="a preset instead of a directory, e.g. gpt2-small, llama-tiny, gpt2-124m")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary size")
    p.add_argument("--batch-size", type=int, default=8, help="batch size for the training memory estimate")
    p.add_argument("--seq-len", type=int, help="sequence length for the estimates (default: block_size)")


@command("info", "parameters, FLOPs per token and memory estimates of a preset or a model directory",
         _info_arguments)
def _info(args: argparse.Namespace) -> int:
    from .models import ModelConfig
    from .models.io import CONFIG

    if bool(args.model_dir) == bool(args.preset):
        raise ValueError("give either a model directory or --preset")
    if args.preset:
        overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
        cfg = ModelConfig.preset(args.preset, **overrides)
        source = f"preset {args.preset}"
    else:
        path = Path(args.model_dir)
        if not (path / CONFIG).is_file():
            raise FileNotFoundError(f"not a model directory (no {CONFIG}): {path}")
        cfg = ModelConfig.load(path / CONFIG)
        source = str(path)
    T = args.seq_len or cfg.block_size
    n = cfg.num_parameters()
    flops = cfg.flops_per_token(T)
    train = cfg.memory_estimate(args.batch_size, T, training=True)
    infer = cfg.memory_estimate(1, T, training=False)
    print(f"{source}: {cfg.family}, {cfg.n_layer} layers, {cfg.n_head} heads ({cfg.n_kv_head} kv), "
          f"d={cfg.n_embd}, mlp={cfg.mlp} {cfg.intermediate_size}, context {cfg.block_size}, "
          f"vocab {cfg.vocab_size}")
    print(f"parameters:        {n:,} ({_fmt_count(n)})")
    print(f"training FLOPs:    {_fmt_count(flops)} per token (6N + 12·L·T·d, T={T})")
    print(f"inference memory:  {_fmt_bytes(infer['total'])} (fp32 weights + KV cache for {T} tokens)")
    print(f"training memory:   ~{_fmt_bytes(train['total'])} (fp32 + AdamW, batch {args.batch_size}×{T})")
    return 0



# ---- generate ---------------------------------------------------------------------------------------

def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty for seen tokens (1.0: off)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (1: no beam search)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score exponent on length")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going after <EOS>")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="greedy only: draft up to N tokens by prompt lookup and verify them in one pass "
                        "(faster on repetitive text; 0: off)")


def generation_config_from_args(args: argparse.Namespace):
    from .models import GenerationConfig
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        num_beams=args.num_beams, length_penalty=args.length_penalty, stop_strings=list(args.stop),
        stop_at_eos=not args.ignore_eos, seed=args.seed, prompt_lookup=args.prompt_lookup)


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a model directory")
    p.add_argument("--prompt", default=None, help="prompt text (default: read standard input)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples of the same prompt")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--no-stream", action="store_true", help="print when done instead of token by token")
    add_sampling_arguments(p)


@command("generate", "generate text from a model directory, streaming to the terminal", _generate_arguments)
def _generate(args: argparse.Namespace) -> int:
    from .models import generate, stream
    from .models.io import load_pretrained

    cfg = generation_config_from_args(args)
    if args.num_samples < 1:
        raise ValueError("--num-samples must be >= 1")
    model, tokenizer = load_pretrained(args.model_dir, device=_device(args.device))
    if tokenizer is None:
        raise ValueError(f"{args.model_dir} has no tokenizer.json; cannot turn text into tokens")
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    for i in range(args.num_samples):
        sample_cfg = cfg if cfg.seed is None else type(cfg)(**{**cfg.__dict__, "seed": cfg.seed + i})
        if i:
            print("\n" + "-" * 40)
        print(prompt, end="", flush=True)
        if args.no_stream or cfg.num_beams > 1:
            print(generate(model, tokenizer, prompt, sample_cfg), end="")
        else:
            for piece in stream(model, tokenizer, prompt, sample_cfg):
                print(piece, end="", flush=True)
        print()
    return 0



# ---- tokenizer train / data prepare -----------------------------------------------------------------

def _tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train a tokenizer on every document found in SOURCES")
    t.add_argument("sources", nargs="+", help="files, folders or globs (.txt .md .html .epub .pdf)")
    t.add_argument("--kind", default="bpe", choices=["bpe", "char", "word"], help="tokenizer kind (default bpe)")
    t.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size incl. 4 specials (default 8192)")
    t.add_argument("--out", required=True, help="where to write tokenizer.json")


@command("tokenizer", "train a tokenizer (lmlab tokenizer train SOURCES --out tokenizer.json)", _tokenizer_arguments)
def _tokenizer(args: argparse.Namespace) -> int:
    from .data import find_documents, read_document
    from .tokenizers import Tokenizer

    paths = find_documents(args.sources)
    texts = [read_document(p) for p in paths]
    if not any(t.strip() for t in texts):
        raise ValueError("the corpus is empty: no document has any text")
    tok = Tokenizer.train(texts, kind=args.kind, vocab_size=args.vocab_size)
    out = Path(args.out)
    tok.save(out / "tokenizer.json" if out.is_dir() else out)
    sample = next(t for t in texts if t.strip())[:60].strip()
    print(f"{tok.kind} tokenizer, {tok.vocab_size} tokens, trained on {len(paths)} documents -> {out}")
    print(f"sample: {sample!r} -> {tok.encode(sample)[:20]}")
    return 0


def _data_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    d = sub.add_parser("prepare", help="tokenise documents once into a token file with a held-out split")
    d.add_argument("sources", nargs="+", help="files, folders or globs (.txt .md .html .epub .pdf)")
    d.add_argument("--tokenizer", required=True, help="tokenizer.json, or a model directory holding one")
    d.add_argument("--out", required=True, help="output folder (tokens.bin + tokens.json)")
    d.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of each document (0.05)")
    d.add_argument("--weight", action="append", default=[], metavar="NAME=W",
                   help="sampling weight of a document by file name or stem (repeatable)")
    d.add_argument("--preset", help="report tokens per parameter for this preset, e.g. gpt2-small")
    d.add_argument("--seq-len", type=int, help="refuse a corpus without one training window of this length")


def parse_weights(items: Sequence[str]) -> dict[str, float]:
    weights = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ValueError(f"--weight {item!r} must look like NAME=NUMBER")
    return weights


@command("data", "prepare token files (lmlab data prepare SOURCES --tokenizer T --out DIR)", _data_arguments)
def _data(args: argparse.Namespace) -> int:
    from .data import prepare
    from .models import ModelConfig
    from .tokenizers import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    cfg = ModelConfig.preset(args.preset, vocab_size=tok.vocab_size) if args.preset else None
    ds = prepare(args.sources, tok, args.out, val_fraction=args.val_fraction, weights=parse_weights(args.weight),
                 seq_len=args.seq_len)
    st = ds.stats(cfg)
    print(f"documents:  {st['documents']} ({st['documents_without_val']} too short to hold out a val slice)")
    print(f"characters: {st['characters']:,}")
    print(f"tokens:     {st['tokens']:,} (train {st['train_tokens']:,}, val {st['val_tokens']:,}; "
          f"{st['bytes_per_token']:.2f} bytes/token)")
    print(f"unigram entropy: {ds.unigram_entropy():.3f} nats/token (the loss of a model that ignores context)")
    if st["skipped_empty"]:
        print(f"skipped (no text): {', '.join(st['skipped_empty'])}")
    if cfg is not None:
        print(f"tokens per parameter: {st['tokens_per_parameter']:.2f} for {args.preset} "
              f"({st['parameters']:,} parameters; Chinchilla-optimal is ~20, i.e. {st['chinchilla_tokens']:,} tokens)")
    print(f"written to {args.out}")
    return 0


# ---- train / eval / demo ----------------------------------------------------------------------------

def add_train_config_arguments(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag (default None = the config's default, or the saved run's value)."""
    import dataclasses
    import typing

    from .train import TrainConfig
    from .train.config import HELP

    hints = typing.get_type_hints(TrainConfig)
    g = p.add_argument_group("training hyper-parameters (TrainConfig)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        base = next((t for t in (bool, int, float, str) if t is kind or t in typing.get_args(kind)), str)
        help_text = HELP.get(f.name, "")
        help_text += "" if "default" in help_text else f" (default {f.default})"
        if base is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            g.add_argument(flag, type=base, default=None, metavar=base.__name__.upper(), help=help_text)


def train_overrides(args: argparse.Namespace) -> dict:
    import dataclasses

    from .train import TrainConfig
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="*", help="books: files, folders or globs (.txt .md .html .epub .pdf)")
    p.add_argument("--out", required=True, help="run directory (metrics, checkpoints, final model)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with its own data, model and settings; "
                        "only stop conditions (--max-steps, --max-tokens, --epochs, --time-budget-s, "
                        "--early-stopping-patience) and how it runs (--device, --eval-every, --save-every, ...) may "
                        "change; each resume is recorded in OUT/resumes.jsonl")
    m = p.add_argument_group("model (one of)")
    m.add_argument("--preset", help="family-size preset, e.g. gpt2-small, llama-tiny, gpt-medium, gpt2-124m")
    m.add_argument("--config", help="a ModelConfig JSON file (seed keys like d_model/num_layers accepted)")
    m.add_argument("--init", help="start from this model directory's weights and tokenizer")
    d = p.add_argument_group("data and tokenizer")
    d.add_argument("--dataset", help="a prepared token dataset (lmlab data prepare) instead of SOURCES")
    d.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one on SOURCES")
    d.add_argument("--tokenizer-kind", choices=["bpe", "char", "word"], help="kind to train (bpe)")
    d.add_argument("--vocab-size", type=int, help="vocabulary size to train (8192)")
    d.add_argument("--val-fraction", type=float, help="held-out share of each document (0.05)")
    d.add_argument("--weight", action="append", default=[], metavar="NAME=W", help="document sampling weight")
    add_train_config_arguments(p)


# what a new run is made of; a resumed run has its own
_NEW_RUN_ONLY = ("sources", "preset", "config", "init", "dataset", "tokenizer", "tokenizer_kind", "vocab_size",
                 "val_fraction", "weight")


@command("train", "train a model on your books (or resume a run)", _train_arguments)
def _train(args: argparse.Namespace) -> int:
    from .models import ModelConfig
    from .train import TrainConfig
    from .train.recipes import resume_run, train_from_sources

    overrides = train_overrides(args)
    if args.resume:
        given = ["SOURCES" if k == "sources" else "--" + k.replace("_", "-") for k in _NEW_RUN_ONLY
                 if getattr(args, k) not in (None, [])]
        if given:
            raise ValueError(f"--resume continues the run in --out with its own data, tokenizer and model; drop "
                             f"{', '.join(given)}")
        result = resume_run(args.out, overrides)
    else:
        if not any(overrides.get(k) for k in ("max_steps", "max_tokens", "epochs", "time_budget_s")):
            overrides["epochs"] = 1.0  # a sensible stop when none is given: one pass over the books
        config = TrainConfig.from_dict(overrides)
        model_config = ModelConfig.load(args.config) if args.config else None
        data = {k: v for k in ("tokenizer_kind", "vocab_size", "val_fraction") if (v := getattr(args, k)) is not None}
        result = train_from_sources(
            args.out, config, sources=args.sources, dataset=args.dataset, preset=args.preset,
            model_config=model_config, init=args.init, tokenizer=args.tokenizer, weights=parse_weights(args.weight),
            **data)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    print(f"stopped after {result.steps} steps ({result.stop_reason})"
          + (f"; final loss {result.final_loss:.4f}" if result.final_loss is not None else "")
          + (f", best val loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""))
    if result.stop_reason == "interrupted":
        print(f"continue with: lmlab train --out {args.out} --resume")
        return 130
    print(f"model: {Path(args.out) / 'final'}")
    return 0


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a model directory")
    p.add_argument("texts", nargs="+", help="files, folders or globs to evaluate on")
    p.add_argument("--seq-len", type=int, help="window length (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (8)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")


@command("eval", "loss, perplexity and bits per byte of a model on texts", _eval_arguments)
def _eval(args: argparse.Namespace) -> int:
    from .data import find_documents, read_document
    from .models.io import load_pretrained
    from .train.recipes import evaluate_texts

    model, tok = load_pretrained(args.model_dir, device=_device(args.device))
    if tok is None:
        raise ValueError(f"{args.model_dir} has no tokenizer.json")
    texts = [read_document(p) for p in find_documents(args.texts)]
    r = evaluate_texts(model, tok, texts, seq_len=args.seq_len, batch_size=args.batch_size)
    print(f"loss {r['loss']:.4f} nats/token | perplexity {r['perplexity']:.2f} | "
          f"bits per byte {r['bits_per_byte']:.4f} | {r['tokens']:,} tokens")
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="lmlab-demo", help="run directory to create (default ./lmlab-demo)")
    p.add_argument("--budget", type=float, default=180.0,
                   help="seconds for the whole demo (180); the steps are fitted to it after timing a few")
    p.add_argument("--max-steps", type=int, help="train exactly this many steps instead (reproducible anywhere)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--seed", type=int, default=0, help="seed for the book, the model and the samples")


@command("demo", "the main job: train a small model on a built-in book and show text before/after", _demo_arguments)
def _demo(args: argparse.Namespace) -> int:
    from .train.recipes import run_demo
    run_demo(args.out, budget_s=args.budget, max_steps=args.max_steps, seed=args.seed, device=args.device)
    return 0


# ---- serve ------------------------------------------------------------------------------------------

def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --api-token)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--workspace", help="folder for books/, models/, runs/ and the database (default: your data dir)")
    p.add_argument("--database-url", help="SQLAlchemy URL, e.g. postgresql://... (default: SQLite in the workspace)")
    p.add_argument("--api-token", default=os.environ.get("LMLAB_API_TOKEN"),
                   help="token required on every request (default: $LMLAB_API_TOKEN)")
    p.add_argument("--max-jobs", type=int, default=1, help="training processes at once; more wait in a queue (1)")
    p.add_argument("--max-upload-mb", type=float, default=100.0, help="largest book upload in MiB (100)")
    p.add_argument("--memory-budget-gb", type=float, help="refuse models/batches estimated above this (70%% of RAM)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="intra-op threads for generation; 1 lets requests run side by side (default 1)")


@command("serve", "the web app: upload books, create and train models, watch live charts, generate", _serve_arguments)
def _serve(args: argparse.Namespace) -> int:
    try:
        from .server import Settings, serve
    except ImportError as exc:
        raise ValueError(f"lmlab serve needs the server extra: pip install 'lmlab[server]' ({exc})") from None
    settings = Settings(workspace=args.workspace, database_url=args.database_url, api_token=args.api_token or None,
                        host=args.host, port=args.port, max_jobs=args.max_jobs,
                        max_upload_bytes=int(args.max_upload_mb * 2**20),
                        memory_budget_bytes=int(args.memory_budget_gb * 2**30) if args.memory_budget_gb else None,
                        torch_threads=args.torch_threads)
    serve(settings)
    return 0


# ---- export / import (Hugging Face transformers, GGUF for llama.cpp) --------------------------------

def _export_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    h = sub.add_parser("hf", help="a transformers-native checkpoint (GPT2LMHeadModel, LlamaForCausalLM, "
                                  "OpenAIGPTLMHeadModel) with its tokenizer; no custom code needed to load it")
    h.add_argument("model_dir", help="an lmlab model directory")
    h.add_argument("out_dir", help="folder to write (created, or updated in place)")
    g = sub.add_parser("gguf", help="one GGUF file for llama.cpp (llama and gpt2 families, bpe tokenizers)")
    g.add_argument("model_dir", help="an lmlab model directory")
    g.add_argument("out_file", help="the .gguf file to write")
    g.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0"],
                   help="weight type of the matrices (default f32; norms and biases stay f32)")


@command("export", "export a model: lmlab export hf MODEL_DIR OUT_DIR | lmlab export gguf MODEL_DIR OUT.gguf",
         _export_arguments)
def _export(args: argparse.Namespace) -> int:
    from .interop import export_gguf, export_hf
    try:
        if args.format == "hf":
            out = export_hf(args.model_dir, args.out_dir)
            print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
        else:
            out = export_gguf(args.model_dir, args.out_file, dtype=args.dtype)
            print(f"wrote {out} ({args.dtype}, {out.stat().st_size / 2**20:.1f} MiB; run with llama.cpp: "
                  f"llama-cli -m {out})")
    except ImportError as exc:  # an optional dependency is missing: say which extra to install
        raise ValueError(str(exc)) from None
    return 0


def _import_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    h = sub.add_parser("hf", help="a local transformers checkpoint (GPT-2, Llama, GPT-1; safetensors)")
    h.add_argument("hf_dir", help="folder with config.json, model.safetensors and tokenizer.json")
    h.add_argument("model_dir", help="lmlab model directory to write")


@command("import", "import a model: lmlab import hf HF_DIR MODEL_DIR", _import_arguments)
def _import(args: argparse.Namespace) -> int:
    from .interop import import_hf
    out = import_hf(args.hf_dir, args.model_dir)
    if (out / "tokenizer.json").is_file():
        print(f"wrote {out} (continue training with: lmlab train SOURCES --init {out} --out RUN_DIR)")
    else:
        print(f"wrote {out}; its tokenizer does not put <PAD> <UNK> <BOS> <EOS> at ids 0-3, so it is kept "
              f"unchanged in {out / 'hf_tokenizer'} (used by lmlab export; see docs/interop.md)")
    return 0


# ---- entry point ------------------------------------------------------------------------------------

# ---- selfplay ---------------------------------------------------------------------------------------

def _selfplay_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    a = sub.add_parser("azr", help="Absolute Zero miniature on a program DSL: warm-up only, solver-only RL on "
                                   "random tasks, AZR with a frozen proposer, full AZR (matched compute)")
    a.add_argument("--out", required=True, help="folder for results.json, solve_rate.png, proposer.png, report.html")
    a.add_argument("--seeds", default="3", help="a count N (seeds 0..N-1) or a comma list like 0,1,2 (default 3)")
    a.add_argument("--workers", type=int, default=2, help="seeds run in parallel processes, 1 thread each (2)")
    a.add_argument("--quick", action="store_true", help="a smoke run in seconds; its numbers mean nothing")
    a.add_argument("--arms", help="comma list of arms (default all: warmup_only,solver_rl_random,"
                                  "azr_frozen_proposer,azr)")
    a.add_argument("--iterations", type=int, help="self-play iterations, one gradient step each")
    a.add_argument("--warmup-steps", type=int, help="next-token warm-up steps on random-program triples")
    a.add_argument("--propose-batch", type=int, help="proposals per task type per iteration")
    a.add_argument("--solve-batch", type=int, help="solver answers trained per task type per iteration")
    a.add_argument("--group", type=int, help="solver samples G that score a proposal's learnability")
    a.add_argument("--lr", type=float, help="Adam learning rate of the RL phase")
    a.add_argument("--eval-every", type=int, help="score the held-out set every N iterations")
    t = sub.add_parser("text", help="RL for a text model: group-relative advantages, KL to the starting model")
    t.add_argument("--model", help="model directory to start from (e.g. lmlab-demo/final); with --resume, the "
                                    "run's own by default")
    t.add_argument("--out", required=True, help="folder for metrics.jsonl, config.json, checkpoints/ and final/")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint; settings not given come from "
                        "OUT/config.json, and those given must match it (only --iterations and --save-every may "
                        "change)")
    t.add_argument("--reward", choices=["seed", "repetition", "perplexity", "file"],
                   help="seed: seed 000's diversity*0.5+length*0.5; repetition: distinct 3-grams; perplexity: "
                        "judge log-prob (--judge); file: your function (--reward-file) (default seed)")
    t.add_argument("--judge", help="model directory of the judge for --reward perplexity")
    t.add_argument("--reward-file", help="FILE.py:FUNCTION, fn(prompt, completion) -> float, for --reward file")
    t.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: start from <BOS>)")
    t.add_argument("--prompts-file", metavar="FILE", help="a JSON list of prompt strings, instead of --prompt "
                                                          "(keeps them off the command line)")
    t.add_argument("--seed", type=int, help="seed for sampling and the update (default 0)")
    t.add_argument("--quick", action="store_true", help="a few small iterations, to check a setup")
    t.add_argument("--iterations", type=int, help="policy updates (default 40)")
    t.add_argument("--group-size", type=int, help="completions per prompt (default 8)")
    t.add_argument("--prompts-per-iteration", type=int, help="prompts per update (default 4)")
    t.add_argument("--max-new-tokens", type=int, help="tokens per completion (default 48)")
    t.add_argument("--lr", type=float, help="AdamW learning rate (default 5e-5)")
    t.add_argument("--kl-coef", type=float, help="weight of the KL penalty to the starting model (default 0.1)")
    t.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    t.add_argument("--save-every", type=int, help="checkpoint OUT/checkpoints/step-N every N iterations (0: only at "
                                                  "the end; also on Ctrl-C or SIGTERM) (default 10)")


@command("selfplay", "self-play RL: lmlab selfplay azr --out DIR | lmlab selfplay text --model DIR --out DIR",
         _selfplay_arguments)
def _selfplay(args: argparse.Namespace) -> int:
    from .lab.selfplay.text import SETTING_FLAGS
    names = {"azr": ("arms", "iterations", "warmup_steps", "propose_batch", "solve_batch", "group", "lr",
                     "eval_every"),
             "text": (*SETTING_FLAGS, "reward")}[args.mode]
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.mode == "azr":
        from .lab.selfplay.azr import AZRConfig, parse_seeds, run_experiment
        from .lab.selfplay.report import table
        if "arms" in overrides:
            overrides["arms"] = tuple(a.strip() for a in overrides["arms"].split(",") if a.strip())
        cfg = AZRConfig.quick(**overrides) if args.quick else AZRConfig(**overrides)
        results = run_experiment(cfg, parse_seeds(args.seeds), args.out, workers=args.workers)
        for row in table(results):
            print(" | ".join(row))
        verdict = results["summary"]["verdict"].get("reproduces")
        print(f"reproduces: {verdict}; report: {Path(args.out) / 'report.html'}")
        return 0
    from .lab.selfplay.text import TextSelfPlayConfig, read_prompts_file, resume_text_selfplay, run_text_selfplay
    if args.prompt and args.prompts_file:
        raise ValueError("give --prompt or --prompts-file, not both")
    prompts = read_prompts_file(args.prompts_file) if args.prompts_file else args.prompt
    if args.resume:
        if args.quick:
            raise ValueError("--quick sets up a new run; --resume continues one with the settings it was started with")
        rows = resume_text_selfplay(args.out, overrides, model_dir=args.model, prompts=prompts, judge=args.judge,
                                    reward_file=args.reward_file)
    else:
        if not args.model:
            raise ValueError("--model is required (except with --resume)")
        cfg = TextSelfPlayConfig.quick(**overrides) if args.quick else TextSelfPlayConfig(**overrides)
        rows = run_text_selfplay(args.model, args.out, cfg, prompts or [""], judge=args.judge,
                                 reward_file=args.reward_file)
    print(f"reward {rows[0]['reward']:.4f} -> {rows[-1]['reward']:.4f}, kl {rows[-1]['kl']:.4f}; "
          f"model: {Path(args.out) / 'final'}")
    return 0


# ---- lab facts --------------------------------------------------------------------------------------

_FACTS_VERBS = ("phases", "plateau", "alpha", "warmup", "hallucination", "finetune", "memory", "patching",
                "ablation", "all")


def _lab_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lab", required=True, metavar="LAB")
    f = sub.add_parser("facts", help="knowledge acquisition on synthetic biographies (Zucchet et al. 2025)",
                       description="Experiments of Zucchet et al. 2025 at CPU scale; each writes results.json, PNG "
                                   "plots and report.html into --out. Example: lmlab lab facts phases --out runs/facts")
    f.add_argument("verb", choices=_FACTS_VERBS, metavar="EXPERIMENT",
                   help="phases | plateau | alpha | warmup | hallucination | finetune | memory | patching | "
                        "ablation | all")
    f.add_argument("--out", required=True, help="folder for results.json, plots and report.html")
    f.add_argument("--seeds", default="0,1,2", help="comma list (0,1,2) or range (0-4) of seeds (default 0,1,2)")
    f.add_argument("--quick", action="store_true", help="reduced sizes and budgets (minutes instead of tens)")
    f.add_argument("--workers", type=int, help="parallel processes, 1 thread each (default: one per CPU core)")


@command("lab", "labs: lmlab lab facts phases|plateau|alpha|warmup|hallucination|finetune|memory|patching|"
                "ablation|all --out DIR", _lab_arguments)
def _lab(args: argparse.Namespace) -> int:
    from .lab.facts.experiments import parse_seeds, run_experiment
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers ({args.workers}) must be >= 1")
    results = run_experiment(args.verb, parse_seeds(args.seeds), Path(args.out), args.quick, args.workers)
    for name, res in (results.items() if args.verb == "all" else [(args.verb, results)]):
        if isinstance(res, dict) and "speed" in res:
            where = Path(args.out) / (name if args.verb == "all" else "") / "report.html"
            verdict = res.get("verdict", "inconclusive")
            print(f"{name}: {verdict} ({res.get('measured')}); wall {res['speed']['wall_s']:.0f} s; report: {where}")
    return 0


_DEBUG_HELP = "on an error, print the traceback too"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description="Train, study and ship small language models.")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


_PACKAGE = Path(__file__).resolve().parent
_RAISE = dis.opmap["RAISE_VARARGS"]
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_user_error(exc: BaseException) -> bool:
    """Bad input rather than a bug: an OSError about a path, or a ValueError that lmlab's own code raised with
    its own message (a `raise` statement in the package: the house convention for input it refuses). A
    ValueError from inside torch, numpy or the standard library, or from an operation that failed in lmlab's
    code (an unpacking, an int() of something never checked), is a bug."""
    if isinstance(exc, _PATH_ERRORS):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # the frame the exception was raised in
    if not isinstance(exc, ValueError) or tb is None:
        return False
    code = tb.tb_frame.f_code
    return Path(code.co_filename).resolve().is_relative_to(_PACKAGE) and code.co_code[tb.tb_lasti] == _RAISE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with 2 on unknown flags
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    from .train.console import console_progress

    try:
        with console_progress():  # the Trainer's progress line (it only logs; a library user sees nothing)
            return args.run(args)
    except KeyboardInterrupt:
        print("lmlab: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        user = is_user_error(exc)
        if args.debug or not user:
            traceback.print_exc()
        if not user:
            print(f"lmlab: internal error: {type(exc).__name__}; this is a bug in lmlab, please report it with the "
                  "traceback above", file=sys.stderr)
            return 1
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"lmlab: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
