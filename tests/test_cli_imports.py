"""`lmlab --help` and every `lmlab COMMAND [MODE] --help` answer without importing torch or the other heavy
libraries: building the parser reads only the config dataclasses and name lists (torch alone took ~1 s of the
~2.5 s each help took)."""

import json
import os
import subprocess
import sys
from pathlib import Path

# what no help may import; the commands import them when they run
HEAVY = ("torch", "transformers", "fastapi", "sqlalchemy", "safetensors", "tokenizers", "numpy")

# in a fresh interpreter: every (sub)command path from the parser itself, so that a new command is covered
PROBE = """
import contextlib, io, json, sys
import lmlab.cli as cli

def paths(parser, prefix=()):
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, cli.argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += paths(sub, (*prefix, name))
    return out

codes = {}
for path in paths(cli.build_parser()):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            code = cli.main([*path, "--help"])
        except SystemExit as exc:
            code = exc.code
    codes[" ".join(path)] = [code, len(out.getvalue())]
print(json.dumps({"codes": codes, "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
"""


def test_help_of_every_command_imports_no_heavy_library():
    src = Path(__file__).resolve().parent.parent / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{PROBE}"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    codes = result["codes"]
    # the registry as the parser has it: the top level, each command, and the modes below tune, lab, lab data
    assert {"", "train", "generate", "tune", "tune sft", "tune grpo", "lab", "lab data", "lab data influence",
            "selfplay azr"} <= set(codes), sorted(codes)
    assert len(codes) > 40
    bad = {path: code for path, (code, _) in codes.items() if code != 0}
    assert not bad, f"--help did not exit 0: {bad}"
    silent = [path for path, (_, chars) in codes.items() if chars < 100]
    assert not silent, f"--help printed (almost) nothing: {silent}"
    assert result["heavy"] == [], f"--help imported {result['heavy']}"


def test_the_spelled_out_task_names_are_the_tasks():
    from lmlab.tune.config import TASK_NAMES
    from lmlab.tune.rewards import TASKS

    assert TASK_NAMES == tuple(TASKS) == ("addition", "count", "sort", "format")


def test_the_packages_submodules_are_still_reached_as_attributes():
    """`import lmlab` then `lmlab.models.io.load_pretrained` worked while the packages imported every module; with
    the lazy re-exports only the listed names resolved ("module 'lmlab' has no attribute 'models'")."""
    src = Path(__file__).resolve().parent.parent / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    probe = ("import lmlab\n"
             "print(lmlab.models.io.load_pretrained.__name__, lmlab.models.generation.__name__,\n"
             "      lmlab.train.recipes.train_from_sources.__name__, lmlab.tokenizers.Tokenizer.__name__,\n"
             "      lmlab.data.dataset.TokenDataset.__name__)\n"
             "for name in ('lmlab', 'lmlab.models', 'lmlab.train', 'lmlab.data'):\n"
             "    module = __import__(name, fromlist=['x'])\n"
             "    try:\n"
             "        module.no_such_thing\n"
             "    except AttributeError as exc:\n"
             "        print(exc)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "load_pretrained lmlab.models.generation train_from_sources Tokenizer TokenDataset",
        "module 'lmlab' has no attribute 'no_such_thing'", "module 'lmlab.models' has no attribute 'no_such_thing'",
        "module 'lmlab.train' has no attribute 'no_such_thing'", "module 'lmlab.data' has no attribute 'no_such_thing'"]
