"""norm_test_batch_size: the AdAdaGrad norm test against its own inequality, and input checks."""

import math

import numpy as np
import pytest

from jaxbatch import stats


def _passes(trace, g2, batch, eta):
    """The norm test itself: tr(Sigma) / B <= eta^2 |g_B|^2."""
    return trace / batch <= eta**2 * g2 * (1 + 1e-12)


def test_result_is_the_smallest_granular_batch_that_passes():
    rng = np.random.default_rng(3)
    for _ in range(200):
        trace, g2 = 10 ** rng.uniform(-2, 3), 10 ** rng.uniform(-3, 1)
        eta = rng.choice([0.05, 0.1, 0.3])
        gran = int(rng.choice([1, 8, 32]))
        batch = gran * int(rng.integers(1, 20))
        limit = gran * 4096
        got = stats.norm_test_batch_size(
            trace, g2, batch, max_batch_size=limit, eta=eta, granularity=gran
        )
        assert batch <= got <= limit
        if got == batch:
            assert _passes(trace, g2, batch, eta) or batch == limit
            continue
        assert got % gran == 0
        if got < limit:
            assert _passes(trace, g2, got, eta)
            assert not _passes(trace, g2, got - gran, eta)  # the smallest one on the grid
        else:
            assert not _passes(trace, g2, limit - gran, eta)


def test_only_grows_and_respects_the_bound():
    # B_test = 2 / (0.01 * 0.5) = 400
    assert stats.norm_test_batch_size(2.0, 0.5, 64, max_batch_size=4096) == 400
    assert stats.norm_test_batch_size(2.0, 0.5, 64, max_batch_size=4096, granularity=32) == 416
    assert stats.norm_test_batch_size(2.0, 0.5, 512, max_batch_size=4096) == 512
    assert stats.norm_test_batch_size(2.0, 0.5, 64, max_batch_size=256) == 256
    assert stats.norm_test_batch_size(2.0, 0.5, 64, max_batch_size=4096, eta=0.2) == 100
    # eta default 0.1: a noise scale of 1,000 asks for 100,000, capped at the maximum
    assert stats.norm_test_batch_size(1e3, 1.0, 64, max_batch_size=8192) == 8192


@pytest.mark.parametrize(
    "trace, g2", [(2.0, 0.0), (2.0, -1.0), (-2.0, 0.5), (math.nan, 0.5), (2.0, math.inf)]
)
def test_uninformative_statistics_keep_the_batch(trace, g2):
    assert stats.norm_test_batch_size(trace, g2, 96, max_batch_size=1024, granularity=32) == 96


def test_accepts_numpy_and_jax_scalars():
    import jax.numpy as jnp

    got = stats.norm_test_batch_size(
        jnp.float32(2.0), np.float32(0.5), 64, max_batch_size=4096, granularity=32
    )
    assert got == 416 and isinstance(got, int)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size must be a positive int, got 0"),
        (dict(batch_size=64.0), "batch_size must be a positive int"),
        (dict(max_batch_size=1000, granularity=64), "not a multiple of granularity=64"),
        (dict(batch_size=2048, max_batch_size=1024), "larger than max_batch_size=1024"),
        (dict(eta=0.0), "eta must be > 0"),
        (dict(granularity=0), "granularity must be a positive int"),
        (dict(trace_sigma=np.ones(3)), "trace_sigma must be a scalar"),
        (dict(grad_sq_norm="x"), "grad_sq_norm must be a real number"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(trace_sigma=2.0, grad_sq_norm=0.5, batch_size=64, max_batch_size=4096)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        stats.norm_test_batch_size(**args)
