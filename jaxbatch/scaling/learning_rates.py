"""Learning rate as a function of batch size: linear, square-root and the Adam "surge" rule."""

import math

from jaxbatch import _validate

LEARNING_RATE_RULES = ("linear", "sqrt", "none")


def learning_rate(base_lr: float, base_batch: float, batch: float, rule: str) -> float:
    """Scales a learning rate tuned at ``base_batch`` to ``batch``.

    With kappa = batch / base_batch::

      'linear':  lr = base_lr * kappa         (SGD with momentum; pair it with warmup)
      'sqrt':    lr = base_lr * sqrt(kappa)   (keeps the variance of the update fixed; Adam)
      'none':    lr = base_lr

    References:
      Goyal et al., 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
      Sec. 2.1 (linear scaling rule).
      Krizhevsky, 2014, "One weird trick for parallelizing convolutional neural networks"
      (square-root rule); Hoffer, Hubara, Soudry, 2017, "Train longer, generalize better:
      closing the generalization gap in large batch training of neural networks" (lr
      proportional to sqrt(batch) keeps the covariance of the weight update fixed).

    Args:
      base_lr: learning rate tuned at ``base_batch`` (>= 0).
      base_batch: the reference batch size (> 0).
      batch: the new batch size (> 0).
      rule: one of ``'linear'``, ``'sqrt'``, ``'none'``.

    Returns:
      The learning rate for ``batch``.

    Examples:
      >>> learning_rate(0.1, 256, 8192, 'linear')
      3.2
    """
    base_lr = _validate.non_negative("base_lr", base_lr)
    kappa = _validate.kappa(base_batch, batch)
    if rule == "linear":
        return base_lr * kappa
    if rule == "sqrt":
        return sqrt_rule(base_lr, kappa)
    if rule == "none":
        return base_lr
    raise ValueError(f"rule must be one of {LEARNING_RATE_RULES}, got {rule!r}")


def sqrt_rule(value: float, kappa: float) -> float:
    """value * sqrt(kappa): the square-root rule on a checked value and kappa = B / B_ref.

    The one place the rule is written: ``learning_rate(..., 'sqrt')``, ``adam_sde`` (lr, and
    eps by its inverse) and ``rescale_hparams`` ('sqrt', 'adam_sde') all call it.
    """
    return value * math.sqrt(kappa)


def surge_lr(lr_max: float, batch: float, noise_scale: float) -> float:
    """Optimal Adam learning rate at ``batch`` given its peak value at the noise scale.

    For sign-like (Adam-style) updates the optimal learning rate first rises and then falls with
    the batch size, peaking at B = B_noise::

      lr_opt(B) = lr_max / (1/2 * (sqrt(B_noise / B) + sqrt(B / B_noise)))

    so lr_opt(B_noise) = lr_max and lr_opt(B) = lr_opt(B_noise**2 / B).

    References:
      Li et al., 2024, "Surge Phenomenon in Optimal Learning Rate and Batch Size Scaling",
      the Adam-style scaling law (its main theorem), with peak B_peak = B_noise.

    Args:
      lr_max: the optimal learning rate at ``batch == noise_scale`` (>= 0).
      batch: the batch size (> 0).
      noise_scale: B_noise, e.g. ``stats`` B_simple measured during training (> 0).

    Returns:
      The optimal learning rate at ``batch``.
    """
    lr_max = _validate.non_negative("lr_max", lr_max)
    ratio = _validate.positive("batch", batch) / _validate.positive("noise_scale", noise_scale)
    return lr_max / (0.5 * (math.sqrt(1.0 / ratio) + math.sqrt(ratio)))
