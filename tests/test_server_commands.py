"""The command lines the supervisor launches (server/commands.py), built without a process or a database: the
exact argv of each kind of run, fresh and resumed, the files written beside it, and each argv read back by
the real `lmlab` parser, so a flag the CLI does not know fails here rather than in a launched run."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

pytest.importorskip("fastapi")

from lmlab.cli import build_parser  # noqa: E402
from lmlab.server.commands import CHILD_BOOTSTRAP, child_argv, experiment_command, flags, run_command  # noqa: E402
from lmlab.server.workspace import Workspace  # noqa: E402

MODEL = {"name": "m", "config": {"family": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32,
                                 "vocab_size": 300}, "tokenizer_kind": "bpe", "tokenizer_vocab": 300}
TRAIN_PARAMS = {"max_steps": 50, "batch_size": 4, "lr": 0.001, "schedule": "wsd", "decay_fraction": 0.2,
                "val_fraction": 0.25, "early_stopping_patience": 0, "device": "cpu"}
TRAIN_FLAGS = ["--max-steps", "50", "--batch-size", "4", "--lr", "0.001", "--schedule", "wsd", "--decay-fraction",
               "0.2"]
SELFPLAY_PARAMS = {"reward": "perplexity", "judge": "judge", "prompts": ["Once upon", "Жил-был"], "new_model": "new",
                   "seed": 1, "iterations": 5, "group_size": 4, "prompts_per_iteration": 2, "max_new_tokens": 16,
                   "lr": 1e-05, "kl_coef": 0.05, "temperature": 1.0, "save_every": 0}
SELFPLAY_FLAGS = ["--seed", "1", "--iterations", "5", "--group-size", "4", "--prompts-per-iteration", "2",
                  "--max-new-tokens", "16", "--lr", "1e-05", "--kl-coef", "0.05", "--temperature", "1.0",
                  "--save-every", "0"]


def train_run(**changes):
    return {"id": 7, "kind": "train", "model_name": "m", "books": ["a.txt", "b b.txt"], "params": TRAIN_PARAMS,
            "init_from_trained": False, "resume": False, **changes}


def no_lookup(name):
    raise AssertionError(f"model {name!r} looked up: a resumed training run needs no model row")


def test_flags():
    assert flags({"max_steps": 3, "lr": 1e-05, "quick": True, "tied": False, "min_lr": None}) == [
        "--max-steps", "3", "--lr", "1e-05", "--quick", "--no-tied"]


def test_training_from_scratch(tmp_path):
    ws = Workspace(tmp_path)
    run_dir = ws.run_path(7)
    args, files = run_command(train_run(), ws, {"m": MODEL}.get)
    assert args == ["train", str(ws.books / "a.txt"), str(ws.books / "b b.txt"),
                    "--model-config", str(run_dir / "model_config.json"), "--tokenizer-kind", "bpe",
                    "--vocab-size", "300", "--out", str(run_dir), *TRAIN_FLAGS, "--val-fraction", "0.25",
                    "--early-stopping-patience", "0", "--device", "cpu"]
    assert list(files) == [run_dir / "model_config.json"]
    assert json.loads(files[run_dir / "model_config.json"]) == MODEL["config"]
    parsed = build_parser().parse_args(args)
    assert (parsed.command, parsed.out, parsed.max_steps, parsed.val_fraction) == ("train", str(run_dir), 50, 0.25)


def test_training_from_the_trained_weights(tmp_path):
    ws = Workspace(tmp_path)
    args, files = run_command(train_run(init_from_trained=True, books=["a.txt"]), ws, {"m": MODEL}.get)
    assert args[:5] == ["train", str(ws.books / "a.txt"), "--init", str(ws.models / "m"), "--out"]
    assert files == {}
    assert build_parser().parse_args(args).init == str(ws.models / "m")


def test_resumed_training_keeps_its_data_and_settings(tmp_path):
    """--resume reads the data split from the run directory: no books, no config, no --val-fraction."""
    ws = Workspace(tmp_path)
    args, files = run_command(train_run(resume=True), ws, no_lookup)
    assert args == ["train", "--out", str(ws.run_path(7)), "--resume", *TRAIN_FLAGS, "--early-stopping-patience",
                    "0", "--device", "cpu"]
    assert files == {}
    assert build_parser().parse_args(args).resume is True


def test_training_of_a_model_that_is_gone(tmp_path):
    with pytest.raises(ValueError, match="^model 'm' no longer exists$"):
        run_command(train_run(), Workspace(tmp_path), {}.get)


@pytest.mark.parametrize("resume", [False, True])
def test_selfplay(tmp_path, resume):
    """The prompts go in a file: a command line is public (ps, /proc) and logged."""
    ws = Workspace(tmp_path)
    run_dir = ws.run_path(9)
    run = {"id": 9, "kind": "selfplay", "model_name": "base", "books": [], "params": SELFPLAY_PARAMS,
           "init_from_trained": True, "resume": resume}
    args, files = run_command(run, ws, {"base": MODEL, "judge": MODEL}.get)
    assert args == ["selfplay", "text", "--model", str(ws.models / "base"), "--out", str(run_dir),
                    "--reward", "perplexity", "--judge", str(ws.models / "judge"),
                    "--prompts-file", str(run_dir / "prompts.json"), *SELFPLAY_FLAGS] + ["--resume"] * resume
    assert files == {run_dir / "prompts.json": '["Once upon", "Жил-был"]'}
    parsed = build_parser().parse_args(args)
    assert (parsed.judge, parsed.iterations, parsed.resume) == (str(ws.models / "judge"), 5, resume)


def test_selfplay_without_judge_or_prompts(tmp_path):
    ws = Workspace(tmp_path)
    params = {**SELFPLAY_PARAMS, "reward": "seed", "judge": None, "prompts": []}
    run = {"id": 9, "kind": "selfplay", "model_name": "base", "params": params, "resume": False}
    args, files = run_command(run, ws, {"base": MODEL}.get)
    assert args == ["selfplay", "text", "--model", str(ws.models / "base"), "--out", str(ws.run_path(9)),
                    "--reward", "seed", *SELFPLAY_FLAGS]
    assert files == {}


@pytest.mark.parametrize("gone", ["base", "judge"])
def test_selfplay_of_a_model_that_is_gone(tmp_path, gone):
    run = {"id": 9, "kind": "selfplay", "model_name": "base", "params": SELFPLAY_PARAMS, "resume": True}
    models = {"base": MODEL, "judge": MODEL}
    del models[gone]
    with pytest.raises(ValueError, match=f"^model '{gone}' no longer exists$"):
        run_command(run, Workspace(tmp_path), models.get)


def test_experiment(tmp_path):
    ws = Workspace(tmp_path)
    params = {"lab": "facts", "experiment": "plateau", "quick": True, "seeds": [3, 5], "workers": 2}
    run = {"id": 4, "kind": "experiment", "model_name": "", "params": params, "resume": False}
    args, files = run_command(run, ws, no_lookup)
    assert args == experiment_command(params, ws.run_path(4)) == [
        "lab", "facts", "plateau", "--out", str(ws.run_path(4)), "--seeds", "3,5", "--quick", "--workers", "2"]
    assert files == {}
    with pytest.raises(ValueError, match="^unknown lab 'nope'$"):
        experiment_command({**params, "lab": "nope"}, ws.run_path(4))


def test_a_merge_with_negative_numbers_parses_as_the_cli_reads_it():
    """`--weights -1.0,1.0` as two arguments: argparse read "-1.0,1.0" as a flag, and the merge job the API had
    accepted (201) failed with "expected one argument"; so did --lambda -1e-05. Each is one --flag=VALUE now."""
    from lmlab.server.commands import merge_command
    args = merge_command({"model": "a", "others": ["b"], "method": "task-arithmetic", "base": "p",
                          "weights": [-1.0, 1.0], "lambda": -1e-05}, "runs/run-1/model")
    parsed = build_parser().parse_args(args)
    assert (parsed.weights, parsed.lam, parsed.base, parsed.models) == ("-1.0,1.0", -1e-05, "models/p",
                                                                         ["models/a", "models/b"])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the signal mask from /proc")
def test_a_run_process_starts_with_sigint_ignored(tmp_path):
    """A SIGINT (a cancel) that reached the child while its interpreter was still starting killed it with "Fatal
    Python error: init_import_site ... KeyboardInterrupt"; started with SIGINT ignored, it waits for the bootstrap's
    handler (and the stop file covers a signal sent before). Here the "interpreter" reports what it was given."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ngrep "^SigIgn:" /proc/self/status\nprintf "%s|" "$@"\n')
    fake.chmod(0o755)
    out = subprocess.run(child_argv(str(fake), ["train", "--out", "a b"]), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert int(out[0].split()[1], 16) & (1 << (signal.SIGINT - 1)), out
    assert out[1:] == f"-c|{CHILD_BOOTSTRAP}|train|--out|a b|".splitlines(), out  # the arguments, unchanged
