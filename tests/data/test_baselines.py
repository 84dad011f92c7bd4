"""TF-IDF baseline: tokenization, a corpus with a known answer, and a dense NumPy transcription."""

import math

import numpy as np
import pytest

from jaxbatch.data import baselines


def test_identifier_tokens():
    assert baselines.identifier_tokens("parseHTTPResponse_code(x, max_len2)") == [
        "parse",
        "http",
        "response",
        "code",
        "max",
        "len",
    ]
    assert baselines.identifier_tokens("a.b c_d", min_token_len=1) == ["a", "b", "c", "d"]


def test_known_answers():
    queries = ["read the json config file", "send an http request", "compute the sha256 digest"]
    targets = [
        "def load_config(path):\n    return json.loads(read_file(path))",
        "def post(url):\n    return httpRequest(url, method='POST')",
        "def checksum(data):\n    return hashlib.sha256(data).hexdigest()",
    ]
    assert baselines.tfidf_retrieval_recall(queries, targets, ks=(1, 3)) == {1: 1.0, 3: 1.0}
    # Rotating the targets makes every true target the one sharing nothing with its query.
    rotated = targets[1:] + targets[:1]
    assert baselines.tfidf_retrieval_recall(queries, rotated, ks=(1, 2, 3)) == {
        1: 0.0,
        2: 0.0,
        3: 1.0,
    }


def test_no_shared_token_is_never_a_hit():
    recall = baselines.tfidf_retrieval_recall(
        ["zzz qqq", "alpha beta"], ["xx yy", "alpha"], ks=(1,)
    )
    assert recall == {1: 0.5}


def _dense_reference(queries, targets):
    """Straight transcription: full vocabulary count matrices, then the formulas."""
    tok = baselines.identifier_tokens
    vocab = sorted({t for text in list(queries) + list(targets) for t in tok(text)})
    index = {t: i for i, t in enumerate(vocab)}

    def counts(texts):
        m = np.zeros((len(texts), len(vocab)))
        for r, text in enumerate(texts):
            for t in tok(text):
                m[r, index[t]] += 1
        return m

    cq, ct = counts(queries), counts(targets)
    n = len(targets)
    df = (ct > 0).sum(0)
    idf = np.where(df > 0, np.log((1 + n) / (1 + df)) + 1, 0.0)  # unseen in targets: ignored

    def weigh(c):
        w = np.where(c > 0, 1 + np.log(np.maximum(c, 1)), 0.0) * idf
        norm = np.linalg.norm(w, axis=1, keepdims=True)
        return np.divide(w, norm, out=np.zeros_like(w), where=norm > 0)

    return weigh(cq) @ weigh(ct).T


def test_matches_dense_reference():
    rng = np.random.default_rng(0)
    words = ["get", "set", "value", "http", "parse", "file", "path", "json", "read", "write"]
    words += [f"tok{i}" for i in range(30)]

    def text():
        return " ".join(rng.choice(words, size=rng.integers(1, 12)))

    queries = [text() for _ in range(60)]
    targets = [text() + "_" + text() for _ in range(60)]
    sim = baselines.tfidf_similarity(queries, targets)
    reference = _dense_reference(queries, targets)
    np.testing.assert_allclose(sim, reference, atol=1e-5)
    got = baselines.tfidf_retrieval_recall(queries, targets, ks=(1, 5))
    true = np.diag(reference)[:, None]
    rank = (reference >= true - 1e-6).sum(1) - 1
    for k in (1, 5):
        assert math.isclose(got[k], float(np.mean(rank < k)))


def test_errors():
    with pytest.raises(ValueError, match="equally many"):
        baselines.tfidf_retrieval_recall(["a"], ["b", "c"])
    with pytest.raises(ValueError, match="ks must be positive"):
        baselines.tfidf_retrieval_recall(["aa"], ["aa"], ks=(0,))
