"""Byte tokenizer: ids are bytes + 1 with PAD/CLS around them, and decode inverts encode."""

import numpy as np
import pytest

from jaxbatch.data import tokens


def test_constants():
    assert (tokens.PAD, tokens.CLS, tokens.BOS, tokens.VOCAB_SIZE) == (0, 257, 257, 258)


@pytest.mark.parametrize("add_cls", [False, True])
def test_encode_matches_utf8_bytes_plus_one(add_cls):
    text = "déf f(x): return π"  # multi-byte characters
    raw = list(text.encode("utf-8"))
    got = tokens.encode(text, 40, add_cls=add_cls)
    expected = ([257] if add_cls else []) + [b + 1 for b in raw]
    expected += [0] * (40 - len(expected))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    assert tokens.decode(got) == text


def test_truncation_keeps_prefix_and_bytes_input():
    got = tokens.encode(b"abcdef", 4, add_cls=True)
    np.testing.assert_array_equal(got, [257, ord("a") + 1, ord("b") + 1, ord("c") + 1])
    assert tokens.decode(got) == "abc"


def test_decode_replaces_cut_multibyte_character():
    cut = tokens.encode("aπ", 2)  # 'π' is two bytes; only the first survives
    assert tokens.decode(cut) == "a\ufffd"


def test_encode_batch_rows_equal_encode():
    texts = ["one", "two three", ""]
    batch = tokens.encode_batch(texts, 6)
    for row, text in zip(batch, texts, strict=True):
        np.testing.assert_array_equal(row, tokens.encode(text, 6))


@pytest.mark.parametrize("max_len, add_cls", [(0, False), (1, True), (2.5, False)])
def test_bad_max_len(max_len, add_cls):
    with pytest.raises(ValueError, match="max_len"):
        tokens.encode("x", max_len, add_cls=add_cls)


def test_bad_inputs():
    with pytest.raises(TypeError, match="str or bytes"):
        tokens.encode(3, 4)
    with pytest.raises(ValueError, match="token ids"):
        tokens.decode([1, 258])
