import signal

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
