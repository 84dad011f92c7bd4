"""The train state and the one jitted, donated train step.

step: accumulate (lax.scan over micro-batches of the loss gradient; for contrastive losses through
cached embedding gradients, ``grad_cache``) → optimizer → apply → model EMA → gradient-noise
statistics → the fault guard (:class:`GuardState`: a step whose loss or gradient is not finite, or
whose loss spikes, leaves the state as it was). The step is a pure function of (state, batch); the
loop jits it with the state's shardings and donates the state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxbatch import stats
from jaxbatch.train import grad_cache
from jaxbatch.train import noise as noise_lib
from jaxbatch.train.tasks import Task, split_variables

# Smoothing of the |G|^2 and tr(Sigma) estimates before their ratio B_simple (McCandlish et al.)
# for an optimizer that carries no ``noise_lib.NoiseSettings`` (a plain ``optim.accumulate``);
# the trainer's decay is exp(-B / config.noise.ema_samples) (``noise_lib.ema_decay``).
NOISE_EMA_DECAY = 0.95


@flax.struct.dataclass
class GuardState:
    """What the in-step fault guard carries (int32 / float32 scalars, replicated).

    The step updates the first five; the loop sets the last three when it rolls back.

    Attributes:
      skipped: steps whose update was not applied (non-finite loss or gradient, or a loss spike).
      consecutive: skipped steps in a row, up to this one.
      spikes: steps whose loss exceeded ``spike_factor`` × the running mean.
      streaks: times ``consecutive`` reached ``max_consecutive_skips``.
      loss_mean: exponential moving average of the loss of applied steps (not bias-corrected).
      good_steps: applied steps (the bias correction of ``loss_mean``, the spike warm-up).
      lr_scale: factor on every update (= on the learning rate), lowered by each rollback.
      rollbacks: rollbacks so far.
      data_offset: batches skipped by rollbacks; batch position = step + data_offset.
    """

    skipped: jax.Array
    consecutive: jax.Array
    spikes: jax.Array
    streaks: jax.Array
    loss_mean: jax.Array
    good_steps: jax.Array
    lr_scale: jax.Array
    rollbacks: jax.Array
    data_offset: jax.Array


def guard_init() -> GuardState:
    i, f = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
    return GuardState(i, i, i, i, f, i, jnp.ones((), jnp.float32), i, i)


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """The static settings of the in-step guard (``config.faults``).

    Attributes:
      skip_nonfinite: skip a step whose loss, gradient norm or update norm is not finite.
      spike_factor: skip (and count as a spike) a step whose loss exceeds this factor times the
        bias-corrected running mean of the applied steps' losses; 0 = off. Losses are assumed
        positive (cross-entropies).
      spike_warmup_steps: applied steps before spikes are looked for.
      loss_ema_decay: decay of the running mean.
      max_consecutive_skips: a streak of this many skipped steps counts in ``streaks``; 0 = off.
    """

    skip_nonfinite: bool = True
    max_consecutive_skips: int = 0
    spike_factor: float = 0.0
    spike_warmup_steps: int = 10
    loss_ema_decay: float = 0.9


def _guard(cfg: GuardConfig, g: GuardState, loss, finite):
    """(apply?, new guard state, spike?) of one step; pure jnp, no host sync."""
    bad = jnp.logical_not(finite) if cfg.skip_nonfinite else jnp.zeros((), bool)
    spike = jnp.zeros((), bool)
    if cfg.spike_factor > 0:
        debias = 1.0 - jnp.float32(cfg.loss_ema_decay) ** g.good_steps.astype(jnp.float32)
        mean = g.loss_mean / jnp.maximum(debias, 1e-12)
        warm = g.good_steps >= cfg.spike_warmup_steps
        spike = warm & jnp.isfinite(loss) & (loss > cfg.spike_factor * mean)
        bad = bad | spike
    ok = jnp.logical_not(bad)
    d = jnp.float32(cfg.loss_ema_decay)
    consecutive = jnp.where(bad, g.consecutive + 1, 0)
    streak = consecutive == cfg.max_consecutive_skips if cfg.max_consecutive_skips else False
    new = g.replace(
        skipped=g.skipped + bad.astype(jnp.int32),
        consecutive=consecutive,
        streaks=g.streaks + jnp.asarray(streak, jnp.int32),
        spikes=g.spikes + spike.astype(jnp.int32),
        loss_mean=jnp.where(ok, d * g.loss_mean + (1 - d) * loss.astype(jnp.float32), g.loss_mean),
        good_steps=g.good_steps + ok.astype(jnp.int32),
    )
    return ok, new


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
      guard: the fault guard's counters (:class:`GuardState`).
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    ema_state: Any
    noise: stats.NoiseScaleEMA
    rng: jax.Array
    guard: GuardState | None = None


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
        guard=guard_init(),
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


def _scaled(grad_fn, fault):
    """``grad_fn`` with its gradients and loss multiplied by ``fault`` (fault injection)."""

    def scaled(params, micro_batch, rng):
        grads, aux = grad_fn(params, micro_batch, rng)
        grads = jax.tree.map(lambda g: g * fault.astype(g.dtype), grads)
        return grads, {**aux, "loss": aux["loss"] * fault.astype(aux["loss"].dtype)}

    return scaled


def make_train_step(
    task: Task,
    tx,
    ema,
    *,
    micro_batches: int,
    guard: GuardConfig | None = GuardConfig(),
    noise: noise_lib.NoiseSettings | None = None,
):
    """The pure train step ``(state, batch, fault=None) -> (state, metrics)``.

    Gradient-noise statistics (``jaxbatch.train.noise``): with the settings of ``noise`` (default
    ``tx.noise``, which ``optimizer.make_optimizer`` attaches), the step takes its small
    gradients from the k micro-batches and G groups of each (G from the mesh the step is traced
    under, ``noise_lib.plan_groups``; the groups' gradients run under the logical-axis rules of
    the inside of a group) and logs, when k·G >= 2, ``noise_g2`` and ``noise_trace`` (the
    bias-corrected EMAs of |G|^2 and tr(Sigma), decay exp(-B/ema_samples)), ``b_simple`` (their
    ratio), the step's own estimates ``noise_g2_step`` / ``noise_trace_step``, and
    ``noise_b_small`` / ``noise_b_big`` (in examples; tokens for 'lm'). An optimizer without
    settings (a plain ``optim.accumulate``) keeps the micro-batch statistics only, decay
    ``NOISE_EMA_DECAY``.

    Args:
      guard: the in-step fault guard; None builds the step without it (the benchmark's
        baseline, ``scripts/bench_guard.py``). With it, a step with a non-finite loss, gradient
        norm or update norm (or a loss spike) returns params, model state, optimizer state, EMA
        and noise statistics unchanged, selected on device (``jnp.where``): no host sync. Every
        update is multiplied by ``state.guard.lr_scale`` (1 until a rollback lowers it).
      fault: a float32 scalar multiplying the gradients and the loss (fault injection: NaN
        for a non-finite step, a large factor for a loss spike); None in normal training.
    """

    cached = grad_cache.applies(task, micro_batches)
    if noise is None:
        noise = getattr(tx, "noise", None)
    if cached and noise is not None and noise.groups > 1:
        why = noise_lib.why_groups_do_not_apply("contrastive", (), True)
        raise ValueError(
            f"noise groups ({noise.groups}) with gradient caching (a contrastive loss with "
            f"micro_batches={micro_batches}): {why}"
        )

    def train_step(state: TrainState, batch: dict, fault: jax.Array | None = None):
        rng, step_rng = jax.random.split(state.rng)
        batch_examples = int(jax.tree.leaves(batch)[0].shape[0])
        plan = noise_lib.GroupPlan(1)
        if noise is not None and not cached:
            mesh = jax.sharding.get_abstract_mesh()
            shape = {} if mesh.empty else dict(mesh.shape)
            plan = noise_lib.plan_groups(noise, shape, batch_examples, micro_batches)
        extra = {}
        if cached:  # the full-batch contrastive loss at the memory of one micro-batch
            batch, d_shared, loss, loss_metrics = grad_cache.embedding_cotangents(
                task, state.params, state.model_state, batch, step_rng, micro_batches
            )
            grad_fn = grad_cache.grad_fn_for(task, state.model_state, d_shared, loss, loss_metrics)
        elif plan.groups > 1:
            group_task = noise.group_task if noise.group_task is not None else task
            grad_fn = noise_lib.in_group(grad_fn_for(group_task, state.model_state), plan)
            extra = dict(
                noise_groups=plan.groups,
                group_axis_name=plan.axes,
                constrain_group_grads=noise_lib.constrain_groups(plan),
            )
        else:
            grad_fn = grad_fn_for(task, state.model_state)
        if fault is not None:
            grad_fn = _scaled(grad_fn, fault)
        updates, opt_state = tx.update(
            None,
            state.opt_state,
            state.params,
            grad_fn=grad_fn,
            batch=batch,
            rng=step_rng,
            **extra,
        )
        if guard is not None and state.guard is not None:
            scale = state.guard.lr_scale
            updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
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
        metrics["update_norm"] = optax.tree.norm(updates)
        noise_ema = state.noise
        if noise is None and micro_batches > 1 and not cached:
            g2, trace = stats.noise_scale_from_two_batches(
                noise_stats.sq_norm_small,
                noise_stats.sq_norm_big,
                noise_stats.b_small.astype(jnp.float32),
                noise_stats.b_big.astype(jnp.float32),
            )
            noise_ema, b_simple = stats.noise_scale_ema_update(
                noise_ema, g2, trace, NOISE_EMA_DECAY
            )
            metrics["b_simple"] = b_simple
        elif noise is not None and noise.enabled and micro_batches * plan.groups > 1 and not cached:
            unit = noise_lib.examples_unit(task.name, batch)
            b_small = noise_stats.b_small.astype(jnp.float32) * unit
            b_big = noise_stats.b_big.astype(jnp.float32) * unit
            g2, trace = stats.noise_scale_from_two_batches(
                noise_stats.sq_norm_small, noise_stats.sq_norm_big, b_small, b_big
            )
            decay = noise_lib.ema_decay(noise, batch_examples)
            noise_ema, b_simple = stats.noise_scale_ema_update(noise_ema, g2, trace, decay)
            g2_hat, trace_hat = stats.noise_scale_ema_debiased(noise_ema)
            metrics.update(
                noise_g2=g2_hat,
                noise_trace=trace_hat,
                b_simple=b_simple,
                noise_g2_step=g2,
                noise_trace_step=trace,
                noise_b_small=b_small,
                noise_b_big=b_big,
            )
        new = dict(
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            ema_state=ema_state,
            noise=noise_ema,
        )
        guard_state = state.guard
        if guard is not None and guard_state is not None:
            finite = (
                jnp.isfinite(metrics["loss"])
                & jnp.isfinite(noise_stats.sq_norm_big)
                & jnp.isfinite(metrics["update_norm"])
            )
            ok, guard_state = _guard(guard, guard_state, metrics["loss"], finite)
            old = {k: getattr(state, k) for k in new}
            new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        if guard is not None and guard_state is not None:
            metrics["skipped_steps"] = guard_state.skipped
            metrics["consecutive_skips"] = guard_state.consecutive
            metrics["loss_spikes"] = guard_state.spikes
            metrics["skip_streaks"] = guard_state.streaks
            metrics["lr_scale"] = guard_state.lr_scale
        new_state = state.replace(step=state.step + 1, rng=rng, guard=guard_state, **new)
        return new_state, metrics

    return train_step


def eval_variables(state: TrainState, *, use_ema: bool) -> dict:
    """The variables to evaluate: the live parameters or their EMA."""
    if use_ema:
        return dict(state.ema_state.ema)
    return {"params": state.params, **state.model_state}
