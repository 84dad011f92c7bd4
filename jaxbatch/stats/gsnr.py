"""Gradient signal-to-noise ratio (GSNR) per parameter."""

import jax
import jax.numpy as jnp


def gsnr(mean_grad, mean_sq_grad):
    """Per-parameter GSNR from the first two moments of the per-example gradient.

    For each parameter j, with g_ij the gradient of example i::

      mean_j = E_i[g_ij],   var_j = E_i[g_ij^2] - mean_j^2
      r_j    = mean_j^2 / var_j

    ``var_j`` is the population (ddof=0) variance over the examples the moments were taken over;
    it is clipped at 0 against round-off, so a parameter with zero variance gets +inf (or NaN if
    its mean is 0 as well).

    References:
      Liu et al., 2020, "Understanding Why Neural Networks Generalize Well Through GSNR of
      Parameters", Sec. 2 (definition of the GSNR r(theta_j)).

    Args:
      mean_grad: pytree of E[g] per parameter.
      mean_sq_grad: pytree (same structure) of E[g^2] per parameter.

    Returns:
      Pytree of r per parameter, same structure and shapes.
    """

    def leaf(m, m2):
        m = jnp.asarray(m)
        var = jnp.maximum(jnp.asarray(m2) - jnp.square(m), 0.0)
        return jnp.square(m) / var

    return jax.tree.map(leaf, mean_grad, mean_sq_grad)
