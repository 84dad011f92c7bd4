"""Lexical retrieval baseline for ``codesearch``: TF-IDF over identifier sub-tokens (NumPy only).

Text -> tokens: split on every non-alphanumeric character (so snake_case splits), split camelCase
and ACRONYMWords, lowercase, drop tokens shorter than ``min_token_len``. The targets are the
document collection (N documents):

  tf(t, d) = 1 + log(count(t, d))            (sublinear; 0 when absent)
  idf(t)   = log((1 + N) / (1 + df(t))) + 1  (smoothed; df over targets)
  v(d)     = tf(., d) * idf / ||tf(., d) * idf||_2,  same map for queries
  sim(q, d) = v(q) . v(d)                     (cosine)

Recall@k is the fraction of queries whose own target is among the k most similar targets; ties
count against the query (rank = number of *other* targets scoring >= the true target), so a query
sharing no token with any target is never a hit.

References:
  Salton, Buckley, 1988, "Term-weighting approaches in automatic text retrieval" (tf-idf, cosine).
  Husain et al., 2019, "CodeSearchNet Challenge: Evaluating the State of Semantic Code Search"
  (docstring -> code retrieval, lexical baselines).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[A-Za-z0-9]+")
_SUBWORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def identifier_tokens(text: str, *, min_token_len: int = 2) -> list[str]:
    """Identifier sub-tokens, e.g. ``'parseHTTPResponse_code'`` -> parse, http, response, code."""
    out = []
    for word in _WORD.findall(text):
        out.extend(s.lower() for s in _SUBWORD.findall(word) if len(s) >= min_token_len)
    return out


def _weights(counts: Counter, idf: dict[str, float]) -> dict[str, float]:
    w = {t: (1.0 + math.log(c)) * idf[t] for t, c in counts.items() if t in idf}
    norm = math.sqrt(sum(x * x for x in w.values()))
    return {t: x / norm for t, x in w.items()} if norm > 0 else {}


def tfidf_similarity(
    queries: Sequence[str], targets: Sequence[str], *, min_token_len: int = 2
) -> np.ndarray:
    """Cosine similarities of the TF-IDF vectors above: float32 [len(queries), len(targets)]."""
    target_counts = [Counter(identifier_tokens(t, min_token_len=min_token_len)) for t in targets]
    df = Counter(t for counts in target_counts for t in counts)
    n = len(targets)
    idf = {t: math.log((1 + n) / (1 + d)) + 1.0 for t, d in df.items()}
    query_w = [
        _weights(Counter(identifier_tokens(q, min_token_len=min_token_len)), idf) for q in queries
    ]
    vocab = {t: i for i, t in enumerate(sorted({t for w in query_w for t in w}))}
    # Only terms that occur in some query can contribute to a dot product; target norms were
    # already taken over all of each target's terms in _weights.
    q_mat = np.zeros((len(queries), len(vocab)), np.float32)
    t_mat = np.zeros((n, len(vocab)), np.float32)
    for i, w in enumerate(query_w):
        for t, x in w.items():
            q_mat[i, vocab[t]] = x
    for j, counts in enumerate(target_counts):
        for t, x in _weights(counts, idf).items():
            if t in vocab:
                t_mat[j, vocab[t]] = x
    return q_mat @ t_mat.T


def tfidf_retrieval_recall(
    queries: Sequence[str],
    targets: Sequence[str],
    ks: Sequence[int] = (1, 10),
    *,
    min_token_len: int = 2,
) -> dict[int, float]:
    """Recall@k of TF-IDF retrieval where query i's correct answer is target i.

    Args:
      queries: N query strings (e.g. docstrings).
      targets: N target strings (e.g. function sources); all N are candidates for every query.
      ks: cut-offs, each a positive integer.
      min_token_len: shortest identifier sub-token kept.

    Returns:
      {k: fraction of queries whose target ranks in the top k}.
    """
    if len(queries) != len(targets) or not queries:
        raise ValueError(
            f"need equally many queries and targets (> 0), got {len(queries)} and {len(targets)}"
        )
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    sim = tfidf_similarity(queries, targets, min_token_len=min_token_len)
    true = np.diagonal(sim)[:, None]
    rank = (sim >= true).sum(axis=1) - 1  # other targets scoring at least as high
    return {k: float(np.mean(rank < k)) for k in ks}
