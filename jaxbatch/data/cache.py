"""On-disk cache for derived datasets (JSON only, never pickle).

Location: ``$JAXBATCH_CACHE`` if set, else ``~/.cache/jaxbatch``. Entries are written atomically
(temporary file + rename), so concurrent processes never read a half-written file.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any


def cache_dir() -> pathlib.Path:
    """The cache directory (not created until something is written)."""
    env = os.environ.get("JAXBATCH_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "jaxbatch"


def read_json(name: str) -> Any | None:
    """Returns the cached JSON value stored under ``name``, or ``None`` if absent or unreadable."""
    path = cache_dir() / name
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(name: str, value: Any) -> pathlib.Path:
    """Atomically stores ``value`` as JSON under ``name``; returns the file path."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, ensure_ascii=False)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared between users
        os.replace(tmp, directory / name)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return directory / name
