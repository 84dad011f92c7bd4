"""Fixtures for tests/data: an isolated disk cache and the stdlib extraction, once per session."""

import os

import pytest

from jaxbatch.data import codesearch


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Points JAXBATCH_CACHE at a fresh directory so tests never read or write ~/.cache."""
    previous = os.environ.get("JAXBATCH_CACHE")
    os.environ["JAXBATCH_CACHE"] = str(tmp_path_factory.mktemp("jaxbatch_cache"))
    yield
    if previous is None:
        os.environ.pop("JAXBATCH_CACHE", None)
    else:
        os.environ["JAXBATCH_CACHE"] = previous


@pytest.fixture(scope="session")
def stdlib_pairs(_session_cache):
    """All codesearch pairs of this interpreter (extracted once, then served from the cache)."""
    return codesearch.load_codesearch_pairs("all")
