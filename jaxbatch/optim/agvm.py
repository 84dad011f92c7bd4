"""AGVM: per-module learning-rate scales from the agreement of two half-batch gradients.

How the two half-batch gradients reach the transform: ``agvm``'s update takes them as the extra
argument ``half_grads=(g_a, g_b)`` (the gradient it is given is their mean). Two sources:

- ``accumulate_halves(agvm(inner, groups=...), k)``: ``optim.accumulate`` run over each half of
  the k micro-batches (k even, or k = 1: the batch is then split into two halves of B/2), so the
  step computes g_a, g_b and g = (g_a + g_b) / 2 with the same work as one accumulation and one
  more gradient buffer; its state is an ``AccumulateState`` as ``optim.accumulate``'s is.
- a data-parallel step that reduces the gradient over each half of the data axis first (what the
  authors' code does with two process groups) passes those two means itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxbatch import _validate
from jaxbatch.optim.accumulate import (
    AccumulateState,
    GradNoiseStats,
    accumulate,
    inner_with_extra_args,
)
from jaxbatch.optim.masks import param_path

_PHI_EPS = 1e-6  # in mu = sqrt(clip((Phi_ref + 1e-6) / (Phi_i + 1e-6), ...)), as the paper


class AGVMState(NamedTuple):
    """State of :func:`agvm`.

    Attributes:
      inner_state: the inner optimizer's state.
      mu: f32 [G], the current learning-rate scale of each group (1 at the start).
      phi: f32 [G], Phi_i = 1 - cos(g_a,i, g_b,i) at the last step that measured it (0 before).
      count: int32 [], updates taken so far (the step index t of the next update).
    """

    inner_state: optax.OptState
    mu: jax.Array
    phi: jax.Array
    count: jax.Array


def _group_rules(groups) -> list[tuple[str, re.Pattern]]:
    items = list(groups.items()) if isinstance(groups, Mapping) else list(groups)
    if not items:
        raise ValueError("agvm needs at least one group, got groups=" + repr(groups))
    rules, seen = [], set()
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(
                f"agvm groups must be {{name: regex}} or [(name, regex), ...], got entry {item!r}"
            )
        name, pattern = item
        if name in seen:
            raise ValueError(f"agvm group {name!r} is given twice")
        seen.add(name)
        try:
            rules.append((name, re.compile(pattern)))
        except (re.error, TypeError) as e:
            raise ValueError(f"agvm group {name!r}: pattern {pattern!r} is not a regex: {e}") from e
    return rules


def group_of_each_leaf(tree, groups) -> list[int]:
    """The group index of every leaf of ``tree`` (first group whose regex fullmatches its path).

    Paths are ``optim.masks.param_path`` names such as ``'backbone/conv1/kernel'``. Raises
    ValueError naming every group that matches no leaf and every leaf that no group matches.
    """
    rules = _group_rules(groups)
    paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    index, unmatched = [], []
    for path in paths:
        hit = next((i for i, (_, regex) in enumerate(rules) if regex.fullmatch(path)), None)
        (unmatched.append(path) if hit is None else index.append(hit))
    empty = [name for i, (name, _) in enumerate(rules) if i not in index]
    problems = []
    if empty:
        patterns = {name: regex.pattern for name, regex in rules if name in empty}
        problems.append(f"agvm groups {empty} match no parameter (patterns {patterns})")
    if unmatched:
        more = f" (and {len(unmatched) - 10} more)" if len(unmatched) > 10 else ""
        problems.append(
            f"parameters {unmatched[:10]}{more} match no agvm group; add a catch-all group such "
            "as ('rest', '.*') last"
        )
    if problems:
        known = paths[:8] + (["..."] if len(paths) > 8 else [])
        raise ValueError("; ".join(problems) + f". Parameter paths look like {known}")
    return index


def agvm(
    inner: optax.GradientTransformation,
    groups: Mapping[str, str] | Sequence[tuple[str, str]],
    *,
    reference: str | None = None,
    momentum: float = 0.97,
    interval: int = 10,
    start_step: int = 0,
    stop_step: int | None = None,
    min_ratio: float = 0.5,
    max_ratio: float = 10.0,
    cos_eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """Adaptive Gradient Variance Modulator around any optimizer: one learning-rate scale per group.

    At update t (0-based), with g_a, g_b two gradients of independent halves of the batch and
    g_{a,i} the concatenation of g_a over the leaves of group i::

      Phi_i  = 1 - cos(g_a,i, g_b,i)                       (gradient variance of group i)
      mu'_i  = sqrt(clip((Phi_ref + 1e-6) / (Phi_i + 1e-6), min_ratio, max_ratio))
      mu_i  <- momentum * mu_i + (1 - momentum) * mu'_i     when start <= t <= stop, t % n == 0
      updates_i = mu_i * inner_updates_i                   when start <= t <= stop, else 1 *

    mu starts at 1 and the reference group's mu'_ref is 1. Scaling the inner optimizer's update
    of a group is scaling its learning rate (for SGD with momentum, Adam, LARS and LAMB the
    learning rate multiplies the whole update, weight decay included, as in the authors' PyTorch
    hook). ``start_step`` is the paper's warm-up: start after the learning-rate warm-up. The
    cosine uses raw gradients, the authors' SGD path (their Adam option, which first divides by
    Adam's second moment, is not implemented).

    References:
      Xue, Chen, Wang, Li, Liu, Wu, Lu, Luo, 2022, "Large-batch Optimization for Dense Visual
      Predictions" (NeurIPS), Sec. 3 (Eqs. for Phi_i, mu_i and the momentum on mu); the authors'
      code Sense-X/AGVM ``agvm/optim/agvm_optimizer_hook.py`` (Phi_ref = the first group,
      clip [0.5, 10], momentum 0.97, every n iterations from a start iteration).

    Args:
      inner: the optimizer whose per-group updates are scaled.
      groups: ``{name: regex}`` or ``[(name, regex), ...]`` over parameter paths
        (``optim.masks.param_path``, e.g. ``'backbone/.*'``); each leaf joins the first group
        whose regex fullmatches its path. Every group must match a leaf and every leaf a group.
      reference: the group whose Phi is Phi_ref (the backbone in the paper); default the first.
      momentum: the momentum on mu, in [0, 1).
      interval: n, measure every n updates (>= 1).
      start_step: first update (0-based) that measures and scales.
      stop_step: last such update; None: never stop.
      min_ratio: lower clip of the Phi ratio before the square root.
      max_ratio: upper clip of it.
      cos_eps: each norm in the cosine is floored at this (torch.cosine_similarity's eps).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`AGVMState`; ``update``
      needs ``half_grads=(g_a, g_b)`` (see the module docstring).
    """
    rules = _group_rules(groups)
    names = [name for name, _ in rules]
    if reference is None:
        reference = names[0]
    if reference not in names:
        raise ValueError(f"reference={reference!r} is not one of the agvm groups {names}")
    ref_index = names.index(reference)
    _validate.check_decay("momentum", momentum)
    for name, value in (("interval", interval), ("start_step", start_step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (name == "interval"):
            low = 1 if name == "interval" else 0
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if stop_step is not None and (not isinstance(stop_step, int) or stop_step < start_step):
        raise ValueError(f"stop_step must be None or an int >= start_step, got {stop_step!r}")
    _validate.check_positive("min_ratio", min_ratio)
    _validate.check_positive("max_ratio", max_ratio)
    if min_ratio > max_ratio:
        raise ValueError(f"min_ratio must be <= max_ratio, got {min_ratio!r} > {max_ratio!r}")
    _validate.check_positive("cos_eps", cos_eps)
    inner = inner_with_extra_args(inner)
    num = len(names)

    def init_fn(params):
        group_of_each_leaf(params, groups)
        return AGVMState(
            inner.init(params),
            mu=jnp.ones((num,), jnp.float32),
            phi=jnp.zeros((num,), jnp.float32),
            count=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, *, half_grads=None, **extra_args):
        if half_grads is None:
            raise ValueError(
                "agvm needs half_grads=(g_a, g_b), the gradients of two independent halves of "
                "the batch: wrap it as optim.accumulate_halves(agvm(...), micro_batches) or pass "
                "the means over the two halves of the data axis"
            )
        g_a, g_b = half_grads
        index = group_of_each_leaf(updates, groups)
        phi = _group_phi(g_a, g_b, index, num, cos_eps)
        ratio = (phi[ref_index] + _PHI_EPS) / (phi + _PHI_EPS)
        fresh = jnp.sqrt(jnp.clip(ratio, min_ratio, max_ratio))
        t = state.count
        active = t >= start_step
        if stop_step is not None:
            active &= t <= stop_step
        measure = active & (t % interval == 0)
        mu = jnp.where(measure, momentum * state.mu + (1.0 - momentum) * fresh, state.mu)
        phi = jnp.where(measure, phi, state.phi)
        scale = jnp.where(active, mu, jnp.ones_like(mu))

        new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        leaves, treedef = jax.tree.flatten(new_updates)
        scaled = [
            (u * scale[i].astype(jnp.promote_types(u.dtype, jnp.float32))).astype(u.dtype)
            for u, i in zip(leaves, index, strict=True)
        ]
        return treedef.unflatten(scaled), AGVMState(inner_state, mu, phi, t + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _group_phi(g_a, g_b, index: list[int], num: int, cos_eps: float) -> jax.Array:
    """Phi_i = 1 - <a_i, b_i> / (max(|a_i|, eps) max(|b_i|, eps)) per group, f32 [num]."""
    a_leaves, treedef = jax.tree.flatten(g_a)
    b_leaves = treedef.flatten_up_to(g_b)
    if len(a_leaves) != len(index):
        raise ValueError(
            f"half_grads have {len(a_leaves)} leaves, but the gradient has {len(index)}"
        )
    dot, aa, bb = (jnp.zeros((num,), jnp.float32) for _ in range(3))
    for a, b, i in zip(a_leaves, b_leaves, index, strict=True):
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        dot = dot.at[i].add(jnp.sum(a * b))
        aa = aa.at[i].add(jnp.sum(a * a))
        bb = bb.at[i].add(jnp.sum(b * b))
    denom = jnp.maximum(jnp.sqrt(aa), cos_eps) * jnp.maximum(jnp.sqrt(bb), cos_eps)
    return 1.0 - dot / denom


def split_halves(batch, micro_batches: int):
    """The two halves of ``batch`` whose micro-batches are those of ``optim.accumulate``.

    ``accumulate`` puts example j + k*i in micro-batch j (k = micro_batches). Half A holds the
    micro-batches j < k/2 and half B the others, each laid out so that ``accumulate`` with k/2
    micro-batches meets the same micro-batches in the same order. k = 1 is treated as k = 2
    (even and odd examples). The split is a reshape and a slice of each leaf's local rows, so a
    batch sharded along B needs no communication.
    """
    k = 2 if micro_batches == 1 else micro_batches

    def half(x, which):
        if x.shape[0] % k:
            raise ValueError(
                f"a batch leaf of shape {x.shape} does not split into {k} micro-batches"
            )
        rows = x.reshape(x.shape[0] // k, k, *x.shape[1:])
        part = rows[:, : k // 2] if which == 0 else rows[:, k // 2 :]
        return part.reshape(x.shape[0] // 2, *x.shape[1:])

    return jax.tree.map(lambda x: half(x, 0), batch), jax.tree.map(lambda x: half(x, 1), batch)


def accumulate_halves(
    inner: optax.GradientTransformation,
    micro_batches: int,
    *,
    accumulator_dtype: jnp.dtype = jnp.float32,
    aux_shapes: Any = None,
    noise_groups: int = 1,
    group_axis_name: str | tuple[str, ...] | None = None,
    constrain_group_grads: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``optim.accumulate`` over each half of the micro-batches; ``inner`` gets both halves.

    With k = micro_batches (even, or 1: two halves of B/2) the step computes g_a over the
    micro-batches j < k/2, g_b over the rest (``split_halves``), g = (g_a + g_b) / 2, and calls
    ``inner.update(g, inner_state, params, half_grads=(g_a, g_b))``. The state is an
    ``AccumulateState``: ``aux`` is the mean over both halves, and ``noise`` holds the mean of
    |g_j|^2 over the micro-batches (of the two halves when k = 1, so b_small = B/2) and |g|^2.
    Dropout keys: half A's micro-batch j gets ``fold_in(rng, j)`` as in ``accumulate``, half
    B's ``fold_in(fold_in(rng, k), j)`` (independent of every other). Without ``grad_fn`` the
    gradients pass to ``inner`` as in ``accumulate`` and ``half_grads`` must come from the caller.

    ``noise_groups=G`` splits every micro-batch of each half into G groups for the noise
    statistics as ``optim.accumulate`` does (b_small = B/(kG)); g_a, g_b and g are unchanged.

    Args:
      inner: typically ``agvm(optimizer, groups=...)``; it must accept ``half_grads=``.
      micro_batches: k, even or 1.
      accumulator_dtype: as in ``optim.accumulate``.
      aux_shapes: as in ``optim.accumulate``.
      noise_groups: G, as in ``optim.accumulate``.
      group_axis_name: as in ``optim.accumulate``.
      constrain_group_grads: as in ``optim.accumulate``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    if (
        isinstance(micro_batches, bool)
        or not isinstance(micro_batches, int)
        or micro_batches < 1
        or (micro_batches > 1 and micro_batches % 2)
    ):
        raise ValueError(
            f"accumulate_halves needs micro_batches = 1 or an even number (two halves of the "
            f"micro-batches), got {micro_batches!r}"
        )
    inner = inner_with_extra_args(inner)
    k = 2 if micro_batches == 1 else micro_batches
    plain = accumulate(
        inner, micro_batches, accumulator_dtype=accumulator_dtype, aux_shapes=aux_shapes
    )
    half_acc = accumulate(
        optax.identity(),
        k // 2,
        accumulator_dtype=accumulator_dtype,
        aux_shapes=aux_shapes,
        noise_groups=noise_groups,
        group_axis_name=group_axis_name,
        constrain_group_grads=constrain_group_grads,
    )

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
        if params is None or batch is None:
            raise ValueError("accumulate_halves with grad_fn= needs params and batch=")
        half_a, half_b = split_halves(batch, micro_batches)
        rng_b = None if rng is None else jax.random.fold_in(rng, k)
        empty = AccumulateState(optax.EmptyState(), state.noise, state.aux)
        g_a, state_a = half_acc.update(None, empty, params, grad_fn=grad_fn, batch=half_a, rng=rng)
        g_b, state_b = half_acc.update(
            None, empty, params, grad_fn=grad_fn, batch=half_b, rng=rng_b
        )
        mean = jax.tree.map(
            lambda a, b: ((a.astype(jnp.float32) + b.astype(jnp.float32)) / 2).astype(a.dtype),
            g_a,
            g_b,
        )
        new_updates, inner_state = inner.update(
            mean, state.inner_state, params, half_grads=(g_a, g_b), **extra_args
        )
        na, nb = state_a.noise, state_b.noise
        leaves = jax.tree.leaves(mean)
        noise = GradNoiseStats(
            sq_norm_small=(na.sq_norm_small + nb.sq_norm_small) / 2,
            sq_norm_big=sum(
                (jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves),
                jnp.zeros((), jnp.float32),
            ),
            b_small=na.b_small,
            b_big=na.b_big * 2,
        )
        aux = jax.tree.map(lambda a, b: (a + b) / 2, state_a.aux, state_b.aux)
        return new_updates, AccumulateState(inner_state, noise, aux)

    return optax.GradientTransformationExtraArgs(plain.init, update_fn)
