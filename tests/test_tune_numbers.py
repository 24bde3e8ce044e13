"""Numbers no run can train with are refused in one line before anything is written (exit 2): an infinite or
NaN beta, gamma or NLL weight, LoRA alpha or distillation temperature. They were let through (a `> 0` check
passes inf, a `< 0` check passes NaN), the run trained on NaN and failed with a traceback (exit 1), and `lmlab
lora merge` wrote a model of NaNs and exited 0. A path that is a file where a folder goes is exit 2 too."""

from __future__ import annotations

import json

import pytest
from test_run_folders import commands, start  # noqa: F401 (the fixture)

from lmlab.cli import main
from lmlab.models import ModelConfig, Transformer
from lmlab.tune.lora import LoRAConfig, apply_lora, save_adapter


@pytest.mark.parametrize("command, extra, why", [
    ("dpo", ["--beta", "inf"], "beta must be a positive finite number, got inf"),
    ("dpo", ["--sft-weight", "nan"], "sft_weight must be a finite number, 0 or more, got nan"),
    ("dpo", ["--loss", "simpo", "--gamma", "nan"], "gamma must be a finite number, got nan"),
    ("sft", ["--lora-rank", "2", "--lora-alpha", "inf"], "LoRA alpha must be a positive finite number, not inf"),
    ("distill", ["--temperature", "inf"], "temperature (inf) must be a finite number"),  # configs.validate
])
def test_a_number_no_run_can_train_with_is_one_line(tmp_path, start, capsys, command, extra, why):  # noqa: F811
    out = tmp_path / "run"
    assert main([*commands(start, str(out))[command], *extra]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"lmlab: error: {why}"]
    assert not out.exists()


def test_lora_merge_refuses_an_adapter_whose_alpha_is_not_finite(tmp_path, start, capsys):  # noqa: F811
    model = Transformer(ModelConfig.load(start / "model" / "config.json"))
    save_adapter(apply_lora(model, LoRAConfig(rank=2)), tmp_path / "adapter")
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 4.0', '"lora_alpha": Infinity'))
    assert json.loads(config.read_text())["lora_alpha"] == float("inf")
    out = tmp_path / "merged"
    assert main(["lora", "merge", str(start / "model"), str(tmp_path / "adapter"), "--out", str(out)]) == 2
    assert "LoRA alpha must be a positive finite number, not inf" in capsys.readouterr().err
    assert not out.exists()


def test_an_out_that_is_a_file_is_one_line(tmp_path, start, capsys):  # noqa: F811
    out = tmp_path / "a-file"
    out.write_text("the user's own\n")
    assert main(commands(start, str(out))["dpo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmlab: error: ") and "Traceback" not in err[0], err
    assert out.read_text() == "the user's own\n"


@pytest.fixture(scope="module")
def quantized(start, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("q") / "q8"
    assert main(["quantize", str(start / "model"), "--to", "int8", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("command, extra", [("sft", []), ("sft", ["--lora-rank", "2"]), ("dpo", ["--lora-rank", "2"]),
                                            ("grpo", []), ("distill", [])])
def test_an_int8_model_is_refused_before_anything_is_written(tmp_path, start, quantized, capsys, command,  # noqa: F811
                                                             extra):
    """It crashed in the chat tokens' resize (KeyError) or the adapters' (AttributeError), or was refused after
    the run's copy of the data was written."""
    out = tmp_path / "run"
    args = commands(start, str(out))[command]
    flag = "--model" if command != "distill" else "--teacher"
    args[args.index(flag) + 1] = str(quantized)
    if command == "distill":  # the teacher may be int8 (it runs forward only); the student may not
        args += ["--model", str(quantized)]
        args.remove("--preset"), args.remove("llama-tiny")
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lmlab: error: this model is an int8/int4 model, which cannot train; start from the model it was "
                   "quantized from (its quantization.json: source)"], err
    assert not out.exists()


def test_lora_merge_refuses_an_int8_model(tmp_path, start, quantized, capsys):  # noqa: F811
    model = Transformer(ModelConfig.load(start / "model" / "config.json"))
    save_adapter(apply_lora(model, LoRAConfig(rank=2)), tmp_path / "adapter")
    assert main(["lora", "merge", str(quantized), str(tmp_path / "adapter"), "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err == (f"lmlab: error: {quantized} is an int8/int4 model, which an adapter cannot be "
                                       "merged into; merge it into the model it was quantized from (its "
                                       "quantization.json: source)\n")
    assert not (tmp_path / "m").exists()


def test_sequence_distillation_from_books_shorter_than_its_prompts_is_one_line(tmp_path, start, capsys):  # noqa: F811
    """torch.randint over a negative range (a RuntimeError, exit 1), with the run's data left behind."""
    out = tmp_path / "run"
    assert main([*commands(start, str(out))["distill"], "--mode", "sequence", "--prompt-tokens", "100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not more than --prompt-tokens (100000)" in err[0], err
    assert not out.exists()
