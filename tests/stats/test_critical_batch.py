"""fit_critical_batch: exact recovery, calibrated errors on noisy data, and input checks."""

import numpy as np
import pytest

from jaxbatch import stats

S_MIN, B_NOISE = 2000.0, 300.0
BATCHES = np.array([16, 32, 64, 128, 256, 512, 1024, 4096], np.float64)


def _steps(batches):
    return S_MIN * (1 + B_NOISE / batches)


def test_noiseless_data_is_recovered_exactly():
    fit = stats.fit_critical_batch(BATCHES, _steps(BATCHES), BATCHES * _steps(BATCHES))
    np.testing.assert_allclose(
        [fit.b_crit, fit.s_min, fit.e_min], [B_NOISE, S_MIN, S_MIN * B_NOISE]
    )
    assert fit.b_crit_stderr < 1e-8 * B_NOISE and fit.residual_std < 1e-12
    assert fit.num_points == len(BATCHES)
    np.testing.assert_allclose(fit.steps(BATCHES), _steps(BATCHES))
    np.testing.assert_allclose(fit.examples(BATCHES), BATCHES * _steps(BATCHES))


def test_examples_are_used_when_they_differ_from_b_times_s():
    """Runs with a batch schedule: E/S is the effective batch, not the nominal one."""
    effective = np.array([40.0, 150.0, 700.0, 2500.0])
    s = S_MIN * (1 + B_NOISE / effective)
    e = S_MIN * B_NOISE * (1 + effective / B_NOISE)
    nominal = np.array([32, 128, 512, 2048])  # the batch each schedule ended at
    fit = stats.fit_critical_batch(nominal, s, e)
    np.testing.assert_allclose([fit.b_crit, fit.s_min], [B_NOISE, S_MIN], rtol=1e-10)


def test_matches_relative_weighted_polyfit():
    """With E = B S the fit is S = S_min + E_min / B weighted by 1 / S: numpy.polyfit's
    weighted least squares on (1/B, S) must give the same S_min and E_min."""
    rng = np.random.default_rng(5)
    s = _steps(BATCHES) * (1 + 0.05 * rng.normal(size=len(BATCHES)))
    e_min, s_min = np.polyfit(1 / BATCHES, s, 1, w=1 / s)
    fit = stats.fit_critical_batch(BATCHES, s)
    np.testing.assert_allclose([fit.s_min, fit.e_min, fit.b_crit], [s_min, e_min, e_min / s_min])


def test_standard_error_is_calibrated_on_noisy_data():
    """Over many synthetic experiments with 3% multiplicative noise in the step counts, the
    reported standard error matches the spread of B_crit and ~2-sigma intervals cover it."""
    rng = np.random.default_rng(2018)
    reps = 400
    fits = [
        stats.fit_critical_batch(
            BATCHES, _steps(BATCHES) * (1 + 0.03 * rng.normal(size=len(BATCHES)))
        )
        for _ in range(reps)
    ]
    b = np.array([f.b_crit for f in fits])
    se = np.array([f.b_crit_stderr for f in fits])
    assert abs(b.mean() - B_NOISE) < 4 * b.std(ddof=1) / np.sqrt(reps)
    np.testing.assert_allclose(se.mean(), b.std(ddof=1), rtol=0.25)
    coverage = np.mean(np.abs(b - B_NOISE) < 2 * se)
    assert 0.83 < coverage < 0.98, coverage  # t with 6 dof: P(|t| < 2) = 0.908


@pytest.mark.parametrize(
    "args, match",
    [
        (([64, 128], [10, 8]), "at least 3 runs"),
        (([64, 128, 256], [10, 8]), "same length, got 3, 2 and 3"),
        (([64, 128, 256], [10, 8, 7], [640, 1024]), "same length"),
        (([64, 0, 256], [10, 8, 7]), r"batch_sizes must be finite and > 0, got \[0.0\]"),
        (([64, 128, 256], [10, -8, 7]), r"steps must be finite and > 0, got \[-8.0\]"),
        (([64, 128, 256], [10, np.nan, 7]), "steps must be finite"),
        (([[64, 128, 256]], [10, 8, 7]), "1-D sequence"),
        (([128, 128, 128], [10, 10.5, 9.5]), "at least two different ratios"),
        (([64, 128, 256], [10, 20, 40]), "must be > 0. The runs do not follow"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        stats.fit_critical_batch(*args)


def test_recovers_s_min_and_b_crit_from_one_noisy_sweep():
    """Data drawn from the model with 5% multiplicative noise (one fixed seed, 6 batch sizes as a
    sweep would run): the fit lands within 3 standard errors of the true S_min and B_crit, and its
    standard errors are of the size of that noise (neither 0 nor vacuous)."""
    rng = np.random.default_rng(12)
    batches = np.array([32, 64, 128, 256, 512, 2048], np.float64)
    steps = _steps(batches) * np.exp(0.05 * rng.normal(size=len(batches)))
    fit = stats.fit_critical_batch(batches, steps)
    assert abs(fit.b_crit - B_NOISE) < 3 * fit.b_crit_stderr
    assert abs(fit.s_min - S_MIN) < 3 * fit.s_min_stderr
    assert 0.005 < fit.b_crit_stderr / fit.b_crit < 0.5
    assert 0.005 < fit.s_min_stderr / fit.s_min < 0.2
    assert 0.01 < fit.residual_std < 0.15
