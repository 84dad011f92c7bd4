"""AdamW weight decay from the EMA timescale it implies (held fixed when the batch changes)."""

from jaxbatch import _validate


def adamw_timescale(weight_decay: float, lr: float, batch: float, dataset_size: float) -> float:
    """The AdamW timescale tau = B / (lr * weight_decay * D), as a fraction of D.

    With decoupled weight decay scaled by the learning rate (the ``optax.adamw`` convention,
    w <- w - lr * (u + weight_decay * w)), the weights are an EMA of the updates with per-step
    coefficient lr * weight_decay, i.e. a timescale of 1 / (lr * weight_decay) steps. Dividing by
    the D / B steps that process D samples gives::

      tau = B / (lr * weight_decay * D)

    B and D must count the same unit (samples, or tokens). With D the size of one epoch, tau is
    in epochs; with D the total samples of the run, tau is the fraction of the run (the Power
    Lines tau_EMA for single-epoch LLM pre-training).

    References:
      Bergsma et al., 2025, "Power Lines: Scaling Laws for Weight Decay and Batch Size in LLM
      Pre-training" (the AdamW timescale tau_EMA); Wang & Aitchison, 2024, "How to set AdamW's
      weight decay as you scale model and dataset size".

    Args:
      weight_decay: lambda (> 0).
      lr: the learning rate eta (> 0).
      batch: batch size B (> 0).
      dataset_size: D, in the same unit as ``batch`` (> 0).

    Returns:
      tau in units of D (epochs, or fractions of the run).
    """
    wd = _validate.positive("weight_decay", weight_decay)
    lr = _validate.positive("lr", lr)
    return _validate.positive("batch", batch) / (
        lr * wd * _validate.positive("dataset_size", dataset_size)
    )


def weight_decay_for_timescale(tau: float, lr: float, batch: float, dataset_size: float) -> float:
    """The weight decay that gives AdamW timescale ``tau`` at this lr, batch and data size.

    Inverts tau = B / (lr * lambda * D)::

      lambda = B / (lr * tau * D)

    Holding tau fixed while the batch grows makes the optimal lambda grow linearly with B (at a
    fixed lr). See ``adamw_timescale`` for the units of tau and the optax convention assumed.

    References:
      Bergsma et al., 2025, "Power Lines: Scaling Laws for Weight Decay and Batch Size in LLM
      Pre-training" (tau_EMA = B / (eta * lambda * D)).

    Args:
      tau: the target timescale in units of D (> 0), e.g. epochs.
      lr: the learning rate eta (> 0).
      batch: batch size B (> 0).
      dataset_size: D, in the same unit as ``batch`` (> 0).

    Returns:
      The weight decay lambda (``optax.adamw``'s ``weight_decay``).

    Examples:
      >>> weight_decay_for_timescale(0.2, 1e-3, 512, 1_000_000)
      2.56
    """
    tau = _validate.positive("tau", tau)
    lr = _validate.positive("lr", lr)
    batch = _validate.positive("batch", batch)
    return batch / (lr * tau * _validate.positive("dataset_size", dataset_size))
