"""Gradient accumulation over micro-batches inside one jitted step, with noise statistics."""

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class GradNoiseStats(NamedTuple):
    """Squared gradient norms at two batch sizes: the inputs of
    ``jaxbatch.stats.noise_scale_from_two_batches``.

    Attributes:
      sq_norm_small: float32 [], mean over the k·G small gradients (G noise groups in each of the
        k micro-batches) of their squared norms |g_small|^2 (the mean of the squares, not the
        square of the mean norm).
      sq_norm_big: float32 [], |mean of the small gradients|^2 = |whole-batch gradient|^2.
      b_small: int32 [], examples per small gradient (B / (k·G)).
      b_big: int32 [], examples in the whole batch.
    """

    sq_norm_small: jax.Array
    sq_norm_big: jax.Array
    b_small: jax.Array
    b_big: jax.Array


class AccumulateState(NamedTuple):
    """State of ``accumulate``: the inner optimizer's state, the last step's noise statistics
    and the last step's micro-batch mean of ``grad_fn``'s aux output."""

    inner_state: optax.OptState
    noise: GradNoiseStats
    aux: Any


def _empty_noise() -> GradNoiseStats:
    zero_f, zero_i = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    return GradNoiseStats(zero_f, zero_f, zero_i, zero_i)


def _sq_norm(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return sum(
        (jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.zeros((), jnp.float32)
    )


def _batch_size(batch, micro_batches: int) -> int:
    """The common leading dim of every leaf of ``batch``; checks it divides by micro_batches."""
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError("batch has no array leaves to split into micro-batches")
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        name = f"batch{jax.tree_util.keystr(path)}"
        if not shape:
            raise ValueError(f"{name} is a scalar; every batch leaf needs a leading batch dim")
        if shape[0] % micro_batches:
            raise ValueError(
                f"{name} has shape {shape}: its leading dim {shape[0]} is not divisible by "
                f"micro_batches={micro_batches}"
            )
        sizes[name] = shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch leaves disagree on the batch size (leading dim): {sizes}")
    return next(iter(sizes.values()))


def split_micro_batches(batch, micro_batches: int):
    """[B, ...] -> [k, B/k, ...], micro-batch j holding examples j, j + k, j + 2k, ...

    Strided rather than contiguous: a batch sharded along B keeps every micro-batch spread over
    all of its shards (each shard's rows are split k ways locally), so every device works on
    every micro-step and the reshape needs no communication.
    """

    def leaf(x):
        x = x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(leaf, batch)


def merge_micro_batches(tree, micro_batches: int):
    """Inverse of :func:`split_micro_batches`: [k, B/k, ...] -> [B, ...] in the original order."""

    def leaf(x):
        if x.shape[0] != micro_batches:
            raise ValueError(f"leading dim {x.shape[0]} is not micro_batches={micro_batches}")
        return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])

    return jax.tree.map(leaf, tree)


