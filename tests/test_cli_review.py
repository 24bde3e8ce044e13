"""Defects an adversarial review of the command line found (each test fails without its fix): the help that
crashed, names and numbers that reached the file system or the math unchecked, a merge that followed symbolic
links or took another tokenizer's base, and hints that named the wrong command."""

from __future__ import annotations

import copy

import pytest
import torch

import lmlab
from lmlab.cli import _parsers, build_parser, main
from lmlab.data.jsonl import read_jsonl
from lmlab.interop import export_gguf, export_hf, import_hf
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import load_pretrained, save_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.train.trainer import resolve_device
from lmlab.tune import chat
from lmlab.tune.chats import SHIPPED
from lmlab.tune.lora import LoRAConfig, apply_lora, lora_layers, merge_and_unload, merge_lora_dir, save_adapter

TEXT = "Once upon a time a small fox ran to the river. Жил-был кот у синего моря. " * 40


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review")
    tok = Tokenizer.train([TEXT], kind="bpe", vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=64)).eval()
    save_pretrained(tmp / "base", model, tok)
    return tmp / "base"


def test_every_help_text_prints(capsys):
    """`lmlab --help` (and `lmlab` alone) crashed: the compare command's "95% intervals" went through argparse's
    %-formatting (TypeError: %i format)."""
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "compare" in capsys.readouterr().out
    assert main([]) == 2 and "95% intervals" in " ".join(capsys.readouterr().out.split())  # one %, as written
    for parser in _parsers(build_parser()):  # every command's and subcommand's help, each argument's too
        assert parser.format_help()


def test_names_and_numbers_the_file_system_or_math_refuse_are_one_line_errors(capsys, base, tmp_path):
    long = tmp_path / ("a" * 300)  # a component over 255 bytes: OSError ENAMETOOLONG, "internal error" before
    code, _, err = run(capsys, "quantize", base, "--to", "int8", "--out", long)
    assert code == 2 and err.startswith("lmlab: error: ") and "File name too long" in err and err.count("\n") == 1
    code, _, err = run(capsys, "quantize", base, "--to", "int8", "--out", "")  # "" is the current folder
    assert (code, err) == (2, "lmlab: error: --out is empty; name the folder (or file) to write\n")
    code, _, err = run(capsys, "quantize", base, "--to", "int4", "--group-size", "0", "--out", tmp_path / "q")
    assert (code, err) == (2, "lmlab: error: --group-size must be one of 32, 64, 128 for int4\n")  # was 32
    code, _, err = run(capsys, "quantize", base, "--to", "int8", "--method", "gptq", "--calibration", base,
                       "--calibration-tokens", "0", "--out", tmp_path / "q")
    assert (code, err) == (2, "lmlab: error: --calibration-tokens must be a positive number of tokens, not 0\n")
    with pytest.raises(ValueError, match="'nonsense' is not a device"):  # chat and generate: a RuntimeError
        resolve_device("nonsense")
    with pytest.raises(ValueError, match="choose a rank of at most 64"):  # 10^5 wrote a 977 MB adapter
        apply_lora(lmlab.load(base)[0], LoRAConfig(rank=100_000))


def test_train_refuses_a_family_that_contradicts_the_preset_and_leaves_nothing(capsys, tmp_path):
    (tmp_path / "book.txt").write_text(TEXT)
    code, _, err = run(capsys, "train", tmp_path / "book.txt", "--out", tmp_path / "run", "--preset", "llama-tiny",
                       "--family", "gpt2", "--max-steps", 1)
    assert (code, err) == (2, "lmlab: error: preset 'llama-tiny' is the llama family, but family 'gpt2' was given "
                              "too; give the size alone ('tiny') with a family, or drop the family\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [("--best-of", 2, "--verifier", "logprob"), ("--vote", 2, "--verifier", "addition"),
                                   ("--beam", 2)])
