"""The `lmlab` command. Parses flags, calls library functions, prints. No logic of its own.

    lmlab info --preset llama-small            # parameters, FLOPs/token, memory for a preset
    lmlab info runs/demo/final                 # ... or for a model directory
    lmlab generate runs/demo/final --prompt "Once upon a time" --temperature 0.8 --top-k 40

Bad input prints one line `lmlab: error: ...` and exits with code 2 (`--debug` adds the traceback); any other
error is a bug in lmlab: its traceback, a line saying so, and exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import itertools
import math
import os
import re
import shlex
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .configs import add_arguments, given, is_user_error, parse_seeds, read_config_file

Registry = dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]]


def registrar(registry: Registry):
    """A decorator factory: @reg(name, help, add_arguments) on run(args) -> exit code puts it into `registry`."""
    def mode(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
        def register(fn: Callable[[argparse.Namespace], int]):
            registry[name] = (help, arguments, fn)
            return fn
        return register
    return mode


def _literal(help_text: str) -> str:
    """A command's help as argparse's help= takes it: %-formatted there ("95% intervals" crashed `lmlab --help`),
    unlike description=."""
    return help_text.replace("%", "%%")


def registry_arguments(p: argparse.ArgumentParser, registry: Registry, dest: str, metavar: str, run_key: str) -> None:
    """One subcommand per registry entry; the chosen run lands in args.<run_key> (a key of its own per level,
    so that a nested registry does not overwrite its parent's)."""
    sub = p.add_subparsers(dest=dest, required=True, metavar=metavar)
    for name, (help_text, arguments, run) in registry.items():
        t = sub.add_parser(name, help=_literal(help_text), description=help_text)
        arguments(t)
        t.set_defaults(**{run_key: run})


# Subcommands register here: name -> (help, add_arguments, run). Each run(args) returns an exit code.
COMMANDS: Registry = {}
command = registrar(COMMANDS)


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


# ---- info -------------------------------------------------------------------------------------------

def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", help="a model directory (config.json + model.safetensors), or a run "
                   "(its final model)")
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
    if args.model_dir and args.vocab_size is not None:
        raise ValueError("--vocab-size is a preset's; a model directory has its own: leave it out")
    if args.batch_size < 1 or (args.seq_len is not None and args.seq_len < 1):
        raise ValueError("--batch-size and --seq-len must be >= 1")
    if args.preset:
        overrides = {"vocab_size": args.vocab_size} if args.vocab_size is not None else {}
        cfg = ModelConfig.preset(args.preset, **overrides)
        source = f"preset {args.preset}"
    else:
        path = _model_dir(args.model_dir)  # a run: its final model, as eval and chat take it
        if not (path / CONFIG).is_file():
            raise FileNotFoundError(f"not a model directory (no {CONFIG}): {path}")
        cfg = ModelConfig.load(path / CONFIG)
        source = str(path)
    if args.seq_len is not None and args.seq_len > cfg.block_size:
        raise ValueError(f"--seq-len ({args.seq_len}) is longer than the model's context ({cfg.block_size})")
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
    qc = _quantization(path) if args.model_dir else None
    if qc is None:
        print(f"inference memory:  {_fmt_bytes(infer['total'])} (fp32 weights + KV cache for {T} tokens)")
        print(f"training memory:   ~{_fmt_bytes(train['total'])} (fp32 + AdamW, batch {args.batch_size}×{T})")
        return 0
    from .models.io import WEIGHTS
    from .models.quant import weight_bits
    bpw, qbpw = weight_bits(path / WEIGHTS, n)
    head = "int" + str(qc.bits) if "lm_head" in qc.modules else "fp32"
    print(f"quantized:         int{qc.bits}{f' g{qc.group_size}' if qc.group_size else ''} {qc.method}, "
          f"{len(qc.modules)} linears, head {head}; {bpw:.2f} bits per parameter"
          + (f" ({qbpw:.2f} in the quantized linears)" if qbpw else ""))
    print(f"inference memory:  {_fmt_bytes(int(bpw * n / 8) + infer['kv_cache'])} (the stored weights + fp32 KV "
          f"cache for {T} tokens)")
    print("training memory:   - (a quantized model does not train; train the model it was made from: "
          f"{qc.source or 'its source'})")
    return 0


def _quantization(path: Path) -> Any:
    """The QuantConfig of a quantized model directory, else None."""
    from .models.quant import QUANTIZATION, QuantConfig
    return QuantConfig.load(path / QUANTIZATION) if (path / QUANTIZATION).is_file() else None



# ---- generate ---------------------------------------------------------------------------------------

def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """GenerationConfig's fields as flags, plus the short spellings --greedy, --ignore-eos and --stop TEXT."""
    from .models import GenerationConfig
    add_arguments(p, GenerationConfig, title="sampling (GenerationConfig; default: the model's generation.json)")
    p.add_argument("--greedy", dest="do_sample", action="store_const", const=False, help="= --no-do-sample")
    p.add_argument("--ignore-eos", dest="stop_at_eos", action="store_const", const=False, help="= --no-stop-at-eos")
    p.add_argument("--stop", dest="stop_strings", action="append", metavar="TEXT", help="a stop string (repeatable)")


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a model directory")
    p.add_argument("--prompt", default=None, help="prompt text (default: read standard input)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples of the same prompt")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--no-stream", action="store_true", help="print when done instead of token by token")
    add_sampling_arguments(p)
    from .tune.config import TASK_NAMES

    t = p.add_argument_group("test-time compute (models/ttc.py): one of --best-of, --vote, --beam")
    t.add_argument("--best-of", type=int, metavar="N", help="N samples (seeds seed .. seed+N-1; without --seed "
                   "0 .. N-1, so the same every run), print the one --verifier scores highest")
    t.add_argument("--vote", type=int, metavar="N", help="N samples (seeds as --best-of), majority vote over the "
                   "answers --task extracts (self-consistency, Wang et al. 2023)")
    t.add_argument("--beam", type=int, metavar="W", help="step-wise beam search of width W, scored by the model's "
                   "mean log-prob per token or by --verifier; deterministic (the raw distribution, greedy within a "
                   "step, stops at EOS: no sampling flags) and without a KV cache (each step recomputes the "
                   "context: slow past short answers)")
    t.add_argument("--verifier", "--task", dest="verifier", metavar="TASK",
                   help=f"a post-training task ({', '.join(TASK_NAMES)}; the prompt then starts a text, <BOS> first, "
                   "as in lmlab tune grpo): its checker scores (--best-of, --beam), its extractor finds answers "
                   "(--vote); or logprob: the model's own mean log-prob per token (--best-of, --beam)")
    t.add_argument("--step-tokens", type=int, help="--beam: tokens per step (default 4)")
    s = p.add_argument_group("steering (lab/interp/steer.py; make a direction with lmlab lab interp steer)")
    s.add_argument("--steer", metavar="DIR_OR_FILE", help="a steering direction: its folder or direction.safetensors")
    s.add_argument("--steer-coef", type=float, metavar="C", help="add C times the direction at its layer, every "
                   "position and every decoding step (default 1)")
    s.add_argument("--steer-ablate", action="store_true", help="project the direction out of every layer's residual "
                   "stream instead (Arditi et al. 2024)")


# GenerationConfig fields step-wise beam search has no use for (it reads max_new_tokens only), as flags
_BEAM_IGNORES = {"do_sample": "--do-sample/--greedy", "temperature": "--temperature", "top_k": "--top-k",
                 "top_p": "--top-p", "repetition_penalty": "--repetition-penalty", "length_penalty": "--length-penalty",
                 "stop_strings": "--stop", "stop_at_eos": "--stop-at-eos/--ignore-eos", "seed": "--seed",
                 "prompt_lookup": "--prompt-lookup"}


_NUM_BEAMS_IGNORES = ("do_sample", "temperature", "top_k", "top_p", "stop_strings", "seed", "prompt_lookup")


def _ttc_flag(args: argparse.Namespace) -> tuple[str, int] | None:
    """The test-time compute flag given (--best-of, --vote or --beam) and its N, checked before any loading."""
    chosen = [f for f in ("best_of", "vote", "beam") if getattr(args, f) is not None]
    if not chosen:
        for extra in ("verifier", "step_tokens"):
            if getattr(args, extra) is not None:
                raise ValueError(f"--{extra.replace('_', '-')} is for --best-of, --vote or --beam")
        return None
    if len(chosen) > 1:
        raise ValueError("give one of --best-of, --vote and --beam")
    flag, n = chosen[0].replace("_", "-"), getattr(args, chosen[0])
    if n < 1:
        raise ValueError(f"--{flag} ({n}) must be >= 1")
    if args.num_samples != 1:
        raise ValueError(f"--{flag} chooses among its own samples: leave out --num-samples")
    if args.step_tokens is not None and (flag != "beam" or args.step_tokens < 1):
        raise ValueError("--step-tokens (a number >= 1) is for --beam")
    if flag != "beam" and args.verifier is None:
        raise ValueError(f"--{flag} needs --verifier TASK" + (" or logprob" if flag == "best-of" else ""))
    if flag == "vote" and args.verifier == "logprob":
        raise ValueError("--vote needs a task (its answer extractor), not logprob")
    if flag == "beam":
        from .models import GenerationConfig
        ignored = [_BEAM_IGNORES[k] for k in given(args, GenerationConfig) if k in _BEAM_IGNORES]
        if ignored:
            raise ValueError(f"--beam is deterministic and stops at EOS (see --help): leave out {', '.join(ignored)}")
    if args.verifier not in (None, "logprob"):
        from .tune.rewards import get_task
        get_task(args.verifier)
    return flag, n


def _test_time_compute(args: argparse.Namespace, flag: str, n: int, model: Any, tokenizer: Any, prompt: str,
                       cfg: Any) -> int:
    """--best-of / --vote / --beam: the chosen completion, then one line on what was spent."""
    from .models import ttc
    from .tune.rewards import get_task

    if cfg.num_beams != 1:
        raise ValueError(f"--{flag} searches on its own: leave out --num-beams")
    task = get_task(args.verifier) if args.verifier not in (None, "logprob") else None
    res, line = ttc.run_strategy(model, tokenizer, prompt, cfg, flag, n, task, args.step_tokens or 4)
    print(prompt + (_for_terminal(res.text) if sys.stdout.isatty() else res.text))
    print(line, file=sys.stderr)
    return 0


