"""LAMB: Adam directions rescaled by a layer-wise trust ratio, with masks, clipping, layer axes."""

from __future__ import annotations

import functools
from typing import Any

import optax

from jaxbatch import _validate
from jaxbatch.optim import _leaf_options
from jaxbatch.optim.trust_ratio import MaskOrFn, _trust_ratio_transform


def lamb(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-6,
    eps_root: Any = 0.0,
    weight_decay: Any = 0.0,
    weight_decay_mask: MaskOrFn = None,
    trust_ratio_mask: MaskOrFn = None,
    min_ratio: Any = None,
    max_ratio: Any = None,
    layer_axes: Any = None,
    mu_dtype: Any = None,
    trust_coefficient: Any = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """Layer-wise Adaptive Moments for Batch training (You et al. 2019).

    For every leaf (every layer slice when ``layer_axes`` is given), at step t = 1, 2, ...::

        m = b1·m + (1 - b1)·g;   v = b2·v + (1 - b2)·g²
        r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t) + eps_root) + eps)
        u = r + weight_decay·w                      (leaves in weight_decay_mask)
        ratio = trust_coefficient·||w|| / ||u||    (1 where a norm is 0; leaves in
                                                    trust_ratio_mask, else 1), clipped to
                                                    [min_ratio, max_ratio]
        update = -learning_rate·ratio·u

    With the masks, clips and layer axes left at None and ``trust_coefficient = 1`` this computes
    what ``optax.lamb`` computes (the same chain: ``scale_by_adam`` → ``add_decayed_weights`` →
    trust ratio → ``scale_by_learning_rate``). optax.lamb's ``mask`` argument is a weight-decay
    mask only (its trust ratio covers every leaf); it corresponds to ``weight_decay_mask`` here.
    The trust ratios are in the state (``optax.tree.get(opt_state, 'ratios')``).

    References:
      You et al., 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
      minutes", Algorithm 2 (LAMB), with phi(z) = trust_coefficient·z.

    Args:
      learning_rate: eta (>= 0), a float or an optax schedule.
      b1: first-moment decay in [0, 1).
      b2: second-moment decay in [0, 1).
      eps: added to sqrt(v_hat) (>= 0).
      eps_root: added to v_hat inside the square root (>= 0).
      weight_decay: lambda (>= 0), decoupled decay added before the trust ratio.
      weight_decay_mask: bool pytree/prefix/callable of the leaves that get decay; None: all.
      trust_ratio_mask: bool pytree/prefix/callable of the leaves that get a trust ratio; None:
        all. Pass callables through ``optax.inject_hyperparams(..., static_args=...)``.
      min_ratio: optional lower clip of the ratio.
      max_ratio: optional upper clip of the ratio.
      layer_axes: per-leaf stacked-layer axis (see :func:`scale_by_trust_ratio`).
      mu_dtype: dtype of the first moment; None: that of the updates.
      trust_coefficient: phi's slope (>= 0); 1 in the paper.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``params``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from jaxbatch import optim
      >>> params = {'w': jnp.ones((4, 4)), 'b': jnp.zeros(4)}
      >>> tx = optim.lamb(1e-3, weight_decay=0.01,
      ...                 weight_decay_mask=optim.masks.exclude_bias_and_norm,
      ...                 trust_ratio_mask=optim.masks.exclude_bias_and_norm, max_ratio=10.0)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({'w': jnp.ones((4, 4)), 'b': jnp.ones(4)}, state, params)
    """
    _validate.check_non_negative("learning_rate", learning_rate)
    _validate.check_decay("b1", b1)
    _validate.check_decay("b2", b2)
    _validate.check_non_negative("eps", eps)
    _validate.check_non_negative("eps_root", eps_root)
    _validate.check_non_negative("weight_decay", weight_decay)
    decay_mask = None
    if weight_decay_mask is not None:
        decay_mask = functools.partial(
            _leaf_options.mask_tree, "weight_decay_mask", weight_decay_mask
        )
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        _trust_ratio_transform(
            trust_coefficient=trust_coefficient,
            min_ratio=min_ratio,
            max_ratio=max_ratio,
            mask=trust_ratio_mask,
            mask_name="trust_ratio_mask",
            layer_axes=layer_axes,
            eps=0.0,
            weight_decay=0.0,
            weight_decay_mask=None,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
