"""Identifier sub-tokens of text and code, hashed to int32 ids (input of ``SubtokenBagEncoder``).

Text -> sub-tokens exactly as the TF-IDF baseline reads it (``baselines.identifier_tokens``): split
on every non-alphanumeric character (so ``snake_case`` splits), split ``camelCase`` and
``ACRONYMWords``, lowercase, drop sub-tokens shorter than ``min_token_len``. With ``prefixes``, each
sub-token longer than ``PREFIX_LEN`` adds its first ``PREFIX_LEN`` letters as a feature too
(``"p:pars"`` for parse, parser, parsing: truncation stemming); with ``bigrams``, each pair of
adjacent sub-tokens (``"read file"``). Every feature is hashed with
CRC-32 of its UTF-8 bytes (deterministic across processes and machines, unlike Python's salted
``hash()``) into [1, 2**31 - 1], so 0 stays the padding id:

  id(s) = crc32(utf8(s)) mod (2**31 - 1) + 1
  row   = [id(s_1), ..., id(s_n), id(s_1 s_2), ..., id(s_{n-1} s_n), 0, ...]  (cut to ``length``)

The model folds ids into its own number of buckets (``id mod buckets``), so the data does not
depend on the model's table size. Unigrams come first, so a long function loses bigrams before it
loses any identifier.

References:
  Weinberger et al. 2009, "Feature Hashing for Large Scale Multitask Learning" (the hashing trick);
  Husain et al. 2019, "CodeSearchNet Challenge" (identifier sub-tokens for code search).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from jaxbatch.data.baselines import identifier_tokens

PAD_ID = 0
PREFIX_LEN = 4
_MODULUS = 2**31 - 1


def hash_feature(feature: str) -> int:
    """id in [1, 2**31 - 1] of one feature string (CRC-32 based, the same in every process)."""
    return zlib.crc32(feature.encode("utf-8")) % _MODULUS + 1


def subtoken_features(
    text: str, *, prefixes: bool = False, bigrams: bool = False, min_token_len: int = 2
) -> list[str]:
    """Sub-tokens of ``text`` in order, then their prefixes, then adjacent pairs (if asked)."""
    toks = identifier_tokens(text, min_token_len=min_token_len)
    out = list(toks)
    if prefixes:
        out += [f"p:{t[:PREFIX_LEN]}" for t in toks if len(t) > PREFIX_LEN]
    if bigrams:
        out += [f"{a} {b}" for a, b in zip(toks, toks[1:], strict=False)]
    return out


def encode_subtokens(
    texts: Sequence[str],
    length: int,
    *,
    prefixes: bool = False,
    bigrams: bool = False,
    min_token_len: int = 2,
) -> np.ndarray:
    """Hashed sub-token ids of each text: int32 [len(texts), length], PAD_ID-padded / truncated.

    Args:
      texts: strings (docstrings or source code).
      length: features per row.
      prefixes: add the ``PREFIX_LEN``-letter prefix of every longer sub-token.
      bigrams: add adjacent sub-token pairs.
      min_token_len: drop sub-tokens shorter than this.

    Returns:
      int32 ids in [1, 2**31 - 1], 0 for padding.
    """
    if length < 1:
        raise ValueError(f"encode_subtokens: length must be >= 1, got {length}")
    if min_token_len < 1:
        raise ValueError(f"encode_subtokens: min_token_len must be >= 1, got {min_token_len}")
    out = np.full((len(texts), length), PAD_ID, np.int32)
    memo: dict[str, int] = {}
    for i, text in enumerate(texts):
        feats = subtoken_features(
            text, prefixes=prefixes, bigrams=bigrams, min_token_len=min_token_len
        )[:length]
        ids = [memo.get(f) or memo.setdefault(f, hash_feature(f)) for f in feats]
        out[i, : len(ids)] = ids
    return out
