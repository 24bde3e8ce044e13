"""Independent lab runs (seeds, arms, settings) in parallel processes that a Ctrl-C stops at once.

`concurrent.futures.ProcessPoolExecutor` leaves its `with` block by waiting for every submitted run to finish,
so a SIGINT to the parent (a terminal's Ctrl-C, the web app's cancel) stopped nothing for minutes and the web
app ended the job with SIGKILL. Here the parent, on any exception (KeyboardInterrupt included), kills the
workers it started and returns without waiting. Workers ignore SIGINT until a run installs its own handler,
so a terminal's Ctrl-C, which reaches the whole process group, leaves the parent to decide. A worker that
dies (the OOM killer) still ends the map with BrokenProcessPool rather than a wait for a result that never
comes, which is why this is not multiprocessing's Pool.
"""

from __future__ import annotations

import functools
import multiprocessing
import signal
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from ..configs import is_user_error


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    """fn(item) in a worker. A ValueError is judged here, bad input or a bug (configs.is_user_error reads the frame
    that raised it), and carries the answer as `user_error`: its traceback does not cross to the parent."""
    try:
        return fn(item)
    except ValueError as exc:
        exc.user_error = is_user_error(exc)
        raise


def process_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> list[Any]:
    """[fn(x) for x in items] over `workers` spawned processes, results in order; a worker's exception is
    raised here. fn must be importable by name (a module-level function)."""
    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint)
    try:
        return list(pool.map(functools.partial(_call, fn), items))
    except BaseException:
        for process in set(multiprocessing.active_children()) - before:  # this pool's workers
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
