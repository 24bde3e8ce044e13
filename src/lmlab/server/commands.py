"""The command line of a run's process: pure functions from a run row and the workspace's paths to the
arguments of `lmlab` (`train ...`, `selfplay text ...`, `lab facts EXPERIMENT ...`, `selfplay azr ...`, an
evaluation's `eval ...` / `compare ...`, a fine-tuning run's `tune sft|dpo|grpo ...`, or a model made
from others: `quantize ...`, `merge ...`),
and the files the command reads that must be written into the run directory first. No process control and
no database: the supervisor (jobs.py) looks up the model rows, writes the files and launches
`python -c CHILD_BOOTSTRAP ARGS...` (child_argv).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from ..lab.selfplay.text import SETTING_FLAGS
from .workspace import Workspace

# The child: `lmlab ARGS...`, with SIGINT and SIGTERM restored to KeyboardInterrupt. It is started with SIGINT
# ignored (child_argv): a SIGINT that reached the interpreter while it was still initialising killed it with
# "Fatal Python error: init_import_site ... KeyboardInterrupt" in the run's log. Python leaves an ignored SIGINT
# ignored, and SIGTERM would otherwise kill without a checkpoint. A SIGINT that arrives before these handlers
# are set is lost, so the supervisor writes STOP_FILE (named by $LMLAB_STOP_FILE) before it signals, and the
# child, once its handlers are set, stops at once if it finds that file.
STOP_FILE = "stop-requested"
CHILD_BOOTSTRAP = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.default_int_handler)
if os.path.exists(os.environ.get("LMLAB_STOP_FILE", "")):
    print("lmlab: interrupted (asked to stop while starting)", file=sys.stderr)
    sys.exit(130)
from lmlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def child_argv(python: str, args: list[str]) -> list[str]:
    """The argv of the process that runs `lmlab ARGS...` under the interpreter `python`: through a POSIX shell
    that ignores SIGINT and execs the interpreter (one process, one pid), since an ignored signal stays ignored
    across exec. Popen's preexec_fn could do it without the shell, but is unsafe in a server with threads."""
    return ["/bin/sh", "-c", 'trap "" INT; exec "$0" "$@"', python, "-c", CHILD_BOOTSTRAP, *args]


class Command(NamedTuple):
    args: list[str]  # after `lmlab`
    files: dict[Path, str]  # text the command reads, to write before it starts: {path in the run directory: text}


def flags(params: dict[str, Any]) -> list[str]:
    """`--key value` per setting (`--key`/`--no-key` for a boolean; None left out)."""
    out = []
    for key, value in params.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


def experiment_command(params: dict[str, Any], out: Path) -> list[str]:
    """The lab's own CLI command for an experiment run's params (lab, experiment, quick, seeds, workers),
    writing into `out`: `lab facts EXPERIMENT --out OUT --seeds 0,1 ...` or `selfplay azr --out OUT ...`."""
    seeds = ",".join(str(s) for s in params["seeds"])
    if params["lab"] == "facts":
        args = ["lab", "facts", params["experiment"], "--out", str(out), "--seeds", seeds]
    elif params["lab"] == "azr":
        args = ["selfplay", "azr", "--out", str(out), "--seeds", seeds]
    else:
        raise ValueError(f"unknown lab {params['lab']!r}")
    if params.get("quick"):
        args.append("--quick")
    if params.get("workers"):
        args += ["--workers", str(params["workers"])]
    return args


def eval_command(params: dict[str, Any], out: str) -> list[str]:
    """An evaluation run's command (params: models, tasks, and run for a trajectory), writing into `out`:
    `eval models/NAME --tasks T --out OUT` (OUT/eval.json), `compare models/A models/B ... --tasks T --out OUT`
    (the first the baseline; OUT/compare.json and report.html), or `eval runs/run-N --all-checkpoints --tasks T
    --out OUT` (OUT/trajectory.jsonl). Paths are relative to the workspace, where the supervisor starts every
    run: results name models as `models/NAME`, and the command works as shown from the workspace folder."""
    common = ["--tasks", ",".join(params["tasks"]), "--out", out]
    if params.get("run"):
        return ["eval", f"runs/run-{params['run']}", "--all-checkpoints", *common]
    models = [f"models/{m}" for m in params["models"]]
    return ["compare" if len(models) > 1 else "eval", *models, *common]


# Runs that make a new model of the workspace from existing ones in one pass, written into RUN_DIR/DERIVED_DIR
# and registered under params.new_model when they exit 0 (jobs.Supervisor._register_model). They keep no
# checkpoints: a stopped one is started again. One entry per kind: its command from the run's params.
DERIVED_DIR = "model"