@command("generate", "generate text from a model directory, streaming to the terminal", _generate_arguments)
def _generate(args: argparse.Namespace) -> int:
    from .models import GenerationConfig
    from .models.io import load_generation_config, load_pretrained
    from .train.trainer import resolve_device

    if args.num_samples < 1:
        raise ValueError("--num-samples must be >= 1")
    ttc = _ttc_flag(args)
    direction = _steer_direction(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if ttc is not None and args.verifier not in (None, "logprob"):
        from .tune.rewards import get_task
        get_task(args.verifier).answer(prompt)  # a prompt the checker cannot read: now, not after all the sampling
    model, tokenizer = load_pretrained(args.model_dir, device=resolve_device(args.device))
    cfg = dataclasses.replace(load_generation_config(args.model_dir), **given(args, GenerationConfig))
    if tokenizer is None:
        raise ValueError(f"{args.model_dir} has no tokenizer.json; cannot turn text into tokens")
    if cfg.num_beams > 1 and ttc is None:  # what beam search would leave unused is refused, as --beam does
        ignored = [_BEAM_IGNORES[k] for k in given(args, GenerationConfig) if k in _NUM_BEAMS_IGNORES]
        ignored += ["--num-samples"] * (args.num_samples > 1)
        if ignored:
            raise ValueError(f"--num-beams is deterministic and ignores stop strings: leave out {', '.join(ignored)}")
    from .lab.interp.steer import Steering
    coef = 1.0 if args.steer_coef is None and not args.steer_ablate else args.steer_coef or 0.0
    with Steering(model, direction, coef, args.steer_ablate):  # no hooks without --steer
        if ttc is not None:
            return _test_time_compute(args, *ttc, model, tokenizer, prompt, cfg)
        _samples(args, model, tokenizer, prompt, cfg)
    return 0


def _steer_direction(args: argparse.Namespace) -> Any:
    """--steer's direction (None without it), its flags checked before the model loads."""
    if args.steer is None:
        if args.steer_coef is not None or args.steer_ablate:
            raise ValueError("--steer-coef and --steer-ablate need --steer DIR_OR_FILE")
        return None
    if args.steer_ablate and args.steer_coef is not None:
        raise ValueError("give --steer-coef (add the direction) or --steer-ablate (project it out), not both")
    from .lab.interp.steer import MAX_COEF, Direction
    if args.steer_coef is not None and not math.isfinite(args.steer_coef):
        raise ValueError(f"--steer-coef ({args.steer_coef}) must be a finite number")
    if args.steer_coef is not None and abs(args.steer_coef) > MAX_COEF:
        raise ValueError(f"--steer-coef ({args.steer_coef:g}) must be between -{MAX_COEF:g} and {MAX_COEF:g}")
    return Direction.load(args.steer)


def _samples(args: argparse.Namespace, model: Any, tokenizer: Any, prompt: str, cfg: Any) -> None:
    from .models import generate, stream
    show = _for_terminal if sys.stdout.isatty() else str
    for i in range(args.num_samples):
        sample_cfg = cfg if cfg.seed is None else dataclasses.replace(cfg, seed=cfg.seed + i)
        if i:
            print("\n" + "-" * 40)
        # the text (or its first piece) before the prompt is printed: a refusal (beams the memory cannot hold)
        # prints its one line alone, not after a prompt that looked like the start of an answer
        if args.no_stream or cfg.num_beams > 1:
            pieces: Any = [generate(model, tokenizer, prompt, sample_cfg)]
        else:
            pieces = stream(model, tokenizer, prompt, sample_cfg)
            pieces = itertools.chain([next(pieces, "")], pieces)
        print(prompt, end="", flush=True)
        for piece in pieces:
            print(show(piece), end="", flush=True)
        print()


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _for_terminal(text: str) -> str:
    """A model's text as a terminal may show it: control characters (an escape sequence can move the cursor,
    retitle the window or worse) written as \\xNN; newlines and tabs stay."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)



# ---- tokenizer train / data prepare -----------------------------------------------------------------

def _tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train a tokenizer on every document found in SOURCES")
    t.add_argument("sources", nargs="+", help="files, folders or globs (.txt .md .html .epub .pdf)")
    t.add_argument("--kind", default="bpe", choices=["bpe", "char", "word"], help="tokenizer kind (default bpe)")
    t.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size incl. 4 specials (default 8192)")
    t.add_argument("--out", required=True, help="where to write tokenizer.json (a file, or a folder to write it in)")
    t.add_argument("--force", action="store_true", help="replace the file --out names if it exists")


@command("tokenizer", "train a tokenizer (lmlab tokenizer train SOURCES --out tokenizer.json)", _tokenizer_arguments)
def _tokenizer(args: argparse.Namespace) -> int:
    from .data import find_documents, read_document
    from .files import refuse_existing
    from .tokenizers import Tokenizer

    out = Path(args.out)
    target = out / "tokenizer.json" if out.is_dir() else out
    if not args.force:  # before the training: Tokenizer.save refuses the same, after it
        refuse_existing(target)
    paths = find_documents(args.sources)
    texts = [read_document(p) for p in paths]
    if not any(t.strip() for t in texts):
        raise ValueError("the corpus is empty: no document has any text")
    tok = Tokenizer.train(texts, kind=args.kind, vocab_size=args.vocab_size)
    tok.save(target, overwrite=args.force)
    sample = next(t for t in texts if t.strip())[:60].strip()
    print(f"{tok.kind} tokenizer, {tok.vocab_size} tokens, trained on {len(paths)} documents -> {out}")
    print(f"sample: {sample!r} -> {tok.encode(sample)[:20]}")
    return 0


# Data tools register here like the labs: `lmlab data ACTION ...`, name -> (help, add_arguments, run).
DATA_TOOLS: Registry = {}
data_tool = registrar(DATA_TOOLS)


@command("data", "data tools: lmlab data ACTION ... (prepare: token files; lmlab data --help lists the others)",
         lambda p: registry_arguments(p, DATA_TOOLS, "action", "ACTION", "data_tool_run"))
def _data(args: argparse.Namespace) -> int:
    return args.data_tool_run(args)


def _prepare_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("sources", nargs="+", help="files, folders or globs (.txt .md .html .epub .pdf)")
    d.add_argument("--tokenizer", required=True, help="tokenizer.json, or a model directory holding one")
    d.add_argument("--out", required=True, help="output folder (tokens.bin + tokens.json)")
    d.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of each document (0.05)")
    d.add_argument("--weight", action="append", default=[], metavar="NAME=W",
                   help="sampling weight of a document by file name or stem (repeatable)")
    d.add_argument("--preset", help="report tokens per parameter for this preset, e.g. gpt2-small")
    d.add_argument("--seq-len", type=int, help="refuse a corpus without one training window of this length")
    d.add_argument("--force", action="store_true", help="replace a dataset already in --out (a run trained on it "
                   "then refuses to resume on the new one)")
    d.add_argument("--filters", help=_FILTERS_HELP + "; they run before tokenising and are recorded in "
                   "tokens.json, receipts with examples in OUT/receipts.json")
    _filter_level_argument(d)


_FILTERS_HELP = ("quality filters, run in order: a comma list of gopher, c4, fineweb, lang=CODE "
                 "(lang=ru+uk), each with optional :KEY=VALUE thresholds, e.g. gopher:max_words=1000000")


def _filter_level_argument(d: Any) -> None:
    d.add_argument("--filter-level", choices=("document", "paragraph"),
                   help="what the filters judge: whole documents (a book is one), or each paragraph on its own "
                        "(a document keeps the paragraphs that pass); default document")


def _filters(args: argparse.Namespace) -> Any:
    """--filters and --filter-level as a FilterPlan, or () without --filters."""
    from .data.filters import parse_filters
    if args.filters is None:
        if args.filter_level is not None:
            raise ValueError("--filter-level applies to --filters: give them too")
        return ()
    return parse_filters(args.filters, args.filter_level or "document")


def _print_receipts(receipts: dict) -> None:
    paragraphs = (f"{receipts['paragraphs_kept']} of {receipts['paragraphs_in']} paragraphs, "
                  if "paragraphs_in" in receipts else "")
    print(f"filters: {receipts['documents_kept']} of {receipts['documents_in']} documents kept, {paragraphs}"
          f"{receipts['characters_kept']:,} of {receipts['characters_in']:,} characters")
    for r in receipts["filters"]:
        rules = ", ".join(f"{k} {v}" for k, v in {**r["removed_by_rule"], **r["lines_removed_by_rule"]}.items())
        paragraphs = (f"{r['paragraphs_removed']} of {r['paragraphs_in']} paragraphs, " if "paragraphs_in" in r
                      else "")
        print(f"  {r['name']:<8} removed {paragraphs}{r['documents_removed']} of {r['documents_in']} documents, "
              f"{r['characters_removed']:,} characters" + (f" ({rules})" if rules else ""))
        for ex in r["examples"][:3]:
            print(f"    {ex['document']}: {ex['rule']} = {ex['value']} (keep: {ex['limit']})")


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


@data_tool("prepare", "tokenise documents once into a token file with a held-out split", _prepare_arguments)
def _data_prepare(args: argparse.Namespace) -> int:
    import json

    from .data import prepare
    from .models import ModelConfig
    from .tokenizers import Tokenizer

    filters = _filters(args)
    tok = Tokenizer.load(args.tokenizer)
    cfg = ModelConfig.preset(args.preset, vocab_size=tok.vocab_size) if args.preset else None
    ds = prepare(args.sources, tok, args.out, val_fraction=args.val_fraction, weights=parse_weights(args.weight),
                 seq_len=args.seq_len, filters=filters, overwrite=args.force)
    if filters:
        _print_receipts(json.loads((Path(args.out) / "receipts.json").read_text(encoding="utf-8")))
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


def _filter_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("sources", nargs="+", help="files, folders or globs (.txt .md .html .epub .pdf)")
    d.add_argument("--filters", required=True, help=_FILTERS_HELP)
    _filter_level_argument(d)
    d.add_argument("--out", required=True, help="a new or empty folder: the kept texts (NAME.txt) + receipts.json")
    from .data.filters import filter_help

    d.formatter_class, d.epilog = argparse.RawDescriptionHelpFormatter, filter_help()


@data_tool("filter", "quality filters (Gopher, C4, FineWeb, language) with receipts: kept texts + receipts.json",
           _filter_arguments)
def _data_filter(args: argparse.Namespace) -> int:
    import json
    from collections import Counter

    from .data import find_documents, read_document
    from .data.dataset import _document_names
    from .data.filters import apply_filters
    from .files import staged_dir

    filters = _filters(args)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; choose a new one (nothing is overwritten)")
    paths = find_documents(args.sources)
    names = _document_names(paths)
    kept, receipts = apply_filters([read_document(p) for p in paths], names, filters)
    targets = [name if name.endswith(".txt") else name + ".txt" for name in names]
    if len(set(targets)) < len(targets):  # a.md beside a.md.txt
        raise ValueError(f"two documents would be written as the same file: {Counter(targets).most_common(1)[0][0]}")
    with staged_dir(out, replace=False) as tmp:
        for name, text in zip(targets, kept):
            if text is not None:
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
        (tmp / "receipts.json").write_text(json.dumps(receipts, ensure_ascii=False, indent=1) + "\n",
                                           encoding="utf-8")
    _print_receipts(receipts)
    print(f"written to {out} (receipts.json)")
    return 0


def _inspect_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("sources", nargs="+", help="files, folders or globs (.txt .md .html .epub .pdf); a row each")
    d.add_argument("--tokenizer", help="tokenizer.json or a model directory: count tokens")
    d.add_argument("--preset", help="report tokens per parameter for this preset, e.g. gpt2-small")
    b = d.add_argument_group("planned budget, for the epoch advisor (needs --tokenizer)")
    b.add_argument("--planned-tokens", type=int, help="training tokens you plan to spend")
    b.add_argument("--max-steps", type=int, help="... or optimizer steps, times --batch-size × --seq-len × "
                   "--grad-accum-steps")
    b.add_argument("--batch-size", type=int, default=16, help="sequences per micro-step (16, train's default)")
    b.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's block_size)")
    b.add_argument("--grad-accum-steps", type=int, default=1, help="micro-steps per optimizer step (1)")
    d.add_argument("--out", help="folder to write inspect.json into")
    d.add_argument("--force", action="store_true", help="replace an inspect.json already in --out")


@data_tool("inspect", "documents, characters, tokens, languages, encodings, duplicates, length histogram and an "
           "epoch advisor per source", _inspect_arguments)
def _data_inspect(args: argparse.Namespace) -> int:
    import json

    from .data.inspect import format_report, inspect
    from .models import ModelConfig
    from .tokenizers import Tokenizer

    if args.planned_tokens is not None and args.max_steps is not None:
        raise ValueError("give --planned-tokens or --max-steps, not both")
    # --planned-tokens: inspect() checks it, for the Python API too
    if any(v is not None and v <= 0 for v in (args.max_steps, args.batch_size, args.seq_len, args.grad_accum_steps)):
        raise ValueError("--max-steps, --batch-size, --seq-len and --grad-accum-steps must be > 0")
    tok = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    cfg = ModelConfig.preset(args.preset, **({"vocab_size": tok.vocab_size} if tok else {})) if args.preset else None
    planned = args.planned_tokens
    if args.max_steps is not None:
        seq_len = args.seq_len or (cfg.block_size if cfg else None)
        if seq_len is None:
            raise ValueError("--max-steps needs --seq-len or --preset (its block_size) to count tokens")
        planned = args.max_steps * args.batch_size * seq_len * args.grad_accum_steps
    if cfg is not None and tok is None:
        raise ValueError("--preset needs --tokenizer (tokens per parameter)")
    if args.out:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"--out {out} exists and is not a folder")
        _refuse_results([out / "inspect.json"], args.force)  # before the books are read
    report = inspect(args.sources, tok, model_config=cfg, planned_tokens=planned)
    print(format_report(report))
    if args.out:
        out.mkdir(parents=True, exist_ok=True)
        _write_result(out / "inspect.json", json.dumps(report, ensure_ascii=False, indent=1) + "\n", args.force)
        print(f"written to {out / 'inspect.json'}")
    return 0


def _dedup_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("sources", nargs="+", help="files, folders or globs (.txt .md .html .epub .pdf)")
    d.add_argument("--out", required=True, help="new folder: texts/, clusters.json, report.json (never overwritten)")
    d.add_argument("--level", choices=["doc", "paragraph"], default="doc", help="what a duplicate is (default doc)")
    d.add_argument("--near", action=argparse.BooleanOptionalAction, default=True,
                   help="MinHash/LSH near duplicates besides exact ones (--no-near: exact only)")
    d.add_argument("--ngram", type=int, default=5, help="words per shingle (default 5, as datatrove)")
    d.add_argument("--bands", type=int, default=14, help="LSH bands (default 14)")
    d.add_argument("--rows", type=int, default=8,
                   help="permutations per band (default 8; bands x rows in all, at most 1,024)")
    d.add_argument("--seed", type=int, default=1, help="permutation seed (default 1, datasketch's)")
    d.add_argument("--threshold", type=float,
                   help="keep only candidates whose signatures agree on this share of permutations "
                        "(default: every LSH candidate is a duplicate, as datatrove)")
    d.add_argument("--keep", choices=["one", "none"], default="one",
                   help="one: the first member of each cluster stays (default); none: all go")


@data_tool("dedup", "remove exact and near-duplicate documents or paragraphs (MinHash + LSH)", _dedup_arguments)
def _data_dedup(args: argparse.Namespace) -> int:
    from .data.dedup import DedupConfig, dedup

    cfg = DedupConfig(level=args.level, near=args.near, ngram=args.ngram, bands=args.bands, rows=args.rows,
                      seed=args.seed, threshold=args.threshold, keep=args.keep)
    st = dedup(args.sources, args.out, cfg).stats
    print(f"{st['units']:,} {'documents' if cfg.level == 'doc' else 'paragraphs'}: removed {st['removed']:,} "
          f"({st['exact_duplicates']:,} exact copies), {st['clusters']:,} clusters ({st['near_clusters']:,} near)")
    print(f"characters: {st['chars_in']:,} -> {st['chars_out']:,}; LSH candidate pairs {st['candidate_pairs']:,}, "
          f"near pairs kept {st['near_pairs']:,}")
    print(f"written to {args.out} (lmlab data clusters {args.out} --show ID opens a cluster)")
    return 0


def _clusters_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("folder", help="a folder written by lmlab data dedup")
    d.add_argument("--show", type=int, metavar="ID", help="open one cluster: its members and shared shingles")
    d.add_argument("--limit", type=int, default=20, help="clusters listed, or shared shingles shown (default 20)")


@data_tool("clusters", "list the duplicate clusters of lmlab data dedup, or open one", _clusters_arguments)
def _data_clusters(args: argparse.Namespace) -> int:
    from .data.dedup import load_clusters, open_cluster

    if args.limit < 1:
        raise ValueError(f"--limit ({args.limit}) must be at least 1")
    if args.show is None:
        clusters = load_clusters(args.folder)["clusters"]
        print(f"{len(clusters)} clusters")
        for c in clusters[:args.limit]:
            print(f"  {c['id']:>5}  {c['kind']:<5}  {len(c['members'])} members  {c['members'][0]['doc']}: "
                  f"{c['members'][0]['preview']}")
        return 0
    c = open_cluster(args.folder, args.show, args.limit)
    print(f"cluster {c['id']} ({c['kind']}): {len(c['members'])} members, "
          f"{c['shared_shingles']} shingles shared by all")
    for m in c["members"]:
        print(f"  {'kept   ' if m['kept'] else 'removed'}  {m['doc']} [{m['start']}:{m['end']}]  "
              f"{m['shingles']} shingles, Jaccard with the first {m['jaccard_with_first']:.3f}: {m['preview']}")
    for s in c["shared_examples"]:
        print(f"    | {s}")
    return 0


def _contamination_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("--train", nargs="+", required=True, metavar="SOURCE", help="training files, folders or globs")
    d.add_argument("--eval", required=True, dest="eval_spec", metavar="TASK_OR_TEXT",
                   help="a shipped task, a task .yaml (make-task's too), or a text file or folder (items: paragraphs)")
    d.add_argument("--n", type=int, default=13, help="words per n-gram (default 13, as lm-evaluation-harness)")
    d.add_argument("--model", help="also score the task on all items and on the clean ones with this model")
    d.add_argument("--device", default="auto", help="device for --model (default auto)")
    d.add_argument("--batch-size", type=int, default=16, help="scoring batch size for --model (default 16)")
    d.add_argument("--out", help="write the full result (per item) to this JSON file")


@data_tool("contamination", "which eval items share a word n-gram (13 by default) with the training text",
           _contamination_arguments)
def _data_contamination(args: argparse.Namespace) -> int:
    import json

    from .eval.contamination import check, eval_items

    if args.out and (Path(args.out).exists() or Path(args.out).is_symlink()):  # it replaced any file, the
        raise ValueError(f"--out {args.out} exists; choose a new file (nothing is overwritten)")  # books too
    eval_items(args.eval_spec, need_task=bool(args.model))  # a bad --eval fails before a model loads
    model, tok = _load_for_eval(args.model, args.device) if args.model else (None, None)
    r = check(args.train, args.eval_spec, n=args.n, model=model, tokenizer=tok, batch_size=args.batch_size)
    print(f"{r['eval']}: {len(r['contaminated'])} of {r['items']} items share a {r['n']}-gram with the training "
          f"text ({r['clean']} clean)")
    for i in r["contaminated"]:
        p = r["per_item"][i]
        print(f"  item {i}: {p['matched']}/{p['ngrams']} n-grams ({p['overlap']:.0%}) in "
              f"{', '.join(p['documents'][:3])}: {p['example']!r}")
    for subset, scores in r.get("scores", {}).items():
        print(f"{subset:>5} ({scores['n']} items): " + "  ".join(
            f"{k} {v:.4f}" if v is not None else f"{k} -" for k, v in scores.items() if k != "n"))
    if args.out:
        from .files import atomic_path
        with atomic_path(args.out, new=True) as tmp:  # new: not over a file made meanwhile either
            tmp.write_text(json.dumps(r, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


# ---- train / eval / demo ----------------------------------------------------------------------------

def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="*", help="books: files, folders or globs (.txt .md .html .epub .pdf)")
    p.add_argument("--out", required=True, help="run directory (metrics, checkpoints, final model)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with its own data, model and settings; "
                        "only stop conditions (--max-steps, --max-tokens, --epochs, --time-budget-s, "
                        "--early-stopping-patience) and how it runs (--device, --eval-every, --save-every, ...) may "
                        "change; each resume is recorded in OUT/resumes.jsonl")
    m = p.add_argument_group("model: a preset, a file or initial weights, and/or the fields below")
    m.add_argument("--preset", help="family-size preset, e.g. gpt2-small, llama-tiny, gpt-medium, gpt2-124m")
    m.add_argument("--model-config", metavar="FILE",
                   help="a ModelConfig JSON file (seed keys like d_model/num_layers accepted)")
    m.add_argument("--init", help="start from this model directory's weights and tokenizer")
    d = p.add_argument_group("data and tokenizer")
    d.add_argument("--dataset", help="a prepared token dataset (lmlab data prepare) instead of SOURCES")
    d.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one on SOURCES")
    d.add_argument("--tokenizer-kind", choices=["bpe", "char", "word"], help="kind to train (bpe)")
    d.add_argument("--vocab-size", type=int, help="vocabulary size to train (8192)")
    d.add_argument("--val-fraction", type=float, help="held-out share of each document (0.05)")
    d.add_argument("--weight", action="append", default=[], metavar="NAME=W", help="document sampling weight")
    d.add_argument("--filters", help=_FILTERS_HELP + "; they run on SOURCES before the tokenizer and the token file "
                   "are made, and are recorded with the data (RUN/data/tokens.json, receipts.json)")
    _filter_level_argument(d)
    p.add_argument("--eval-tasks", help="comma list of tasks (files or shipped names) scored at every evaluation; "
                   "their metrics join metrics.jsonl as TASK/METRIC (give it again on --resume)")
    add_lora_arguments(p)
    from .models import ModelConfig
    from .train import TrainConfig
    add_arguments(p, ModelConfig, exclude=("vocab_size",), title="model fields (ModelConfig; over --preset or "
                  "--model-config; the vocabulary comes from the tokenizer)")
    add_arguments(p, TrainConfig, title="training hyper-parameters (TrainConfig)")


# what a new run is made of; a resumed run has its own
_LORA_FLAGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_new_tokens")
_NEW_RUN_ONLY = ("sources", "preset", "model_config", "init", "dataset", "tokenizer", "tokenizer_kind", "vocab_size",
                 "val_fraction", "weight", "filters", "filter_level", *_LORA_FLAGS)


@command("train", "train a model on your books (or resume a run)", _train_arguments)
def _train(args: argparse.Namespace) -> int:
    from .eval import load_task
    from .models import ModelConfig
    from .train import TrainConfig
    from .train.recipes import TaskEval, resume_run, train_from_sources

    tasks = [load_task(t.strip()) for t in (args.eval_tasks or "").split(",") if t.strip()]
    callbacks = [TaskEval(tasks)] if tasks else []
    overrides, model_fields = given(args, TrainConfig), given(args, ModelConfig)
    model_fields.pop("vocab_size", None)  # the tokenizer's (--vocab-size), not a model flag
    if args.resume:
        refuse_on_resume(args, (*_NEW_RUN_ONLY, *model_fields), "data, tokenizer and model")
        from .train.trainer import read_run_config
        saved = read_run_config(args.out).get("lora")
        lora = None
        if saved:
            from .tune.lora import LoRAConfig
            lora = LoRAConfig.from_section(saved)
        result = resume_run(args.out, overrides, callbacks, lora)
    else:
        default_stop(overrides)
        config = TrainConfig.from_dict(overrides)
        model_config = None
        if args.model_config:  # the file's fields, then the flags
            model_config = ModelConfig.from_dict({**read_config_file(args.model_config), **model_fields})
            model_fields = {}
        data = {k: v for k in ("tokenizer_kind", "vocab_size", "val_fraction") if (v := getattr(args, k)) is not None}
        if args.filters is not None or args.filter_level is not None:
            data["filters"] = _filters(args)
        result = train_from_sources(
            args.out, config, sources=args.sources, dataset=args.dataset, preset=args.preset,
            model_config=model_config, model_fields=model_fields, init=args.init, tokenizer=args.tokenizer,
            weights=parse_weights(args.weight), callbacks=callbacks, lora=lora_config(args), **data)
    return report_run(args, result, "train", after=_adapter_note(args.out))


# A fine-tuning run starts from trained weights and is short (tune dpo: 100 steps unless told): TrainConfig's
# warm-up of 100 steps, made for pre-training from random weights, would be the whole run. None, as the web
# app's Tune view and TRL's trainers default to; --warmup-steps still sets one.
FINE_TUNE_DEFAULTS = {"warmup_steps": 0}


def default_stop(overrides: dict[str, Any], **default: Any) -> None:
    """A run needs a stop: when `overrides` name none of TrainConfig's stop conditions, `default` (lmlab train's:
    one pass over the data, epochs=1). A stop given as 0 is given (TrainConfig refuses it), not replaced."""
    from .train.config import STOP_CONDITIONS
    if all(overrides.get(k) is None for k in STOP_CONDITIONS):
        overrides.update(default or {"epochs": 1.0})


def refuse_on_resume(args: argparse.Namespace, flags: Sequence[str], what: str) -> None:
    """--resume keeps the run's own settings: ValueError naming the given flags among `flags` (dest names)."""
    given_flags = ["SOURCES" if k == "sources" else "--" + k.replace("_", "-") for k in flags
                   if getattr(args, k, None) not in (None, False, [])]
    if given_flags:
        raise ValueError(f"--resume continues the run in --out with its own {what}; drop {', '.join(given_flags)}")


