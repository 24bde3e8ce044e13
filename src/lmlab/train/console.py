"""What the Trainer says, and how `lmlab train` shows it.

The Trainer writes nothing to the terminal itself: it logs INFO records on the `lmlab.train` logger (rank 0
only), so a library user sees nothing unless they configure logging (`logging.basicConfig(level="INFO")`
prints them as plain lines). Each metrics line is one record whose message is the progress line and whose
`metrics` attribute is the dict written to metrics.jsonl; other records are messages (resuming, stopping).

    with console_progress():   # what the `lmlab` command does
        train(...)             # on a terminal: one live line, overwritten in place; evaluation lines stay
    with quiet():              # what a lab's many runs do: no records, whatever the caller configured
        train(...)
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

log = logging.getLogger("lmlab.train")


class ConsoleProgress(logging.Handler):
    """Renders lmlab.train's records on stdout: on a terminal each metrics line overwrites the previous one
    (carriage return) and an evaluation's line stays; elsewhere (a log file, a pipe) one line per record."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(logging.INFO)
        self.stream = stream  # None: sys.stdout when the record arrives (so a redirected stdout is followed)
        self.live = False     # a progress line is on screen without its newline

    def emit(self, record: logging.LogRecord) -> None:
        try:
            out = self.stream or sys.stdout
            text, metrics = self.format(record), getattr(record, "metrics", None)
            if metrics is not None and out.isatty():
                self.live = "val_loss" not in metrics
                out.write("\r" + text.ljust(100) + ("" if self.live else "\n"))
            else:
                out.write(("\n" if self.live else "") + text + "\n")
                self.live = False
            out.flush()
        except Exception:
            self.handleError(record)

    def end_line(self) -> None:
        if self.live:
            (self.stream or sys.stdout).write("\n")
            self.live = False


@contextlib.contextmanager
def console_progress(stream: TextIO | None = None) -> Iterator[ConsoleProgress]:
    """Show the Trainer's progress on the console for the duration (the `lmlab` command's whole run)."""
    handler, level = ConsoleProgress(stream), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        handler.end_line()
        log.removeHandler(handler)
        log.setLevel(level)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No lmlab.train records for the duration, whichever handlers are installed."""
    disabled, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = disabled
