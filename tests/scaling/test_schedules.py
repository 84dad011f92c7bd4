"""Sample-based schedules: against optax where the two coincide, and batch invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbatch import scaling


def _np_warmup_cosine(samples, peak, warmup, total, init, end):
    samples = np.asarray(samples, np.float64)
    warm = init + (peak - init) * samples / warmup
    frac = np.clip((samples - warmup) / (total - warmup), 0, 1)
    return np.where(samples < warmup, warm, end + (peak - end) * 0.5 * (1 + np.cos(np.pi * frac)))


def test_warmup_cosine_equals_optax_at_step_boundaries():
    batch, warmup_steps, total_steps = 256, 10, 100
    ours = scaling.warmup_cosine_in_samples(
        0.4,
        warmup_samples=warmup_steps * batch,
        total_samples=total_steps * batch,
        batch_size=batch,
        init_lr=0.01,
        end_lr=0.001,
    )
    ref = optax.warmup_cosine_decay_schedule(0.01, 0.4, warmup_steps, total_steps, end_value=0.001)
    steps = jnp.arange(0, 120)
    np.testing.assert_allclose(jax.vmap(ours)(steps), jax.vmap(ref)(steps), rtol=1e-5, atol=1e-7)


def test_warmup_cosine_matches_numpy_off_step_boundaries():
    batch, warmup, total = 384, 1000.0, 50_000.0  # warmup ends mid-step
    ours = jax.jit(
        scaling.warmup_cosine_in_samples(
            1.0, warmup_samples=warmup, total_samples=total, batch_size=batch, end_lr=0.1
        )
    )
    steps = np.arange(0, 150)
    want = _np_warmup_cosine(steps * batch, 1.0, warmup, total, 0.0, 0.1)
    np.testing.assert_allclose(jax.vmap(ours)(steps), want, rtol=1e-5, atol=1e-6)


def test_warmup_linear_matches_numpy_and_optax():
    batch, warmup, total = 128, 1280, 12800
    ours = scaling.warmup_linear_in_samples(
        0.5, warmup_samples=warmup, total_samples=total, batch_size=batch, end_lr=0.05
    )
    ref = optax.join_schedules(
        [optax.linear_schedule(0.0, 0.5, 10), optax.linear_schedule(0.5, 0.05, 90)], [10]
    )
    steps = jnp.arange(0, 110)
    np.testing.assert_allclose(jax.vmap(ours)(steps), jax.vmap(ref)(steps), rtol=1e-5, atol=1e-7)


def test_rsqrt_and_constant_match_numpy():
    batch, warmup = 64, 6400.0
    samples = np.arange(0, 400) * batch
    rsqrt = scaling.warmup_rsqrt_in_samples(2e-3, warmup_samples=warmup, batch_size=batch)
    safe = np.where(samples == 0, 1, samples)  # the warmup branch covers samples == 0
    want = np.where(samples < warmup, 2e-3 * samples / warmup, 2e-3 * np.sqrt(warmup / safe))
    got = jax.vmap(rsqrt)(jnp.arange(0, 400))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    const = scaling.warmup_constant_in_samples(
        2e-3, warmup_samples=warmup, batch_size=batch, init_lr=1e-4
    )
    want = 1e-4 + (2e-3 - 1e-4) * np.minimum(samples / warmup, 1)
    np.testing.assert_allclose(jax.vmap(const)(jnp.arange(0, 400)), want, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda b: scaling.warmup_cosine_in_samples(
            1.0, warmup_samples=5120, total_samples=102400, batch_size=b
        ),
        lambda b: scaling.warmup_linear_in_samples(
            1.0, warmup_samples=5120, total_samples=102400, batch_size=b
        ),
        lambda b: scaling.warmup_rsqrt_in_samples(1.0, warmup_samples=5120, batch_size=b),
        lambda b: scaling.warmup_constant_in_samples(1.0, warmup_samples=5120, batch_size=b),
    ],
)
def test_doubling_the_batch_keeps_the_regime_in_samples(make):
    small, big = make(256), make(512)
    steps = jnp.arange(0, 200)
    # Step 2t at batch 256 and step t at batch 512 have seen the same samples.
    np.testing.assert_allclose(jax.vmap(big)(steps), jax.vmap(small)(2 * steps), rtol=1e-6)


def test_no_int32_overflow_at_large_sample_counts():
    batch = 65536
    sched = scaling.warmup_cosine_in_samples(
        1.0, warmup_samples=1e9, total_samples=1e11, batch_size=batch
    )
    step = jnp.asarray(1_000_000, jnp.int32)  # 6.5e10 samples: beyond int32
    want = _np_warmup_cosine(1_000_000 * batch, 1.0, 1e9, 1e11, 0.0, 0.0)
    np.testing.assert_allclose(sched(step), want, rtol=1e-5)


def test_steps_and_regime_helpers():
    assert scaling.steps_for_samples(1_281_167 * 90, 4096) == -(-1_281_167 * 90 // 4096)
    assert scaling.steps_for_samples(0, 4096) == 0
    # Regime adaptation keeps the number of steps: samples' / B' == samples / B.
    new = scaling.regime_adaptation(1_000_000, 256, 4096)
    assert new / 4096 == pytest.approx(1_000_000 / 256)


def test_schedule_validation():
    with pytest.raises(ValueError, match="total_samples must be > warmup_samples"):
        scaling.warmup_cosine_in_samples(1.0, warmup_samples=100, total_samples=100, batch_size=8)
    with pytest.raises(ValueError, match="batch_size must be > 0, got 0"):
        scaling.warmup_linear_in_samples(1.0, warmup_samples=1, total_samples=10, batch_size=0)
    with pytest.raises(ValueError, match="warmup_samples must be > 0"):
        scaling.warmup_rsqrt_in_samples(1.0, warmup_samples=0, batch_size=8)
    with pytest.raises(ValueError, match="peak_lr must be >= 0"):
        scaling.warmup_constant_in_samples(-1.0, warmup_samples=0, batch_size=8)
