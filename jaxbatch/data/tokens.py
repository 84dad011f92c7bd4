"""Byte-level tokenizer shared by the text datasets: one token per UTF-8 byte.

Token ids: ``PAD = 0``, byte ``b`` -> ``b + 1`` (1..256), ``CLS = BOS = 257``; ``VOCAB_SIZE = 258``.
A byte vocabulary needs no training and no files, so every machine tokenizes identically.
"""

from __future__ import annotations

import numpy as np

PAD = 0
BYTE_OFFSET = 1
CLS = 257
BOS = CLS
VOCAB_SIZE = 258


def _as_bytes(text: str | bytes) -> bytes:
    if isinstance(text, str):
        return text.encode("utf-8")
    if isinstance(text, bytes | bytearray | memoryview):
        return bytes(text)
    raise TypeError(f"text must be str or bytes, got {type(text).__name__}")


def encode_bytes(data: bytes) -> np.ndarray:
    """Maps raw bytes to token ids without padding: token = byte + 1.

    Args:
      data: raw bytes.

    Returns:
      int32 array [len(data)] with values in 1..256.
    """
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + BYTE_OFFSET


def encode(text: str | bytes, max_len: int, *, add_cls: bool = False) -> np.ndarray:
    """Encodes text as byte tokens, truncated or right-padded with ``PAD`` to ``max_len``.

    tokens = [CLS]? + [b + 1 for b in utf8(text)][: max_len - add_cls] + [PAD] * rest

    Args:
      text: a ``str`` (encoded as UTF-8) or ``bytes``.
      max_len: length of the returned array; must be >= 1 (>= 2 with ``add_cls``).
      add_cls: put the ``CLS`` token at position 0 (a pooling slot for encoders).

    Returns:
      int32 array [max_len].
    """
    min_len = 2 if add_cls else 1
    if not isinstance(max_len, int | np.integer) or max_len < min_len:
        raise ValueError(
            f"max_len must be an integer >= {min_len} (add_cls={add_cls}), got {max_len!r}"
        )
    out = np.full((max_len,), PAD, dtype=np.int32)
    start = 1 if add_cls else 0
    if add_cls:
        out[0] = CLS
    ids = encode_bytes(_as_bytes(text)[: max_len - start])
    out[start : start + ids.size] = ids
    return out


def encode_batch(
    texts: list[str] | list[bytes], max_len: int, *, add_cls: bool = False
) -> np.ndarray:
    """Encodes a list of texts with :func:`encode`; returns int32 [len(texts), max_len]."""
    out = np.full((len(texts), max_len), PAD, dtype=np.int32)
    for i, text in enumerate(texts):
        out[i] = encode(text, max_len, add_cls=add_cls)
    return out


def decode(tokens: np.ndarray | list[int]) -> str:
    """Inverse of :func:`encode`: drops ``PAD``/``CLS``, maps token t -> byte t - 1, UTF-8 decodes.

    Args:
      tokens: 1-D sequence of token ids in [0, VOCAB_SIZE).

    Returns:
      the decoded string (invalid UTF-8, e.g. a character cut by truncation, becomes U+FFFD).
    """
    ids = np.asarray(tokens).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
        raise ValueError(
            f"token ids must be in [0, {VOCAB_SIZE}), got range [{ids.min()}, {ids.max()}]"
        )
    byte_ids = ids[(ids != PAD) & (ids != CLS)] - BYTE_OFFSET
    return byte_ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
