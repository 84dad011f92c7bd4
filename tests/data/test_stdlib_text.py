"""stdlib_text: file filter, hash split, token stream and chunking against direct transcriptions."""

import hashlib

import numpy as np
import pytest

from jaxbatch.data import stdlib_files, stdlib_text


@pytest.fixture(scope="module")
def all_files():
    return stdlib_files.list_stdlib_files()


def _is_test(rel_path):
    return int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big") / 2**64 < 0.1


def test_file_filter(all_files):
    rels = [f.rel_path for f in all_files]
    assert rels == sorted(rels) and len(rels) > 300
    assert "json/decoder.py" in rels and "collections/__init__.py" in rels
    for rel in rels:
        parts = rel.split("/")
        assert parts[0] not in {"test", "idlelib", "site-packages", "lib-dynload"}
        assert "test" not in parts[:-1] and "tests" not in parts[:-1]
        assert not parts[-1].startswith("_sysconfigdata")
    assert "encodings/cp1252.py" not in rels  # a generated codec table
    assert "encodings/utf_8.py" in rels  # a codec with real code


def test_split_files_hash_partition(all_files):
    train = stdlib_text.split_files("train")
    test = stdlib_text.split_files("test")
    assert [f.rel_path for f in test] == [f.rel_path for f in all_files if _is_test(f.rel_path)]
    assert [f.rel_path for f in train] == [
        f.rel_path for f in all_files if not _is_test(f.rel_path)
    ]


def test_stream_is_bos_plus_bytes_of_sorted_files():
    stream = stdlib_text.stdlib_token_stream("test", max_bytes=50_000)
    expected = []
    for f in stdlib_text.split_files("test"):
        expected += [257] + [b + 1 for b in f.path.read_bytes()]
        if len(expected) >= 50_000:
            break
    np.testing.assert_array_equal(stream, expected[:50_000])


def test_full_streams_hold_every_byte(all_files):
    total = sum(f.path.stat().st_size + 1 for f in all_files)  # + 1 BOS per file
    sizes = [stdlib_text.stdlib_token_stream(s).size for s in ("train", "test")]
    assert sum(sizes) == total
    assert 0.02 < sizes[1] / total < 0.3


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_rows_tile_the_stream(seq_len):
    stream = stdlib_text.stdlib_token_stream("test", max_bytes=3_000)
    rows = stdlib_text.stdlib_text_arrays("test", seq_len=seq_len, max_bytes=3_000)["tokens"]
    n_seq = (stream.size - 1) // seq_len
    assert rows.shape == (n_seq, seq_len + 1) and rows.dtype == np.int32
    for i in range(n_seq):
        np.testing.assert_array_equal(rows[i], stream[i * seq_len : i * seq_len + seq_len + 1])
    # Each transition (input t -> target t + 1) of the stream is predicted exactly once.
    assert rows[:, 1:].size == n_seq * seq_len


def test_deterministic_and_in_vocab():
    a = stdlib_text.stdlib_text_arrays("train", seq_len=128, max_bytes=20_000)
    b = stdlib_text.stdlib_text_arrays("train", seq_len=128, max_bytes=20_000)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert a["tokens"].min() >= 1 and a["tokens"].max() <= 257


def test_errors():
    with pytest.raises(ValueError, match="unknown stdlib_text split 'all'"):
        stdlib_text.stdlib_text_arrays("all")
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        stdlib_text.stdlib_text_arrays("test", seq_len=0)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        stdlib_text.stdlib_text_arrays("test", seq_len=100, max_bytes=50)
    with pytest.raises(ValueError, match="max_bytes"):
        stdlib_text.stdlib_token_stream("test", max_bytes=1)
