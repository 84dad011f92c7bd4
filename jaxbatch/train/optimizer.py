"""The optimizer of a run, built from the (already batch-rescaled) config.

config.optimizer + config.schedule → ``optim.accumulate(chain(clip?, optimizer), micro_batches)``.
The learning-rate schedule is stated in samples (jaxbatch.scaling), so a config that changes the
batch keeps warm-up and decay at the same point of training in epochs.
"""

from __future__ import annotations

import ml_collections
import optax

from jaxbatch import optim, scaling


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """The per-step learning rate of the run (a function of the step)."""
    peak = cfg.optimizer.learning_rate
    sched = cfg.schedule
    common = dict(
        warmup_samples=sched.warmup_samples,
        total_samples=cfg.total_samples,
        batch_size=cfg.batch_size,
    )
    if sched.name == "constant":
        return optax.constant_schedule(peak)
    if sched.name == "warmup_cosine":
        return scaling.warmup_cosine_in_samples(peak, end_lr=peak * sched.end_lr_fraction, **common)
    if sched.name == "warmup_linear":
        return scaling.warmup_linear_in_samples(peak, end_lr=peak * sched.end_lr_fraction, **common)
    if sched.name == "warmup_rsqrt":
        return scaling.warmup_rsqrt_in_samples(peak, **common)
    raise ValueError(f"schedule.name={sched.name!r}; unknown schedule")


def _mask(cfg: ml_collections.ConfigDict):
    return optim.masks.exclude_bias_and_norm if cfg.optimizer.mask != "none" else None


def make_inner_optimizer(
    cfg: ml_collections.ConfigDict, *, layer_axes=None
) -> optax.GradientTransformation:
    """The optimizer applied to the mean gradient of one step.

    ``layer_axes``: per parameter, its stacked-layer axis or None (``nn.axes.stacked_layer_axes``
    of the model's variables). LARS and LAMB then give every layer slice of a scanned block its
    own trust ratio, as the papers define them per layer (You et al. 2017, Alg. 1; You et al.
    2019, Alg. 2): a scanned model takes the same update as its unscanned twin.
    """
    o = cfg.optimizer
    lr = make_schedule(cfg)
    mask = _mask(cfg)
    if o.name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(o.weight_decay, mask=mask),
            optax.sgd(lr, momentum=o.momentum or None, nesterov=o.nesterov),
        )
    elif o.name == "adamw":
        tx = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
    elif o.name == "lamb":
        tx = optim.lamb(
            lr,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            weight_decay_mask=mask,
            trust_ratio_mask=mask,
            min_ratio=o.min_ratio or None,
            max_ratio=o.max_ratio or None,
            layer_axes=layer_axes,
        )
    elif o.name == "lars":
        tx = optim.lars(
            lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
            weight_decay=o.weight_decay,
            trust_coefficient=o.trust_coefficient,
            weight_decay_mask=mask,
            trust_ratio_mask=mask,
            layer_axes=layer_axes,
        )
    else:
        raise ValueError(f"optimizer.name={o.name!r}; unknown optimizer")
    if o.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    return tx


def make_optimizer(cfg: ml_collections.ConfigDict, *, aux_shapes=None, layer_axes=None):
    """``optim.accumulate`` around the inner optimizer: one jitted step over micro-batches.

    ``aux_shapes``: shapes of what the loss reports per micro-batch (see ``optim.accumulate``);
    ``layer_axes``: see :func:`make_inner_optimizer`.
    """
    inner = make_inner_optimizer(cfg, layer_axes=layer_axes)
    return optim.accumulate(inner, cfg.micro_batches, aux_shapes=aux_shapes)


def make_ema(cfg: ml_collections.ConfigDict):
    """The model EMA, or None. ``ema.decay`` is already rescaled to ``batch_size``.

    The warm-up ramp is ``ema.warmup_samples / batch_size`` steps (a float: the decay after t
    steps is ρ·min(1, t·B / warmup_samples)), so like the learning-rate schedule it ends after the
    same number of samples at every batch size.
    """
    if cfg.ema.decay == 0.0:
        return None
    return optim.model_ema(
        cfg.ema.decay,
        batch_size=cfg.batch_size,
        warmup_steps=cfg.ema.warmup_samples / cfg.batch_size,
    )
