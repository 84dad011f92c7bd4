"""Noise-scale estimators: NumPy transcription, jit, and recovery of a known G and Sigma."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch import stats


def test_matches_two_equation_solve():
    """E|G_B|^2 = |G|^2 + tr(Sigma)/B at two B's: solve the 2x2 system directly."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        b_small, b_big = rng.integers(1, 50), rng.integers(60, 5000)
        sq_small, sq_big = rng.uniform(2.0, 5.0), rng.uniform(0.5, 2.0)
        a = np.array([[1.0, 1.0 / b_small], [1.0, 1.0 / b_big]])
        want = np.linalg.solve(a, np.array([sq_small, sq_big]))
        got = stats.noise_scale_from_two_batches(sq_small, sq_big, b_small, b_big)
        np.testing.assert_allclose(got, want, rtol=1e-10)


def test_jit_with_int32_batch_sizes_matches_numpy():
    args = (np.float32(3.0), np.float32(1.25), np.int32(16), np.int32(128))
    want = stats.noise_scale_from_two_batches(*(np.float64(a) for a in args))
    got = jax.jit(stats.noise_scale_from_two_batches)(*(jnp.asarray(a) for a in args))
    assert got[0].dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_recovers_known_gradient_and_covariance():
    """Draws g_i = G + noise with known |G|^2 and tr(Sigma) and checks both estimators are
    unbiased to within 4 standard errors of the mean over independent trials."""
    rng = np.random.default_rng(1234)
    dim, b_small, k, trials = 24, 4, 8, 3000
    b_big = b_small * k
    g_true = rng.normal(size=dim) * 0.3
    chol = rng.normal(size=(dim, dim)) / np.sqrt(dim)  # Sigma = chol @ chol.T
    g2_true, trace_true = g_true @ g_true, np.trace(chol @ chol.T)

    per_example = g_true + rng.normal(size=(trials, b_big, dim)) @ chol.T
    micro_means = per_example.reshape(trials, k, b_small, dim).mean(axis=2)
    sq_small = np.mean(np.sum(micro_means**2, axis=-1), axis=1)
    sq_big = np.sum(per_example.mean(axis=1) ** 2, axis=-1)
    g2, trace = stats.noise_scale_from_two_batches(sq_small, sq_big, b_small, b_big)

    for name, est, truth in [("|G|^2", g2, g2_true), ("tr Sigma", trace, trace_true)]:
        stderr = est.std(ddof=1) / np.sqrt(trials)
        assert abs(est.mean() - truth) < 4 * stderr, (name, est.mean(), truth, stderr)
    # The test has power: the naive big-batch norm is off by tr(Sigma)/B_big.
    naive_bias = sq_big.mean() - g2_true
    assert naive_bias > 10 * sq_big.std(ddof=1) / np.sqrt(trials)
    np.testing.assert_allclose(naive_bias, trace_true / b_big, rtol=0.1)


def test_rejects_bad_batch_sizes():
    with pytest.raises(ValueError, match="0 < b_small < b_big"):
        stats.noise_scale_from_two_batches(1.0, 0.5, 64, 64)
    with pytest.raises(ValueError, match="b_small=0"):
        stats.noise_scale_from_two_batches(1.0, 0.5, 0, 64)


def _numpy_ema(g2s, traces, decays):
    m_g2 = m_tr = 0.0
    prod = 1.0
    out = []
    for g2, tr, d in zip(g2s, traces, decays, strict=True):
        m_g2 = d * m_g2 + (1 - d) * g2
        m_tr = d * m_tr + (1 - d) * tr
        prod *= d
        out.append((m_tr / (1 - prod)) / (m_g2 / (1 - prod)))
    return np.array(out), m_g2 / (1 - prod), m_tr / (1 - prod)


def test_ema_matches_numpy_loop_under_scan():
    rng = np.random.default_rng(3)
    steps = 50
    g2s = rng.uniform(0.5, 1.5, steps)
    traces = rng.uniform(50, 150, steps)
    decays = np.where(np.arange(steps) < 20, 0.9, 0.99)  # a decay that changes mid-run
    want, want_g2, want_trace = _numpy_ema(g2s, traces, decays)

    def body(state, xs):
        return stats.noise_scale_ema_update(state, *xs)

    state, got = jax.jit(lambda xs: jax.lax.scan(body, stats.noise_scale_ema_init(), xs))(
        (jnp.asarray(g2s), jnp.asarray(traces), jnp.asarray(decays))
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(
        stats.noise_scale_ema_debiased(state), (want_g2, want_trace), rtol=1e-5
    )
    # Bias correction: the first step returns that step's own ratio, not a damped one.
    np.testing.assert_allclose(got[0], traces[0] / g2s[0], rtol=1e-5)


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\), got 1.0"):
        stats.noise_scale_ema_update(stats.noise_scale_ema_init(), 1.0, 2.0, 1.0)


def test_gsnr_matches_numpy_per_example_moments():
    rng = np.random.default_rng(7)
    per_example = {
        "w": rng.normal(0.5, 2.0, size=(256, 3, 4)),
        "b": rng.normal(-1.0, 0.5, size=(256, 4)),
    }
    mean = jax.tree.map(lambda g: g.mean(0), per_example)
    mean_sq = jax.tree.map(lambda g: (g**2).mean(0), per_example)
    got = stats.gsnr(mean, mean_sq)
    for key, g in per_example.items():
        want = g.mean(0) ** 2 / g.var(0, ddof=0)
        np.testing.assert_allclose(got[key], want, rtol=1e-4)