def refuse_unread(args: argparse.Namespace, reads: Sequence[str], offered: Sequence[str], who: str,
                  names: dict[str, str] | None = None) -> None:
    """ValueError naming the flags among `offered` (dest names; `names` for a --flag spelled otherwise) that were
    given (not None or False: their defaults are None) but that `who` does not read: ignored without a word, they
    looked as if they had an effect (lmlab merge refuses a setting its method does not read the same way)."""
    names = names or {}
    unread = [names.get(k, "--" + k.replace("_", "-")) for k in offered  # `is`: --seed 0 is given (0 == False)
              if k not in reads and getattr(args, k, None) is not None and getattr(args, k) is not False]
    if unread:
        raise ValueError(f"{who} does not read {', '.join(unread)}; drop {'it' if len(unread) == 1 else 'them'} "
                         "(a setting that would be ignored is refused)")


def report_run(args: argparse.Namespace, result: Any, command: str, extra: str = "", after: str = "") -> int:
    """The closing lines of a run on the Trainer (rank 0 only): where it stopped, how to continue an interrupted
    run (exit 130), where its model is."""
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    print(f"stopped after {result.steps} steps ({result.stop_reason})"
          + (f"; final loss {result.final_loss:.4f}" if result.final_loss is not None else "")
          + (f", best val loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else "") + extra)
    if result.stop_reason == "interrupted":
        from .train.checkpoint import latest_checkpoint
        if latest_checkpoint(Path(args.out)) is not None:  # else the Trainer said there is nothing to resume
            print(f"continue with: lmlab {command} --out {args.out} --resume")
        return 130
    print(f"model: {Path(args.out) / 'final'}{after}")
    return 0


# ---- LoRA (tune/lora.py) ----------------------------------------------------------------------------

def add_lora_arguments(p: argparse.ArgumentParser) -> None:
    """The LoRA flags, PEFT's LoraConfig fields (r, lora_alpha, lora_dropout, target_modules) by name."""
    g = p.add_argument_group("LoRA: train low-rank adapters on the frozen model instead of all its weights")
    g.add_argument("--lora-rank", type=int, metavar="R", help="adapter rank r; LoRA is on when given (e.g. 8)")
    g.add_argument("--lora-alpha", type=float, metavar="ALPHA", help="the update is scaled by alpha / r (default 2r)")
    g.add_argument("--lora-dropout", type=float, metavar="P", help="dropout on the adapters' input (default 0)")
    g.add_argument("--lora-targets", metavar="NAMES",
                   help="comma list of modules as named in the HF export, as PEFT's target_modules: q_proj, k_proj, "
                        "v_proj, o_proj, gate_proj, up_proj, down_proj (llama); c_attn, c_proj, c_fc (gpt2, gpt); "
                        "default all-linear (every linear of the blocks, not the output head)")
    g.add_argument("--lora-new-tokens", action="store_true",
                   help="also train the embedding rows of the chat format's tokens, which fine-tuning on "
                        "conversations adds at the mean row, and an untied head's row of <|end|> (the role markers "
                        "are never a target; PEFT's trainable_token_indices)")


def lora_config(args: argparse.Namespace) -> Any:
    """A LoRAConfig from add_lora_arguments' flags, or None without --lora-rank."""
    # `is`, not `in (None, False)`: 0 == False, so --lora-alpha 0 passed as not given
    given_flags = [f"--lora-{k.replace('_', '-')}" for k in ("alpha", "dropout", "targets", "new_tokens")
                   if (v := getattr(args, f"lora_{k}")) is not None and v is not False]
    if args.lora_rank is None:
        if given_flags:
            raise ValueError(f"{', '.join(given_flags)} needs --lora-rank")
        return None
    from .tune.lora import LoRAConfig, parse_targets
    return LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout or 0.0,
                      targets=parse_targets(args.lora_targets), chat_tokens=args.lora_new_tokens)


def _adapter_note(out: str | Path) -> str:
    """report_run's closing words for a run that trained LoRA adapters (tune/lora.py wrote RUN/adapter)."""
    adapter = Path(out) / "adapter"
    return f"\nLoRA adapter (PEFT layout): {adapter}; final/ has it merged" if adapter.is_dir() else ""


def _lora_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    m = sub.add_parser("merge", help="fold an adapter into its base model's weights: a new, plain model directory")
    m.add_argument("model_dir", help="the base model directory the adapter was trained on")
    m.add_argument("adapter_dir", help="adapter_config.json + adapter_model.safetensors (PEFT's layout)")
    m.add_argument("--out", required=True, help="model directory to write (must not exist)")


@command("lora", "LoRA adapters: lmlab lora merge MODEL_DIR ADAPTER_DIR --out DIR", _lora_arguments)
def _lora(args: argparse.Namespace) -> int:
    from .tune.lora import merge_lora_dir
    out = merge_lora_dir(args.model_dir, args.adapter_dir, args.out)
    print(f"wrote {out} (the base model with the adapter merged)")
    return 0


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a model directory (or a run directory: its final/ model)")
    p.add_argument("texts", nargs="*", help="files, folders or globs: loss, perplexity and bits per byte on them")
    p.add_argument("--tasks", help="comma list of task YAML files or shipped task names "
                   "(lmlab.eval.shipped_tasks(): fables-mc, fables-lm, fables-gen); see docs/EVAL.md")
    p.add_argument("--seq-len", type=int, help="window length (default: the model's context)")
    p.add_argument("--stride", type=int, help="score the texts with a sliding window: each window after the first "
                   "counts this many new tokens (default: --seq-len, non-overlapping)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (8)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--json", action="store_true", help="print the results (with per-item scores) as JSON")
    p.add_argument("--probes", type=int, metavar="N", help="generate N samples (seeds 0..N-1, the model's "
                   "generation.json) and report distinct-n, repetition, self-BLEU, compression ratio and, for a run, "
                   "the longest word n-gram shared with its training text")
    p.add_argument("--prompt", default="", help="the prompt of the --probes samples (default: none)")
    p.add_argument("--all-checkpoints", action="store_true", help="MODEL_DIR is a run: score each checkpoint and "
                   "write RUN/eval/trajectory.jsonl and trajectory.png (metric against step); one already there is "
                   "not replaced, nor added to: the command is refused (--force scores every checkpoint again)")
    p.add_argument("--out", help="a folder for the results too: OUT/eval.json (what --json prints); with "
                   "--all-checkpoints, OUT/trajectory.jsonl and .png instead of RUN/eval/ (the web app's jobs)")
    p.add_argument("--force", action="store_true", help="replace the results of an earlier evaluation in --out "
                   "(or RUN/eval/); without it they are kept and the command refused")


def _refuse_results(paths: list[Path], force: bool) -> None:
    """Before any scoring: results already there are a user's earlier ones, replaced only with --force."""
    for path in paths:
        if not force and (path.exists() or path.is_symlink()):
            raise ValueError(f"{path} exists; replace it with --force, or choose another --out")


def _write_result(path: Path, text: str, force: bool) -> None:
    from .files import atomic_path
    with atomic_path(path, new=not force) as tmp:  # new: not over a file written meanwhile either
        tmp.write_text(text, encoding="utf-8")


def _model_dir(path: str) -> Path:
    """A model directory, or a training run's final model."""
    p = Path(path)
    return p / "final" if (p / "final" / "config.json").is_file() else p


def _load_for_eval(path: str, device: str) -> tuple[Any, Any]:
    from .models.io import load_pretrained
    from .train.trainer import resolve_device
    model, tok = load_pretrained(_model_dir(path), device=resolve_device(device))
    if tok is None:
        raise ValueError(f"{path} has no tokenizer.json")
    return model, tok


def _score_tasks(model: Any, tok: Any, tasks: list[Any], batch_size: int) -> list[dict[str, Any]]:
    from .eval import run_task
    return [run_task(model, tok, t, batch_size=batch_size) for t in tasks]


def _print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'task':<24} {'kind':<16} {'n':>5}  metrics")
    for r in results:
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
        print(f"{r['task']:<24} {r['kind']:<16} {r['n']:>5}  {metrics}")
        for name, sig in r.get("signatures", {}).items():
            print(f"{'':<24} sacrebleu {name}: {sig}")


