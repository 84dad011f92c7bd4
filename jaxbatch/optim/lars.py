"""LARS: SGD with momentum and a layer-wise local learning rate, in the paper's form."""

from __future__ import annotations

from typing import Any

import optax

from jaxbatch import _validate
from jaxbatch.optim.trust_ratio import MaskOrFn, _trust_ratio_transform


def lars(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: Any = 0.9,
    weight_decay: Any = 0.0,
    trust_coefficient: Any = 0.001,
    eps: Any = 0.0,
    nesterov: bool = False,
    weight_decay_mask: MaskOrFn = None,
    trust_ratio_mask: MaskOrFn = None,
    min_ratio: Any = None,
    max_ratio: Any = None,
    layer_axes: Any = None,
    momentum_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg 2017), as written in the paper.

    For every leaf (every layer slice when ``layer_axes`` is given)::

        local_lr = trust_coefficient·||w|| / (||g|| + weight_decay·||w|| + eps)
        local_lr = 1                       where ||w|| = 0 or ||g|| = 0
        v        = momentum·v + learning_rate·local_lr·(g + weight_decay·w)
        update   = -v                      (the caller applies w <- w + update)

    ``nesterov=True`` returns ``-(momentum·v + learning_rate·local_lr·(g + weight_decay·w))``
    with the new v, as ``optax.trace(nesterov=True)`` does. Leaves outside ``trust_ratio_mask``
    use ``local_lr = 1``; leaves outside ``weight_decay_mask`` get no decay (and no decay term in
    the denominator). ``local_lr`` may be clipped to [min_ratio, max_ratio].

    Differences from ``optax.lars``: optax adds the decay first and normalises by the norm of the
    sum, ``local_lr = trust_coefficient·||w|| / (||g + weight_decay·w|| + eps)``; here the
    denominator is the paper's ``||g|| + weight_decay·||w||``. Both multiply by the learning rate
    before the momentum trace, so with ``weight_decay = 0`` (or where a leaf is outside the decay
    mask) the two coincide. optax's masks default to True everywhere, as ours do when None.

    This is ``optax.chain(scale_by_trust_ratio(...), optax.scale_by_learning_rate(lr),
    optax.trace(momentum, nesterov))``; the local learning rates are in the state of the first
    element (``optax.tree.get(opt_state, 'ratios')``).

    References:
      You, Gitman, Ginsburg, 2017, "Large Batch Training of Convolutional Networks",
      Algorithm 1 (LARS) and equation (6) with weight decay.

    Args:
      learning_rate: global learning rate gamma (>= 0), a float or an optax schedule.
      momentum: momentum m in [0, 1).
      weight_decay: beta (>= 0).
      trust_coefficient: eta (>= 0).
      eps: added to the local-LR denominator (>= 0).
      nesterov: use Nesterov momentum (as in ``optax.trace``).
      weight_decay_mask: bool pytree/prefix/callable of the leaves that get decay; None: all.
      trust_ratio_mask: bool pytree/prefix/callable of the leaves that get a local LR; None: all.
        Pass callables through ``optax.inject_hyperparams(..., static_args=...)``, which
        otherwise treats callables as schedules.
      min_ratio: optional lower clip of local_lr.
      max_ratio: optional upper clip of local_lr.
      layer_axes: per-leaf stacked-layer axis (see :func:`scale_by_trust_ratio`).
      momentum_dtype: dtype of the momentum buffer; None: that of the updates.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``params``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from jaxbatch import optim
      >>> params = {'w': jnp.ones((4, 4)), 'b': jnp.zeros(4)}
      >>> tx = optim.lars(1.0, weight_decay=1e-4,
      ...                 weight_decay_mask=optim.masks.exclude_bias_and_norm,
      ...                 trust_ratio_mask=optim.masks.exclude_bias_and_norm)
      >>> state = tx.init(params)
      >>> grads = {'w': jnp.ones((4, 4)), 'b': jnp.ones(4)}
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
    """
    _validate.check_non_negative("learning_rate", learning_rate)
    _validate.check_decay("momentum", momentum)
    return optax.chain(
        _trust_ratio_transform(
            trust_coefficient=trust_coefficient,
            eps=eps,
            weight_decay=weight_decay,
            min_ratio=min_ratio,
            max_ratio=max_ratio,
            mask=trust_ratio_mask,
            mask_name="trust_ratio_mask",
            layer_axes=layer_axes,
            weight_decay_mask=True if weight_decay_mask is None else weight_decay_mask,
        ),
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=momentum_dtype),
    )
