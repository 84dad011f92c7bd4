"""codesearch: extraction rules on a hand-written module, and the real stdlib corpus and split."""

import ast
import hashlib
import json
import textwrap

import numpy as np
import pytest

from jaxbatch.data import cache, codesearch, tokens

_MODULE = textwrap.dedent(
    '''
    import os

    def top(path, mode="r"):
        """Open the configuration file at path and return its parsed sections.

        Second paragraph that must not appear in the query.
        """
        with open(path, mode) as handle:
            return handle.read().split("[")

    class Store:
        @property
        def size(self):
            """Number of items currently held by the store object."""
            total = 0
            for item in self._items:
                total += len(item)
            return total

        def stub(self):
            """Abstract method with nothing but a docstring in its body."""

        async def fetch(self, key):
            """Fetch the value stored under key from the remote backend."""
            value = await self._backend.get(key)
            return value if value is not None else self._default

    if os.name == "posix":
        def outer(values):
            """Sort values and drop every duplicate entry from the list."""
            def inner(items):
                """Return items with duplicates removed, keeping the first one."""
                seen = set()
                return [x for x in items if not (x in seen or seen.add(x))]
            return sorted(inner(values))

    def short(x):
        """Return x plus one, which is all this helper function does."""
        return x + 1

    def quoting(name):
        """Raise an error because this name is not valid."""
        raise ValueError("Raise an error because this name is not valid.")
    '''
)


@pytest.fixture(scope="module")
def toy_pairs():
    return {p.qualname: p for p in codesearch.extract_from_source(_MODULE, "toy")}


def test_qualnames_and_filters(toy_pairs):
    # stub: docstring-only body; short: below MIN_CODE_CHARS; quoting: code contains its query.
    assert set(toy_pairs) == {"top", "Store.size", "Store.fetch", "outer", "outer.<locals>.inner"}
    assert all(p.module == "toy" for p in toy_pairs.values())


def test_query_is_first_paragraph(toy_pairs):
    assert toy_pairs["top"].doc == (
        "Open the configuration file at path and return its parsed sections."
    )


def test_target_is_dedented_source_without_docstring(toy_pairs):
    assert toy_pairs["Store.fetch"].code == textwrap.dedent(
        """\
        async def fetch(self, key):
            value = await self._backend.get(key)
            return value if value is not None else self._default"""
    )
    assert "Second paragraph" not in toy_pairs["top"].code
    assert toy_pairs["top"].code.startswith('def top(path, mode="r"):\n    with open(')
    assert toy_pairs["Store.size"].code.startswith("def size(self):")  # decorator dropped
    for pair in toy_pairs.values():
        assert pair.doc[:20] not in pair.code  # its own docstring is gone (nested ones stay)
        ast.parse(pair.code)


def test_unparsable_source_gives_no_pairs():
    assert codesearch.extract_from_source("def f(:\n    pass\n", "broken") == []


def test_stdlib_corpus_size_and_quality(stdlib_pairs):
    assert len(stdlib_pairs) >= 2000
    assert len({p.doc for p in stdlib_pairs}) == len(stdlib_pairs)
    assert len({p.code for p in stdlib_pairs}) == len(stdlib_pairs)
    assert not any(p.module.startswith(("test.", "idlelib", "lib2to3.tests")) for p in stdlib_pairs)
    for pair in stdlib_pairs:
        assert len(pair.doc) >= codesearch.MIN_DOC_CHARS
        assert len(pair.code) >= codesearch.MIN_CODE_CHARS
        assert pair.code.lstrip().startswith(("def ", "async def "))


def test_split_is_hash_based_disjoint_and_complete(stdlib_pairs):
    train = codesearch.split_pairs(stdlib_pairs, "train")
    test = codesearch.split_pairs(stdlib_pairs, "test")

    def in_test(p):  # independent transcription of the split rule
        key = f"{p.module}:{p.qualname}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64 < 0.1

    assert test == [p for p in stdlib_pairs if in_test(p)]
    assert train == [p for p in stdlib_pairs if not in_test(p)]
    assert 0.05 < len(test) / len(stdlib_pairs) < 0.15
    assert codesearch.load_codesearch_pairs("test") == test  # same result through the cache


def test_no_test_query_appears_in_its_code(stdlib_pairs):
    test = codesearch.split_pairs(stdlib_pairs, "test")
    for pair in test:
        assert pair.doc not in pair.code
        ast.parse(pair.code)


def test_max_test_is_a_fixed_subset(stdlib_pairs):
    test = codesearch.split_pairs(stdlib_pairs, "test")
    capped = codesearch.split_pairs(stdlib_pairs, "test", max_test=50)
    assert len(capped) == 50
    positions = [test.index(p) for p in capped]
    assert positions == sorted(positions)
    assert codesearch.split_pairs(stdlib_pairs, "test", max_test=50) == capped


def test_arrays_are_tokenized_pairs(stdlib_pairs):
    arrays = codesearch.codesearch_arrays("test", doc_len=64, code_len=96, max_test=40)
    pairs = codesearch.load_codesearch_pairs("test", max_test=40)
    assert arrays["doc"].shape == (40, 64) and arrays["code"].shape == (40, 96)
    assert arrays["doc"].dtype == np.int32
    for i, pair in enumerate(pairs):
        np.testing.assert_array_equal(arrays["doc"][i], tokens.encode(pair.doc, 64, add_cls=True))
        np.testing.assert_array_equal(arrays["code"][i], tokens.encode(pair.code, 96, add_cls=True))
    again = codesearch.codesearch_arrays("test", doc_len=64, code_len=96, max_test=40)
    np.testing.assert_array_equal(again["code"], arrays["code"])


def test_disk_cache_is_keyed_and_read(tmp_path, monkeypatch, stdlib_pairs):
    # The session fixture extracted into an empty cache, which wrote exactly one keyed file.
    (written,) = cache.cache_dir().glob("codesearch-*.json")
    content = json.loads(written.read_text())
    assert content["extractor_version"] == codesearch.EXTRACTOR_VERSION
    assert content["python_version"] in written.name
    assert [codesearch.CodePair(*row) for row in content["pairs"]] == stdlib_pairs
    # Later calls read the file: an edited copy in another cache directory shows the edit.
    content["pairs"][0][2] = "edited query"
    monkeypatch.setenv("JAXBATCH_CACHE", str(tmp_path))
    cache.write_json(written.name, content)
    assert codesearch.load_codesearch_pairs("all")[0].doc == "edited query"
    assert codesearch.load_codesearch_pairs("all")[1:] == stdlib_pairs[1:]


def test_errors(stdlib_pairs):
    with pytest.raises(ValueError, match="unknown codesearch split 'dev'"):
        codesearch.split_pairs(stdlib_pairs, "dev")
    with pytest.raises(ValueError, match="test_fraction must be in"):
        codesearch.split_pairs(stdlib_pairs, "test", test_fraction=1.0)
    with pytest.raises(ValueError, match="max_test"):
        codesearch.split_pairs(stdlib_pairs, "test", max_test=0)
