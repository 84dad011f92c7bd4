"""The EMA scaling rule: an EMA decay tuned at one batch size, carried to another."""

from jaxbatch.scaling import _checks


def ema_decay(base_decay: float, base_batch: float, batch: float) -> float:
    """Per-step EMA decay for ``batch`` that matches ``base_decay`` at ``base_batch``.

    One step at batch kappa*B sees the data of kappa steps at batch B, so the decay per step is
    raised to the power kappa = batch / base_batch::

      rho(batch) = base_decay ** kappa

    References:
      Busbridge et al., 2023, "How to Scale Your EMA", the EMA Scaling Rule (rho_hat = rho^kappa).

    Args:
      base_decay: decay tuned at ``base_batch``, in [0, 1).
      base_batch: the reference batch size (> 0).
      batch: the new batch size (> 0).

    Returns:
      The decay for ``batch``, in [0, 1).

    Examples:
      >>> round(ema_decay(0.99, 256, 1024), 6)
      0.960596
    """
    base_decay = _checks.decay("base_decay", base_decay)
    return base_decay ** _checks.kappa(base_batch, batch)
