"""The `lmlab` command. Parses flags, calls library functions, prints. No logic of its own.

    lmlab info --preset llama-small            # parameters, FLOPs/token, memory for a preset
    lmlab info runs/demo/final                 # ... or for a model directory
    lmlab generate runs/demo/final --prompt "Once upon a time" --temperature 0.8 --top-k 40

Bad input prints one line `lmlab: error: ...` and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
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


def generation_config_from_args(args: argparse.Namespace):
    from .models import GenerationConfig
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        num_beams=args.num_beams, length_penalty=args.length_penalty, stop_strings=list(args.stop),
        stop_at_eos=not args.ignore_eos, seed=args.seed)


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
    ds = prepare(args.sources, tok, args.out, val_fraction=args.val_fraction, weights=parse_weights(args.weight))
    st = ds.stats(cfg)
    print(f"documents:  {st['documents']} ({st['documents_without_val']} too short to hold out a val slice)")
    print(f"characters: {st['characters']:,}")
    print(f"tokens:     {st['tokens']:,} (train {st['train_tokens']:,}, val {st['val_tokens']:,})")
    if cfg is not None:
        print(f"tokens per parameter: {st['tokens_per_parameter']:.2f} for {args.preset} "
              f"({st['parameters']:,} parameters; Chinchilla-optimal is ~20, i.e. {st['chinchilla_tokens']:,} tokens)")
    print(f"written to {args.out}")
    return 0


# ---- entry point ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description="Train, study and ship small language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with 2 on unknown flags
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"lmlab: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
