"""The train state and the one jitted, donated train step.

step: accumulate (lax.scan over micro-batches of the loss gradient; for contrastive losses through
cached embedding gradients, ``grad_cache``) → optimizer → apply → model EMA → gradient-noise
statistics. The step is a pure function of (state, batch); the loop jits it with
the state's shardings and donates the state.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxbatch import stats
from jaxbatch.train import grad_cache
from jaxbatch.train.tasks import Task, split_variables

# Smoothing of the |G|^2 and tr(Sigma) estimates before their ratio B_simple (McCandlish et al.).
NOISE_EMA_DECAY = 0.95


@flax.struct.dataclass
class TrainState:
    """Everything a run carries from step to step (and checkpoints).

    Attributes:
      step: number of optimizer steps taken.
      params: model parameters.
      model_state: other model collections, e.g. {'batch_stats': ...}.
      opt_state: the optimizer state (``optim.accumulate`` around the inner optimizer).
      ema_state: ``optim.ModelEmaState`` of {'params', **model_state}, or None.
      noise: EMAs of the gradient-noise estimates (``stats.NoiseScaleEMA``).
      rng: the key the next step splits.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    ema_state: Any
    noise: stats.NoiseScaleEMA
    rng: jax.Array


def init_state(task: Task, tx, ema, rng: jax.Array, init_batch: dict) -> TrainState:
    """A fresh state; pure, so ``jax.eval_shape``/``jax.jit(out_shardings=...)`` can run it."""
    init_rng, rng = jax.random.split(rng)
    variables = flax.linen.meta.unbox(task.init_fn(init_rng, init_batch))
    params, model_state = split_variables(variables)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        ema_state=None if ema is None else ema.init({"params": params, **model_state}),
        noise=stats.noise_scale_ema_init(),
        rng=rng,
    )


def grad_fn_for(task: Task, model_state: Any):
    """``grad_fn(params, micro_batch, rng) -> (grads, aux)`` as ``optim.accumulate(rng=)`` calls it.

    ``rng`` is the micro-batch's own key (``optim.accumulate.micro_batch_rng`` of the step key), so
    the dropout masks of the k micro-batches of one step are independent draws.
    """

    def grad_fn(params, micro_batch, rng):
        (loss, (metrics, new_model_state)), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(
            params, model_state, micro_batch, rng
        )
        return grads, {"loss": loss, "metrics": metrics, "model_state": new_model_state}

    return grad_fn


def aux_shapes(task: Task, params: Any, model_state: Any, micro_batch: dict) -> Any:
    """Shapes of the per-micro-batch aux outputs (the accumulator ``optim.accumulate`` keeps).

    All arguments may be ``jax.ShapeDtypeStruct`` trees.
    """

    def aux(params, model_state, micro_batch):
        grad_fn = grad_fn_for(task, model_state)
        return grad_fn(params, micro_batch, jax.random.PRNGKey(0))[1]

    return jax.eval_shape(aux, params, model_state, micro_batch)


def make_train_step(task: Task, tx, ema, *, micro_batches: int):
    """The pure train step ``(state, batch) -> (state, metrics)``."""

    cached = grad_cache.applies(task, micro_batches)

    def train_step(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        if cached:  # the full-batch contrastive loss at the memory of one micro-batch
            batch, d_shared, loss, loss_metrics = grad_cache.embedding_cotangents(
                task, state.params, state.model_state, batch, step_rng, micro_batches
            )
            grad_fn = grad_cache.grad_fn_for(task, state.model_state, d_shared, loss, loss_metrics)
        else:
            grad_fn = grad_fn_for(task, state.model_state)
        updates, opt_state = tx.update(
            None, state.opt_state, state.params, grad_fn=grad_fn, batch=batch, rng=step_rng
        )
        params = optax.apply_updates(state.params, updates)
        aux = opt_state.aux
        model_state = jax.tree.map(
            lambda new, old: new.astype(old.dtype), aux["model_state"], state.model_state
        )
        ema_state = state.ema_state
        if ema is not None:
            _, ema_state = ema.update({"params": params, **model_state}, ema_state)

        noise_stats = opt_state.noise
        metrics = {"loss": aux["loss"], **aux["metrics"]}
        metrics["grad_norm"] = jnp.sqrt(noise_stats.sq_norm_big)
        metrics["update_norm"] = optax.global_norm(updates)
        noise = state.noise
        if micro_batches > 1 and not cached:
            g2, trace = stats.noise_scale_from_two_batches(
                noise_stats.sq_norm_small,
                noise_stats.sq_norm_big,
                noise_stats.b_small.astype(jnp.float32),
                noise_stats.b_big.astype(jnp.float32),
            )
            noise, b_simple = stats.noise_scale_ema_update(noise, g2, trace, NOISE_EMA_DECAY)
            metrics["b_simple"] = b_simple
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            ema_state=ema_state,
            noise=noise,
            rng=rng,
        )
        return new_state, metrics

    return train_step


def eval_variables(state: TrainState, *, use_ema: bool) -> dict:
    """The variables to evaluate: the live parameters or their EMA."""
    if use_ema:
        return dict(state.ema_state.ema)
    return {"params": state.params, **state.model_state}
