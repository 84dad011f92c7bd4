"""Warmup and decay schedules whose breakpoints are counted in samples, not steps.

A schedule tuned as "warm up over 1.28M images, decay over 90 epochs" keeps that meaning at any
batch size: each function here returns an optax-compatible ``step -> lr`` schedule for one batch
size, evaluated at samples = step * batch_size. Doubling the batch halves the number of steps
per phase and leaves the schedule in epochs unchanged.
"""

import math

import jax.numpy as jnp
import optax

from jaxbatch import _validate


def _samples_seen(step, batch_size: float):
    # float32 is exact for step * batch_size up to 2**24 and within 6e-8 relative beyond,
    # which is far below what a learning rate needs; int32 would overflow at ~2e9 samples.
    return jnp.asarray(step, jnp.float32) * batch_size


def _warmup(samples, init_lr: float, peak_lr: float, warmup_samples: float):
    if warmup_samples == 0:
        return jnp.full_like(samples, peak_lr)
    return init_lr + (peak_lr - init_lr) * jnp.minimum(samples / warmup_samples, 1.0)


def _check_phases(warmup_samples, total_samples, batch_size):
    warmup_samples = _validate.non_negative("warmup_samples", warmup_samples)
    total_samples = _validate.positive("total_samples", total_samples)
    if total_samples <= warmup_samples:
        raise ValueError(
            f"total_samples must be > warmup_samples, got total_samples={total_samples!r} and "
            f"warmup_samples={warmup_samples!r}"
        )
    return warmup_samples, total_samples, _validate.positive("batch_size", batch_size)


def _warmup_then_decay(
    shape, peak_lr, init_lr, end_lr, warmup_samples, total_samples, batch_size
) -> optax.Schedule:
    """Linear warmup to ``peak_lr``, then end + (peak - end) * shape(frac), frac in [0, 1]."""
    peak = _validate.non_negative("peak_lr", peak_lr)
    init = _validate.non_negative("init_lr", init_lr)
    end = _validate.non_negative("end_lr", end_lr)
    warmup, total, batch = _check_phases(warmup_samples, total_samples, batch_size)

    def schedule(step):
        samples = _samples_seen(step, batch)
        frac = jnp.clip((samples - warmup) / (total - warmup), 0.0, 1.0)
        decayed = end + (peak - end) * shape(frac)
        return jnp.where(samples < warmup, _warmup(samples, init, peak, warmup), decayed)

    return schedule


def warmup_cosine_in_samples(
    peak_lr: float,
    *,
    warmup_samples: float,
    total_samples: float,
    batch_size: float,
    init_lr: float = 0.0,
    end_lr: float = 0.0,
) -> optax.Schedule:
    """Linear warmup then cosine decay, with both phases measured in samples.

    With s = step * batch_size, W = warmup_samples, T = total_samples::

      s < W:       lr = init_lr + (peak_lr - init_lr) * s / W
      W <= s < T:  lr = end_lr + (peak_lr - end_lr) * (1 + cos(pi * (s - W) / (T - W))) / 2
      s >= T:      lr = end_lr

    At integer step boundaries this equals ``optax.warmup_cosine_decay_schedule`` with
    warmup_steps = W / batch_size and decay_steps = T / batch_size.

    References:
      Goyal et al., 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
      Sec. 2.2 (gradual warmup); Loshchilov & Hutter, 2017, "SGDR: Stochastic Gradient Descent
      with Warm Restarts", Eq. 5 (cosine annealing).

    Args:
      peak_lr: learning rate at the end of warmup (>= 0).
      warmup_samples: samples of linear warmup (>= 0).
      total_samples: samples at which the decay reaches ``end_lr`` (> warmup_samples).
      batch_size: the batch size this schedule will run at (> 0).
      init_lr: learning rate at step 0 (>= 0).
      end_lr: final learning rate (>= 0).

    Returns:
      ``step -> lr``, jit-able, for ``optax`` optimizers' ``learning_rate``.
    """
    return _warmup_then_decay(
        lambda frac: 0.5 * (1.0 + jnp.cos(math.pi * frac)),
        peak_lr,
        init_lr,
        end_lr,
        warmup_samples,
        total_samples,
        batch_size,
    )


