"""Identifier sub-token features: splitting, deterministic hashing, padding, codesearch option."""

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from jaxbatch.data import codesearch, subtokens


def test_identifiers_split_on_case_and_underscores():
    text = "def parseHTTPResponse_code(self, maxLen=10):"
    # Written by hand: every non-alphanumeric splits, camelCase and ACRONYMWords split, lower case,
    # one-letter sub-tokens dropped.
    expected = ["def", "parse", "http", "response", "code", "self", "max", "len", "10"]
    assert subtokens.subtoken_features(text) == expected
    assert subtokens.subtoken_features("a_b x") == []
    assert subtokens.subtoken_features("read_file", bigrams=True) == ["read", "file", "read file"]
    assert subtokens.subtoken_features("parsing files", prefixes=True) == [
        "parsing",
        "files",
        "p:pars",
        "p:file",
    ]


def test_hash_is_crc32_based_and_never_padding():
    assert subtokens.hash_feature("read") == zlib.crc32(b"read") % (2**31 - 1) + 1
    ids = [subtokens.hash_feature(s) for s in ["", "a", "read", "read file", "ünïcode"]]
    assert all(1 <= i <= 2**31 - 1 for i in ids)
    assert len(set(ids)) == len(ids)


def test_hash_is_the_same_in_another_process():
    code = "from jaxbatch.data import subtokens; print(subtokens.hash_feature('read file'))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}  # another salt for Python's hash()
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert int(other.stdout) == subtokens.hash_feature("read file")


def test_encode_pads_and_truncates():
    out = subtokens.encode_subtokens(["readFile now", "x", "one two three four"], 3)
    assert out.dtype == np.int32 and out.shape == (3, 3)
    h = subtokens.hash_feature
    np.testing.assert_array_equal(out[0], [h("read"), h("file"), h("now")])
    np.testing.assert_array_equal(out[1], [0, 0, 0])
    np.testing.assert_array_equal(out[2], [h("one"), h("two"), h("three")])
    with pytest.raises(ValueError, match="length must be >= 1, got 0"):
        subtokens.encode_subtokens(["a"], 0)


def test_codesearch_subtoken_arrays_match_the_pairs():
    pairs = codesearch.load_codesearch_pairs("test", max_test=8)
    arrays = codesearch.codesearch_arrays(
        "test", max_test=8, doc_len=16, code_len=64, tokenizer="subtokens"
    )
    assert arrays["doc"].shape == (8, 16) and arrays["code"].shape == (8, 64)
    np.testing.assert_array_equal(
        arrays["code"], subtokens.encode_subtokens([p.code for p in pairs], 64)
    )
    with pytest.raises(ValueError, match="unknown codesearch tokenizer 'words'"):
        codesearch.codesearch_arrays("test", max_test=8, tokenizer="words")