@command("eval", "score a model: bits per byte on texts and/or tasks (multiple choice, LM, generation); "
         "`lmlab eval make-task` builds a task from your books", _eval_arguments)
def _eval(args: argparse.Namespace) -> int:
    import json

    from .data import find_documents, read_document
    from .train.recipes import evaluate_texts

    if args.probes is not None and args.probes < 1:
        raise ValueError("--probes must be >= 1")
    if args.probes and args.all_checkpoints:  # the trajectory has no place for them: it was written empty
        raise ValueError("--probes cannot be combined with --all-checkpoints: score the checkpoints on texts or "
                         "--tasks")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.seq_len is not None and args.seq_len < 1:
        raise ValueError("--seq-len must be >= 1")
    tasks = _task_list(args.tasks) if args.tasks is not None else []  # bad files fail first
    if not args.texts and not tasks and not args.probes:
        raise ValueError("give texts to evaluate on, --tasks, --probes N, or several")
    if args.all_checkpoints:
        return _trajectory(args, tasks)
    if args.out:
        _refuse_results([Path(args.out) / "eval.json"], args.force)
    model, tok = _load_for_eval(args.model_dir, args.device)
    out: dict[str, Any] = {"model": args.model_dir}
    if args.texts:
        texts = [read_document(p) for p in find_documents(args.texts)]
        out["texts"] = evaluate_texts(model, tok, texts, seq_len=args.seq_len, batch_size=args.batch_size,
                                      stride=args.stride)
    out["tasks"] = _score_tasks(model, tok, tasks, args.batch_size)
    if args.probes:
        out["probes"] = _probes(model, tok, args)
    if args.out:
        _write_result(Path(args.out) / "eval.json", json.dumps(out, ensure_ascii=False, indent=1), args.force)
    if args.json:
        print(json.dumps(out, ensure_ascii=False, indent=1))
        return 0
    if args.texts:
        r = out["texts"]
        print(f"loss {r['loss']:.4f} nats/token | perplexity {r['perplexity']:.2f} | "
              f"bits per byte {r['bits_per_byte']:.4f} | {r['tokens']:,} tokens")
    if tasks:
        _print_table(out["tasks"])
    if args.probes:
        print(f"probes on {args.probes} samples: " + "  ".join(f"{k} {v:.4g}" for k, v in out["probes"].items()))
    return 0


def _task_list(spec: str) -> list[Any]:
    """The tasks of a --tasks comma list, loaded (a bad file fails here); one that names none is refused."""
    from .eval import load_task
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--tasks {spec!r} names no task: give task files or shipped task names, comma-separated")
    return [load_task(name) for name in names]


def _probes(model: Any, tok: Any, args: argparse.Namespace) -> dict[str, float]:
    """The generation probes; memorisation against the training split when MODEL_DIR is a run."""
    import dataclasses

    from .data import TokenDataset
    from .eval import probes
    from .models import generate
    from .models.io import load_generation_config

    base = load_generation_config(_model_dir(args.model_dir))
    samples = [generate(model, tok, args.prompt, dataclasses.replace(base, seed=seed)) for seed in range(args.probes)]
    run, training = Path(args.model_dir), None
    if (run / "data" / "tokens.json").is_file():
        ds = TokenDataset.open(run / "data", tok)
        training = tok.decode(ds.tokens[:ds.train_tokens].tolist())
    return probes(samples, training)


def _trajectory(args: argparse.Namespace, tasks: list[Any]) -> int:
    """Every checkpoint of a run on the tasks (and texts): metric against step, beside the run's metrics."""
    import json

    import numpy as np

    from .data import find_documents, read_document
    from .tokenizers import Tokenizer
    from .train.checkpoint import checkpoint_model, checkpoint_step, checkpoints
    from .train.recipes import evaluate_texts
    from .train.trainer import resolve_device
    from .tune.lora import checkpoint_adapters

    run = Path(args.model_dir)
    found = checkpoints(run)
    if not found or not (run / "tokenizer.json").is_file():
        raise ValueError(f"{run} is not a training run with checkpoints (--all-checkpoints takes a run directory)")
    out = Path(args.out) if args.out else run / "eval"
    _refuse_results([out / "trajectory.jsonl", out / "trajectory.png"], args.force)
    tok = Tokenizer.load(run / "tokenizer.json")
    texts = [read_document(p) for p in find_documents(args.texts)] if args.texts else []
    rows = []
    for ckpt in found:
        model, step = checkpoint_model(ckpt, checkpoint_adapters).to(resolve_device(args.device)), checkpoint_step(ckpt)
        if texts:
            r = evaluate_texts(model, tok, texts, seq_len=args.seq_len, batch_size=args.batch_size,
                               stride=args.stride)
            rows.append({"step": step, "task": "texts", "metric": "bits_per_byte", "value": r["bits_per_byte"]})
        for result in _score_tasks(model, tok, tasks, args.batch_size):
            rows += [{"step": step, "task": result["task"], "metric": k, "value": v}
                     for k, v in result["metrics"].items()]
    _write_result(out / "trajectory.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                  args.force)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault(f"{r['task']} {r['metric']}", []).append((r["step"], r["value"]))
    try:
        from .lab.facts.report import line_plot
        line_plot(out / "trajectory.png", f"{run.name}: evaluation by checkpoint", "step", "value",
                  [(k, [(np.array([s for s, _ in v]), np.array([x for _, x in v]))]) for k, v in series.items()])
        plot = f" and {out / 'trajectory.png'}"
    except ValueError:  # no matplotlib: the numbers are written all the same
        plot = " (no PNG: pip install 'lmlab[lab]' for matplotlib)"
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return 0
    for name, points in series.items():
        print(f"{name:<32} " + "  ".join(f"{s}: {v:.4f}" for s, v in points))
    print(f"{len(found)} checkpoints: {out / 'trajectory.jsonl'}{plot}")
    return 0


def _make_task_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("books", nargs="*", help="documents of the run's dataset to use (name, file name or stem; "
                   "default: all)")
    p.add_argument("--run", dest="run_dir", required=True, help="the training run whose held-out (validation) text "
                   "is used")
    p.add_argument("--kind", choices=["cloze", "next-sentence"], default="cloze", help="item kind (cloze)")
    p.add_argument("--out", required=True, help="the task file to write (NAME.yaml, with NAME.jsonl beside it)")
    p.add_argument("--items", type=int, default=200, help="at most this many items (200; at least 1)")
    p.add_argument("--seed", type=int, default=0, help="which sentences and distractors")


@command("make-task", "build a multiple-choice task from the held-out text of a run's books (also spelled "
         "`lmlab eval make-task`)", _make_task_arguments)
def _make_task(args: argparse.Namespace) -> int:
    from .eval.maketask import held_out_texts, make_items, write_task

    if args.items < 1:
        raise ValueError("--items must be >= 1")
    texts = held_out_texts(args.run_dir, args.books)
    items = make_items(list(texts.values()), args.kind, n=args.items, seed=args.seed)
    path = write_task(args.out, Path(args.out).stem, items, source=", ".join(texts))
    print(f"{len(items)} {args.kind} items from the held-out text of {len(texts)} document(s): {path}")
    return 0


# 2,000 give a 95% interval's ends to about +-0.1 standard errors; 10**9 ran for days (resampling is drawn in
# blocks, so memory stays small, but time grows with resamples x items)
MAX_RESAMPLES = 100_000


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", help="two or more model or run directories; the first is the baseline")
    p.add_argument("--tasks", required=True, help="comma list of task files or shipped task names")
    p.add_argument("--out", default="lmlab-compare", help="folder for compare.json and report.html")
    p.add_argument("--force", action="store_true", help="replace compare.json and report.html already in --out")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (8)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--resamples", type=int, default=2000, help=f"bootstrap resamples (2000; at most "
                   f"{MAX_RESAMPLES:,})")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")


@command("compare", "compare models on tasks: deltas with paired-bootstrap 95% intervals, flipped items, "
         "report.html", _compare_arguments)
def _compare(args: argparse.Namespace) -> int:
    import json

    from .eval.compare import compare, interval, report_html

    if len(args.models) < 2:
        raise ValueError("compare needs at least two models")
    if args.batch_size < 1 or args.resamples < 1:
        raise ValueError("--batch-size and --resamples must be >= 1")
    if args.resamples > MAX_RESAMPLES:
        raise ValueError(f"--resamples ({args.resamples}) must be <= {MAX_RESAMPLES}")
    tasks = _task_list(args.tasks)
    out = Path(args.out)
    _refuse_results([out / "compare.json", out / "report.html"], args.force)
    results = []
    for m in args.models:
        model, tok = _load_for_eval(m, args.device)
        results.append({"model": m, "tasks": _score_tasks(model, tok, tasks, args.batch_size)})
    c = compare(results, resamples=args.resamples)
    _write_result(out / "compare.json", json.dumps({**c, "results": results}, ensure_ascii=False, indent=1),
                  args.force)
    _write_result(out / "report.html", report_html(c), args.force)
    if args.json:
        print(json.dumps(c, ensure_ascii=False, indent=1))
        return 0
    print(f"baseline {c['base']}")
    print(f"{'task':<20} {'metric':<10} {'model':<28} {'delta':>9}  95% interval")
    for r in c["rows"]:
        print(f"{r['task']:<20} {r['metric']:<10} {r['model'][-28:]:<28} {r['delta']:+9.4f}  {interval(r)}")
    print(f"{len(c['flips'])} answers flipped (an item on a metric); report: {out / 'report.html'}")
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
    for flag, value in (("--max-upload-mb", args.max_upload_mb), ("--memory-budget-gb", args.memory_budget_gb)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} ({value}) must be a positive number")
    settings = Settings(workspace=args.workspace, database_url=args.database_url, api_token=args.api_token or None,
                        host=args.host, port=args.port, max_jobs=args.max_jobs,
                        max_upload_bytes=max(1, int(args.max_upload_mb * 2**20)),
                        memory_budget_bytes=None if args.memory_budget_gb is None else
                        max(1, int(args.memory_budget_gb * 2**30)), torch_threads=args.torch_threads)
    serve(settings)
    return 0


# ---- export / import (Hugging Face transformers, GGUF for llama.cpp) --------------------------------

def _export_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    h = sub.add_parser("hf", help="a transformers-native checkpoint (GPT2LMHeadModel, LlamaForCausalLM, "
                                  "OpenAIGPTLMHeadModel) with its tokenizer; no custom code needed to load it")
    h.add_argument("model_dir", help="an lmlab model directory")
    h.add_argument("out_dir", help="folder to write (new or empty; one that holds files only with --force)")
    h.add_argument("--force", action="store_true", help="replace the checkpoint files in OUT_DIR if it holds any")
    g = sub.add_parser("gguf", help="one GGUF file for llama.cpp (llama and gpt2 families, bpe tokenizers)")
    g.add_argument("model_dir", help="an lmlab model directory")
    g.add_argument("out_file", help="the .gguf file to write (an existing file is replaced only with --force)")
    g.add_argument("--force", action="store_true", help="replace OUT_FILE if it exists")
    g.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"],
                   help="weight type of the matrices (default f32; norms and biases stay f32); the plan printed "
                        "shows each tensor's type, any fallback to f16 and why, and the bits per weight")


def _refuse_empty(args: argparse.Namespace, *names: str) -> None:
    """A positional folder or file name "" is the current folder to Path, as an empty --out is (main refuses it):
    `lmlab import hf SRC ""` replaced ./tokenizer.json."""
    for name in names:
        if getattr(args, name, None) is not None and not getattr(args, name).strip():
            raise ValueError(f"{name.upper()} is empty; name the {'file' if name == 'out_file' else 'folder'}")


@command("export", "export a model: lmlab export hf MODEL_DIR OUT_DIR | lmlab export gguf MODEL_DIR OUT.gguf",
         _export_arguments)
def _export(args: argparse.Namespace) -> int:
    from .interop import export_gguf, export_hf
    _refuse_empty(args, "model_dir", "out_dir", "out_file")
    try:
        if args.format == "hf":
            out = export_hf(args.model_dir, args.out_dir, overwrite=args.force)
            print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
        else:
            plan = export_gguf(args.model_dir, args.out_file, dtype=args.dtype, overwrite=args.force)
            out = plan.path
            print("\n".join(plan.lines()))
            print(f"wrote {out} ({args.dtype}, {out.stat().st_size / 2**20:.1f} MiB; run with llama.cpp: "
                  f"llama-cli -m {out})")
    except ImportError as exc:  # an optional dependency is missing: say which extra to install
        raise ValueError(str(exc)) from None
    return 0


def _import_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    h = sub.add_parser("hf", help="a local transformers checkpoint (GPT-2, Llama, GPT-1; safetensors)")
    h.add_argument("hf_dir", help="folder with config.json, model.safetensors and tokenizer.json")
    h.add_argument("model_dir", help="lmlab model directory to write (new or empty; one that holds files only "
                                     "with --force, which replaces the model in it)")
    h.add_argument("--force", action="store_true", help="replace the model in MODEL_DIR if it holds one")


@command("import", "import a model: lmlab import hf HF_DIR MODEL_DIR", _import_arguments)
def _import(args: argparse.Namespace) -> int:
    from .interop import import_hf
    _refuse_empty(args, "hf_dir", "model_dir")
    out = import_hf(args.hf_dir, args.model_dir, overwrite=args.force)
    if (out / "tokenizer.json").is_file():
        print(f"wrote {out} (continue training with: lmlab train SOURCES --init {out} --out RUN_DIR)")
    else:
        print(f"wrote {out}; its tokenizer does not put <PAD> <UNK> <BOS> <EOS> at ids 0-3, so it is kept "
              f"unchanged in {out / 'hf_tokenizer'} (used by lmlab export; see docs/interop.md)")
    return 0


# ---- quantize ---------------------------------------------------------------------------------------

def _quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="the model directory to quantize (it is left as it is)")
    p.add_argument("--to", required=True, metavar="FORMAT",
                   help="int8 (one scale per output row) or int4 (a scale and a zero per group of columns)")
    p.add_argument("--out", required=True, help="the NEW model directory to write (refused if it exists)")
    p.add_argument("--group-size", type=int, help="int4: input columns per group, 32, 64 or 128 (32)")
    p.add_argument("--method", default="rtn", metavar="METHOD",
                   help="rtn (round to nearest, default) or gptq (error feedback on calibration text)")
    p.add_argument("--calibration", nargs="+", metavar="BOOKS", help="gptq: books (files, folders or globs)")
    p.add_argument("--calibration-tokens", type=int, default=32768, help="gptq: tokens of calibration text (32768)")
    p.add_argument("--keep-head", action="store_true", help="keep the output head (and a tied embedding) in fp32")


