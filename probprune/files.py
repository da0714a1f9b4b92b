"""Writing outputs safely: atomic replacement, permissions that follow the umask, recovery after a kill.

Temporary files and folders from :mod:`tempfile` are created private (0600 / 0700); an output on a shared disk must
be readable as the user's umask says, like any file ``cp`` or ``save_pretrained`` would write. Folders are replaced by
renaming the old one aside first, so at every instant either the old or the new folder is complete under one of two
known names, and :func:`recover_dir` puts things back at the next run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new regular file under the current umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """Mode of a new folder under the current umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` all at once or not at all: the one way probprune writes a file.

    ``write(tmp)`` fills a temporary file in the same folder (so the final rename stays on one file system); it is
    flushed to disk (fsync), given umask permissions and renamed over ``path``. A kill or error at any moment leaves
    either the old file or the new one, never a torn one; the temporary file is removed on error.

    Args:
        path: the file to write (its folder is created if missing).
        write: called with the temporary path; writes the whole content there (e.g. ``torch.save(obj, tmp)``).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_atomic` of a UTF-8 text."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def make_temp_dir(path: str | Path) -> Path:
    """A new empty folder ``.<name>.tmp-<random>`` next to ``path`` (same file system), with umask permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, dir_mode())
    return tmp


def write_dir_once(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Fill the folder ``path`` once, atomically, for caches several processes may fill at the same time.

    ``write(tmp)`` fills a new temporary folder next to ``path`` (:func:`make_temp_dir`), which is then renamed to
    ``path``; if another process published ``path`` meanwhile, its folder is kept and this one deleted. An error
    leaves nothing behind.
    """
    path = Path(path)
    tmp = make_temp_dir(path)
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def publish_dir(tmp: Path, path: str | Path) -> Path:
    """Move the finished folder ``tmp`` to ``path``, replacing what is there without a moment where neither exists.

    The old folder is first renamed to ``.<name>.old-<pid>``, then ``tmp`` takes its name, then the old one is
    deleted. A kill between the two renames leaves both complete; :func:`recover_dir` restores the old one.
    """
    path = Path(path)
    aside = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(path, aside)
    os.replace(tmp, path)
    shutil.rmtree(aside, ignore_errors=True)
    return path


def recover_dir(path: str | Path) -> list[str]:
    """Undo what a kill during :func:`make_temp_dir` / :func:`publish_dir` left next to ``path``.

    If ``path`` is missing and an ``.<name>.old-*`` folder exists, the newest is renamed back (the old folder was
    complete); every other ``.<name>.old-*`` and every ``.<name>.tmp-*`` (a write that never finished) is deleted.
    Only names that these two functions create are touched.

    Returns:
        What was done, one line per item (empty if nothing).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    done = []
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    if olds and not path.exists():
        os.replace(olds[0], path)
        done.append(f"restored {path.name}/ from {olds[0].name} (a replacement was interrupted)")
        olds = olds[1:]
    for p in [*olds, *path.parent.glob(f".{path.name}.tmp-*")]:
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p.name} (left by an interrupted write)")
    return done
