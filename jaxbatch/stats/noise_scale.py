"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 from gradient norms at two batch sizes."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbatch import _validate


def _concrete(x) -> bool:
    """True for host values we may inspect without a device transfer or a trace."""
    return isinstance(x, (int, float, np.ndarray, np.generic)) and not isinstance(x, bool)


def noise_scale_from_two_batches(sq_norm_small, sq_norm_big, b_small, b_big):
    """Unbiased |G|^2 and tr(Sigma) from squared gradient norms measured at two batch sizes.

    A batch-B gradient estimate G_B satisfies E[|G_B|^2] = |G|^2 + tr(Sigma) / B, with G the true
    gradient and Sigma the per-example gradient covariance. Two batch sizes give two equations::

      |G|^2     ~ (B_big * |G_big|^2 - B_small * |G_small|^2) / (B_big - B_small)
      tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

    Both are unbiased; averaging |G_small|^2 over several small batches (the micro-batches of
    ``optim.accumulate``, or the per-device gradients of a data-parallel step) reduces their
    variance. Either estimate can be negative on one step; smooth them with
    ``noise_scale_ema_update`` before taking the ratio.

    Plain arithmetic: works on Python floats, NumPy and JAX arrays alike, under ``jax.jit`` too.
    Batch sizes given as Python or NumPy numbers are checked (0 < b_small < b_big).

    References:
      McCandlish, Kaplan, Amodei et al., 2018, "An Empirical Model of Large-Batch Training",
      Appendix A.1 (the two-batch-size unbiased estimators).

    Args:
      sq_norm_small: |G_small|^2, squared norm of a gradient averaged over b_small examples.
      sq_norm_big: |G_big|^2, squared norm of a gradient averaged over b_big examples.
      b_small: the small batch size.
      b_big: the big batch size (> b_small).

    Returns:
      ``(g2, trace)``: the estimates of |G|^2 and tr(Sigma).
    """
    if _concrete(b_small) and _concrete(b_big):
        if not (np.all(np.asarray(b_small) > 0) and np.all(np.asarray(b_big) > b_small)):
            raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small!r}, b_big={b_big!r}")
    g2 = (b_big * sq_norm_big - b_small * sq_norm_small) / (b_big - b_small)
    trace = (sq_norm_small - sq_norm_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


class NoiseScaleEMA(NamedTuple):
    """EMAs of the |G|^2 and tr(Sigma) estimates; ``decay_product`` = prod of decays so far."""

    g2: jax.Array
    trace: jax.Array
    decay_product: jax.Array


def noise_scale_ema_init() -> NoiseScaleEMA:
    """An empty ``NoiseScaleEMA`` (float32 zeros, decay product 1)."""
    zero = jnp.zeros((), jnp.float32)
    return NoiseScaleEMA(g2=zero, trace=zero, decay_product=jnp.ones((), jnp.float32))


def noise_scale_ema_debiased(state: NoiseScaleEMA) -> tuple[jax.Array, jax.Array]:
    """Bias-corrected EMAs ``(g2, trace)``: each divided by 1 - prod(decays)."""
    correction = 1.0 - state.decay_product
    return state.g2 / correction, state.trace / correction


def noise_scale_ema_update(
    state: NoiseScaleEMA, g2, trace, decay
) -> tuple[NoiseScaleEMA, jax.Array]:
    """Folds one (|G|^2, tr(Sigma)) estimate into the EMAs and returns B_simple.

    The single-step estimates are too noisy for their ratio, so the paper smooths numerator and
    denominator separately::

      ema_x <- decay * ema_x + (1 - decay) * x          for x in (|G|^2, tr(Sigma))
      x_hat  = ema_x / (1 - prod_t decay_t)              (bias correction, as in Adam)
      B_simple = trace_hat / g2_hat

    Jit-able; ``decay`` may change between calls (the correction uses the product of the decays
    actually applied). A Python-number ``decay`` is checked to lie in [0, 1).

    References:
      McCandlish, Kaplan, Amodei et al., 2018, "An Empirical Model of Large-Batch Training",
      Sec. 2 (B_simple = tr(Sigma) / |G|^2) and Appendix A.1 (EMA of both estimates).

    Args:
      state: the running ``NoiseScaleEMA``.
      g2: this step's |G|^2 estimate (``noise_scale_from_two_batches``).
      trace: this step's tr(Sigma) estimate.
      decay: EMA decay in [0, 1), e.g. 0.99.

    Returns:
      ``(new_state, b_simple)``, B_simple a float32 scalar.
    """
    _validate.check_decay("decay", decay)
    decay = jnp.asarray(decay, jnp.float32)
    new = NoiseScaleEMA(
        g2=decay * state.g2 + (1.0 - decay) * jnp.asarray(g2, jnp.float32),
        trace=decay * state.trace + (1.0 - decay) * jnp.asarray(trace, jnp.float32),
        decay_product=state.decay_product * decay,
    )
    g2_hat, trace_hat = noise_scale_ema_debiased(new)
    return new, trace_hat / g2_hat