@command("quantize", "int8/int4 weight-only quantization: lmlab quantize MODEL_DIR --to int8|int4 --out DIR",
         _quantize_arguments)
def _quantize(args: argparse.Namespace) -> int:
    from .models.io import WEIGHTS
    from .models.quant import FORMATS, METHODS, quantize_dir

    if args.to not in FORMATS:
        raise ValueError(f"--to {args.to!r} is not a format; choose {' or '.join(FORMATS)}")
    if args.method not in METHODS:
        raise ValueError(f"--method {args.method!r} is not a method; choose {' or '.join(METHODS)}")
    # int8 passes its --group-size on, for quantize_dir to refuse; int4's default is 32 (0 is 0, refused)
    group_size = (32 if args.group_size is None else args.group_size) if args.to == "int4" else args.group_size
    out, qc, stats = quantize_dir(args.model_dir, args.out, FORMATS[args.to], group_size, method=args.method,
                                  keep_head=args.keep_head, calibration=args.calibration,
                                  calibration_tokens=args.calibration_tokens)
    source, written = Path(args.model_dir) / WEIGHTS, out / WEIGHTS
    how = f"{args.to}" + (f" g{qc.group_size}" if qc.group_size else "") + f" {qc.method}"
    print(f"wrote {out} ({how}; {len(qc.modules)} linears quantized, head {'fp32' if args.keep_head else args.to}; "
          f"{written.stat().st_size / 2**20:.1f} MiB from {source.stat().st_size / 2**20:.1f} MiB)")
    if stats:
        rtn, gptq = sum(s["rtn"] for s in stats.values()), sum(s["gptq"] for s in stats.values())
        print(f"layer output error on the calibration text: rtn {rtn:.4g}, gptq {gptq:.4g} ({gptq / rtn:.2f}x)")
    return 0


# ---- merge ------------------------------------------------------------------------------------------

def _merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", help="the model directories to merge (one architecture, one tokenizer)")
    p.add_argument("--method", required=True, help="linear, slerp, task-arithmetic, ties or dare")
    p.add_argument("--base", help="task-arithmetic/ties/dare: the model the others were fine-tuned from")
    p.add_argument("--weights", help="one number per model, comma-separated (equal by default); a negative first "
                   "one as --weights=-1,1")
    p.add_argument("--t", type=float, help="slerp: 0 gives the first model, 1 the second (0.5)")
    p.add_argument("--density", type=float, help="ties/dare: the fraction of each delta kept (1)")
    p.add_argument("--lambda", dest="lam", type=float, help="task-arithmetic/ties/dare: delta scale (1; a negative "
                   "one as --lambda=-1e-5)")
    p.add_argument("--seed", type=int, help="dare: the seed of the dropped entries (0)")
    p.add_argument("--out", required=True, help="the NEW model directory to write (refused unless absent or empty)")


@command("merge", "merge models: lmlab merge A B [C...] --method linear|slerp|task-arithmetic|ties|dare --out DIR",
         _merge_arguments)
def _merge(args: argparse.Namespace) -> int:
    from .models.merge import merge_dirs

    try:  # a negative first number as --weights=-1,1 (argparse reads "-1,1" after a space as a flag)
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        raise ValueError(f"--weights {args.weights!r} must be numbers separated by commas") from None
    out = merge_dirs(args.models, args.out, args.method, base=args.base, weights=weights, t=args.t,
                     density=args.density, lam=args.lam, seed=args.seed)
    print(f"wrote {out} ({args.method} of {len(args.models)} models)")
    return 0


# ---- entry point ------------------------------------------------------------------------------------

# ---- selfplay ---------------------------------------------------------------------------------------

def _selfplay_arguments(p: argparse.ArgumentParser) -> None:
    from .lab.selfplay.config import AZRConfig, TextSelfPlayConfig

    sub = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    a = sub.add_parser("azr", help="Absolute Zero miniature on a program DSL: warm-up only, solver-only RL on "
                                   "random tasks, AZR with a frozen proposer, full AZR (matched compute)")
    a.add_argument("--out", required=True, help="folder for results.json, solve_rate.png, proposer.png, report.html")
    a.add_argument("--seeds", default="0,1,2", help="seeds: a list 0,1,2, a range 0-4, or one seed (default 0,1,2)")
    a.add_argument("--workers", type=int, default=2, help="seeds run in parallel processes, 1 thread each (2)")
    a.add_argument("--quick", action="store_true", help="a smoke run in seconds; its numbers mean nothing")
    add_arguments(a, AZRConfig, title="experiment settings (AZRConfig)")
    t = sub.add_parser("text", help="RL for a text model: group-relative advantages, KL to the starting model")
    t.add_argument("--model", help="model directory to start from (e.g. lmlab-demo/final); with --resume, the "
                                    "run's own by default")
    t.add_argument("--out", required=True, help="folder for metrics.jsonl, config.json, checkpoints/ and final/")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint; settings not given come from "
                        "OUT/config.json, and those given must match it (only --iterations and --save-every may "
                        "change)")
    t.add_argument("--judge", help="model directory of the judge for --reward perplexity")
    t.add_argument("--reward-file", help="FILE.py:FUNCTION, fn(prompt, completion) -> float, for --reward file")
    t.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: start from <BOS>)")
    t.add_argument("--prompts-file", metavar="FILE", help="a JSON list of prompt strings, instead of --prompt "
                                                          "(keeps them off the command line)")
    t.add_argument("--quick", action="store_true", help="a few small iterations, to check a setup")
    add_arguments(t, TextSelfPlayConfig, title="self-play settings (TextSelfPlayConfig)")


@command("selfplay", "self-play RL: lmlab selfplay azr --out DIR | lmlab selfplay text --model DIR --out DIR",
         _selfplay_arguments)
def _selfplay(args: argparse.Namespace) -> int:
    from .lab.selfplay.azr import AZRConfig
    from .lab.selfplay.text import TextSelfPlayConfig
    overrides = given(args, AZRConfig if args.mode == "azr" else TextSelfPlayConfig)
    if args.mode == "azr":
        from .lab.selfplay.azr import run_experiment
        from .lab.selfplay.report import reproduces, table
        cfg = AZRConfig.quick(**overrides) if args.quick else AZRConfig(**overrides)
        results = run_experiment(cfg, parse_seeds(args.seeds), args.out, workers=args.workers)
        for row in table(results):
            print(" | ".join(row))
        print(f"reproduces: {reproduces(results['summary']['verdict'])}; report: {Path(args.out) / 'report.html'}")
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


# ---- tune -------------------------------------------------------------------------------------------

# Post-training methods register here like the commands: `lmlab tune MODE ...`, mode -> (help, add_arguments,
# run). Each method's block below registers its own mode.
TUNE: Registry = {}
tune_mode = registrar(TUNE)


@command("tune", "post-training of a trained model: lmlab tune MODE --model DIR --data FILE.jsonl --out DIR",
         lambda p: registry_arguments(p, TUNE, "mode", "MODE", "tune_run"))
def _tune(args: argparse.Namespace) -> int:
    return args.tune_run(args)


# ---- tune grpo --------------------------------------------------------------------------------------

def _grpo_arguments(p: argparse.ArgumentParser) -> None:
    from .tune.config import REWARDS, TASK_NAMES, GRPOConfig

    p.add_argument("--model", help="model directory to start from; with --resume, the run's own")
    p.add_argument("--out", required=True, help="run folder: config.json, metrics.jsonl, checkpoints/, final/")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint; "
                   "settings not given come from OUT/config.json (only --steps, --save-every, --eval-every and "
                   "--device may change)")
    p.add_argument("--task", help=f"a verifiable task: {', '.join(TASK_NAMES)} (its prompts, its checker, held-out "
                   "pass@1 at each evaluation)")
    p.add_argument("--reward", help=f"instead of --task, a reward over --prompt completions: {', '.join(REWARDS)}")
    p.add_argument("--prompt", action="append", default=[], help="a prompt for --reward (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE", help="a JSON list of prompt strings, instead of --prompt")
    p.add_argument("--judge", help="model directory of the judge for --reward perplexity")
    p.add_argument("--reward-file", help="FILE.py:FUNCTION, fn(prompt, completion) -> float, for --reward file")
    add_lora_arguments(p)
    add_arguments(p, GRPOConfig, title="GRPO settings (GRPOConfig)")


@tune_mode("grpo", "GRPO with verifiable rewards (variants grpo, dr_grpo, dapo): lmlab tune grpo --model DIR "
           "--task addition --out DIR", _grpo_arguments)
def _tune_grpo(args: argparse.Namespace) -> int:
    from .lab.selfplay.text import read_prompts_file
    from .tune.grpo import GRPOConfig, resume_grpo, run_grpo

    overrides = given(args, GRPOConfig)
    if args.prompt and args.prompts_file:
        raise ValueError("give --prompt or --prompts-file, not both")
    prompts = read_prompts_file(args.prompts_file) if args.prompts_file else args.prompt
    if args.resume:
        refuse_on_resume(args, ("model", "task", "reward", "prompt", "prompts_file", "judge", "reward_file",
                                *_LORA_FLAGS), "model, task or reward, prompts and LoRA settings")
        result = resume_grpo(args.out, overrides)
    else:
        if not args.model:
            raise ValueError("--model is required (except with --resume)")
        result = run_grpo(args.model, args.out, GRPOConfig(**overrides), task=args.task, reward=args.reward,
                          prompts=prompts, judge=args.judge, reward_file=args.reward_file, lora=lora_config(args))
    rows = [m for m in result.history if "reward" in m]
    held = [m["heldout_pass1"] for m in result.history if "heldout_pass1" in m]
    extra = f"; reward {rows[0]['reward']:.4f} -> {rows[-1]['reward']:.4f}" if rows else ""
    return report_run(args, result, "tune grpo", extra + (f"; held-out pass@1 {held[-1]:.3f}" if held else ""),
                      after=_adapter_note(args.out))


# ---- tune dpo (preference optimisation) --------------------------------------------------------------

def _dpo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="the model directory to start from (and the frozen reference)")
    p.add_argument("--data", help="JSONL: {prompt, chosen, rejected} a line; for --loss kto {prompt, completion, "
                   "label: true|false}")
    p.add_argument("--out", required=True, help="run directory (metrics, checkpoints, final model)")
    p.add_argument("--loss", choices=["dpo", "ipo", "simpo", "orpo", "kto"], help="the objective (dpo)")
    p.add_argument("--beta", type=float, help="the loss's beta (ORPO: lambda); default per loss: 0.1, SimPO 2.0")
    p.add_argument("--gamma", type=float, help="SimPO's target reward margin (1.0)")
    p.add_argument("--sft-weight", type=float, help="add this weight x the chosen completions' NLL per token to "
                   "dpo, ipo or simpo (DPO + NLL: RPO, TRL's loss_type sigmoid+sft; 0)")
    p.add_argument("--ref-cache", metavar="DIR", help="where reference log-probabilities are cached "
                   "(default ~/.cache/lmlab/reference; 'none' computes them every run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its own model, data and "
                   "loss; only stop conditions and how it runs may change")
    add_lora_arguments(p)
    from .train import TrainConfig
    add_arguments(p, TrainConfig, title="training hyper-parameters (TrainConfig)", defaults=FINE_TUNE_DEFAULTS)


@tune_mode("dpo", "preference optimisation (DPO, IPO, SimPO, ORPO, KTO) of a trained model on JSONL pairs",
           _dpo_arguments)
def _tune_dpo(args: argparse.Namespace) -> int:
    from .train import TrainConfig
    from .tune.preference import PreferenceConfig, default_cache_dir, run_preference

    overrides = given(args, TrainConfig)
    if args.resume:
        refuse_on_resume(args, ("model", "data", "loss", "beta", "gamma", "sft_weight", "ref_cache", *_LORA_FLAGS),
                         "model, data, loss and LoRA settings")
        result = run_preference(args.out, overrides, resume=True)
    else:
        if not args.model or not args.data:
            raise ValueError("--model and --data are required (except with --resume)")
        default_stop(overrides, max_steps=100)
        overrides = {**FINE_TUNE_DEFAULTS, **overrides}
        cache = None if args.ref_cache == "none" else Path(args.ref_cache) if args.ref_cache else default_cache_dir()
        cfg = PreferenceConfig(loss=args.loss or "dpo", beta=args.beta,
                               **({"gamma": args.gamma} if args.gamma is not None else {}),
                               **({"sft_weight": args.sft_weight} if args.sft_weight is not None else {}))
        result = run_preference(args.out, TrainConfig.from_dict(overrides), model_dir=args.model, data=args.data,
                                cfg=cfg, cache_dir=cache, lora=lora_config(args))
    last = next((m for m in reversed(result.history) if "margin" in m), {})
    return report_run(args, result, "tune dpo", f", margin {last['margin']:.4f}, accuracy {last['accuracy']:.2f}, "
                      f"kl {last['kl']:.4f}" if last else "", after=_adapter_note(args.out))


# ---- tune arena ---------------------------------------------------------------------------------------

def _arena_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="a new folder: results.json, frontier.png, report.html and each "
                   "method's run")
    p.add_argument("--model", help="the base model directory, or a training run (its final model) (default: a "
                   "fresh ~3M llama with a tokenizer trained on the task's text)")
    p.add_argument("--steps", type=int, help="optimizer steps per method, the same for all (60; --quick 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base, the data order and the sampling (0)")
    p.add_argument("--quick", action="store_true", help="a tiny model, few steps, pairs and prompts: a smoke run "
                   "in seconds, not a measurement")


@tune_mode("arena", "SFT, then DPO, IPO, SimPO, ORPO, KTO and GRPO from it at an equal budget on the shipped rule "
           "task: win-rates, KL to the SFT model, a report", _arena_arguments)
def _tune_arena(args: argparse.Namespace) -> int:
    from .lab.arena import ArenaConfig, run_arena

    given_ = {"seed": args.seed, **({"steps": args.steps} if args.steps is not None else {})}
    cfg = ArenaConfig.quick(**given_) if args.quick else ArenaConfig(**given_)
    command = shlex.join(["lmlab", "tune", "arena", "--out", args.out, *(["--model", args.model] if args.model else []),
                          *(["--steps", str(args.steps)] if args.steps is not None else []), "--seed", str(args.seed),
                          *(["--quick"] if args.quick else [])])
    run_arena(args.out, cfg, model_dir=_model_dir(args.model) if args.model else None, command=command)
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


# ---- tune sft / chat ---------------------------------------------------------------------------------

