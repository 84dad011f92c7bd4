"""``stdlib_text``: a byte-level language-modelling stream over the standard library's source.

Files (see ``stdlib_files``) go to 'train' or 'test' by a SHA-256 hash of their relative path;
each split is the concatenation, in sorted path order, of ``BOS`` + the file's byte tokens
(byte b -> b + 1). The stream is cut into rows of ``seq_len + 1`` tokens with stride ``seq_len``
(consecutive rows share one token), so inputs = tokens[:, :-1] and targets = tokens[:, 1:]
predict every transition of the stream exactly once; the incomplete tail is dropped.
"""

from __future__ import annotations

import numpy as np

from jaxbatch.data import stdlib_files, tokens

SPLITS = ("train", "test")


def split_files(split: str, *, test_fraction: float = 0.1) -> list[stdlib_files.StdlibFile]:
    """Files of one split: test iff sha256(rel_path) / 2**64 < test_fraction; sorted by path."""
    if split not in SPLITS:
        raise ValueError(f"unknown stdlib_text split {split!r}; expected one of {SPLITS}")
    stdlib_files.check_fraction("test_fraction", test_fraction)
    files = stdlib_files.list_stdlib_files()
    in_test = [stdlib_files.hash_unit(f.rel_path) < test_fraction for f in files]
    return [f for f, t in zip(files, in_test, strict=True) if t == (split == "test")]


def stdlib_token_stream(
    split: str, *, test_fraction: float = 0.1, max_bytes: int | None = None
) -> np.ndarray:
    """The split's token stream: for each file, BOS then its bytes + 1.

    Args:
      split: 'train' or 'test'.
      test_fraction: fraction of files (by hash) in 'test'.
      max_bytes: stop after this many tokens (files in sorted order, the last one cut).

    Returns:
      int32 array [n_tokens].
    """
    if max_bytes is not None and max_bytes < 2:
        raise ValueError(f"max_bytes must be None or >= 2, got {max_bytes!r}")
    chunks, total = [], 0
    for f in split_files(split, test_fraction=test_fraction):
        chunk = np.concatenate([[tokens.BOS], tokens.encode_bytes(f.path.read_bytes())])
        chunks.append(chunk.astype(np.int32))
        total += chunk.size
        if max_bytes is not None and total >= max_bytes:
            break
    stream = np.concatenate(chunks)
    return stream if max_bytes is None else stream[:max_bytes]


def stdlib_text_arrays(
    split: str,
    *,
    seq_len: int = 256,
    test_fraction: float = 0.1,
    max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Language-modelling rows: row i = stream[i * seq_len : i * seq_len + seq_len + 1].

    Args:
      split: 'train' or 'test'.
      seq_len: model context length; each row holds seq_len + 1 tokens.
      test_fraction: fraction of files (by hash) in 'test'.
      max_bytes: cap on the stream length before chunking (fast CPU runs).

    Returns:
      {'tokens': int32 [(n_tokens - 1) // seq_len, seq_len + 1]}.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    stream = stdlib_token_stream(split, test_fraction=test_fraction, max_bytes=max_bytes)
    n_seq = (stream.size - 1) // seq_len
    if n_seq < 1:
        raise ValueError(
            f"stdlib_text {split!r} has {stream.size} tokens, fewer than seq_len + 1 = "
            f"{seq_len + 1}; raise max_bytes or lower seq_len"
        )
    starts = np.arange(n_seq)[:, None] * seq_len
    return {"tokens": stream[starts + np.arange(seq_len + 1)[None, :]]}