def quantize_command(params: dict[str, Any], out: str) -> list[str]:
    """`quantize models/NAME --to int8|int4 [--group-size G] [--method gptq --calibration books/B ...]
    [--keep-head] --out OUT`, paths relative to the workspace (as eval_command)."""
    args = ["quantize", f"models/{params['model']}", "--to", params["to"]]
    if params.get("group_size"):
        args += ["--group-size", str(params["group_size"])]
    args += ["--method", params["method"]]
    if params.get("calibration"):
        args += ["--calibration", *[f"books/{b}" for b in params["calibration"]]]
    return args + (["--keep-head"] if params.get("keep_head") else []) + ["--out", out]


def merge_command(params: dict[str, Any], out: str) -> list[str]:
    """`merge models/NAME models/OTHER ... --method M [--base models/BASE] [--weights ...] [--t T]
    [--density D] [--lambda L] [--seed S] --out OUT` (the parameters the method uses only)."""
    args = ["merge", *[f"models/{m}" for m in [params["model"], *params["others"]]], "--method", params["method"]]
    if params.get("base"):
        args += ["--base", f"models/{params['base']}"]
    # one argument each, --flag=VALUE: a value starting with '-' ("-1.0,1.0", "-1e-05") is no flag then
    if params.get("weights"):
        args.append("--weights=" + ",".join(repr(float(w)) for w in params["weights"]))
    for flag in ("t", "density", "lambda", "seed"):
        if params.get(flag) is not None:
            args.append(f"--{flag}={params[flag]}")
    return args + ["--out", out]


DERIVED = {"quantize": quantize_command, "merge": merge_command}


def product(run: dict[str, Any]) -> str | None:
    """The file in its run directory that a run making no model leaves when it finishes (a lab experiment's
    report, an evaluation's results); None for training and self-play, which make a model."""
    if run["kind"] == "experiment":
        return "report.html"
    if run["kind"] == "eval":
        p = run["params"]
        return "trajectory.jsonl" if p.get("run") else "compare.json" if len(p["models"]) > 1 else "eval.json"
    return None


def train_command(run: dict[str, Any], ws: Workspace, model: dict[str, Any] | None) -> Command:
    """`train BOOKS... --out RUN_DIR` from the model's config (or `--init` its trained weights), or
    `train --out RUN_DIR --resume`. `model` is the model's row; ValueError when it is gone (a resume needs
    none: the run directory holds its data and settings)."""
    run_dir = ws.run_path(run["id"])
    params = {k: v for k, v in run["params"].items() if k != "new_version"}  # the server's check, not a flag
    files = {}
    if run["resume"]:  # the run's own data and settings; max_steps may have grown (a stop condition)
        args = ["train", "--out", str(run_dir), "--resume"]
        params = {k: v for k, v in params.items() if k != "val_fraction"}
    else:
        if model is None:
            raise ValueError(f"model {run['model_name']!r} no longer exists")
        args = ["train", *[str(ws.book_path(b)) for b in run["books"]]]
        if run["init_from_trained"]:
            args += ["--init", str(ws.model_path(run["model_name"]))]
        else:
            config_file = run_dir / "model_config.json"
            files[config_file] = json.dumps(model["config"], indent=2)
            args += ["--model-config", str(config_file), "--tokenizer-kind", model["tokenizer_kind"],
                     "--vocab-size", str(model["tokenizer_vocab"])]
        args += ["--out", str(run_dir)]
    return Command(args + flags(params), files)


def selfplay_command(run: dict[str, Any], ws: Workspace, get_model: Callable[[str], dict[str, Any] | None]) -> Command:
    """`selfplay text --model DIR --out RUN_DIR --reward R [--judge DIR] [--prompts-file F] SETTINGS...`,
    plus `--resume` when it continues (the flags it started with: --resume checks they match). ValueError
    when `get_model` finds the starting model or the judge no longer."""
    p, run_dir, files = run["params"], ws.run_path(run["id"]), {}
    for name in (run["model_name"], p.get("judge")):
        if name and get_model(name) is None:
            raise ValueError(f"model {name!r} no longer exists")
    args = ["selfplay", "text", "--model", str(ws.model_path(run["model_name"])), "--out", str(run_dir),
            "--reward", p["reward"]]
    if p.get("judge"):
        args += ["--judge", str(ws.model_path(p["judge"]))]
    if p.get("prompts"):  # a file, not arguments: a command line is public (ps, /proc) and logged
        prompts_file = run_dir / "prompts.json"
        files[prompts_file] = json.dumps(p["prompts"], ensure_ascii=False)
        args += ["--prompts-file", str(prompts_file)]
    args += flags({k: p[k] for k in SETTING_FLAGS if k in p})
    return Command(args + (["--resume"] if run["resume"] else []), files)