def _sft_arguments(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig
    p.add_argument("--model", help="the model directory to fine-tune (e.g. lmlab-demo/final)")
    p.add_argument("--data", help="JSONL: conversations {\"messages\": [{\"role\", \"content\"}]} or "
                   "{\"prompt\", \"completion\"} pairs (docs/TUNE.md)")
    p.add_argument("--out", required=True, help="run directory (metrics, checkpoints, final model with its template)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, "
                   "on its own copy of the data; only what `lmlab train --resume` lets change may change")
    p.add_argument("--packing", action="store_true", help="lay short examples end to end in each context instead "
                   "of one per row (packed examples attend to the ones before them)")
    p.add_argument("--completion-only", action="store_true",
                   help="prompt–completion data: train on the completion only (default: the whole text)")
    p.add_argument("--val-fraction", type=float, help="held-out share of the examples for validation (0.1)")
    add_lora_arguments(p)
    p.add_argument("--lora-hard-tokens", type=int, metavar="K", help="LoRA also trains the embedding (and untied "
                   "head) rows of the K tokens the model finds hardest on the training split (largest summed loss): "
                   "those of a fixed reply wording; each row adds n_embd trainable parameters (twice untied)")
    add_arguments(p, TrainConfig, title="training hyper-parameters (TrainConfig)", defaults=FINE_TUNE_DEFAULTS)


@tune_mode("sft", "supervised fine-tuning on conversations (assistant turns only) or prompt–completion pairs",
           _sft_arguments)
def _tune_sft(args: argparse.Namespace) -> int:
    from .train import TrainConfig
    from .tune.sft import resume_sft, run_sft

    overrides = given(args, TrainConfig)
    if args.resume:
        refuse_on_resume(args, ("model", "data", "packing", "completion_only", "val_fraction", "lora_hard_tokens",
                                *_LORA_FLAGS), "model, data and LoRA settings")
        result = resume_sft(args.out, overrides)
    else:
        if not args.model or not args.data:
            raise ValueError("--model and --data are required (except with --resume)")
        default_stop(overrides)
        overrides = {**FINE_TUNE_DEFAULTS, **overrides}
        result = run_sft(args.model, args.data, args.out, TrainConfig.from_dict(overrides), packing=args.packing,
                         completion_only=args.completion_only, lora=lora_config(args),
                         val_fraction=0.1 if args.val_fraction is None else args.val_fraction,
                         lora_hard_tokens=args.lora_hard_tokens or 0)
    return report_run(args, result, "tune sft", after=f" (try: lmlab chat {Path(args.out) / 'final'})"
                      + _adapter_note(args.out))


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a model directory with lmlab's chat template (from lmlab tune sft), or its run")
    p.add_argument("--system", help="a system message at the start of the conversation")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    add_sampling_arguments(p)


@command("chat", "talk to a fine-tuned model in the terminal: streaming, with the conversation's history "
         "(oldest turns dropped, and said so, when the context fills); Ctrl-C stops a reply; an empty line or "
         "Ctrl-D ends the chat", _chat_arguments)
def _chat(args: argparse.Namespace) -> int:
    from .models import GenerationConfig
    from .models.io import load_generation_config
    from .train.trainer import resolve_device
    from .tune.chat import fit_history, load_chat_model, reply

    path = _model_dir(args.model_dir)
    explicit = given(args, GenerationConfig)
    if explicit.get("num_beams", 1) > 1 or "length_penalty" in explicit or explicit.get("stop_at_eos") is False:
        raise ValueError("a chat reply is sampled token by token and ends with its turn: leave out --num-beams, "
                         "--length-penalty and --ignore-eos")
    model, tok = load_chat_model(path, resolve_device(args.device))
    cfg = dataclasses.replace(load_generation_config(path), **explicit)
    if cfg.num_beams > 1 or not cfg.stop_at_eos:
        print(f"lmlab: {path / 'generation.json'}'s num_beams and stop_at_eos do not apply to a chat: its replies "
              "are sampled and end with their turn", file=sys.stderr)
    if cfg.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1 for a chat, not {cfg.max_new_tokens}")
    history = [{"role": "system", "content": args.system}] if args.system else []
    room = model.config.block_size - min(cfg.max_new_tokens, model.config.block_size // 2)  # keep room to answer
    if history:  # a system message that leaves no room for a question would refuse every line as too long
        try:
            fit_history([*history, {"role": "user", "content": "?"}], tok, room)
        except ValueError:
            raise ValueError(f"--system is too long: it leaves no room for a message in the model's context "
                             f"({room} tokens with room for a reply)") from None
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 arrive as lone surrogates, in any locale
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - input() edits the line and recalls earlier ones (arrow keys)
        except ImportError:  # not on every platform
            pass
    show = _for_terminal if sys.stdout.isatty() else str
    while True:
        try:
            text = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()  # Ctrl-D: the shell's prompt on a line of its own
            break
        if not text.strip():
            break
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # stdin's bytes that are not UTF-8 (lone surrogates, as read above)
            print("lmlab: that line is not UTF-8 text; type it again", file=sys.stderr)
            continue
        rounds = sum(m["role"] == "user" for m in history) + 1
        try:
            history = fit_history([*history, {"role": "user", "content": text}], tok, room)
        except ValueError as exc:
            print(f"lmlab: {exc}; say it shorter", file=sys.stderr)
            continue
        dropped = rounds - sum(m["role"] == "user" for m in history)
        if dropped:
            print(f"lmlab: the oldest {dropped} round{'s' * (dropped > 1)} of the conversation no longer fit the "
                  f"model's context and {'are' if dropped > 1 else 'is'} left out", file=sys.stderr)
        answer, pieces = "", reply(model, tok, history, cfg)
        try:
            for piece in pieces:
                answer += piece
                print(show(piece), end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops this reply (what was shown stays in the history), not the chat
            pieces.close()
            print(" [stopped]", end="", flush=True)
        print()
        history.append({"role": "assistant", "content": answer})
    return 0


# ---- tune distill (tune/distill.py) -----------------------------------------------------------------

def _distill_arguments(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig
    p.add_argument("--teacher", help="the teacher's model directory (an int8/int4 one too: it only runs forward)")
    p.add_argument("--preset", help="a new student of this preset, with the teacher's tokenizer (e.g. gpt2-tiny)")
    p.add_argument("--model", help="instead of --preset, a trained student to start from (the teacher's tokenizer)")
    p.add_argument("--data", nargs="+", metavar="BOOK", help="book files or folders (the held-out part is evaluated)")
    p.add_argument("--out", required=True, help="run directory (metrics, checkpoints, final model)")
    p.add_argument("--mode", choices=["logits", "sequence"], help="logits: KL to the teacher's softened "
                   "distribution mixed with the data's loss (Hinton et al. 2015); sequence: train on the teacher's "
                   "continuations of book windows (Kim & Rush 2016). Default logits")
    p.add_argument("--temperature", type=float, help="logits: the softmax temperature T (2.0)")
    p.add_argument("--alpha", type=float, help="logits: weight of the KD term, 1 - alpha on the data (0.5)")
    p.add_argument("--teacher-samples", type=int, help="sequence: teacher continuations to write (256)")
    p.add_argument("--prompt-tokens", type=int, help="sequence: book tokens that start each continuation (16)")
    p.add_argument("--continuation-tokens", type=int, help="sequence: tokens per continuation, at most (128)")
    p.add_argument("--teacher-temperature", type=float, help="sequence: the teacher's sampling temperature, 0 greedy "
                   "(1.0)")
    p.add_argument("--val-fraction", type=float, help="held-out share of each book (0.05)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its own teacher, data and "
                   "settings (sequence mode: its own teacher samples); only stop conditions and how it runs may change")
    add_arguments(p, TrainConfig, title="training hyper-parameters (TrainConfig)")


_DISTILL = ("mode", "temperature", "alpha", "teacher_samples", "prompt_tokens", "continuation_tokens",
            "teacher_temperature")


@tune_mode("distill", "knowledge distillation of a teacher into a smaller student (logits or sequence level): "
           "lmlab tune distill --teacher DIR --preset gpt2-tiny --data BOOKS --out DIR", _distill_arguments)
def _tune_distill(args: argparse.Namespace) -> int:
    from .train import TrainConfig
    from .tune.distill import DistillConfig, resume_distill, run_distill

    overrides = given(args, TrainConfig)
    if args.resume:
        refuse_on_resume(args, ("teacher", "preset", "model", "data", "val_fraction", *_DISTILL),
                         "teacher, student, data and distillation settings")
        result = resume_distill(args.out, overrides)
    else:
        if not args.teacher or not args.data:
            raise ValueError("--teacher and --data are required (except with --resume)")
        default_stop(overrides)
        cfg = DistillConfig(**{k: v for k in _DISTILL if (v := getattr(args, k)) is not None})
        result = run_distill(args.teacher, args.data, args.out, TrainConfig.from_dict(overrides), cfg,
                             preset=args.preset, student_dir=args.model,
                             val_fraction=0.05 if args.val_fraction is None else args.val_fraction)
    last = next((m for m in reversed(result.history) if "val_kl" in m), {})
    return report_run(args, result, "tune distill", f"; val KL to the teacher {last['val_kl']:.4f}" if last else "")


# ---- lab facts --------------------------------------------------------------------------------------

# lab.facts.experiments.EXPERIMENTS and "all"; spelled out so that `lmlab --help` does not import torch
# (tests/test_facts.py checks the two agree)
_FACTS_VERBS = ("phases", "plateau", "alpha", "warmup", "hallucination", "finetune", "memory", "patching",
                "ablation", "all")


# Labs register here like the tune modes: `lmlab lab NAME ...`, name -> (help, add_arguments, run). Each lab's
# block registers its own name.
LABS: Registry = {}
lab_mode = registrar(LABS)


@command("lab", "labs: lmlab lab NAME ... --out DIR (facts: Zucchet et al. 2025's experiments)",
         lambda p: registry_arguments(p, LABS, "lab", "LAB", "lab_run"))
def _lab(args: argparse.Namespace) -> int:
    return args.lab_run(args)


# Data experiments (`lmlab lab data NAME ...`) register here the same way: name -> (help, add_arguments, run).
DATA_LABS: Registry = {}
data_lab = registrar(DATA_LABS)


@lab_mode("data", "data experiments: what the data does to a model (lmlab lab data NAME ... --out DIR)",
          lambda p: registry_arguments(p, DATA_LABS, "data_lab", "EXPERIMENT", "data_run"))
def _lab_data(args: argparse.Namespace) -> int:
    return args.data_run(args)


def _influence_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="a new folder for results.json and report.html")
    p.add_argument("--seeds", help="the check's seeds: a list 0,1,2, a range 0-4, or one seed (default 0)")
    p.add_argument("--quick", action="store_true", help="the check on 60 documents instead of 200: a smoke run, not "
                   "the check")
    p.add_argument("--proj-dim", type=int, default=0, metavar="K",
                   help="random-project the per-document gradients to K numbers (TRAK's projection; 0: exact dot "
                        "products, the default)")
    u = p.add_argument_group("your run: which of its training passages helped or hurt a text (with --run)")
    u.add_argument("--run", dest="run_dir", help="a run directory with checkpoints (its books must still be there)")
    u.add_argument("--target", help="the text whose loss the passages move")
    u.add_argument("--target-file", help="read the target text from this file")
    u.add_argument("--unit", choices=("paragraph", "document"), help="what is scored (paragraph)")
    u.add_argument("--max-passages", type=int, help="score a fixed random sample of this many (2000)")
    u.add_argument("--top", type=int, help="passages listed as helping and hurting most (10)")


@data_lab("influence", "what each document does: per-step TracIn influence (gradient dot products at every step "
          "that trained on it; exact unless --proj-dim) of 200 synthetic documents on a target text, checked against "
          "true leave-one-out retraining (Spearman rho); with --run, which passages of your run's books helped or hurt "
          "a --target text (TracInCP over its checkpoints). "
          "Example: lmlab lab data influence --out runs/influence --quick", _influence_arguments)
def _lab_data_influence(args: argparse.Namespace) -> int:
    from .lab.influence import InfluenceLabConfig, run_influence, run_influence_lab
    if args.proj_dim < 0:
        raise ValueError(f"--proj-dim ({args.proj_dim}) must be >= 0 (0: exact dot products)")
    offered, names = ("run_dir", "target", "target_file", "unit", "max_passages", "top", "seeds", "quick"), \
        {"run_dir": "--run"}
    if args.run_dir is not None or args.target is not None or args.target_file is not None:
        if args.run_dir is None or (args.target is None) == (args.target_file is None):
            raise ValueError("scoring a run's passages takes --run and one of --target or --target-file")
        refuse_unread(args, offered[:6], offered, "influence on a run's passages (--run)", names)
        from .data import read_document  # the books' reader: encodings (cp1251), NUL bytes refused
        target = args.target if args.target is not None else read_document(args.target_file)
        res = run_influence(args.run_dir, args.out, target, unit=args.unit or "paragraph",
                            max_passages=2000 if args.max_passages is None else args.max_passages,
                            proj_dim=args.proj_dim, top=10 if args.top is None else args.top,
                            command=shlex.join(["lmlab", *sys.argv[1:]]))
        best = res["helped"][0]["passage"][:80] if res["helped"] else "none"
        print(f"influence: {len(res['passages'])} passages; helped most: {best!r}; report: "
              f"{Path(args.out) / 'report.html'}")
        return 0
    refuse_unread(args, ("seeds", "quick"), offered, "the influence check (without --run)", names)
    cfg = InfluenceLabConfig.quick() if args.quick else InfluenceLabConfig()
    cfg = dataclasses.replace(cfg, proj_dim=args.proj_dim)
    res = run_influence_lab(args.out, parse_seeds("0" if args.seeds is None else args.seeds), cfg,
                            command=shlex.join(["lmlab", *sys.argv[1:]]))
    print(f"influence: {res['verdict']} ({res['measured']}); wall {res['speed']['wall_s']:.0f} s; "
          f"report: {Path(args.out) / 'report.html'}")
    return 0


def _drift_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", dest="run_dir", required=True,
                   help="a run directory with at least two checkpoints (train with --keep-last 0)")
    p.add_argument("--out", required=True, help="folder for results.json, PNG plots and report.html")
    p.add_argument("--probe", action="append", default=[], metavar="TEXT",
                   help="a probe text whose hidden states' drift is reported (repeatable)")
    p.add_argument("--token", action="append", default=[], metavar="TOKEN",
                   help="a token whose nearest neighbours are compared (repeatable)")
    p.add_argument("--top", type=int, default=20, help="the most volatile tokens listed (default 20)")
    p.add_argument("--kinds", metavar="DIR", help="the --out folder of `lmlab lab data split`: drift per kind of "
                   "text (reasoning, knowledge, noise), also adjusted for frequency")


@data_lab("drift", "embedding drift between a run's checkpoints: per token against its frequency in the training data, "
          "the most volatile tokens, neighbour changes, probe texts' hidden states. Example: lmlab lab data drift "
          "--run runs/demo --out runs/demo-drift", _drift_arguments)
def _lab_data_drift(args: argparse.Namespace) -> int:
    from .lab.drift import run_drift
    res = run_drift(args.run_dir, args.out, args.probe, args.token, args.top, shlex.join(["lmlab", *sys.argv[1:]]),
                    args.kinds)
    print(f"drift: {res['measured']}; report: {Path(args.out) / 'report.html'}")
    return 0


def _facts_arguments(f: argparse.ArgumentParser) -> None:
    f.add_argument("verb", choices=_FACTS_VERBS, metavar="EXPERIMENT",
                   help="phases | plateau | alpha | warmup | hallucination | finetune | memory | patching | "
                        "ablation | all")
    f.add_argument("--out", required=True, help="folder for results.json, plots and report.html")
    f.add_argument("--seeds", default="0,1,2", help="seeds: a list 0,1,2, a range 0-4, or one seed (default 0,1,2)")
    f.add_argument("--quick", action="store_true", help="reduced sizes and budgets (minutes instead of tens)")
    f.add_argument("--workers", type=int, help="parallel processes, 1 thread each (default: one per CPU core)")


@lab_mode("facts", "knowledge acquisition on synthetic biographies (Zucchet et al. 2025); each experiment writes "
          "results.json, PNG plots and report.html into --out. Example: lmlab lab facts phases --out runs/facts",
          _facts_arguments)
def _lab_facts(args: argparse.Namespace) -> int:
    from .lab.facts.experiments import run_experiment
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers ({args.workers}) must be >= 1")
    results = run_experiment(args.verb, parse_seeds(args.seeds), Path(args.out), args.quick, args.workers)
    for name, res in (results.items() if args.verb == "all" else [(args.verb, results)]):
        if isinstance(res, dict) and "speed" in res:
            where = Path(args.out) / (name if args.verb == "all" else "") / "report.html"
            verdict = res.get("verdict", "inconclusive")
            print(f"{name}: {verdict} ({res.get('measured')}); wall {res['speed']['wall_s']:.0f} s; report: {where}")
    return 0


def _merge_lab_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="a new folder for results.json, paths.png, report.html and the runs")
    p.add_argument("--seeds", default="0,1,2", help="seeds: a list 0,1,2, a range 0-4, or one seed (default 0,1,2)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run in a minute, not a measurement")


@lab_mode("merge", "the merge explorer: held-out loss along the path between two fine-tunings of one parent "
          "(siblings) and between two models trained from scratch (strangers), barrier heights over seeds. "
          "Example: lmlab lab merge --out runs/merge", _merge_lab_arguments)
def _lab_merge(args: argparse.Namespace) -> int:
    from .lab.merge import MergeLabConfig, run_merge_lab
    cfg = MergeLabConfig.quick() if args.quick else MergeLabConfig()
    res = run_merge_lab(args.out, parse_seeds(args.seeds), cfg, command=shlex.join(["lmlab", *sys.argv[1:]]))
    print(f"merge: {res['verdict']} ({res['measured']}); wall {res['speed']['wall_s']:.0f} s; "
          f"report: {Path(args.out) / 'report.html'}")
    return 0


def _interp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("view", choices=("lens", "attention", "patch", "steer", "sae", "sae-facts"), metavar="VIEW",
                   help="lens (logit lens) | attention (every head's pattern) | patch (activation patching) | steer "
                        "(build and measure a steering direction) | sae (a sparse autoencoder on --books, with a "
                        "feature browser) | sae-facts (SAE feature purity on a biographies model against a random-init "
                        "one)")
    p.add_argument("--model", help="a model directory (every view but sae-facts)")
    p.add_argument("--prompt", help="lens, attention, patch: the prompt (patch: the clean one)")
    p.add_argument("--corrupt", help="patch: the corrupted prompt, with as many tokens as --prompt")
    p.add_argument("--target", help="lens, patch: the token traced (its first token; default: the model's top token "
                                    "after --prompt)")
    p.add_argument("--foil", help="patch: the token the target's logit is compared with (default: the corrupted "
                                  "run's top token other than the target)")
    p.add_argument("--top-k", type=int, help="lens: tokens kept per stream and position (default 5)")
    p.add_argument("--bos", action="store_true", help="start the prompts with <BOS> (models trained on texts that "
                   "start with it, such as lmlab tune grpo's and lmlab lab ttc's task models)")
    p.add_argument("--layer", type=int, help="steer, sae: the residual stream, 0 the embeddings, i the output of "
                   "block i-1 (sae's default: the middle one)")
    p.add_argument("--out", required=True, help="folder for results.json, PNG heatmaps and report.html (steer: and "
                   "the direction, direction.safetensors + direction.json)")
    s = p.add_argument_group("steer (lab/interp/steer.py): the --positive minus --negative direction at --layer")
    s.add_argument("--positive", help="a text file, one prompt per line: the behaviour steered towards")
    s.add_argument("--negative", help="a text file, one prompt per line: the behaviour steered away from")
    s.add_argument("--neutral", help="a text file, one text per line, for the KL cost (up to 64 lines)")
    s.add_argument("--prompts", help="prompts to generate from, one per line (default: --negative's lines)")
    s.add_argument("--coefs", help="coefficients measured, a comma list (default 0,0.5,1,2,4)")
    s.add_argument("--samples", type=int, help="prompts generated from per coefficient (default 16)")
    s.add_argument("--max-new-tokens", type=int, help="tokens per sample (default 32)")
    s.add_argument("--word", help="the property measured: whether a sample contains WORD (default: the share of "
                   "Cyrillic among its letters)")
    s.add_argument("--seed", type=int, help="sampling seed (default 0)")
    a = p.add_argument_group("sae, sae-facts (lab/interp/sae.py, saelab.py): a sparse autoencoder on a residual stream")
    a.add_argument("--books", nargs="+", metavar="BOOKS", help="sae: the text to train on (files, folders or globs)")
    a.add_argument("--tokens", type=int, help="sae: tokens of --books used, a tenth held out (65536)")
    a.add_argument("--kind", help="sae: topk (Gao et al. 2024, the default) or l1 (Bricken et al. 2023)")
    a.add_argument("--features", type=int, help="sae: dictionary size (default 8 x the model width)")
    a.add_argument("--k", type=int, help="sae --kind topk: features per token (16)")
    a.add_argument("--l1", type=float, help="sae --kind l1: sparsity coefficient (1)")
    a.add_argument("--steps", type=int, help="sae: optimizer steps (2000)")
    a.add_argument("--name", help="sae: folder name under MODEL/sae/ (default layerN-KIND; never overwritten)")
    a.add_argument("--seeds", help="sae-facts: seeds (0,1,2)")
    a.add_argument("--quick", action="store_true", help="sae-facts: smaller models and budgets (minutes)")


# which of lab interp's flags each view reads, and the defaults of those it reads (None in the parser, so that a
# flag given to a view that does not read it can be told from its default, and refused)
_INTERP_READS = {"lens": ("prompt", "target", "top_k", "bos"), "attention": ("prompt", "bos"),
                 "patch": ("prompt", "corrupt", "target", "foil", "bos"),
                 "steer": ("layer", "positive", "negative", "neutral", "prompts", "coefs", "samples", "max_new_tokens",
                           "word", "seed", "bos"),
                 "sae": ("layer", "books", "tokens", "kind", "features", "k", "l1", "steps", "name"),
                 "sae-facts": ("seeds", "quick")}
_INTERP_FLAGS = tuple(dict.fromkeys(flag for reads in _INTERP_READS.values() for flag in reads))
_INTERP_DEFAULTS = {"top_k": 5, "coefs": "0,0.5,1,2,4", "samples": 16, "max_new_tokens": 32, "seed": 0,
                    "tokens": 65536, "kind": "topk", "k": 16, "l1": 1.0, "steps": 2000, "seeds": "0,1,2"}


def _interp_flags(args: argparse.Namespace) -> None:
    """A flag the view does not read is refused (sae: --k is topk's, --l1 l1's); then the defaults."""
    from .lab.interp.sae import KINDS
    reads = _INTERP_READS[args.view]
    kind = args.kind or "topk"
    if args.view == "sae" and kind in KINDS:  # an unknown kind is refused by its own sentence after this
        reads = tuple(r for r in reads if r != {"topk": "l1", "l1": "k"}[kind])
    refuse_unread(args, reads, _INTERP_FLAGS, f"lab interp {args.view}" + (f" --kind {kind}" if args.view == "sae"
                                                                             else ""))
    for flag, value in _INTERP_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)


