"""VRGD: gradients scaled element-wise by their normalised gradient signal-to-noise ratio.

How the k small gradients reach the transform: ``vrgd`` reads their element-wise mean (the
gradient it is given) and their element-wise mean of squares, passed as the extra argument
``grad_sq_mean``. Two sources provide it:

- ``accumulate_with_moments(vrgd(inner), k)``: ``optim.accumulate`` over k micro-batches that also
  averages g_j^2 (one more f32 accumulator of the parameters' size) and hands it to ``vrgd``; its
  state is an ``AccumulateState``, so a trainer reads ``noise`` and ``aux`` as before.
- a data-parallel step that has the per-device gradients (e.g. in a ``shard_map`` before the mean
  over the batch axes) passes ``grad_sq_mean = pmean(g_device^2)`` to ``vrgd``'s update itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxbatch import _validate
from jaxbatch.optim import _leaf_options
from jaxbatch.optim.accumulate import AccumulateState, accumulate, inner_with_extra_args

# r is capped here before its mean is taken, so that the mean of a layer of 10^12 elements stays
# finite in f32 even where a variance underflows to 0.
_MAX_GSNR = 1e20
_SCOPES = ("layer", "global")


class VRGDState(NamedTuple):
    """State of :func:`vrgd`.

    Attributes:
      inner_state: the inner optimizer's state.
      clipped_fraction: pytree with the structure of the params; per leaf the f32 fraction of its
        elements whose normalised GSNR hit a bound at the last update (0 for leaves outside the
        mask, and before the first update). For logging.
    """

    inner_state: optax.OptState
    clipped_fraction: optax.Params


def gsnr_multipliers(
    mean_grad,
    mean_sq_grad,
    *,
    scope: str = "layer",
    min_ratio: float = 0.9,
    max_ratio: float = 1.1,
    layer_axes: Any = None,
    mask: Any = None,
    eps: float = 1e-30,
):
    """The VRGD multiplier of every gradient element, and the fraction clipped per leaf.

    For each element j, from the k small gradients g_1..g_k (``mean_grad`` = (1/k) sum_i g_i,
    ``mean_sq_grad`` = (1/k) sum_i g_i^2)::

      var_j = max(mean_sq_j - mean_j^2, 0)                       (population variance over k)
      r_j   = min(mean_j^2 / (var_j + eps), 1e20)                (GSNR)
      r_j  <- r_j / mean_{l in S(j)} r_l                         (1 where that mean is 0)
      r_j  <- clip(r_j, min_ratio, max_ratio)

    with S(j) the elements of j's leaf (``scope='layer'``; of j's layer slice when ``layer_axes``
    names a stacked-layer axis) or of every masked leaf (``scope='global'``). The variance's
    normalisation (k or k - 1, the 1/B_small of a mean over examples) cancels in the ratio to the
    mean, so the result does not depend on it. Leaves outside ``mask`` get multiplier 1.

    References:
      Jiang, Liu, Ding, Guo, Lin, 2023, "Accelerating Large Batch Training via Gradient Signal to
      Noise Ratio (GSNR)", Sec. 3 and Algorithm 1 (GSNR over the devices' gradients, normalised
      by its mean within each layer, bounded to [1 - gamma, 1 + gamma]); the GSNR definition
      r = E[g]^2 / Var[g] from Liu et al., 2020.

    Args:
      mean_grad: pytree, the mean of the k small gradients.
      mean_sq_grad: pytree of the same structure, the mean of their element-wise squares.
      scope: 'layer' or 'global', the set the GSNR is normalised over.
      min_ratio: lower bound of the normalised GSNR.
      max_ratio: upper bound (>= min_ratio).
      layer_axes: per-leaf stacked-layer axis (``int | None`` pytree, prefix or callable), as in
        :func:`jaxbatch.optim.scale_by_trust_ratio`; only with ``scope='layer'``.
      mask: pytree of Python bools (prefix or callable); False leaves are left unscaled.
      eps: added to the variance (>= 0).

    Returns:
      ``(multipliers, clipped_fraction)``: f32 pytrees shaped like ``mean_grad`` and with one
      scalar per leaf.
    """
    _check_options(scope, min_ratio, max_ratio, eps, layer_axes)
    leaves, treedef = jax.tree.flatten(mean_grad)
    sq_leaves = treedef.flatten_up_to(mean_sq_grad)
    use, axes = _plan(mean_grad, mask, layer_axes)
    ratios = []
    for m, m2, on in zip(leaves, sq_leaves, use, strict=True):
        if not on:
            ratios.append(None)
            continue
        m = jnp.asarray(m, jnp.float32)
        var = jnp.maximum(jnp.asarray(m2, jnp.float32) - jnp.square(m), 0.0)
        ratios.append(jnp.minimum(jnp.square(m) / (var + eps), _MAX_GSNR))

    if scope == "global":
        on_leaves = [r for r in ratios if r is not None]
        total = sum((jnp.sum(r) for r in on_leaves), jnp.zeros((), jnp.float32))
        count = sum(r.size for r in on_leaves)
        scales = [None if r is None else total / max(count, 1) for r in ratios]
    else:
        scales = [
            None if r is None else jnp.mean(r, axis=_reduce_axes(r.ndim, a), keepdims=True)
            for r, a in zip(ratios, axes, strict=True)
        ]

    multipliers, clipped = [], []
    for leaf, r, scale in zip(leaves, ratios, scales, strict=True):
        if r is None:
            multipliers.append(jnp.ones(jnp.shape(leaf), jnp.float32))
            clipped.append(jnp.zeros((), jnp.float32))
            continue
        normalised = jnp.where(scale > 0, r / jnp.where(scale > 0, scale, 1.0), 1.0)
        bounded = jnp.clip(normalised, min_ratio, max_ratio)
        multipliers.append(bounded)
        hit = (normalised <= min_ratio) | (normalised >= max_ratio)
        clipped.append(jnp.mean(hit.astype(jnp.float32)) if hit.size else jnp.zeros(()))
    return treedef.unflatten(multipliers), treedef.unflatten(clipped)


def vrgd(
    inner: optax.GradientTransformation,
    *,
    gamma: float = 0.1,
    min_ratio: float | None = None,
    max_ratio: float | None = None,
    scope: str = "layer",
    layer_axes: Any = None,
    mask: Any = None,
    eps: float = 1e-30,
) -> optax.GradientTransformationExtraArgs:
    """VRGD around any optimizer: the gradient times its bounded, normalised GSNR, then ``inner``.

    ``update(g, state, params, grad_sq_mean=m2)`` with g the mean of k small gradients (micro-
    batches or devices) and m2 the mean of their squares computes::

      g' = gsnr_multipliers(g, m2) * g            (element-wise; see gsnr_multipliers)
      updates, inner_state = inner.update(g', inner_state, params)

    Elements whose gradient is consistent across the k small batches (high GSNR) take larger steps
    than the layer average, noisy ones smaller, within [min_ratio, max_ratio]. The paper applies
    this to SGD, Adam, LARS and LAMB (VR-SGD, VR-Adam, VR-LARS, VR-LAMB); any optax optimizer
    works as ``inner``. Put ``vrgd`` before transforms that change the gradient (clipping), since
    ``grad_sq_mean`` describes the gradient as averaged.

    Bounds: the paper bounds the normalised GSNR to [1 - gamma, 1 + gamma] (as recalled: only
    the paper's abstract could be checked here, not its Algorithm 1, so the form of the bound
    and the default are unverified); ``gamma=0.1`` (the default) keeps every element within
    10 % of its plain step, which keeps the inner optimizer's tuned learning rate valid.
    ``min_ratio``/``max_ratio`` override either end (e.g. (0, 2) for a looser bound).

    References:
      Jiang, Liu, Ding, Guo, Lin, 2023, "Accelerating Large Batch Training via Gradient Signal to
      Noise Ratio (GSNR)", Algorithm 1 (VR-SGD) and its VR-Adam/VR-LARS/VR-LAMB variants.

    Args:
      inner: the optimizer that receives the scaled gradient.
      gamma: half-width of the default bounds [1 - gamma, 1 + gamma] (>= 0).
      min_ratio: lower bound (default 1 - gamma, clipped at 0).
      max_ratio: upper bound (default 1 + gamma).
      scope: 'layer' (normalise within each leaf, or each layer slice with ``layer_axes``) or
        'global' (over every masked element of the model).
      layer_axes: see :func:`gsnr_multipliers`.
      mask: leaves to scale (Python-bool pytree, prefix or callable); None: all.
      eps: added to the variance.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`VRGDState`; ``update``
      requires ``grad_sq_mean=`` (see the module docstring for where it comes from).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> tx = vrgd(optax.sgd(0.1))
      >>> params = {'w': jnp.zeros(3)}
      >>> state = tx.init(params)
      >>> g, g2 = {'w': jnp.array([1.0, 1.0, 0.1])}, {'w': jnp.array([1.01, 2.0, 0.02])}
      >>> updates, state = tx.update(g, state, params, grad_sq_mean=g2)
      >>> [round(float(x), 3) for x in updates['w']]  # element 0 is the consistent one
      [-0.11, -0.09, -0.009]
    """
    _validate.check_non_negative("gamma", gamma)
    if min_ratio is None:
        min_ratio = max(1.0 - gamma, 0.0)
    if max_ratio is None:
        max_ratio = 1.0 + gamma
    _check_options(scope, min_ratio, max_ratio, eps, layer_axes)
    inner = inner_with_extra_args(inner)

    def init_fn(params):
        _plan(params, mask, layer_axes)  # fail on a bad mask/layer_axes at init, before a trace
        clipped = jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params)
        return VRGDState(inner.init(params), clipped)

    def update_fn(updates, state, params=None, *, grad_sq_mean=None, **extra_args):
        if grad_sq_mean is None:
            raise ValueError(
                "vrgd needs grad_sq_mean=, the element-wise mean of the squared small gradients: "
                "wrap it as optim.accumulate_with_moments(vrgd(...), micro_batches) or pass the "
                "mean of the per-device squared gradients"
            )
        if jax.tree.structure(grad_sq_mean) != jax.tree.structure(updates):
            raise ValueError(
                f"grad_sq_mean has structure {jax.tree.structure(grad_sq_mean)}, expected the "
                f"gradient's {jax.tree.structure(updates)}"
            )
        multipliers, clipped = gsnr_multipliers(
            updates,
            grad_sq_mean,
            scope=scope,
            min_ratio=min_ratio,
            max_ratio=max_ratio,
            layer_axes=layer_axes,
            mask=mask,
            eps=eps,
        )
        scaled = jax.tree.map(
            lambda g, r: (jnp.asarray(g, jnp.float32) * r).astype(jnp.result_type(g)),
            updates,
            multipliers,
        )
        new_updates, inner_state = inner.update(scaled, state.inner_state, params, **extra_args)
        return new_updates, VRGDState(inner_state, clipped)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def accumulate_with_moments(
    inner: optax.GradientTransformation,
    micro_batches: int,
    *,
    accumulator_dtype: jnp.dtype = jnp.float32,
    aux_shapes: Any = None,
    noise_groups: int = 1,
    group_axis_name: str | tuple[str, ...] | None = None,
    constrain_group_grads: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``optim.accumulate`` that also hands ``inner`` the mean of the squared micro-gradients.

    Same contract, state (``AccumulateState``) and micro-batch split as ``optim.accumulate``; in
    addition ``inner.update`` receives ``grad_sq_mean = (1/k) sum_j g_j ** 2`` (element-wise,
    ``accumulator_dtype``), which :func:`vrgd` needs. It is averaged by ``accumulate``'s own aux
    accumulator (one more buffer of the parameters' size in the scan carry). Called without
    ``grad_fn`` the gradients pass to ``inner`` as in ``accumulate``, and ``grad_sq_mean`` must
    then come from the caller's extra arguments.

    With ``noise_groups=G`` (``optim.accumulate``'s noise groups: G gradients per micro-batch,
    side by side, e.g. the per-replica gradients of data parallelism), the small gradients are
    the k·G group gradients and ``grad_sq_mean`` is the mean of their squares: the paper's
    setting, where the GSNR comes from the devices' gradients (Jiang et al. 2023, Sec. 3).

    Args:
      inner: typically ``vrgd(optimizer)``; it must accept ``grad_sq_mean=``.
      micro_batches: k >= 1, with k·G >= 2 (one gradient has no variance).
      accumulator_dtype: as in ``optim.accumulate``.
      aux_shapes: as in ``optim.accumulate``.
      noise_groups: G, as in ``optim.accumulate``.
      group_axis_name: as in ``optim.accumulate``.
      constrain_group_grads: as in ``optim.accumulate``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}")
    if isinstance(noise_groups, bool) or not isinstance(noise_groups, int) or noise_groups < 1:
        raise ValueError(f"noise_groups must be a positive int, got {noise_groups!r}")
    if micro_batches * noise_groups < 2:
        raise ValueError(
            f"accumulate_with_moments needs micro_batches x noise_groups >= 2 small gradients "
            f"(the variance of one gradient is 0), got micro_batches={micro_batches!r}, "
            f"noise_groups={noise_groups!r}"
        )
    inner = inner_with_extra_args(inner)
    acc_dtype = jnp.dtype(accumulator_dtype)
    plain = accumulate(inner, micro_batches, accumulator_dtype=acc_dtype, aux_shapes=aux_shapes)

    def update_fn(
        updates,
        state,
        params=None,
        *,
        grad_fn: Callable | None = None,
        batch=None,
        rng=None,
        **extra_args,
    ):
        if grad_fn is None:
            return plain.update(updates, state, params, batch=batch, rng=rng, **extra_args)
        if params is None:
            raise ValueError("accumulate_with_moments with grad_fn= needs params")
        sq_shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p), acc_dtype), params)
        moments = accumulate(
            optax.identity(),
            micro_batches,
            accumulator_dtype=acc_dtype,
            aux_shapes={"aux": aux_shapes, "grad_sq": sq_shapes},
            noise_groups=noise_groups,
            group_axis_name=group_axis_name,
            constrain_group_grads=constrain_group_grads,
        )

        def with_squares(p, micro_batch, *rng_j):
            grads, aux = grad_fn(p, micro_batch, *rng_j)
            squares = jax.tree.map(lambda g: jnp.square(g.astype(acc_dtype)), grads)
            return grads, {"aux": aux, "grad_sq": squares}

        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sq_shapes)
        moment_state = AccumulateState(
            optax.EmptyState(), state.noise, {"aux": state.aux, "grad_sq": zeros}
        )
        mean, moment_state = moments.update(
            None, moment_state, params, grad_fn=with_squares, batch=batch, rng=rng
        )
        new_updates, inner_state = inner.update(
            mean,
            state.inner_state,
            params,
            grad_sq_mean=moment_state.aux["grad_sq"],
            **extra_args,
        )
        return new_updates, AccumulateState(
            inner_state, moment_state.noise, moment_state.aux["aux"]
        )

    return optax.GradientTransformationExtraArgs(plain.init, update_fn)


def _reduce_axes(ndim: int, layer_axis: int | None) -> tuple[int, ...]:
    if layer_axis is None:
        return tuple(range(ndim))
    layer_axis %= ndim
    return tuple(a for a in range(ndim) if a != layer_axis)


def _plan(tree, mask, layer_axes) -> tuple[list[bool], list[int | None]]:
    use = _leaf_options.leaf_options(
        "mask", mask, tree, default=True, check_leaf=_leaf_options.check_mask_leaf("mask")
    )
    axes = _leaf_options.leaf_options(
        "layer_axes",
        layer_axes,
        tree,
        default=None,
        check_leaf=_leaf_options.check_layer_axis_leaf,
    )
    return use, axes


def _check_options(scope, min_ratio, max_ratio, eps, layer_axes) -> None:
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
    if scope == "global" and layer_axes is not None:
        raise ValueError("layer_axes applies to scope='layer' only; got scope='global'")
    _validate.check_non_negative("min_ratio", min_ratio)
    _validate.check_positive("max_ratio", max_ratio)
    _validate.check_non_negative("eps", eps)
    lo, hi = _validate.concrete_float(min_ratio), _validate.concrete_float(max_ratio)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(
            f"min_ratio must be <= max_ratio, got min_ratio={min_ratio!r} > max_ratio={max_ratio!r}"
        )
