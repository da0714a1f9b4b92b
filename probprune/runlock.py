"""One writer per output folder: a lock file that a run holds while it writes there.

``probprune prune``/``baseline`` (and every sweep trial, which runs :func:`probprune.pipeline.prune` in its own
folder) take an exclusive ``fcntl.flock`` on ``<output>/.probprune.lock`` before they touch the folder and hold it
until they return; the holder's pid, host and command line are written into the file. A second run into the same
folder is refused with a message naming the first one. The kernel drops the lock when the holding process dies
(crash, ``kill -9``, lost node), so a lock file left behind by a dead process is stale: the next run takes it over
and says whose it was. The file is removed on release, and a folder that the lock alone created is removed with it.

``flock`` is advisory and per host on some network file systems (NFS without lock support): there it protects
against a second run on the same machine only.
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".probprune.lock"
F = TypeVar("F", bound=Callable[..., Any])


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (it wrote no details)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) if "started" in holder else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {since}: {holder.get('command', '?')}"


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


class OutputLock:
    """An exclusive lock on one output folder, held from :meth:`acquire` to :meth:`release` (or process exit).

    Examples:
        >>> with OutputLock("runs/a"):  # doctest: +SKIP
        ...     ...  # write runs/a; a second process trying the same folder gets a UserError
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created_folder = False

    def acquire(self) -> OutputLock:
        """Take the lock (creating the folder if needed).

        Raises:
            UserError: another live process holds it (the message names it), or the folder cannot be written.
        """
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"--output {self.folder} exists and is not a folder")
        from .files import dir_mode, file_mode

        try:
            self._created_folder = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True, mode=dir_mode())
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    self._drop_created_folder()
                    raise UserError(
                        f"--output {self.folder} is being written by another probprune run "
                        f"({_describe(_read_holder(self.path))}); wait for it to end or choose another "
                        "folder"
                    ) from None
                try:  # the holder before us may have removed the file between our open and our flock: retry
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            stale = _read_holder(self.path)
            if stale:
                log.warning(
                    "%s: taking over the lock of a run that is no longer running (%s)", self.folder, _describe(stale)
                )
            holder = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python",
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError as err:
            self._drop_created_folder()
            raise UserError(f"--output {self.folder}: cannot create the lock file {LOCK_NAME}: {err}") from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (and the folder, if the lock created it and nothing else is in it)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: nobody can take the old file meanwhile
        finally:
            os.close(self._fd)
            self._fd = None
        self._drop_created_folder()

    def _drop_created_folder(self) -> None:
        if self._created_folder:
            try:
                self.folder.rmdir()  # only if empty
            except OSError:
                pass

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holds_output_lock(param: str = "output") -> Callable[[F], F]:
    """Decorator: the function runs holding :class:`OutputLock` on its argument ``param`` (an output folder)."""

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            with OutputLock(sig.bind(*args, **kwargs).arguments[param]):
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return wrap
