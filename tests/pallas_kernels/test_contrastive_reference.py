"""The N×N oracle against an independent float64 NumPy transcription of the three losses."""

import numpy as np
import pytest

from pallas_kernels.contrastive import contrastive_loss_reference


def _numpy_loss(x, y, scale, bias, kind):
    """Float64 loops over the formulas of CLIP, SigLIP (Eq. 1) and DCL (see reference.py)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    n = x.shape[0]
    logits = scale * x @ y.T + bias
    total = 0.0
    if kind == "sigmoid":
        for i in range(n):
            for j in range(n):
                z = 1.0 if i == j else -1.0
                total += np.log1p(np.exp(-z * logits[i, j]))  # −log σ(z·L)
        return total / n
    for i in range(n):
        negatives = [j for j in range(n) if kind == "softmax" or j != i]
        row = np.log(np.sum(np.exp(logits[i, negatives]))) - logits[i, i]
        col = np.log(np.sum(np.exp(logits[negatives, i]))) - logits[i, i]
        total += 0.5 * (row + col)
    return total / n


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "decoupled"])
@pytest.mark.parametrize("n", [2, 7])
def test_reference_matches_numpy(kind, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 5)).astype(np.float32)
    y = rng.standard_normal((n, 5)).astype(np.float32)
    got = contrastive_loss_reference(x, y, 2.5, -0.7, kind=kind)
    np.testing.assert_allclose(float(got), _numpy_loss(x, y, 2.5, -0.7, kind), rtol=1e-5)


def test_reference_decoupled_single_pair_is_minus_inf():
    # With N = 1 the DCL denominator has no negatives: log 0.
    x = np.ones((1, 3), np.float32)
    assert float(contrastive_loss_reference(x, x, 1.0, kind="decoupled")) == -np.inf


def test_reference_rejects_unknown_kind():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="kind must be one of"):
        contrastive_loss_reference(x, x, 1.0, kind="hinge")
