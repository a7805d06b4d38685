"""Progress on stderr, for every wait longer than a couple of seconds; one rule for all of sparsecc.

The rule: progress is on by default and goes to stderr; SPARSECC_PROGRESS=0 (or false/no/off) turns all of
it off. On a terminal a Bar rewrites one line in place; anywhere else (a pipe, a CI log) every message is a
line of its own and a Bar prints only at the start and end of each stage and every tenth of the way.
Lines start with "[sparsecc]" (or "[sparsecc.<what>]"). Nothing here imports torch.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

ENV = "SPARSECC_PROGRESS"
_silenced = 0          # > 0 inside silenced(): a caller asked for no progress (search_scheme(progress=False))


def enabled() -> bool:
    """Whether progress is printed: True unless SPARSECC_PROGRESS is 0, false, no or off (or inside silenced())."""
    return not _silenced and os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@contextmanager
def silenced(really: bool = True):
    """No progress from anything inside (when `really`): for an API call whose caller passed progress=False."""
    global _silenced
    _silenced += bool(really)
    try:
        yield
    finally:
        _silenced -= bool(really)


def _tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):   # closed or replaced stderr
        return False


def say(msg: str, source: str = "sparsecc") -> None:
    """One progress line on stderr: "[source] msg"."""
    if enabled():
        try:
            print(f"[{source}] {msg}", file=sys.stderr, flush=True)
        except (OSError, ValueError):      # stderr closed: progress is never worth an error
            pass


@contextmanager
def waiting(msg: str, source: str = "sparsecc", after: float = 2.0):
    """Around a wait of unknown length: says "msg ..." once it has lasted `after` seconds, and then how long it
    took when it ends. Quick waits print nothing."""
    if not enabled():
        yield
        return
    start = time.perf_counter()
    shown = threading.Event()

    def show():
        shown.set()
        say(f"{msg} ...", source)

    timer = threading.Timer(after, show)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if shown.is_set():
            say(f"{msg}: done in {time.perf_counter() - start:.1f} s", source)


class Bar:
    """A counted progress bar for a stage of known length: bar(stage, done, total)."""

    def __init__(self, source: str = "sparsecc", enabled: bool = True):
        self.source, self.on = source, enabled and globals()["enabled"]()
        self.tty, self.width, self.stage, self.shown = _tty(), 0, None, -1

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.on:
            return
        bar = "#" * (20 * done // max(total, 1))
        line = f"[{self.source}] {stage} [{bar:20}] {done}/{total}"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(self.width))
            sys.stderr.flush()
            self.width = len(line)
            return
        tenth = 10 * done // max(total, 1)
        if stage != self.stage or done >= total or tenth > self.shown:
            self.stage, self.shown = stage, tenth
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.on and self.tty and self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.width = 0