# A fine-tuning run's settings, by method, as its command's flags (GRPO counts its updates in --steps). The
# data it reads is the run's own copy (DATASET, made when it was started), so a resume finds the same examples
# whatever happens to the workspace's dataset meanwhile.
TUNE_SETTINGS = {
    "sft": ("max_steps", "batch_size", "lr", "warmup_steps", "seed", "save_every", "log_every", "eval_every",
            "packing", "completion_only", "lora_hard_tokens"),
    "dpo": ("max_steps", "batch_size", "lr", "warmup_steps", "seed", "save_every", "log_every", "beta", "sft_weight"),
    "grpo": ("max_steps", "prompts_per_step", "group_size", "max_new_tokens", "lr", "kl_coef", "seed", "save_every",
             "eval_every", "eval_prompts"),
    "distill": ("max_steps", "batch_size", "lr", "warmup_steps", "seed", "save_every", "log_every", "eval_every",
                "mode", "temperature", "alpha"),
}
LORA_SETTINGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_new_tokens")
DATASET = "dataset.jsonl"


def tune_command(run: dict[str, Any], ws: Workspace) -> Command:
    """`tune sft|dpo|grpo --model DIR --out RUN_DIR (--data RUN_DIR/dataset.jsonl | --task T) SETTINGS...`,
    `tune distill --teacher DIR --preset P --out RUN_DIR --data BOOKS... SETTINGS...`, or
    `tune METHOD --out RUN_DIR --resume` with its step limit (the run keeps its own model, data and settings)."""
    p, run_dir = run["params"], ws.run_path(run["id"])
    method = p["method"]
    steps = {"steps" if method == "grpo" else "max_steps": p["max_steps"]}
    if run["resume"]:
        return Command(["tune", method, "--out", str(run_dir), "--resume", *flags(steps)], {})
    model = str(ws.model_path(run["model_name"]))
    if method == "distill":  # a new student of a preset, taught by the model on the run's books
        args = ["tune", method, "--teacher", model, "--preset", p["preset"], "--out", str(run_dir), "--data",
                *[str(ws.book_path(b)) for b in run["books"]]]
    else:
        args = ["tune", method, "--model", model, "--out", str(run_dir)]
        args += ["--task", p["task"]] if method == "grpo" else ["--data", str(run_dir / DATASET)]
    if method == "dpo":  # the reference log-probabilities cached in the run, not in the server's home
        args += ["--loss", p["loss"], "--ref-cache", str(run_dir / "reference")]
    settings = {k: p.get(k) for k in (*TUNE_SETTINGS[method], *LORA_SETTINGS) if k != "max_steps"}
    settings.update({k: v or None for k, v in settings.items() if isinstance(v, bool)})  # store_true flags only
    return Command(args + flags({**steps, **settings}), {})


def run_command(run: dict[str, Any], ws: Workspace, get_model: Callable[[str], dict[str, Any] | None]) -> Command:
    """The command of any run: `lmlab train ...`, `lmlab selfplay text ...` or a lab experiment's, with
    --resume when it continues from a checkpoint. `get_model(name)` is the model's row, or None."""
    if run["kind"] == "experiment":
        return Command(experiment_command(run["params"], ws.run_path(run["id"])), {})
    if run["kind"] == "eval":
        return Command(eval_command(run["params"], str(ws.run_path(run["id"]).relative_to(ws.root))), {})
    if run["kind"] in DERIVED:
        out = ws.run_path(run["id"]).relative_to(ws.root) / DERIVED_DIR
        return Command(DERIVED[run["kind"]]({"model": run["model_name"], **run["params"]}, str(out)), {})
    if run["kind"] == "selfplay":
        return selfplay_command(run, ws, get_model)
    if run["kind"] == "tune":
        if not run["resume"] and get_model(run["model_name"]) is None:
            raise ValueError(f"model {run['model_name']!r} no longer exists")
        return tune_command(run, ws)
    return train_command(run, ws, None if run["resume"] else get_model(run["model_name"]))


def again_command(run: dict[str, Any], ws: Workspace, get_model: Callable[[str], dict[str, Any] | None]) -> str:
    """The shell line that makes the run again as it started (not as a resume), into ./run-N-again: the same
    books, model config file, tokenizer and settings, so the command's TrainConfig and ModelConfig equal the
    run's (tests/test_server_runpage.py parses it with the CLI). ValueError as run_command."""
    args = run_command({**run, "resume": False}, ws, get_model).args
    args[args.index("--out") + 1] = f"run-{run['id']}-again"
    return shlex.join(["lmlab", *args])