def test_test_time_compute_writes_control_characters_out_on_a_terminal(capsys, tmp_path, monkeypatch, flags):
    """--best-of, --vote and --beam printed the model's text raw, so an escape sequence reached the terminal;
    they now show it as plain generation does (\\xNN on a terminal)."""
    tok = Tokenizer.train(["hello world\n" * 50], kind="bpe", vocab_size=300)
    model = Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=len(tok)))
    esc = tok.encode("\x1b")[0]
    with torch.no_grad():  # every next token is ESC
        model.norm_f.weight.zero_()
        model.norm_f.bias.copy_(model.tok_emb.weight[esc] * 1000)
    save_pretrained(tmp_path / "esc", model.eval(), tok)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert main(["generate", str(tmp_path / "esc"), "--prompt", "2+3=", "--max-new-tokens", "3", *map(str, flags)]) == 0
    assert capsys.readouterr().out == "2+3=" + "\\x1b" * 3 + "\n"


def test_info_on_a_config_json_that_is_not_utf8_is_a_one_line_error(capsys, base, tmp_path):
    """`lmlab info DIR` read config.json without load_pretrained's guard: a UnicodeDecodeError traceback."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_bytes(b'{"family": "gpt2", "n_layer": "\xff"}')
    assert run(capsys, "info", tmp_path / "m") == (2, "", f"lmlab: error: {tmp_path / 'm' / 'config.json'} is not "
                                                   "UTF-8 text: 'utf-8' codec can't decode byte 0xff in position 31: "
                                                   "invalid start byte\n")


def test_lora_targets_that_name_nothing_are_refused(capsys, base, tmp_path):
    for text in ("", " , "):  # both trained every linear layer
        code, _, err = run(capsys, "tune", "sft", "--model", base, "--data", SHIPPED, "--lora-rank", "2",
                           "--lora-targets", text, "--out", tmp_path / "run")
        assert (code, err) == (2, f"lmlab: error: --lora-targets names no module ({text!r}); leave it out to adapt "
                                  "every linear layer\n")
    assert not (tmp_path / "run").exists()


def test_a_json_line_that_json_cannot_read_names_its_line(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": []}\n{"messages": [{"role": "user", "content": ' + "9" * 5000 + "}]}\n")
    with pytest.raises(ValueError, match=rf"^{data}:2: not JSON that can be read \(Exceeds the limit"):
        read_jsonl(data, lambda record: record)


def test_an_existing_gguf_file_is_replaced_only_when_asked(capsys, base, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    code, _, err = run(capsys, "export", "gguf", base, out)
    assert code == 2 and "exists; replace it with --force" in err and out.read_bytes() == b"mine"
    with pytest.raises(FileExistsError, match="overwrite=True in Python"):  # the library wrote over it
        export_gguf(base, out)
    assert out.read_bytes() == b"mine"
    pytest.importorskip("gguf")
    assert run(capsys, "export", "gguf", base, out, "--force")[0] == 0 and out.read_bytes()[:4] == b"GGUF"


def test_hf_export_and_import_replace_a_folder_that_holds_files_only_when_asked(capsys, base, tmp_path):
    """`export hf` / `import hf` into a folder holding another model replaced its config and weights (they
    updated the folder in place): `import hf HF runs/x/final` destroyed the model there without a word."""
    pytest.importorskip("transformers")
    mine = tmp_path / "mine"
    other = Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=50))
    save_pretrained(mine, other, Tokenizer.train([TEXT], kind="word", vocab_size=50))
    before = {f.name: f.read_bytes() for f in mine.iterdir()}
    code, _, err = run(capsys, "export", "hf", base, mine)
    assert code == 2 and f"{mine} exists and is not empty; replace what it holds with --force" in err
    assert run(capsys, "export", "hf", base, tmp_path / "hf")[0] == 0  # a new folder
    code, _, err = run(capsys, "import", "hf", tmp_path / "hf", mine)
    assert code == 2 and "exists and is not empty" in err
    for call in (lambda: export_hf(base, mine), lambda: import_hf(tmp_path / "hf", mine)):
        with pytest.raises(FileExistsError, match="overwrite=True in Python"):
            call()
    assert {f.name: f.read_bytes() for f in mine.iterdir()} == before  # untouched
    (tmp_path / "empty").mkdir()
    assert run(capsys, "import", "hf", tmp_path / "hf", tmp_path / "empty")[0] == 0  # an empty folder is new
    assert run(capsys, "import", "hf", tmp_path / "hf", mine, "--force")[0] == 0
    assert load_pretrained(mine)[0].config == load_pretrained(base)[0].config
    assert run(capsys, "export", "hf", base, tmp_path / "hf", "--force")[0] == 0


def test_a_refused_run_names_the_command_that_resumes_it(capsys, base, tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    code, _, err = run(capsys, "tune", "sft", "--model", base, "--data", SHIPPED, "--out", tmp_path / "run")
    assert code == 2 and f"resume it (lmlab tune sft --out {tmp_path / 'run'} --resume)" in err  # said lmlab train


def _adapter(model, tok, out, rank=2):
    """model with a rank-`rank` adapter of random B (so it changes the weights), saved with its tokenizer."""
    torch.manual_seed(1)
    apply_lora(model, LoRAConfig(rank=rank), tok)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.05)
    save_adapter(model, out, tokenizer=tok)
    return merge_and_unload(copy.deepcopy(model))


def test_lora_merge_rebuilds_a_chat_run_and_refuses_another_tokenizer(base, tmp_path):
    """An adapter of a chat fine-tuning run (trained on the base plus the chat tokens) merged onto that base gave
    a model without the chat tokens or template; one of another tokenizer's base of the same widths merged without
    a word. Symbolic links in the base's folder were copied as the files they point to."""
    model, tok = load_pretrained(base)
    chat_model, chat_tok, added = chat.add_chat_tokens(model, tok)
    assert added == 4
    want = _adapter(chat_model, chat_tok, tmp_path / "adapter")

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not the model's")
    linked = tmp_path / "linked"
    linked.mkdir()
    for f in base.iterdir():
        (linked / f.name).write_bytes(f.read_bytes())
    (linked / "notes.txt").symlink_to(outside / "secret.txt")
    (linked / "extra").symlink_to(outside)
    merge_lora_dir(linked, tmp_path / "adapter", tmp_path / "merged")
    got, got_tok = load_pretrained(tmp_path / "merged")
    assert [got_tok.id_to_token(i) for i in range(len(got_tok))] == \
        [chat_tok.id_to_token(i) for i in range(len(chat_tok))]
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in got.state_dict().items())
    assert chat.load_chat_model(tmp_path / "merged")  # the template, as `lmlab tune sft` leaves it
    assert not (tmp_path / "merged" / "notes.txt").exists() and not (tmp_path / "merged" / "extra").exists()

    other = Tokenizer.train([TEXT.upper()], kind="bpe", vocab_size=300)
    save_pretrained(tmp_path / "other", Transformer(model.config).eval(), other)
    _adapter(lmlab.load(tmp_path / "other")[0], other, tmp_path / "other-adapter")
    with pytest.raises(ValueError, match="was trained with another tokenizer"):
        merge_lora_dir(base, tmp_path / "other-adapter", tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()


@pytest.mark.parametrize("argv", [["quantize", "{base}", "--to", "int8", "--out", "{tmp}/q"],
                                  ["export", "hf", "{base}", "{tmp}/hf"],
                                  ["merge", "{base}", "{base}", "--method", "linear", "--out", "{tmp}/m"]])
def test_a_write_that_finds_no_room_is_a_one_line_error(base, tmp_path, argv):
    """A file size limit (ulimit -f; a full disk reads the same): safetensors' IoError was "internal error:
    SafetensorError; this is a bug in lmlab", exit 1. It is exit 2 with one line, and nothing half-made is left."""
    import resource
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def limit():  # 64 KiB a file: the weights do not fit
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    args = [a.replace("{base}", str(base)).replace("{tmp}", str(tmp_path)) for a in argv]
    r = subprocess.run([sys.executable, "-m", "lmlab.cli", *args], capture_output=True, text=True, timeout=300,
                       preexec_fn=limit, env={"PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1",
                                              "PYTHONDONTWRITEBYTECODE": "1",  # a cut .pyc would break imports
                                              "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmlab: error: a write found no room: the disk is full, or a "
                                                   "quota or file size limit was reached (")
    assert "File too large" in lines[0] and sorted(p.name for p in tmp_path.iterdir()) == []


BIG = str(2**63)  # no model's size: it reached torch as a TypeError, the tokenizers library as a panic (exit 99)


@pytest.mark.parametrize("argv, message", [
    (["train", "BOOK", "--out", "OUT", "--preset", "tiny", "--n-embd", BIG], f"n_embd ({BIG}) must be <= 109951162"),
    (["train", "BOOK", "--out", "OUT", "--preset", "tiny", "--block-size", BIG], f"block_size ({BIG}) must be <= "),
    (["info", "--preset", "gpt2-tiny", "--vocab-size", BIG], f"vocab_size ({BIG}) must be <= 1099511627776"),
    (["tokenizer", "train", "BOOK", "--out", "OUT.json", "--vocab-size", BIG],
     f"vocab_size ({BIG}) must be at most 16,777,216"),
    (["tune", "grpo", "--model", "MODEL", "--out", "OUT", "--reward", "length", "--prompts-file", "DEEP"],
     "the prompts file DEEP is nested too deeply to be a list of strings"),
])
def test_sizes_no_model_has_and_a_deeply_nested_prompts_file_are_one_line_errors(argv, message, base, tmp_path,
                                                                                  capsys):
    """A CLI fuzz found these ending in 'lmlab: internal error' (TypeError, RecursionError) or a Rust panic."""
    (tmp_path / "book.txt").write_text("Жили-были дед да баба. " * 50)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    names = {"BOOK": tmp_path / "book.txt", "OUT": tmp_path / "out", "OUT.json": tmp_path / "t.json",
             "DEEP": tmp_path / "deep.json", "MODEL": base}
    argv = [str(names.get(a, a)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error: ") and "\n" not in err and message.replace("DEEP", str(names["DEEP"])) in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("argv, message", [
    # a 0 taken for "not given" (`x or default`): the default ran instead, exit 0
    (["train", "BOOK", "--out", "OUT", "--preset", "tiny", "--max-steps", "1", "--vocab-size", "0"],
     "vocab_size (0) must be >= 260 for bpe"),
    (["train", "BOOK", "--out", "OUT", "--preset", "tiny", "--epochs", "0"], "epochs (0.0) must be > 0"),
    (["train", "BOOK", "--out", "OUT", "--preset", "tiny", "--max-steps", "1", "--lora-alpha", "0"],
     "--lora-alpha needs --lora-rank"),
    (["info", "--preset", "tiny", "--vocab-size", "0"], "vocab_size (0) must be >= 5"),
    # taken and ignored: a model directory has its vocabulary
    (["info", "MODEL", "--vocab-size", "-1"], "--vocab-size is a preset's; a model directory has its own"),
    # the message blamed the time budget
    (["demo", "--out", "OUT", "--max-steps", "0"], "--max-steps (0) must be >= 1"),
    # "not valid YAML: maximum recursion depth exceeded" for a JSON file
    (["info", "--preset", "tiny", "--config", "DEEP"], "DEEP is nested too deeply to be a mapping of settings"),
])
def test_a_zero_an_ignored_vocabulary_and_a_deep_config_file_are_one_line_errors(argv, message, base, tmp_path,
                                                                                  capsys):
    """More of the CLI fuzz: each ran with a setting other than the one given, or named the wrong cause."""
    (tmp_path / "book.txt").write_text("Жили-были дед да баба. " * 50)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    names = {"BOOK": tmp_path / "book.txt", "OUT": tmp_path / "out", "DEEP": tmp_path / "deep.json", "MODEL": base}
    argv = [str(names.get(a, a)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error: ") and "\n" not in err, err
    assert message.replace("DEEP", str(names["DEEP"])) in err, err
    assert not (tmp_path / "out").exists()


AZR = ["selfplay", "azr", "--out", "OUT", "--quick", "--seeds", "0", "--workers", "1"]
DISTILL = ["tune", "distill", "--teacher", "MODEL", "--preset", "tiny", "--data", "BOOK", "--out", "OUT",
           "--max-steps", "2"]
GENERATE = ["generate", "MODEL", "--prompt", "the", "--max-new-tokens", "4"]


@pytest.mark.parametrize("argv, message", [
    ([*GENERATE, "--num-beams", BIG], f"num_beams ({BIG}) must be <= 1099511627776"),
    ([*GENERATE, "--num-beams", "2", "--length-penalty", "1000"], "length_penalty (1000.0) must be <= 10"),
    ([*GENERATE, "--steer", "DIR", "--steer-coef", "1e30"], "--steer-coef (1e+30) must be between -1000 and 1000"),
    ([*AZR, "--references", BIG], f"the longest prompt and answer these settings allow (references {BIG}, "),
    ([*AZR, "--ind-inputs", BIG], f"these settings allow (references 2, ind_inputs {BIG})"),
    ([*AZR, "--lr", "1e30"], "lr (1e+30) must be <= 10"),
    ([*AZR, "--warmup-lr", "1e30"], "warmup_lr (1e+30) must be <= 10"),
    ([*AZR, "--warmup-lr", "10"], "the warm-up diverged: its loss went from 4.8846 to 117.9444 in 60 steps; lower "
                                  "--warmup-lr (10)"),
    ([*DISTILL, "--mode", "sequence", "--teacher-samples", BIG], f"teacher_samples ({BIG}) must be <= 1000000"),
    ([*DISTILL, "--temperature", "1e30"], "temperature (1e+30) must be <= 100"),
    (["train", "BOOK", "--out", "OUT", "--preset", "tiny", "--max-steps", "2", "--weight-decay", "1e30"],
     "weight_decay (1e+30) must be <= 10"),
    (["tune", "sft", "--model", "MODEL", "--data", "CHATS", "--out", "OUT", "--max-steps", "2", "--lora-rank", "4",
      "--lora-alpha", BIG], "LoRA alpha (9.22337e+18) must be at most 1e+06"),
    (["serve", "--workspace", "OUT", "--port", "0", "--torch-threads", str(2**32)],
     "torch_threads (4294967296) must be at most the "),
])
def test_values_past_what_the_code_can_use_are_one_line_errors(argv, message, base, tmp_path, capsys):
    """A CLI fuzz found these ending in "lmlab: internal error" (an OverflowError in the beam scores or the AZR
    prompts, a TypeError inside torch.zeros or torch.randint, NaN sampling probabilities, a server that failed its
    start with exit 3) or in a divergence blamed on --lr (weight decay, LoRA alpha): now refused as settings."""
    from lmlab.lab.interp.steer import Direction

    (tmp_path / "book.txt").write_text("Жили-были дед да баба. " * 50)
    Direction(torch.ones(load_pretrained(base)[0].config.n_embd), 1).save(tmp_path / "dir")
    names = {"BOOK": tmp_path / "book.txt", "OUT": tmp_path / "out", "MODEL": base, "DIR": tmp_path / "dir",
             "CHATS": SHIPPED}
    assert main([str(names.get(a, a)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_refused_generation_prints_no_prompt_before_its_error(base, capsys):
    """The prompt went to stdout first, then the refusal (beams the free memory cannot hold) to stderr: a script
    reading stdout took the prompt for the start of an answer."""
    assert main([str(base) if a == "MODEL" else a for a in [*GENERATE, "--num-beams", str(2**30)]]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "is free on" in err, (out, err)