def _steer_flags(args: argparse.Namespace) -> list[float]:
    """lmlab lab interp steer's flags, checked before any loading; the coefficients (their values, and the
    other numbers, run_steer checks: report.check_steer)."""
    missing = [f"--{f}" for f in ("positive", "negative", "layer", "neutral") if getattr(args, f) is None]
    if missing:
        raise ValueError(f"steer needs {', '.join(missing)}")
    try:
        return [float(c) for c in args.coefs.split(",")]
    except ValueError:
        raise ValueError(f"--coefs {args.coefs!r}: give numbers separated by commas, e.g. 0,1,2") from None


def _lab_sae(args: argparse.Namespace, command: str) -> dict:
    from .lab.interp.sae import KINDS
    from .lab.interp.saelab import run_sae, run_sae_facts
    if args.view == "sae-facts":
        return run_sae_facts(args.out, parse_seeds(args.seeds), args.quick, command)
    if not args.books:
        raise ValueError("sae needs --books (the text whose activations it learns)")
    if args.kind not in KINDS:
        raise ValueError(f"--kind {args.kind!r} is not an SAE kind; choose {' or '.join(KINDS)}")
    for flag in ("tokens", "features", "k", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} ({getattr(args, flag)}) must be >= 1")
    if args.l1 < 0:
        raise ValueError(f"--l1 ({args.l1}) must be >= 0")
    settings = {"kind": args.kind, "k": args.k, "l1": args.l1, "steps": args.steps, "stream": args.layer,
                "n_features": args.features}
    return run_sae(args.model, args.books, args.out, settings, args.tokens, name=args.name, command=command)


@lab_mode("interp", "look inside a model: logit lens, attention patterns, activation patching, steering directions, "
          "sparse autoencoders; writes results.json, PNG heatmaps and report.html. Example: lmlab lab interp lens "
          "--model runs/demo/final --prompt 'Once upon a time' --out runs/interp/lens", _interp_arguments)
def _lab_interp(args: argparse.Namespace) -> int:
    from .lab.facts.report import new_report
    from .lab.interp.report import run_attention, run_lens, run_patch, run_steer
    from .lab.interp.views import check_view
    new_report(args.out)  # the run_* functions check it too; here it comes before the view's own flags
    command = shlex.join(["lmlab", "lab", "interp", *sys.argv[3:]]) if sys.argv[1:3] == ["lab", "interp"] else ""
    if (args.model is None) != (args.view == "sae-facts"):
        raise ValueError("--model is needed by every view but sae-facts" if args.model is None
                         else "sae-facts trains its own biographies models; leave out --model")
    if args.view == "steer":
        _interp_flags(args)
        coefs = _steer_flags(args)
        res = run_steer(args.model, args.positive, args.negative, args.layer, args.out, neutral=args.neutral,
                        prompts=args.prompts, coefs=coefs, n_prompts=args.samples, max_new_tokens=args.max_new_tokens,
                        word=args.word, seed=args.seed, command=command, bos=args.bos)
        print(f"steer: {res['measured']}; checks {res['verdict']}; direction and report: {args.out}")
        return 0
    sae = args.view in ("sae", "sae-facts")
    if (args.prompt is None) != sae:
        raise ValueError("--prompt is for lens, attention and patch" if sae else f"{args.view} needs --prompt")
    if not sae:
        check_view(args.view, args.corrupt, args.target, args.foil)
    _interp_flags(args)
    if sae:
        res = _lab_sae(args, command)
    else:
        if args.top_k < 1:
            raise ValueError(f"--top-k ({args.top_k}) must be >= 1")
        if args.view == "lens":
            res = run_lens(args.model, args.prompt, args.out, args.target, args.top_k, command, args.bos)
        elif args.view == "attention":
            res = run_attention(args.model, args.prompt, args.out, command, args.bos)
        else:
            res = run_patch(args.model, args.prompt, args.corrupt, args.out, args.target, args.foil, command,
                            args.bos)
    print(f"{args.view}: {res['measured']}; checks {res['verdict']}; report: {Path(args.out) / 'report.html'}")
    return 0


def require_positive(args: argparse.Namespace, *flags: str) -> None:
    """ValueError for an integer flag given below 1."""
    for flag in flags:
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} ({getattr(args, flag)}) must be >= 1")


def _ttc_arguments(p: argparse.ArgumentParser) -> None:
    from .tune.config import TASK_NAMES
    p.add_argument("--out", required=True, help="folder for the two models, results.json, PNG plots and report.html")
    p.add_argument("--quick", action="store_true", help="40 held-out prompts instead of 150 (minutes)")
    p.add_argument("--task", choices=TASK_NAMES, help="the verifiable task (default sort)")
    p.add_argument("--steps", type=int, help="pre-training steps of each model")
    p.add_argument("--prompts", type=int, help="held-out prompts scored")
    p.add_argument("--seed", type=int, help="the models' training seed (and the samples' seeds 16s..16s+15); 0")


@lab_mode("ttc", "test-time compute on a verifiable task: accuracy against generated tokens for sampling, voting, "
          "best-of-N and step-wise beam search, and a small model with N tries against a larger one with one at equal "
          "FLOPs. Example: lmlab lab ttc --out runs/ttc --quick", _ttc_arguments)
def _lab_ttc(args: argparse.Namespace) -> int:
    from .lab.facts.report import new_report
    from .lab.ttc import Scale, run
    require_positive(args, "steps", "prompts")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed ({args.seed}) must be >= 0")
    new_report(args.out)  # run() checks it too
    told = [k for k in ("task", "steps", "prompts", "seed") if getattr(args, k) is not None]
    scale = dataclasses.replace(Scale.default(args.quick), **{k: getattr(args, k) for k in told})
    command = shlex.join(["lmlab", "lab", "ttc", "--out", args.out] + ["--quick"] * args.quick
                         + [a for k in told for a in (f"--{k}", str(getattr(args, k)))])
    res = run(args.out, args.quick, scale, command)
    print(f"ttc: {res['verdict']} ({res['measured']}); wall {res['speed']['wall_s']:.0f} s; report: "
          f"{Path(args.out) / 'report.html'}")
    return 0


