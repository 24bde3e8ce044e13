import signal
import subprocess
from pathlib import Path

import pytest
import torch

# A suite started in the background of a non-interactive shell (`nohup ... &`) inherits SIGINT ignored; the
# tests of Ctrl-C handling, and the processes the server tests spawn, need Python's own handler as a terminal
# gives it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# A test must write under its tmp_path, never into the checkout (a command's default output folder, taken from the
# working directory, once landed in a commit): files the suite leaves in the checkout fail the run.
ROOT = Path(__file__).resolve().parent.parent
_BEFORE = pytest.StashKey[set]()


def _untracked() -> set[str]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--others", "--exclude-standard"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(out.stdout.splitlines()) if out.returncode == 0 else set()


def pytest_sessionstart(session):
    session.config.stash[_BEFORE] = _untracked()


def pytest_sessionfinish(session, exitstatus):
    left = sorted(_untracked() - session.config.stash.get(_BEFORE, set()))
    if left:
        print(f"\nthe tests left {len(left)} file(s) in the checkout: {', '.join(left[:10])}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
