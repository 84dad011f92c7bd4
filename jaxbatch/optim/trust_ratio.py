"""Layer-wise trust ratio: scale each leaf's update by ||w|| / ||u||, per leaf or per stacked layer.

The shared core of LARS and LAMB. One reduction pass per leaf computes both squared norms in f32
(XLA fuses the two sibling reductions), then one elementwise pass scales the update; per-layer
ratios on stacked (``nn.scan``) leaves reduce over every axis except the layer axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxbatch import _validate
from jaxbatch.optim import _leaf_options

MaskOrFn = Any | Callable[[optax.Params], Any]


class TrustRatioState(NamedTuple):
    """State of :func:`scale_by_trust_ratio`.

    Attributes:
      ratios: a pytree with the structure of the params; each leaf is the f32 multiplier applied
        to that leaf at the last update: shape ``[]``, or ``[L]`` for a leaf with a layer axis of
        size L. Leaves outside the mask hold 1.0 (they pass through unscaled), and every leaf holds
        1.0 before the first update. Read them with ``optax.tree.get(opt_state, 'ratios')``.
    """

    ratios: optax.Params


def _reduce_axes(ndim: int, layer_axis: int | None) -> tuple[int, ...]:
    if layer_axis is None:
        return tuple(range(ndim))
    layer_axis %= ndim
    return tuple(a for a in range(ndim) if a != layer_axis)


def _sq_norm(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Sum of squares over ``axes`` in f32, keeping dims so the result broadcasts against x."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.sum(x * x, axis=axes, keepdims=True)


def trust_ratio(
    w_norm: jax.Array,
    u_norm: jax.Array,
    *,
    trust_coefficient: Any = 1.0,
    eps: Any = 0.0,
    weight_decay: Any = 0.0,
    min_ratio: Any = None,
    max_ratio: Any = None,
) -> jax.Array:
    """ratio = trust_coefficient·||w|| / (||u|| + weight_decay·||w|| + eps), 1 where a norm is 0.

    The result is then clipped to [min_ratio, max_ratio] (either bound may be None). Works
    elementwise on norms of any shape, so per-layer norms give per-layer ratios.

    References:
      You, Gitman, Ginsburg, 2017, "Large Batch Training of Convolutional Networks",
      Algorithm 1 (local LR).

    Args:
      w_norm: parameter norms ||w|| (f32).
      u_norm: update norms ||u|| (f32).
      trust_coefficient: eta in the paper.
      eps: added to the denominator.
      weight_decay: beta in the paper; adds beta·||w|| to the denominator.
      min_ratio: optional lower clip of the ratio.
      max_ratio: optional upper clip of the ratio.

    Returns:
      The ratios, same shape as the norms.
    """
    ratio = trust_coefficient * w_norm / (u_norm + weight_decay * w_norm + eps)
    ratio = jnp.where((w_norm == 0.0) | (u_norm == 0.0), jnp.ones_like(ratio), ratio)
    if min_ratio is not None or max_ratio is not None:
        ratio = jnp.clip(ratio, min_ratio, max_ratio)
    return ratio


def scale_by_trust_ratio(
    *,
    trust_coefficient: Any = 1.0,
    eps: Any = 0.0,
    weight_decay: Any = 0.0,
    min_ratio: Any = None,
    max_ratio: Any = None,
    mask: MaskOrFn = None,
    layer_axes: Any = None,
    weight_decay_mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """Scales each leaf's update by its layer-wise trust ratio (LARS/LAMB style).

    For every leaf in ``mask`` (per layer slice when ``layer_axes`` names a stacked-layer axis)::

        ratio = trust_coefficient·||w|| / (||u|| + weight_decay·||w|| + eps)
        ratio = 1                      where ||w|| = 0 or ||u|| = 0
        ratio = clip(ratio, min_ratio, max_ratio)
        out   = ratio · (u + weight_decay·w)

    With ``weight_decay = 0`` this is ``out = ratio·u`` (the LAMB form, where the decay is added
    to ``u`` before this transform). With ``weight_decay > 0`` it is the LARS form: the decay term
    is scaled together with the update, and its norm bound ``weight_decay·||w||`` enters the
    denominator. Leaves outside ``mask`` pass through unchanged, except that they still receive
    ``+ weight_decay·w`` if an explicit ``weight_decay_mask`` selects them. Norms are computed in
    f32 for every dtype; the output has the update's dtype.

    References:
      You, Gitman, Ginsburg, 2017, "Large Batch Training of Convolutional Networks",
      Algorithm 1; You et al., 2019, "Large Batch Optimization for Deep Learning: Training BERT
      in 76 minutes", Algorithm 2 (the ratio phi(||x||)/||r + lambda·x||).

    Args:
      trust_coefficient: multiplier of the ratio (eta; >= 0).
      eps: added to the denominator (>= 0).
      weight_decay: decay coefficient beta (>= 0), see above.
      min_ratio: optional lower clip of the ratio (>= 0).
      max_ratio: optional upper clip of the ratio (>= min_ratio).
      mask: pytree of Python bools with the structure of the params (or a prefix of it), or a
        callable ``params -> such a pytree``; True leaves get a ratio. None: every leaf.
      layer_axes: pytree of ``int | None`` (or a callable ``params -> pytree``, or a prefix
        tree); an int names the stacked-layer axis of that leaf, and each slice along it gets its
        own ratio (norms reduce over every other axis). None: one ratio per leaf.
      weight_decay_mask: like ``mask``; the leaves that receive ``weight_decay·w``. None: the same
        leaves as ``mask``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`TrustRatioState`. ``update``
      requires ``params``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from jaxbatch import optim
      >>> params = {'w': jnp.ones((2, 3)), 'b': jnp.zeros(3)}
      >>> tx = optim.scale_by_trust_ratio(mask={'w': True, 'b': False})
      >>> state = tx.init(params)
      >>> u, state = tx.update({'w': jnp.full((2, 3), 2.0), 'b': jnp.ones(3)}, state, params)
      >>> float(state.ratios['w'])  # ||w|| / ||u|| = sqrt(6) / sqrt(24)
      0.5
    """
    return _trust_ratio_transform(
        trust_coefficient=trust_coefficient,
        eps=eps,
        weight_decay=weight_decay,
        min_ratio=min_ratio,
        max_ratio=max_ratio,
        mask=mask,
        layer_axes=layer_axes,
        weight_decay_mask=weight_decay_mask,
        mask_name="mask",
    )


def _check_ratio_bounds(min_ratio: Any, max_ratio: Any) -> None:
    """Checks optional trust-ratio clip bounds: each >= 0 and min_ratio <= max_ratio."""
    _validate.check_non_negative("min_ratio", min_ratio)
    _validate.check_non_negative("max_ratio", max_ratio)
    lo, hi = _validate.concrete_float(min_ratio), _validate.concrete_float(max_ratio)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(
            f"min_ratio must be <= max_ratio, got min_ratio={min_ratio!r} > max_ratio={max_ratio!r}"
        )


def _trust_ratio_transform(
    *,
    trust_coefficient,
    eps,
    weight_decay,
    min_ratio,
    max_ratio,
    mask,
    layer_axes,
    weight_decay_mask,
    mask_name,
):
    """:func:`scale_by_trust_ratio`, with the name its caller gives ``mask`` in error messages."""
    _validate.check_non_negative("trust_coefficient", trust_coefficient)
    _validate.check_non_negative("eps", eps)
    _validate.check_non_negative("weight_decay", weight_decay)
    _check_ratio_bounds(min_ratio, max_ratio)

    def leaf_plan(params):
        """Static per-leaf (apply_ratio, apply_decay, layer_axis), checked against params."""
        use_ratio = _leaf_options.leaf_options(
            mask_name,
            mask,
            params,
            default=True,
            check_leaf=_leaf_options.check_mask_leaf(mask_name),
        )
        if weight_decay_mask is None:
            use_decay = use_ratio
        else:
            use_decay = _leaf_options.leaf_options(
                "weight_decay_mask",
                weight_decay_mask,
                params,
                default=True,
                check_leaf=_leaf_options.check_mask_leaf("weight_decay_mask"),
            )
        axes = _leaf_options.leaf_options(
            "layer_axes",
            layer_axes,
            params,
            default=None,
            check_leaf=_leaf_options.check_layer_axis_leaf,
        )
        return list(zip(use_ratio, use_decay, axes, strict=True))

    def ratio_shape(leaf, axis):
        return () if axis is None else (leaf.shape[axis],)

    def init_fn(params):
        plan = leaf_plan(params)
        leaves, treedef = jax.tree.flatten(params)
        ratios = [
            jnp.ones(ratio_shape(p, axis), jnp.float32)
            for p, (_, _, axis) in zip(leaves, plan, strict=True)
        ]
        return TrustRatioState(ratios=jax.tree.unflatten(treedef, ratios))

    def update_fn(updates, state, params=None):
        _validate.require_params(params, "scale_by_trust_ratio")
        plan = leaf_plan(params)
        u_leaves, treedef = jax.tree.flatten(updates)
        w_leaves = treedef.flatten_up_to(params)
        out, ratios = [], []
        for u, w, (use_ratio, use_decay, axis) in zip(u_leaves, w_leaves, plan, strict=True):
            new_u, ratio = _scale_leaf(
                u,
                w,
                use_ratio=use_ratio,
                use_decay=use_decay,
                axis=axis,
                trust_coefficient=trust_coefficient,
                eps=eps,
                weight_decay=weight_decay,
                min_ratio=min_ratio,
                max_ratio=max_ratio,
            )
            out.append(new_u)
            ratios.append(ratio)
        del state
        return treedef.unflatten(out), TrustRatioState(ratios=treedef.unflatten(ratios))

    return optax.GradientTransformation(init_fn, update_fn)


def _scale_leaf(u, w, *, use_ratio, use_decay, axis, **hyper):
    """Returns (scaled update in u.dtype, f32 ratio of shape [] or [L]) for one leaf."""
    ratio_shape = () if axis is None else (u.shape[axis],)
    compute_dtype = jnp.promote_types(u.dtype, jnp.float32)
    decay = hyper["weight_decay"]
    # A constant zero decay adds nothing; skipping it saves a read of w on unmasked leaves.
    use_decay = use_decay and not (isinstance(decay, int | float) and decay == 0)
    decay = decay if use_decay else 0.0
    if not use_ratio:
        if not use_decay:
            return u, jnp.ones(ratio_shape, jnp.float32)
        new_u = u.astype(compute_dtype) + decay * w.astype(compute_dtype)
        return new_u.astype(u.dtype), jnp.ones(ratio_shape, jnp.float32)
    axes = _reduce_axes(u.ndim, axis)
    w_norm = jnp.sqrt(_sq_norm(w, axes))
    u_norm = jnp.sqrt(_sq_norm(u, axes))
    ratio = trust_ratio(
        w_norm,
        u_norm,
        trust_coefficient=hyper["trust_coefficient"],
        eps=hyper["eps"],
        weight_decay=decay,
        min_ratio=hyper["min_ratio"],
        max_ratio=hyper["max_ratio"],
    )
    direction = u.astype(compute_dtype)
    if use_decay:
        direction = direction + decay * w.astype(compute_dtype)
    new_u = (direction * ratio.astype(compute_dtype)).astype(u.dtype)
    return new_u, ratio.astype(jnp.float32).reshape(ratio_shape)
