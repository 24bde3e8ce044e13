"""Independent lab runs (seeds, arms, settings) in parallel processes that a Ctrl-C stops at once.

`concurrent.futures.ProcessPoolExecutor` leaves its `with` block by waiting for every submitted run to finish,
so a SIGINT to the parent (a terminal's Ctrl-C, the web app's cancel) stopped nothing for minutes and the web
app ended the job with SIGKILL. Here the parent's KeyboardInterrupt terminates the workers (multiprocessing's
Pool does so when its block exits), and the workers ignore SIGINT until a run installs its own handler, so a
terminal's Ctrl-C, which reaches the whole process group, leaves the parent to decide.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable, Iterable
from multiprocessing import get_context
from typing import Any


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    # Pool's terminate sends SIGTERM, which a run's trainer turns into "stop after this step" and then a
    # KeyboardInterrupt: the worker must then end (terminate joins it), quietly rather than with a traceback.
    try:
        return fn(item)
    except KeyboardInterrupt:
        os._exit(130)


def process_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> list[Any]:
    """[fn(x) for x in items] over `workers` spawned processes, results in order; a worker's exception is
    raised here. fn must be importable by name (a module-level function)."""
    with get_context("spawn").Pool(workers, initializer=_ignore_sigint) as pool:
        return pool.map(functools.partial(_call, fn), list(items), chunksize=1)
