"""Config files by path or by name: ``--config configs/smollm2/135m_quickstart.yaml`` or ``--config smollm2/135m_quickstart``.

The configs of ``configs/`` ship inside the package (the wheel installs them as ``probprune/configs/``), so a
``pip install``-ed probprune runs the documented commands from any folder. A ``--config`` value is resolved as: an
existing file first; else a packaged config of that name (``FAMILY/NAME``, with or without ``.yaml`` and a leading
``configs/``); else an error that lists the closest names.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from .errors import UserError

_PACKAGE = Path(__file__).resolve().parent


def config_roots() -> list[Path]:
    """Folders that hold the packaged configs: ``probprune/configs`` (installed) or the clone's ``configs/``."""
    return [p for p in (_PACKAGE / "configs", _PACKAGE.parent / "configs") if p.is_dir()]


def packaged_configs() -> list[str]:
    """Names of the packaged configs, e.g. ``["gemma3/1b_paper", ..., "tiny/smoke"]``."""
    names = set()
    for root in config_roots():
        names.update(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))
    return sorted(names)


def resolve_config(name: str | Path | None) -> Path | None:
    """The config file that ``--config name`` means (None stays None: the defaults).

    Raises:
        UserError: neither a file nor a packaged config; the message lists the closest packaged names.

    Examples:
        >>> resolve_config("tiny/smoke").name
        'smoke.yaml'
    """
    if name is None:
        return None
    path = Path(name).expanduser()
    if path.exists():  # a file, or a folder that load_config refuses with its own message
        return path
    stem = str(name).replace("\\", "/").removeprefix("./").removeprefix("configs/")
    stem = stem.removesuffix(".yaml").removesuffix(".yml")
    for root in config_roots():
        candidate = root / f"{stem}.yaml"
        if candidate.is_file():
            return candidate
    names = packaged_configs()
    close = difflib.get_close_matches(stem, names, n=5, cutoff=0.5)
    hint = f"closest packaged configs: {', '.join(close)}" if close else f"packaged configs: {', '.join(names)}"
    raise UserError(f"config file not found: {name}, and no packaged config of that name ({hint})")