def split_noise_groups(micro_batch, groups: int):
    """[b, ...] -> [G, b/G, ...], group g holding the g-th contiguous block of b/G examples.

    Contiguous rather than strided: a micro-batch sharded along b over n devices puts group g on
    the devices g·n/G ... (g+1)·n/G − 1 (for G dividing n), so with G = the data-axis size the
    group gradients are the per-replica gradients of data parallelism before their mean.
    """
    return jax.tree.map(
        lambda x: x.reshape(groups, x.shape[0] // groups, *x.shape[1:]), micro_batch
    )


def micro_batch_rng(rng: jax.Array, index) -> jax.Array:
    """The key of micro-batch ``index`` of a step whose key is ``rng``: ``fold_in(rng, index)``.

    ``accumulate(..., rng=)`` hands this key to ``grad_fn`` for micro-batch ``index``; a caller
    that embeds the micro-batches in a separate pass (gradient caching) derives the same key here,
    so both passes of one micro-batch draw the same dropout masks.
    """
    return jax.random.fold_in(rng, index)


def inner_with_extra_args(inner) -> optax.GradientTransformationExtraArgs:
    """``inner`` checked to be an optax transformation, with extra-argument support.

    The one check every wrapper of an inner optimizer in this package makes (``accumulate``,
    ``vrgd``, ``agvm`` and their accumulators).
    """
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise ValueError(f"inner must be an optax.GradientTransformation, got {inner!r}")
    return optax.with_extra_args_support(inner)


def accumulate(
    inner: optax.GradientTransformation,
    micro_batches: int,
    *,
    accumulator_dtype: jnp.dtype = jnp.float32,
    aux_shapes: Any = None,
    noise_groups: int = 1,
    group_axis_name: str | tuple[str, ...] | None = None,
    constrain_group_grads: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Averages gradients over ``micro_batches`` micro-batches with ``lax.scan``, then ``inner``.

    With k = micro_batches and the batch split into micro-batches m_1..m_k of B/k examples::

      g_j = grad_fn(params, m_j)[0]              (one micro-batch at a time: memory of B/k)
      g   = (1/k) sum_j g_j                      (one accumulator in accumulator_dtype)
      updates, inner_state = inner.update(g, inner_state, params)
      noise.sq_norm_small = (1/k) sum_j |g_j|^2,  noise.sq_norm_big = |g|^2
      noise.b_small = B/k,  noise.b_big = B

    For a loss that is a mean over examples, g equals the full-batch gradient, so this computes
    what ``inner`` computes on the whole batch. ``state.noise`` feeds
    ``jaxbatch.stats.noise_scale_from_two_batches`` (it needs k·G >= 2: at k·G = 1 the two batch
    sizes coincide).

    Noise groups (G = ``noise_groups`` > 1) give the small-batch gradients without micro-batches:
    each micro-batch is cut into G contiguous groups (:func:`split_noise_groups`) whose gradients
    are computed side by side (``jax.vmap`` of ``grad_fn``), so the FLOPs are those of one
    micro-batch and, with the group axis sharded over the data axis of the mesh
    (``constrain_group_grads``), each device holds one group gradient: these are the per-replica
    gradients of data parallelism before their mean. Then::

      g_jh = grad_fn(params, group h of m_j)[0]            (h = 1..G)
      noise.sq_norm_small = (1/(kG)) sum_jh |g_jh|^2,  noise.b_small = B/(kG)

    and g, the update and ``aux`` (the mean over groups) are as without groups. Only for losses
    that are means of per-example terms with no coupling between examples (no batch norm over
    the micro-batch, no contrastive pairs): there, the mean of the group gradients is the
    micro-batch gradient. With ``rng``, group h of micro-batch j draws its dropout from
    ``fold_in(micro_batch_rng(rng, j), h)``.

    Contract:

    * ``state = acc.init(params)`` -> ``AccumulateState(inner_state, noise, aux)``; ``noise``
      starts at zeros; ``aux`` is zeros shaped like ``aux_shapes`` (dtype ``accumulator_dtype``)
      or None.
    * ``updates, state = acc.update(None, state, params, grad_fn=grad_fn, batch=batch)``.
      ``grad_fn(params, micro_batch) -> (grads, aux)``; ``aux`` is a pytree of arrays (e.g.
      {'loss': ..., 'accuracy': ...}) whose micro-batch mean, in ``accumulator_dtype``, becomes
      ``state.aux``. Its structure and shapes must match ``aux_shapes`` so the state keeps one
      structure across steps (which jit with donation or ``out_shardings`` needs); get them with
      ``jax.eval_shape(lambda p, b: grad_fn(p, b)[1], params, micro_batch)``. A mismatch raises
      at trace time. ``batch`` is a pytree whose leaves share a leading dim B divisible by k;
      micro-batch j holds examples j, j + k, j + 2k, ... (a strided split, so that a batch
      sharded along B spreads every micro-batch over all shards). Every other keyword argument
      is passed on to ``inner``.
    * ``acc.update(None, state, params, grad_fn=grad_fn, batch=batch, rng=key)``: stochastic
      losses (dropout). ``grad_fn`` is then called as ``grad_fn(params, m_j, rng_j)`` with
      ``rng_j = micro_batch_rng(key, j) = fold_in(key, j)``, so every micro-batch draws its own
      masks (one key for all of them would repeat one mask k times, which is not the full-batch
      gradient of a dropout model: the k micro-batches of a step would share their noise).
    * ``updates, state = acc.update(grads, state, params)`` without ``grad_fn``: ``grads`` go to
      ``inner`` unchanged, ``noise`` and ``aux`` keep their values. This is what ``optax.chain``
      or a caller with ready-made gradients does.
    * In ``optax.chain``, put ``accumulate`` first when driving it with ``grad_fn``; the chain
      passes ``grad_fn``/``batch`` to every transform that takes extra arguments.
    * Gradients are cast to ``accumulator_dtype`` before summing, and the mean is cast back to
      the dtype ``grad_fn`` returns before ``inner`` sees it. Squared norms are float32.
    * Works unchanged inside ``jax.jit`` with a batch sharded along its leading axis; the result
      equals the unsharded one.

    References:
      McCandlish, Kaplan, Amodei et al., 2018, "An Empirical Model of Large-Batch Training",
      Appendix A.1 (|G_small|^2 and |G_big|^2 as the inputs of the noise-scale estimators).

    Args:
      inner: the optimizer applied to the accumulated gradient.
      micro_batches: k, a positive int.
      accumulator_dtype: floating dtype of the gradient and aux accumulators.
      aux_shapes: pytree of arrays or ``jax.ShapeDtypeStruct`` matching ``grad_fn``'s aux
        output (only shapes are used), or None when ``grad_fn`` returns aux None.
      noise_groups: G, a positive int dividing the micro-batch size: small gradients per
        micro-batch for the noise statistics (see above); 1 = the micro-batches themselves.
      group_axis_name: the mesh axis (or axes) the group axis is sharded over, given to
        ``jax.vmap(spmd_axis_name=)`` so the sharding constraints inside ``grad_fn`` keep each
        group on its devices (the caller's activation rules must then not use that axis for
        the batch inside a group); None: no mesh axis.
      constrain_group_grads: applied to the [G, ...]-stacked group gradients (e.g.
        ``jax.lax.with_sharding_constraint`` putting G on the mesh's data axis and the parameter
        dims where the parameters live); None leaves their placement to the compiler.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> def grad_fn(params, batch):
      ...   loss = lambda p: jnp.mean((batch['x'] @ p - batch['y']) ** 2)
      ...   value, grads = jax.value_and_grad(loss)(params)
      ...   return grads, {'loss': value}
      >>> params = jnp.zeros(3)
      >>> acc = accumulate(optax.adam(1e-2), 4, aux_shapes={'loss': jnp.zeros(())})
      >>> state = acc.init(params)
      >>> batch = {'x': jnp.ones((8, 3)), 'y': jnp.ones(8)}
      >>> @jax.jit
      ... def step(params, state, batch):
      ...   updates, state = acc.update(None, state, params, grad_fn=grad_fn, batch=batch)
      ...   return optax.apply_updates(params, updates), state
      >>> params, state = step(params, state, batch)
      >>> float(state.aux['loss']), int(state.noise.b_small)
      (1.0, 2)
    """
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, numbers.Integral):
        raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}")
    micro_batches = int(micro_batches)
    acc_dtype = jnp.dtype(accumulator_dtype)
    if not jnp.issubdtype(acc_dtype, jnp.floating):
        raise ValueError(f"accumulator_dtype must be a floating dtype, got {accumulator_dtype!r}")
    if isinstance(noise_groups, bool) or not isinstance(noise_groups, numbers.Integral):
        raise ValueError(f"noise_groups must be a positive int, got {noise_groups!r}")
    if noise_groups < 1:
        raise ValueError(f"noise_groups must be a positive int, got {noise_groups!r}")
    groups = int(noise_groups)
    inner = inner_with_extra_args(inner)
    aux_zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), acc_dtype), aux_shapes)

    def init_fn(params):
        return AccumulateState(inner.init(params), _empty_noise(), aux_zeros)

    def update_fn(
        updates,
        state,
        params=None,
        *,
        grad_fn: Callable | None = None,
        batch=None,
        rng: jax.Array | None = None,
        **extra_args,
    ):
        if grad_fn is None:
            for name, value in (("batch", batch), ("rng", rng)):
                if value is not None:
                    raise ValueError(
                        f"accumulate got {name}= without grad_fn=; pass both or neither"
                    )
            if updates is None:
                raise ValueError("accumulate needs gradients: pass updates, or grad_fn= and batch=")
            new_updates, inner_state = inner.update(
                updates, state.inner_state, params, **extra_args
            )
            return new_updates, state._replace(inner_state=inner_state)

        if updates is not None:
            raise ValueError(
                "accumulate computes the gradients itself when grad_fn= is given; pass updates=None"
            )
        if params is None or batch is None:
            raise ValueError("accumulate with grad_fn= needs params and batch=")
        batch_size = _batch_size(batch, micro_batches)
        if (batch_size // micro_batches) % groups:
            raise ValueError(
                f"the micro-batch of {batch_size // micro_batches} examples (batch {batch_size} / "
                f"micro_batches={micro_batches}) is not divisible by noise_groups={groups}"
            )
        micro = split_micro_batches(batch, micro_batches)
        if rng is None:
            call = lambda p, m, j: grad_fn(p, m)
        else:
            call = lambda p, m, j: grad_fn(p, m, micro_batch_rng(rng, j))
        grads_like, aux_like = jax.eval_shape(
            lambda p, m: call(p, jax.tree.map(lambda x: x[0], m), 0), params, micro
        )
        _check_aux(aux_like, state.aux)

        def grouped_call(p, micro_batch, index):
            """(mean gradient, sum of the groups' squared norms, mean aux) of one micro-batch."""
            if groups == 1:
                grads, aux = call(p, micro_batch, index)
                return grads, _sq_norm(grads), aux
            parts = split_noise_groups(micro_batch, groups)
            h = jnp.arange(groups, dtype=jnp.int32)
            vmap = lambda f: jax.vmap(f, spmd_axis_name=group_axis_name)
            if rng is None:
                stacked, aux = vmap(lambda m, i: grad_fn(p, m))(parts, h)
            else:
                key = micro_batch_rng(rng, index)
                stacked, aux = vmap(lambda m, i: grad_fn(p, m, jax.random.fold_in(key, i)))(
                    parts, h
                )
            if constrain_group_grads is not None:
                stacked = constrain_group_grads(stacked)
            sq = jnp.sum(jax.vmap(_sq_norm)(stacked))
            mean_over_groups = lambda x: jnp.mean(jnp.asarray(x, acc_dtype), axis=0)
            grads = jax.tree.map(mean_over_groups, stacked)
            return grads, sq, jax.tree.map(mean_over_groups, aux)

        def body(carry, indexed_micro_batch):
            grad_acc, sq_acc, aux_acc = carry
            index, micro_batch = indexed_micro_batch
            grads, sq, aux = grouped_call(params, micro_batch, index)
            grad_acc = jax.tree.map(lambda a, g: a + g.astype(acc_dtype), grad_acc, grads)
            aux_acc = jax.tree.map(lambda a, x: a + jnp.asarray(x, acc_dtype), aux_acc, aux)
            return (grad_acc, sq_acc + sq, aux_acc), None

        zeros = lambda like: jax.tree.map(lambda x: jnp.zeros(x.shape, acc_dtype), like)
        carry = (zeros(grads_like), jnp.zeros((), jnp.float32), zeros(aux_like))
        indices = jnp.arange(micro_batches, dtype=jnp.int32)
        (grad_sum, sq_sum, aux_sum), _ = jax.lax.scan(body, carry, (indices, micro))

        mean = jax.tree.map(lambda a: a / micro_batches, grad_sum)
        noise = GradNoiseStats(
            sq_norm_small=sq_sum / (micro_batches * groups),
            sq_norm_big=_sq_norm(mean),
            b_small=jnp.asarray(batch_size // (micro_batches * groups), jnp.int32),
            b_big=jnp.asarray(batch_size, jnp.int32),
        )
        mean = jax.tree.map(lambda a, like: a.astype(like.dtype), mean, grads_like)
        new_updates, inner_state = inner.update(mean, state.inner_state, params, **extra_args)
        aux_mean = jax.tree.map(lambda a: a / micro_batches, aux_sum)
        return new_updates, AccumulateState(inner_state, noise, aux_mean)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_aux(aux_like, state_aux) -> None:
    """Raises unless grad_fn's aux has the structure and shapes declared by ``aux_shapes``."""
    got = jax.tree.map(lambda x: tuple(x.shape), aux_like)
    want = jax.tree.map(lambda x: tuple(jnp.shape(x)), state_aux)
    if jax.tree.structure(aux_like) != jax.tree.structure(state_aux) or jax.tree.leaves(
        got
    ) != jax.tree.leaves(want):
        raise ValueError(
            f"grad_fn returned aux with shapes {got}, but accumulate(..., aux_shapes=) declared "
            f"{want}. Pass aux_shapes=jax.eval_shape(lambda p, b: grad_fn(p, b)[1], params, "
            "micro_batch) so the optimizer state keeps one structure across steps"
        )
