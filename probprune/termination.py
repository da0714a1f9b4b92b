"""Stopping on SIGTERM like on Ctrl-C, in every entry point (``probprune``, ``ray_jobs/prune.py``, ``ray_jobs/sweep.py``).

A cluster scheduler preempts a job with SIGTERM. The entry points turn it into :class:`Terminated` (a
``KeyboardInterrupt``), so a terminated run unwinds exactly as an interrupted one does: ``finally`` blocks close the
actors and Ray, the last search checkpoint stays, and the process prints what to run next and exits with 143 (128 +
SIGTERM), as a process killed by the signal would report.

``ray.init`` installs its own SIGTERM handler (``sys.exit(15)``, or an abort inside Ray's C++ core while the driver
connects). :func:`sigterm_deferred` keeps the application's handler across it: a SIGTERM that arrives while Ray
starts is held until ``ray.init`` returns and then delivered to that handler.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

EXIT_SIGTERM = 128 + signal.SIGTERM  # 143
EXIT_SIGINT = 128 + signal.SIGINT  # 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that a terminated run unwinds like Ctrl-C (actors closed, hint printed)."""


_RECEIVED: list[int] = []  # set by the handler: Ray's blocking calls may re-raise it as a plain KeyboardInterrupt


def on_sigterm(signum: int, frame: object) -> None:
    """The SIGTERM handler: remember the signal, raise :class:`Terminated`."""
    _RECEIVED.append(signum)
    raise Terminated()


def install() -> None:
    """Make SIGTERM raise :class:`Terminated` in this process (from the main thread; a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)


def terminated() -> bool:
    """Whether a SIGTERM was received (tells a ``KeyboardInterrupt`` raised by Ray for it from a real Ctrl-C)."""
    return bool(_RECEIVED)


def report_interrupt(prog: str, what: str) -> int:
    """After a ``KeyboardInterrupt`` reached the entry point: print the stop message and return the exit code.

    Args:
        prog: the program name the message starts with (``probprune``).
        what: how to continue, e.g. ``"a search resumes from its last checkpoint with --resume"``.

    Returns:
        143 after SIGTERM, 130 after Ctrl-C.
    """
    if terminated():
        print(f"{prog}: terminated (SIGTERM); {what}", file=sys.stderr, flush=True)
        return EXIT_SIGTERM
    print(f"{prog}: interrupted; {what}", file=sys.stderr, flush=True)
    return EXIT_SIGINT


@contextmanager
def sigterm_deferred(during: str = "") -> Iterator[None]:
    """Hold SIGTERM during the block and deliver it afterwards to the handler that was installed before it.

    Only when an application handler is installed (a callable, e.g. :func:`on_sigterm`) and on the main thread;
    otherwise the block runs unchanged. Code inside the block that installs its own SIGTERM handler (``ray.init``) has
    it replaced by the held one at the end.

    Args:
        during: what the block does, for the log line when a held signal is delivered (``"Ray was starting"``).
    """
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):
        yield
        return
    pending: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    if pending:
        log.warning("SIGTERM arrived while %s: stopping now", during or "a step that must not be cut")
        previous(signal.SIGTERM, None)
