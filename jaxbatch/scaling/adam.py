"""The square-root (SDE) scaling rule for all of Adam's hyper-parameters at once."""

from typing import NamedTuple

from jaxbatch import _validate
from jaxbatch.scaling.learning_rates import sqrt_rule


class AdamHParams(NamedTuple):
    """Adam hyper-parameters in ``optax.adam`` naming: ``(lr, b1, b2, eps)``."""

    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def sde_beta(beta: float, kappa: float, *, name: str = "beta") -> float:
    """beta' = 1 - kappa * (1 - beta): the SDE rule for an Adam moment decay; checked > 0."""
    beta = _validate.decay(name, beta)
    new = 1.0 - kappa * (1.0 - beta)
    if new <= 0.0:
        raise ValueError(
            f"the SDE rule gives {name} = 1 - kappa*(1 - {name}) = 1 - {kappa:g}*(1 - {beta:g}) "
            f"= {new:g} <= 0; it needs kappa < 1/(1 - {name}) = {1.0 / (1.0 - beta):g}"
        )
    return new


#: The fields of ``AdamHParams`` in order; :func:`sde_hparam` has a rule for each.
SDE_FIELDS = ("lr", "b1", "b2", "eps")


def sde_hparam(field: str, value: float, kappa: float, *, name: str | None = None) -> float:
    """One Adam hyper-parameter under the SDE rule (see :func:`adam_sde`).

    Args:
      field: which one: 'lr', 'b1', 'b2' or 'eps' (``SDE_FIELDS``).
      value: its value at the reference batch.
      kappa: batch / base_batch (> 0, checked by the caller).
      name: the name used in error messages; default ``field``.
    """
    name = field if name is None else name
    if field == "lr":
        return sqrt_rule(_validate.non_negative(name, value), kappa)
    if field in ("b1", "b2"):
        return sde_beta(value, kappa, name=name)
    if field == "eps":
        return _validate.non_negative(name, value) / sqrt_rule(1.0, kappa)  # eps / sqrt(kappa)
    raise ValueError(f"field must be one of {SDE_FIELDS}, got {field!r}")


def adam_sde(base: AdamHParams, base_batch: float, batch: float) -> AdamHParams:
    """Rescales Adam's (lr, b1, b2, eps) from ``base_batch`` to ``batch`` (square-root rule).

    With kappa = batch / base_batch::

      lr'  = lr * sqrt(kappa)
      b1'  = 1 - kappa * (1 - b1)
      b2'  = 1 - kappa * (1 - b2)
      eps' = eps / sqrt(kappa)

    The rule keeps Adam's SDE approximation fixed, so it is accurate while kappa * (1 - b) stays
    well below 1; a kappa that makes a beta <= 0 raises.

    References:
      Malladi, Lyu, Panigrahi, Arora, 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
      Algorithms", the Square Root Scaling Rule for Adam (definition in the scaling-rule section).

    Args:
      base: hyper-parameters tuned at ``base_batch``; betas in [0, 1), lr and eps >= 0.
      base_batch: the reference batch size (> 0).
      batch: the new batch size (> 0).

    Returns:
      ``AdamHParams`` for ``batch``.

    Examples:
      >>> new = adam_sde(AdamHParams(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8), 256, 1024)
      >>> [round(x, 12) for x in new]
      [0.002, 0.6, 0.996, 5e-09]
    """
    if not isinstance(base, AdamHParams):
        raise ValueError(f"base must be an AdamHParams(lr, b1, b2, eps), got {base!r}")
    kappa = _validate.kappa(base_batch, batch)
    return AdamHParams(*(sde_hparam(f, v, kappa) for f, v in zip(SDE_FIELDS, base, strict=True)))
