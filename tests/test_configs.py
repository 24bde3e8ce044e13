"""lmlab.configs: one validator, one reader and one flag generator for every config dataclass; `--config FILE`
for any command; one seed grammar."""

import dataclasses
import json
from dataclasses import dataclass

import pytest

from lmlab.cli import build_parser, main
from lmlab.configs import add_arguments, from_dict, given, knob, parse_seeds, read_config_file, validate
from lmlab.lab.facts.data import BioConfig
from lmlab.lab.facts.experiments import Scale
from lmlab.lab.facts.memory import MemoryConfig
from lmlab.lab.facts.runner import RunConfig
from lmlab.lab.selfplay.azr import AZRConfig
from lmlab.lab.selfplay.text import TextSelfPlayConfig
from lmlab.models import GenerationConfig, ModelConfig
from lmlab.train import TrainConfig


@dataclass
class Knobs:
    n: int = knob(3, "a count", gt=0)
    rate: float | None = knob(None, "a rate", ge=0, lt=1)
    kind: str = knob("a", "a kind", choices=("a", "b"))
    on: bool = knob(False, "a switch")
    names: list[str] = knob(factory=list, help="names")

    def __post_init__(self) -> None:
        validate(self)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n (0) must be > 0"),
    (dict(n=2.5), "n (2.5) must be an integer"),
    (dict(n=True), "n (True) must be an integer"),
    (dict(rate=1), "rate (1) must be < 1"),
    (dict(rate=-0.5), "rate (-0.5) must be >= 0"),
    (dict(rate=float("nan")), "rate (nan) must be a finite number"),
    (dict(rate="0.1"), "rate ('0.1') must be a number or null"),
    (dict(kind="c"), "kind ('c') must be one of a, b"),
    (dict(on="yes"), "on ('yes') must be true or false"),
    (dict(names=["x", 1]), "names (['x', 1]) must be a list of a string"),
])
def test_validate_names_the_field_and_the_rule(kwargs, message):
    with pytest.raises(ValueError) as err:
        Knobs(**kwargs)
    assert str(err.value) == message


def test_valid_values_pass_and_ints_are_numbers():
    assert Knobs(n=1, rate=0, kind="b", on=True, names=["x"]).rate == 0
    assert TrainConfig(max_steps=1, lr=1).lr == 1  # JSON may write 1.0 as 1


def test_from_dict_refuses_unknown_keys_and_maps_aliases():
    with pytest.raises(ValueError, match=r"^unknown Knobs field\(s\): colour, size$"):
        from_dict(Knobs, {"n": 2, "colour": 1, "size": 2})
    assert from_dict(Knobs, {"count": 5}, aliases={"count": "n"}).n == 5
    with pytest.raises(ValueError, match=r"^n_embd \(32\) conflicts with d_model \(64\)$"):
        ModelConfig.from_dict({"d_model": 64, "n_embd": 32})


