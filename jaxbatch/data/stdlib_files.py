"""The Python standard library's own source files, as a fixed corpus for the text datasets.

The corpus is the ``.py`` files under ``sysconfig.get_paths()['stdlib']`` of the running
interpreter, minus tests, IDLE, installed packages, generated codec tables and build-specific
files. It depends only on the interpreter (its version and distribution), never on what else is
installed, so every machine with the same Python gets the same data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import platform
import sysconfig
import tokenize

# Top-level entries of the stdlib that are not library source: tests, the IDE, third-party
# packages, compiled extensions, build configuration, generated documentation data.
_EXCLUDED_TOP = frozenset(
    {
        "test",
        "idlelib",
        "site-packages",
        "dist-packages",
        "lib-dynload",
        "pydoc_data",
        "__pycache__",
    }
)
# Test packages nested inside library packages (tkinter/test, lib2to3/tests, ctypes/test, ...).
_EXCLUDED_ANY = frozenset({"test", "tests", "__pycache__"})
# Codec modules that are generated lookup tables rather than code.
_TABLE_MARKERS = ("decoding_table = (", "decoding_map = codecs.make_identity_dict")


@dataclasses.dataclass(frozen=True)
class StdlibFile:
    """One source file: ``rel_path`` (POSIX, relative to the stdlib root) and its absolute path."""

    rel_path: str
    path: pathlib.Path

    @property
    def module(self) -> str:
        """Dotted module name, e.g. ``json/decoder.py`` -> ``json.decoder``."""
        parts = self.rel_path[: -len(".py")].split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        return ".".join(parts)


def python_version() -> str:
    """Implementation and version of the running interpreter, e.g. ``cpython-3.11.7``."""
    return f"{platform.python_implementation().lower()}-{platform.python_version()}"


def stdlib_root() -> pathlib.Path:
    """Directory of the running interpreter's standard library."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {root} does not exist")
    return root


def _excluded(rel: pathlib.PurePosixPath) -> bool:
    parts = rel.parts
    if parts[0] in _EXCLUDED_TOP or parts[0].startswith("config-"):
        return True
    if any(p in _EXCLUDED_ANY for p in parts[:-1]):
        return True
    return rel.name.startswith("_sysconfigdata")  # records this machine's build flags


def read_source(path: pathlib.Path) -> str | None:
    """Source text decoded with its PEP 263 encoding; ``None`` if it cannot be decoded."""
    data = path.read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        return data.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return None


def list_stdlib_files(root: pathlib.Path | None = None) -> list[StdlibFile]:
    """Library ``.py`` files of the standard library, sorted by relative path.

    Args:
      root: the standard-library directory; defaults to :func:`stdlib_root`.

    Returns:
      files sorted by ``rel_path``; excludes test packages, idlelib, site-packages, lib-dynload,
      pydoc_data, ``_sysconfigdata*`` and the generated codec tables in ``encodings``.
    """
    root = stdlib_root() if root is None else pathlib.Path(root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = pathlib.PurePosixPath(pathlib.Path(dirpath).relative_to(root).as_posix())
        # Prune excluded trees before descending: site-packages alone can be 100x the stdlib.
        dirnames[:] = sorted(d for d in dirnames if not _excluded(rel_dir / d / "x.py"))
        for name in filenames:
            rel = rel_dir / name
            if not name.endswith(".py") or _excluded(rel):
                continue
            path = pathlib.Path(dirpath) / name
            if rel.parts[0] == "encodings":
                text = read_source(path) or ""
                if any(marker in text for marker in _TABLE_MARKERS):
                    continue
            files.append(StdlibFile(rel.as_posix(), path))
    files.sort(key=lambda f: f.rel_path)
    if not files:
        raise FileNotFoundError(f"no standard-library .py files found under {root}")
    return files


def fingerprint(files: list[StdlibFile]) -> str:
    """Short SHA-256 digest of the interpreter version and every file's path and size."""
    digest = hashlib.sha256(python_version().encode())
    for f in files:
        digest.update(f"\0{f.rel_path}\0{f.path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def hash_unit(key: str) -> float:
    """Deterministic map of a string to [0, 1) via SHA-256 (unlike ``hash``, not salted)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def check_fraction(name: str, value: float) -> float:
    """Validates a split fraction in the open interval (0, 1)."""
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return float(value)