def _pool_lab_arguments(p: argparse.ArgumentParser, sources_help: str, target_help: str, seeds_help: str) -> None:
    """The flags lab data mix and design share: SOURCES and --target (or the built-in ones), --out, seeds, workers."""
    p.add_argument("sources", nargs="*", help=sources_help)
    p.add_argument("--target", help=target_help)
    p.add_argument("--out", required=True, help="a new folder for results.json, report.html and the runs")
    p.add_argument("--seeds", default="0,1,2", help=seeds_help)
    p.add_argument("--workers", type=int, help="parallel processes, 1 thread each (default 2)")


def _run_pool_lab(args: argparse.Namespace, name: str, config: Any, run: Callable[..., dict[str, Any]],
                  knobs: tuple[str, ...]) -> int:
    """lab data mix or design: the config (--quick's, then the given knobs), the run, its one-line verdict."""

    require_positive(args, *[k for k in knobs if isinstance(getattr(args, k), int)], "workers")
    cfg = config.quick() if args.quick else config()
    cfg = dataclasses.replace(cfg, **{k: getattr(args, k) for k in knobs if getattr(args, k) is not None})
    res = run(args.out, args.sources, args.target, parse_seeds(args.seeds), cfg, args.workers,
              command=shlex.join(["lmlab", *sys.argv[1:]]))
    print(f"{name}: {res['verdict']} ({res['measured']}); wall {res['speed']['wall_s']:.0f} s; "
          f"report: {Path(args.out) / 'report.html'}")
    return 0


def _mix_arguments(p: argparse.ArgumentParser) -> None:
    _pool_lab_arguments(p, "two or more sources, each a file, folder or glob (default: three built-in ones, tales, "
                        "sums and logs, with held-out tales as the target)",
                        "the target text (file, folder or glob) whose loss the mixture should minimise",
                        "seeds of the check on the bigger model (default 0,1,2)")
    p.add_argument("--proxies", type=int, help="proxy models, one per random mixture (default 24; --quick 12)")
    p.add_argument("--fit", choices=("auto", "linear", "quadratic"), help="the regression: linear in the shares, "
                   "Scheffé quadratic, or auto (default): the one that ranks held-out proxies better")
    p.add_argument("--quick", action="store_true", help="tiny proxies and budgets: a smoke run in a minute")


@data_lab("mix", "a mixture of SOURCES chosen by experiment (RegMix): proxy models on random mixtures, a regression "
          "of their target loss on the shares, the proposal checked against the uniform mixture on a bigger model. "
          "Example: lmlab lab data mix --quick --out runs/mix", _mix_arguments)
def _lab_data_mix(args: argparse.Namespace) -> int:
    from .lab.mix import MixLabConfig, run_mix_lab
    return _run_pool_lab(args, "mix", MixLabConfig, run_mix_lab, ("proxies", "fit"))


def _design_arguments(p: argparse.ArgumentParser) -> None:
    _pool_lab_arguments(p, "the pool: files, folders or globs (default: a built-in pool of tales, their near copies, "
                        "sums, logs and junk, with held-out tales as the target)",
                        "the target text (file, folder or glob) whose loss the arms are scored on",
                        "seeds (default 0,1,2)")
    p.add_argument("--larger", type=float, help="the scale baseline's tokens, a multiple of the designed set's (4)")
    p.add_argument("--steps", type=int, help="training steps of every arm (default 300; --quick 120)")
    p.add_argument("--tasks", type=lambda s: tuple(t.strip() for t in s.split(",") if t.strip()), metavar="TASKS",
                   help="eval tasks every arm's model is also scored on: comma list of shipped task names "
                        "(fables-mc, fables-lm, fables-gen) or task YAML files; see docs/EVAL.md")
    p.add_argument("--quick", action="store_true", help="smaller pool, model and budget: minutes")


@data_lab("design", "a designed micro-dataset against a scale baseline: the pool's paragraphs deduplicated and "
          "cleaned of noise, against a random sample of the same size and a larger one, on a target text over "
          "seeds. Example: lmlab lab data design --quick --out runs/design", _design_arguments)
def _lab_data_design(args: argparse.Namespace) -> int:
    from .lab.design import DesignLabConfig, run_design_lab
    return _run_pool_lab(args, "design", DesignLabConfig, run_design_lab, ("larger", "steps", "tasks"))


def _split_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", help="files, folders or globs (.txt .md .html .epub .pdf)")
    p.add_argument("--model", help="a model directory: adds each passage's loss, its robust z-score (a rule: "
                   "z > 3 is noise) and gradient norm")
    p.add_argument("--unit", choices=("paragraph", "document"), default="paragraph",
                   help="what gets a label: a paragraph (text between blank lines; default) or a whole document")
    p.add_argument("--out", required=True, help="a new folder for passages.jsonl, reasoning.txt, knowledge.txt, "
                   "noise.txt, results.json and report.html")


@data_lab("split", "label each passage reasoning, knowledge or noise by documented rules (heuristics in English and "
          "Russian, plus a model's loss with --model), with the scores behind each label; the three classes are "
          "written as text files to use as mixture sources. Example: lmlab lab data split books/ --out runs/split",
          _split_arguments)
def _lab_data_split(args: argparse.Namespace) -> int:
    from .lab.split import run_split
    res = run_split(args.sources, args.out, args.model, args.unit, command=shlex.join(["lmlab", *sys.argv[1:]]))
    print(f"split: {res['measured']}; files: " + ", ".join(str(Path(args.out) / f) for f in res["files"].values())
          + f"; report: {Path(args.out) / 'report.html'}")
    return 0


_DEBUG_HELP = "on an error, print the traceback too"


# what a training run's config.json records beside its settings (its data's statistics, and the folder of the
# tokens it made, inside the run): --config RUN/config.json skips them, as every *_sha256 of an input
RUN_RECORDS = frozenset({"data_stats", "dataset"})
_CONFIG_HELP = ("read settings from a JSON or YAML file: keys are this command's flag names (dashes or "
                "underscores; nested mappings such as a run's {train: ..., model: ...} are merged), and flags given "
                "on the command line win")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description="Train, study and ship small language models.")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=_literal(help_text), description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
        p.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
        arguments(p)
        p.set_defaults(run=run)
        # and on every mode below it (`lmlab tune sft ... --config F`): absent unless given, so a value given
        # before the mode (`lmlab tune --config F sft`) is not replaced by the mode's default
        for leaf in _parsers(p)[1:]:
            leaf.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
            leaf.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    return parser


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and every (sub)command parser below it."""
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                out += _parsers(sub)
    return out


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command that `args` ran: `lmlab selfplay text` -> the `text` parser."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or getattr(args, subs[0].dest, None) is None:
            return parser
        parser = subs[0].choices[getattr(args, subs[0].dest)]


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parser.parse_args, with `--config FILE` for any command: the file's settings become that command's
    defaults and the command line is parsed again over them, so flags given there win and required flags may
    come from the file. ValueError for a file that is not a mapping of this command's settings."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        return parser.parse_args(argv)
    required = [a for p in _parsers(parser) for a in p._actions
                if a.required and not isinstance(a, argparse._SubParsersAction)]
    for action in required:  # a first pass to learn the command and the file; what is missing may be in it
        action.required = False
    try:
        args = parser.parse_args(argv)
    finally:
        for action in required:
            action.required = True
    if not getattr(args, "config", None):
        return parser.parse_args(argv)
    target = _innermost(parser, args)
    actions = [a for a in target._actions if a.dest not in ("help", "config", "debug", "run")
               and not isinstance(a, argparse._SubParsersAction)]
    dests: dict[str, argparse.Action] = {}
    for a in actions:  # a setting by its own flag: --do-sample/--no-do-sample, not --greedy (which stores False)
        if a.dest not in dests or not isinstance(a, argparse._StoreConstAction):
            dests[a.dest] = a
    # a flag's own name too, where it is not its setting's (--lambda: lam, --stop: stop_strings, --greedy: do_sample)
    flag_names = {o.lstrip("-").replace("-", "_"): a for a in actions for o in a.option_strings
                  if o.startswith("--") and o.lstrip("-").replace("-", "_") not in dests}
    flat: dict[str, object] = {}

    def merge(mapping: dict) -> None:
        for key, value in mapping.items():
            name = str(key).replace("-", "_")
            if name.endswith("_sha256") and name not in dests:
                continue  # a run's record of an input's contents, not a setting
            if isinstance(value, dict) and name not in dests and name not in flag_names:
                merge(value)  # a section, e.g. a run's "train" and "model"
            elif name in dests:
                flat[name] = value
            elif name in flag_names:
                action = flag_names[name]
                if not isinstance(action, argparse._StoreConstAction):
                    flat[action.dest] = value
                elif not isinstance(value, bool):
                    raise ValueError(f"{args.config}: {name} must be true or false, not {value!r}")
                elif value:  # the flag given (greedy: true is --greedy); false: not given
                    flat[action.dest] = action.const
            else:
                flat[name] = value

    settings = read_config_file(args.config)
    if isinstance(settings.get("data_stats"), dict):  # a training run's own config.json
        settings = _run_settings(settings)
    merge(settings)
    unknown = sorted(set(flat) - set(dests))
    if unknown:
        raise ValueError(f"{args.config}: not settings of this command: {', '.join(unknown)}; it takes "
                         f"{', '.join(sorted({*dests, *flag_names}))}")
    for name in flat:
        dests[name].required = False
        flat[name] = _config_value(args.config, name, dests[name], flat[name])
    target.set_defaults(**flat)
    return parser.parse_args(argv)


def _run_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A training run's config.json as the settings that make the same run: its records left out (RUN_RECORDS),
    the model section's sizes left to the --init model or the --tokenizer that bring them, and its LoRA
    section as the --lora-* flags (a section merged by name, its dropout became the model's)."""
    settings = {k: v for k, v in saved.items() if k not in RUN_RECORDS}
    model = dict(settings.get("model") or {})
    if settings.get("init"):
        model = {}  # the --init model's own
    elif settings.get("tokenizer"):
        model.pop("vocab_size", None)  # the tokenizer's own
    settings["model"] = model
    lora = settings.pop("lora", None)
    if isinstance(lora, dict):
        if chosen := lora.get("tokens") or lora.get("head_tokens"):
            raise ValueError(f"the run trained the rows of chosen tokens ({chosen!r:.60}), which no flag of "
                             "this command sets: give its settings as flags instead of --config")
        targets = lora.get("targets") or []
        settings.update(lora_rank=lora.get("rank"), lora_alpha=lora.get("alpha"), lora_dropout=lora.get("dropout"),
                        lora_targets=None if list(targets) == ["all-linear"] else ",".join(targets),
                        lora_new_tokens=bool(lora.get("chat_tokens")))
    return settings


class _Once(argparse.Action):
    """One value of a repeatable or list flag, read as that flag reads a value (its type and choices)."""

    def __init__(self, action: argparse.Action, kind: Any = None) -> None:
        super().__init__(action.option_strings, action.dest, type=kind or action.type, choices=action.choices)


def _config_value(path: str, name: str, action: argparse.Action, value: object) -> object:
    """A config file's value as its flag would give it: set_defaults skips argparse's conversion and checks, so
    "false" for a switch read as true and a list for a comma-separated flag reached the command as a list.
    A switch takes true or false; a list for a flag of one comma-separated value is joined; each value goes
    through the flag's type and choices. ValueError, one line, naming the file and the setting."""
    where = f"{path}: {name}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, not {value!r}")
        return value
    if value is None:
        return None
    if isinstance(action, argparse._AppendAction):  # a repeatable flag (--weight, --prompt): one value or a list
        return [_config_value(path, name, _Once(action), v) for v in (value if isinstance(value, list) else [value])]
    if getattr(action, "list_of", None) is not None and isinstance(value, list):  # a comma-list flag (configs.py)
        return [_config_value(path, name, _Once(action, action.list_of), v) for v in value]
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int) and action.nargs != 1
    if isinstance(value, list) and not many:
        if action.type is not None or any(isinstance(v, (list, dict)) for v in value):
            raise ValueError(f"{where} takes one value, not a list")
        value = ",".join(map(str, value))  # e.g. merge's weights: [0.7, 0.3] -> "0.7,0.3"

    def one(v: object) -> object:
        if isinstance(v, (list, dict)) or (isinstance(v, bool) and action.type not in (None, str)):
            raise ValueError(f"{where} must be a {'number' if action.type in (int, float) else 'value'}, not {v!r}")
        if action.type is not None:
            try:
                v = action.type(v if isinstance(v, str) else str(v))
            except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
                kind = {int: "an integer", float: "a number"}.get(action.type)
                raise ValueError(f"{where} must be {kind}, not {v!r}" if kind else
                                 f"{where}: {str(exc) or f'not a valid value: {v!r}'}") from None
        elif not isinstance(v, str):
            v = str(v)
        if action.choices is not None and v not in action.choices:
            raise ValueError(f"{where} is {v!r}; choose one of {', '.join(map(str, action.choices))}")
        return v

    return [one(v) for v in value] if many and isinstance(value, list) else one(value)


# what a write that ran out of room says where it is not an OSError with its errno: safetensors' Rust IoError,
# torch.save's stream writer, a short write
_FULL = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122", "File too large",
         "os error 27", "unexpected pos", "requested and")
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) is a write that found no room: a full disk, a quota, a file
    size limit. Not a bug: the user frees space and runs again."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        if isinstance(seen, (OSError, RuntimeError)) or type(seen).__name__ == "SafetensorError":
            if any(marker in str(seen) for marker in _FULL):
                return True
        seen = seen.__cause__ or seen.__context__
    return False


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))  # after --debug, if given
    if argv[command:command + 2] == ["eval", "make-task"]:  # the spelling of the docs; one parser per command
        del argv[command]  # keeps it flat
    parser = build_parser()
    try:
        args = parse_arguments(parser, argv)  # argparse itself exits with 2 on unknown flags
    except (ValueError, OSError) as exc:  # a --config file that is missing or does not fit the command
        print(f"lmlab: error: {exc}", file=sys.stderr)
        return 2
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    if isinstance(getattr(args, "out", None), str) and not args.out.strip():  # Path("") is the current folder
        print("lmlab: error: --out is empty; name the folder (or file) to write", file=sys.stderr)
        return 2
    from .train.console import console_progress

    try:
        with console_progress():  # the Trainer's progress line (it only logs; a library user sees nothing)
            return args.run(args)
    except BrokenPipeError:  # the reader of our output went away (`| head`): stop quietly, as `yes | head` does
        devnull = os.open(os.devnull, os.O_WRONLY)  # Python's own flush at exit would fail on the pipe again
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE
    except KeyboardInterrupt:
        print("lmlab: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if disk_full(exc):
            if args.debug:
                traceback.print_exc()
            print(f"lmlab: error: a write found no room: the disk is full, or a quota or file size limit was reached "
                  f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}); free some space and run "
                  "it again (a run: --resume, from its last checkpoint)", file=sys.stderr)
            return 2
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