CONFIGS = [TrainConfig, ModelConfig, GenerationConfig, TextSelfPlayConfig, AZRConfig]
LAB_CONFIGS = [BioConfig, RunConfig, MemoryConfig, Scale]  # set from code and files, not flags
COMMANDS = {TrainConfig: ["train"], ModelConfig: ["train"], GenerationConfig: ["generate"],
            TextSelfPlayConfig: ["selfplay", "text"], AZRConfig: ["selfplay", "azr"]}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_has_help_and_a_flag(cls, capsys):
    with pytest.raises(SystemExit):
        main([*COMMANDS[cls], "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        if f.name != "vocab_size" or cls is not ModelConfig:  # the model's vocabulary is the tokenizer's
            assert "--" + f.name.replace("_", "-") in text, f.name
            assert " ".join(f.metadata["help"].split()[:3]) in text, f.name


@pytest.mark.parametrize("cls", LAB_CONFIGS, ids=lambda c: c.__name__)
def test_the_labs_configs_declare_help_and_bounds_alike(cls):
    assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), cls.__name__
    with pytest.raises(ValueError, match=r"\(0\) must be > 0$"):
        cls(**{next(f.name for f in dataclasses.fields(cls) if f.metadata.get("gt") == 0): 0})


def test_generated_flags_parse_to_the_field_types():
    import argparse
    p = argparse.ArgumentParser()
    add_arguments(p, Knobs)
    args = p.parse_args(["--n", "4", "--rate", "0.5", "--on", "--names", "a, b"])
    assert given(args, Knobs) == {"n": 4, "rate": 0.5, "on": True, "names": ["a", "b"]}
    assert given(p.parse_args([]), Knobs) == {}
    assert given(p.parse_args(["--no-on"]), Knobs) == {"on": False}


def test_config_file_for_any_command(tmp_path, capsys):
    """Keys are the command's flag names (dashes or underscores, sections merged); flags given win; a file
    with other keys is one line, exit 2."""
    (tmp_path / "info.json").write_text(json.dumps({"preset": "gpt2-tiny", "batch-size": 4}))
    assert main(["info", "--config", str(tmp_path / "info.json")]) == 0
    assert "preset gpt2-tiny" in (out := capsys.readouterr().out) and "batch 4×128" in out  # the file's values
    assert main(["info", "--config", str(tmp_path / "info.json"), "--batch-size", "2"]) == 0
    assert "batch 2×128" in capsys.readouterr().out  # the flag wins over the file
    (tmp_path / "bad.json").write_text(json.dumps({"preset": "gpt2-tiny", "colour": "red"}))
    assert main(["info", "--config", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lmlab: error: {tmp_path / 'bad.json'}: not settings of this command: colour;")
    assert "\n" not in err
    assert main(["info", "--config", str(tmp_path / "missing.json")]) == 2


def test_config_file_sections_and_required_flags(tmp_path):
    """A run-like file with `train` and `model` sections fills TrainConfig and ModelConfig flags, and a required
    flag (--out) may come from it."""
    (tmp_path / "run.yaml").write_text(f"out: {tmp_path / 'r'}\npreset: gpt2-tiny\n"
                                       "train:\n  max_steps: 2\n  lr: 0.001\nmodel:\n  n_layer: 1\n")
    parser = build_parser()
    from lmlab.cli import parse_arguments
    args = parse_arguments(parser, ["train", "book.txt", "--config", str(tmp_path / "run.yaml"), "--lr", "0.002"])
    assert (args.out, args.preset, args.max_steps, args.lr, args.n_layer) == (str(tmp_path / "r"), "gpt2-tiny", 2,
                                                                               0.002, 1)
    assert given(args, ModelConfig) == {"n_layer": 1}



def test_a_runs_own_config_json_is_a_config_file(tmp_path, capsys):
    """The help's "a run's {train: ..., model: ...}": a run's config.json also records facts (data_stats, the
    dataset folder, inputs' sha256), which --config skips; its settings fill the new run's."""
    (tmp_path / "book.txt").write_text("Жили-были дед да баба, и была у них курочка Ряба. " * 40)
    assert main(["train", str(tmp_path / "book.txt"), "--out", str(tmp_path / "r1"), "--preset", "llama-tiny",
                 "--tokenizer-kind", "char", "--n-layer", "1", "--max-steps", "2", "--lr", "0.002"]) == 0
    saved = json.loads((tmp_path / "r1" / "config.json").read_text())
    assert {"data_stats", "dataset"} <= set(saved)  # what the file holds besides settings
    capsys.readouterr()
    assert main(["train", str(tmp_path / "book.txt"), "--config", str(tmp_path / "r1" / "config.json"),
                 "--out", str(tmp_path / "r2"), "--max-steps", "1"]) == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "r2" / "config.json").read_text())
    assert again["model"] == saved["model"] and again["train"]["lr"] == 0.002 and again["train"]["max_steps"] == 1
    # a run from --init with LoRA, and one with a trained --tokenizer: the model's sizes are theirs, and the LoRA
    # section is the --lora-* flags (merged by name, its dropout became the model's; a review of the change)
    book, r1 = str(tmp_path / "book.txt"), str(tmp_path / "r1")
    for first in (["--init", f"{r1}/final", "--lora-rank", "4", "--lora-alpha", "3", "--lora-dropout", "0.25"],
                  ["--tokenizer", f"{r1}/tokenizer.json", "--preset", "llama-tiny", "--n-layer", "1"]):
        name = first[0].strip("-")
        assert main(["train", book, "--out", str(tmp_path / name), "--max-steps", "1", *first]) == 0
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert main(["train", book, "--config", str(tmp_path / name / "config.json"), "--out",
                     str(tmp_path / f"{name}2")]) == 0, capsys.readouterr().err
        again = json.loads((tmp_path / f"{name}2" / "config.json").read_text())
        assert (again["model"], again.get("lora"), again.get("init"), again.get("tokenizer")) == (
            saved["model"], saved.get("lora"), saved.get("init"), saved.get("tokenizer"))
    assert saved["tokenizer"] == str((tmp_path / "r1" / "tokenizer.json").resolve())

def test_read_config_file_errors_name_the_file(tmp_path):
    (tmp_path / "a.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="a.json must hold a mapping of settings, not list"):
        read_config_file(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("{nope")
    with pytest.raises(ValueError, match="b.json is not valid JSON"):
        read_config_file(tmp_path / "b.json")
    (tmp_path / "c.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="c.yaml is not valid YAML"):
        read_config_file(tmp_path / "c.yaml")


@pytest.mark.parametrize("text, seeds", [("0,1,2", [0, 1, 2]), ("0-4", [0, 1, 2, 3, 4]), ("3", [3]),
                                         ("1-2,7", [1, 2, 7]), (5, [5]), ([4, 2], [4, 2])])
def test_one_seed_grammar(text, seeds):
    assert parse_seeds(text) == seeds


# 2^31 and up: the labs' derived seeds overflowed torch.manual_seed mid-run; a range of 10^12 seeds was a list
@pytest.mark.parametrize("text", ["", "a,b", "1,1", "-1", "3-1", [True], "9223372036854775000", [2**31],
                                  "0-1000000000000"])
def test_bad_seeds_are_refused(text):
    with pytest.raises(ValueError, match="seeds"):
        parse_seeds(text)


def test_config_values_are_read_as_their_flags_read_them(tmp_path, capsys):
    """set_defaults skips argparse: "false" for a switch was true, a list for a comma-separated flag reached the
    command as a list (merge: AttributeError, exit 1). Now a switch takes true or false, a list is joined, and a
    value goes through the flag's type and choices, or is one line naming the file and the setting."""
    from lmlab.cli import parse_arguments
    parser = build_parser()
    (tmp_path / "m.yaml").write_text("method: linear\nweights: [0.7, 0.3]\nseed: 4\n")
    args = parse_arguments(parser, ["merge", "a", "b", "--out", "o", "--config", str(tmp_path / "m.yaml")])
    assert (args.weights, args.seed) == ("0.7,0.3", 4)
    (tmp_path / "q.json").write_text(json.dumps({"to": "int4", "keep_head": False, "group_size": "64"}))
    args = parse_arguments(parser, ["quantize", "m", "--out", "o", "--config", str(tmp_path / "q.json")])
    assert (args.keep_head, args.group_size) == (False, 64)
    for body, message in (({"to": "int4", "keep_head": "false"}, "keep_head must be true or false, not 'false'"),
                          ({"to": "int4", "group_size": "sixty"}, "group_size must be an integer, not 'sixty'"),
                          ({"to": "int4", "group_size": [32]}, "group_size takes one value, not a list")):
        (tmp_path / "bad.json").write_text(json.dumps(body))
        assert main(["quantize", "m", "--out", "o", "--config", str(tmp_path / "bad.json")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_both_labs_read_seeds_alike():
    """`--seeds 3` is seed 3 for the knowledge lab and for AZR alike (AZR read it as a count of 3 seeds)."""
    for argv in (["lab", "facts", "phases", "--out", "x", "--seeds", "3"], ["selfplay", "azr", "--out", "x",
                                                                          "--seeds", "3"]):
        assert parse_seeds(build_parser().parse_args(argv).seeds) == [3]


@pytest.mark.parametrize("flags, message", [
    (["--seq-len", "-5"], "--batch-size and --seq-len must be >= 1"),
    (["--seq-len", "0"], "--batch-size and --seq-len must be >= 1"),
    (["--batch-size", "0"], "--batch-size and --seq-len must be >= 1"),
    (["--seq-len", "500"], "--seq-len (500) is longer than the model's context (128)"),
])
def test_info_refuses_sizes_it_cannot_estimate(capsys, flags, message):
    """`lmlab info --seq-len -5` printed FLOPs for T=-5 and exit 0; --batch-size 0 and --seq-len 0 went through."""
    assert main(["info", "--preset", "gpt2-tiny", *flags]) == 2
    assert capsys.readouterr().err == f"lmlab: error: {message}\n"


def test_config_files_give_lists_repeatable_flags_and_flag_names_on_every_mode(tmp_path, capsys):
    """A list for a repeatable flag (--weight) was walked a character at a time ("--weight 't' must look like
    NAME=NUMBER"), a list for a list setting (sample_prompts) was "takes one value", keys had to be argparse's
    names (lam, not lambda), and `--config` / `--debug` after a mode (`lmlab tune sft ... --config F`) were
    unrecognized arguments."""
    from lmlab.cli import parse_arguments

    def parsed(argv, body):
        (tmp_path / "c.json").write_text(json.dumps(body))
        return parse_arguments(build_parser(), [*argv, "--config", str(tmp_path / "c.json")])

    args = parsed(["train", "b.txt", "--out", "o"], {"weight": ["tales=2", "wp=1"], "train": {
        "sample_prompts": ["Once upon, a time", "Жили"], "drift_probes": ["a b"], "lr": 0.01}})
    assert (args.weight, args.sample_prompts, args.drift_probes, args.lr) == (
        ["tales=2", "wp=1"], ["Once upon, a time", "Жили"], ["a b"], 0.01)  # an item's comma stays in it
    assert parsed(["train", "b.txt", "--out", "o"], {"weight": "tales=2"}).weight == ["tales=2"]
    args = parsed(["generate", "m"], {"greedy": True, "stop": ["\n\n", "END"], "ignore_eos": False})
    assert (args.do_sample, args.stop_strings, args.stop_at_eos) == (False, ["\n\n", "END"], None)
    assert parsed(["generate", "m"], {"do_sample": False}).do_sample is False  # (read as the string 'False')
    assert parsed(["merge", "a", "b", "--out", "o"], {"lambda": 0.5, "method": "ties"}).lam == 0.5
    assert parsed(["tune", "grpo", "--out", "o"], {"prompt": ["a", "b"]}).prompt == ["a", "b"]
    args = parsed(["tune", "sft", "--out", "o", "--debug"], {"max_steps": 3, "model": "m"})
    assert (args.max_steps, args.model, args.debug) == (3, "m", True)
    args = parse_arguments(build_parser(), ["tune", "--config", str(tmp_path / "c.json"), "sft", "--out", "o"])
    assert (args.max_steps, args.model) == (3, "m")  # before the mode, as before
    (tmp_path / "c.json").write_text(json.dumps({"greedy": "yes"}))
    assert main(["generate", "m", "--config", str(tmp_path / "c.json")]) == 2
    assert capsys.readouterr().err.strip() == (f"lmlab: error: {tmp_path / 'c.json'}: greedy must be true or false, "
                                               "not 'yes'")
