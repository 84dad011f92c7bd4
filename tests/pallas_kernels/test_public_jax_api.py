"""The library's source uses only JAX's public API: no module under jaxbatch/ or pallas_kernels/
names ``jax._src``, so a JAX upgrade that moves a private name cannot break a user's program.

The interpreted kernels inside ``jax.shard_map`` (the one place that once needed a private switch)
are covered by tests/losses/test_contrastive_ring_pallas.py; this file checks the source text.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("jaxbatch", "pallas_kernels")
# `jax._src`, `from jax import _src`, and `importlib.import_module("jax._src...")` alike.
PRIVATE = re.compile(r"jax\s*\.\s*_src|from\s+jax\s+import\s+(\([^)]*)?\b_src\b")


def _library_files() -> list[pathlib.Path]:
    files = [f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))]
    assert files, f"no library sources found under {ROOT}"
    return files


def private_uses(text: str) -> list[str]:
    """Lines of ``text`` that name JAX's private package."""
    return [line.strip() for line in text.splitlines() if PRIVATE.search(line)]


@pytest.mark.parametrize("package", PACKAGES)
def test_library_source_names_no_private_jax(package):
    offenders = {
        str(f.relative_to(ROOT)): private_uses(f.read_text(encoding="utf-8"))
        for f in _library_files()
        if f.relative_to(ROOT).parts[0] == package
    }
    offenders = {path: lines for path, lines in offenders.items() if lines}
    assert not offenders, f"library modules use jax._src (private JAX API): {offenders}"


@pytest.mark.parametrize(
    "line",
    [
        "from jax._src import config",
        "import jax._src.config as c",
        "from jax import _src",
        "x = jax._src.core.Tracer",
        'importlib.import_module("jax._src.config")',
    ],
)
def test_detector_finds_private_imports(line):
    # Guards the check above against a pattern that matches nothing.
    assert private_uses(line) == [line]


def test_detector_ignores_public_names():
    assert private_uses("from jax import lax\nimport jax.numpy as jnp\njax.shard_map") == []
