"""EMA of the model (parameters and batch statistics) with the batch-size scaling rule rho^kappa."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxbatch import _validate
from jaxbatch.scaling import ema as scaling_ema


class ModelEmaState(NamedTuple):
    """State of :func:`model_ema`.

    Attributes:
      count: int32 scalar, the number of updates so far.
      ema: the average, a pytree with the structure of the tracked tree (in ``ema_dtype``).
    """

    count: jax.Array
    ema: Any


def ema_decay(
    decay: Any = None,
    *,
    half_life_samples: Any = None,
    batch_size: Any,
    reference_batch_size: Any = None,
) -> Any:
    """The per-step EMA decay at ``batch_size``: ``jaxbatch.scaling.ema_decay`` for optimizer
    arguments (they may be arrays, traced under ``optax.inject_hyperparams``).

    ``rho = decay^(batch_size / reference_batch_size)`` (the EMA scaling rule: kappa = B / B_ref
    steps at B are replaced by one step at kappa·B), or, with ``half_life_samples``,
    ``rho = 0.5^(batch_size / half_life_samples)`` (the weight of a sample halves every
    ``half_life_samples`` samples, whatever the batch).

    References:
      Busbridge et al., 2023, "How to Scale Your EMA", the EMA Scaling Rule
      (rho_hat = rho^kappa).

    Args:
      decay: rho at ``reference_batch_size``, in [0, 1). Exactly one of ``decay`` and
        ``half_life_samples`` must be given.
      half_life_samples: number of samples over which the weight of a sample halves (> 0).
      batch_size: the batch size B of one update (> 0).
      reference_batch_size: B_ref for ``decay`` (> 0); None means ``batch_size`` (kappa = 1).

    Returns:
      rho (a float, or an array when the arguments are arrays).
    """
    if (decay is None) == (half_life_samples is None):
        raise ValueError(
            "exactly one of decay and half_life_samples must be given, got "
            f"decay={decay!r}, half_life_samples={half_life_samples!r}"
        )
    _validate.check_positive("batch_size", batch_size)
    if half_life_samples is not None:
        _validate.check_positive("half_life_samples", half_life_samples)
        # A sample's weight halves every half_life_samples samples: decay 0.5 at that "batch".
        return scaling_ema._scaled_decay(0.5, half_life_samples, batch_size)
    _validate.check_decay("decay", decay)
    if reference_batch_size is None:
        return decay
    _validate.check_positive("reference_batch_size", reference_batch_size)
    return scaling_ema._scaled_decay(decay, reference_batch_size, batch_size)


def model_ema(
    decay: Any = None,
    *,
    half_life_samples: Any = None,
    batch_size: Any,
    reference_batch_size: Any = None,
    warmup_steps: Any = 0,
    ema_dtype: Any = None,
) -> optax.GradientTransformation:
    """Exponential moving average of a tree of model variables (params, batch-norm statistics).

    At update t = 0, 1, 2, ... (``count`` before the update), with rho from :func:`ema_decay`::

        rho_t = rho · min(1, t / warmup_steps)     (rho_t = rho when warmup_steps = 0)
        ema   = rho_t·ema + (1 - rho_t)·x_new

    The warm-up is a linear ramp of the decay from 0: the first update copies ``x_new`` (so the
    average forgets the random init at once) and the full decay applies from step
    ``warmup_steps`` on. ``decay = 0`` is allowed (the "average" is the latest value), 1 is not
    (it would never move).

    Contract (not a gradient transformation in the usual sense): ``init(tree)`` copies the tree;
    ``update(new_tree, state, params=None)`` treats its first argument as the new value of the
    tracked tree and returns ``(new_tree, new_state)`` unchanged in its first element, with
    ``new_state.ema`` the average and ``new_state.count`` the number of updates. Track batch
    statistics by passing ``{'params': params, 'batch_stats': batch_stats}`` as the tree.
    To use it inside an ``optax.chain``, use :func:`model_ema_of_params`.

    Where the two coincide, this equals ``optax.ema(rho, debias=False)`` fed the same sequence:
    when the initial tree is zeros (optax's EMA starts at zero) and there is no warm-up.

    References:
      Busbridge et al., 2023, "How to Scale Your EMA", the EMA Scaling Rule and its algorithm.

    Args:
      decay: rho at ``reference_batch_size``, in [0, 1) (see :func:`ema_decay`).
      half_life_samples: half-life of a sample's weight in samples (> 0), instead of ``decay``.
      batch_size: samples per update (> 0).
      reference_batch_size: the batch at which ``decay`` was tuned; None: ``batch_size``.
      warmup_steps: length of the linear decay ramp in updates (>= 0).
      ema_dtype: dtype of the average (e.g. ``jnp.float32`` for bf16 params); None keeps each
        leaf's dtype. The average is computed in ``promote(leaf dtype, f32)`` either way.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ModelEmaState`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from jaxbatch import optim
      >>> params = {'w': jnp.zeros(3)}
      >>> ema = optim.model_ema(0.9, batch_size=4096, reference_batch_size=256)
      >>> ema_state = ema.init(params)
      >>> params = optax.apply_updates(params, {'w': jnp.ones(3)})
      >>> _, ema_state = ema.update(params, ema_state)
    """
    rho = ema_decay(
        decay,
        half_life_samples=half_life_samples,
        batch_size=batch_size,
        reference_batch_size=reference_batch_size,
    )
    _validate.check_non_negative("warmup_steps", warmup_steps)
    static_no_warmup = isinstance(warmup_steps, int | float) and warmup_steps == 0

    def init_fn(tree):
        def copy(x):
            x = jnp.asarray(x)
            return x.astype(ema_dtype) if ema_dtype is not None else jnp.array(x, copy=True)

        return ModelEmaState(count=jnp.zeros([], jnp.int32), ema=jax.tree.map(copy, tree))

    def update_fn(tree, state, params=None):
        del params
        if static_no_warmup and isinstance(rho, float):
            # Python floats: 1 - rho in float64, so rho close to 1 keeps its weight exactly.
            rho_t, one_minus = rho, 1.0 - rho
        else:
            rho_t = jnp.asarray(rho, jnp.float32)
            if not static_no_warmup:
                t = state.count.astype(jnp.float32)
                steps = jnp.asarray(warmup_steps, jnp.float32)
                ramp = jnp.minimum(1.0, t / jnp.maximum(steps, 1.0))
                # warmup_steps = 0 given as an array (inject_hyperparams) means no ramp.
                rho_t = rho_t * jnp.where(steps > 0, ramp, 1.0)
            one_minus = 1.0 - rho_t

        def average(old, new):
            dtype = jnp.promote_types(jnp.promote_types(old.dtype, new.dtype), jnp.float32)
            mixed = jnp.asarray(rho_t, dtype) * old.astype(dtype)
            mixed = mixed + jnp.asarray(one_minus, dtype) * new.astype(dtype)
            return mixed.astype(old.dtype)

        new_ema = jax.tree.map(average, state.ema, tree)
        return tree, ModelEmaState(count=optax.safe_increment(state.count), ema=new_ema)

    return optax.GradientTransformation(init_fn, update_fn)


def model_ema_of_params(
    decay: Any = None,
    *,
    half_life_samples: Any = None,
    batch_size: Any,
    reference_batch_size: Any = None,
    warmup_steps: Any = 0,
    ema_dtype: Any = None,
) -> optax.GradientTransformation:
    """:func:`model_ema` of ``params + updates``, for the end of an ``optax.chain``.

    ``update(updates, state, params)`` forms the new parameters ``params + updates`` (the
    updates it receives are the final ones when it is the last element of the chain), folds them
    into the average exactly as :func:`model_ema` does, and returns ``updates`` unchanged. Under
    ``jit``, XLA shares the sum with the caller's ``optax.apply_updates``. Arguments as in
    :func:`model_ema`. It tracks params only; for batch statistics use :func:`model_ema`.

    Examples:
      >>> import optax
      >>> from jaxbatch import optim
      >>> tx = optax.chain(optim.lamb(1e-3), optim.model_ema_of_params(0.999, batch_size=256))
      >>> # EMA params: optax.tree.get(opt_state, 'ema')

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ModelEmaState`; ``update``
      requires ``params``.
    """
    inner = model_ema(
        decay,
        half_life_samples=half_life_samples,
        batch_size=batch_size,
        reference_batch_size=reference_batch_size,
        warmup_steps=warmup_steps,
        ema_dtype=ema_dtype,
    )

    def update_fn(updates, state, params=None):
        _validate.require_params(params, "model_ema_of_params")
        _, state = inner.update(optax.apply_updates(params, updates), state)
        return updates, state

    return optax.GradientTransformation(inner.init, update_fn)