def warmup_linear_in_samples(
    peak_lr: float,
    *,
    warmup_samples: float,
    total_samples: float,
    batch_size: float,
    init_lr: float = 0.0,
    end_lr: float = 0.0,
) -> optax.Schedule:
    """Linear warmup then linear decay to ``end_lr``, both phases measured in samples.

    With s = step * batch_size, W = warmup_samples, T = total_samples::

      s < W:       lr = init_lr + (peak_lr - init_lr) * s / W
      W <= s < T:  lr = peak_lr + (end_lr - peak_lr) * (s - W) / (T - W)
      s >= T:      lr = end_lr

    References:
      Goyal et al., 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
      Sec. 2.2 (gradual warmup); You et al., 2019, "Large Batch Optimization for Deep Learning:
      Training BERT in 76 minutes" (linear warmup with linear / polynomial decay).

    Args:
      peak_lr: learning rate at the end of warmup (>= 0).
      warmup_samples: samples of linear warmup (>= 0).
      total_samples: samples at which the decay reaches ``end_lr`` (> warmup_samples).
      batch_size: the batch size this schedule will run at (> 0).
      init_lr: learning rate at step 0 (>= 0).
      end_lr: final learning rate (>= 0).

    Returns:
      ``step -> lr``, jit-able.
    """
    return _warmup_then_decay(
        lambda frac: 1.0 - frac,
        peak_lr,
        init_lr,
        end_lr,
        warmup_samples,
        total_samples,
        batch_size,
    )


def warmup_rsqrt_in_samples(
    peak_lr: float, *, warmup_samples: float, batch_size: float, init_lr: float = 0.0
) -> optax.Schedule:
    """Linear warmup then inverse-square-root decay in samples (the Transformer schedule).

    With s = step * batch_size and W = warmup_samples::

      s < W:   lr = init_lr + (peak_lr - init_lr) * s / W
      s >= W:  lr = peak_lr * sqrt(W / s)

    References:
      Vaswani et al., 2017, "Attention Is All You Need", Eq. 3 (warmup then step^-0.5).

    Args:
      peak_lr: learning rate at the end of warmup (>= 0).
      warmup_samples: samples of linear warmup (> 0: the decay is normalised by it).
      batch_size: the batch size this schedule will run at (> 0).
      init_lr: learning rate at step 0 (>= 0).

    Returns:
      ``step -> lr``, jit-able.
    """
    peak = _validate.non_negative("peak_lr", peak_lr)
    init = _validate.non_negative("init_lr", init_lr)
    warmup = _validate.positive("warmup_samples", warmup_samples)
    batch = _validate.positive("batch_size", batch_size)

    def schedule(step):
        samples = _samples_seen(step, batch)
        decayed = peak * jnp.sqrt(warmup / jnp.maximum(samples, warmup))
        return jnp.where(samples < warmup, _warmup(samples, init, peak, warmup), decayed)

    return schedule


def warmup_constant_in_samples(
    peak_lr: float, *, warmup_samples: float, batch_size: float, init_lr: float = 0.0
) -> optax.Schedule:
    """Linear warmup over ``warmup_samples`` samples, then a constant ``peak_lr``.

    With s = step * batch_size and W = warmup_samples::

      lr = init_lr + (peak_lr - init_lr) * min(s / W, 1)

    References:
      Goyal et al., 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
      Sec. 2.2 (gradual warmup).

    Args:
      peak_lr: learning rate after warmup (>= 0).
      warmup_samples: samples of linear warmup (>= 0; 0 means constant from step 0).
      batch_size: the batch size this schedule will run at (> 0).
      init_lr: learning rate at step 0 (>= 0).

    Returns:
      ``step -> lr``, jit-able.
    """
    peak = _validate.non_negative("peak_lr", peak_lr)
    init = _validate.non_negative("init_lr", init_lr)
    warmup = _validate.non_negative("warmup_samples", warmup_samples)
    batch = _validate.positive("batch_size", batch_size)

    def schedule(step):
        return _warmup(_samples_seen(step, batch), init, peak, warmup)

    return schedule


def steps_for_samples(samples: float, batch_size: float) -> int:
    """Number of optimizer steps that process at least ``samples`` samples: ceil(samples / B).

    Args:
      samples: a sample budget (>= 0).
      batch_size: samples per step (> 0).

    Returns:
      ceil(samples / batch_size) as an int.
    """
    samples = _validate.non_negative("samples", samples)
    return math.ceil(samples / _validate.positive("batch_size", batch_size))


def regime_adaptation(samples: float, base_batch: float, batch: float) -> float:
    """Hoffer et al.'s regime adaptation: scale a sample budget by kappa to keep its steps.

    Large-batch training closes the generalization gap when it runs as many *steps* as the
    small-batch regime did, i.e. each phase (warmup, each decay stage, the total) processes
    kappa = batch / base_batch times more samples::

      samples' = samples * kappa      (so samples' / batch == samples / base_batch)

    Use it on the sample counts given to the ``*_in_samples`` schedules to trade extra epochs
    for accuracy; leave them unchanged to keep the epoch budget.

    References:
      Hoffer, Hubara, Soudry, 2017, "Train longer, generalize better: closing the generalization
      gap in large batch training of neural networks" (regime adaptation).

    Args:
      samples: a sample count tuned at ``base_batch`` (>= 0).
      base_batch: the reference batch size (> 0).
      batch: the new batch size (> 0).

    Returns:
      The sample count for ``batch``.
    """
    return _validate.non_negative("samples", samples) * _validate.kappa(base_batch, batch)
