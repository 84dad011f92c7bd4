"""The optimizer of a run, built from the (already batch-rescaled) config.

config.optimizer + config.schedule → ``optim.accumulate(chain(clip?, optimizer), micro_batches)``,
with ``optimizer.gradient_scaling`` = 'vrgd' → ``accumulate_with_moments(vrgd(chain(...)))`` or
'agvm' → ``accumulate_halves(agvm(chain(...), groups))``; the small gradients' groups come from
the mesh at trace time (``jaxbatch.train.noise``).
The learning-rate schedule is stated in samples (jaxbatch.scaling), so a config that changes the
batch keeps warm-up and decay at the same point of training in epochs.
"""

from __future__ import annotations

import math
import re

import jax
import ml_collections
import optax

from jaxbatch import optim, scaling
from jaxbatch.optim.masks import param_path
from jaxbatch.train import config as config_lib
from jaxbatch.train import noise as noise_lib
from jaxbatch.train import tasks as tasks_lib


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


def top_level_groups(params) -> tuple[tuple[str, str], ...]:
    """AGVM's default groups: one per top-level module of ``params``, in tree order."""
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        head = param_path(path).split("/")[0]
        if head not in names:
            names.append(head)
    return tuple((n, f"{re.escape(n)}(/.*)?") for n in names)


def _lazy_agvm(inner, cfg: ml_collections.ConfigDict):
    """``optim.agvm`` whose default groups (``agvm_groups = ()``) are read off the parameters."""
    o = cfg.optimizer
    start = o.agvm_start_samples
    if start < 0:
        start = cfg.schedule.warmup_samples
    start_step = math.ceil(start / cfg.batch_size)

    def build(params):
        groups = tuple(tuple(g) for g in o.agvm_groups) or top_level_groups(params)
        return optim.agvm(
            inner,
            groups,
            reference=o.agvm_reference or None,
            momentum=float(o.agvm_momentum),
            interval=o.agvm_interval,
            start_step=start_step,
        )

    def init_fn(params):
        return build(params).init(params)

    def update_fn(updates, state, params=None, **extra_args):
        return build(updates).update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_optimizer(cfg: ml_collections.ConfigDict, *, aux_shapes=None, layer_axes=None):
    """The accumulator around the inner optimizer: one jitted step over micro-batches.

    ``noise_lib.accumulate_for_training`` (``optim.accumulate``, or ``accumulate_with_moments`` /
    ``accumulate_halves`` for vrgd / agvm) whose noise groups the step chooses from the mesh;
    the result carries the run's ``noise_lib.NoiseSettings`` as ``.noise``.

    ``aux_shapes``: shapes of what the loss reports per micro-batch (see ``optim.accumulate``;
    its 'model_state' tells a batch-norm model); ``layer_axes``: see
    :func:`make_inner_optimizer`.

    Raises:
      ConfigError: ``config.noise.groups > 1`` on a model where groups do not apply.
    """
    inner = make_inner_optimizer(cfg, layer_axes=layer_axes)
    scaling_name = cfg.optimizer.gradient_scaling
    if scaling_name == "vrgd":
        inner = optim.vrgd(
            inner,
            gamma=float(cfg.optimizer.vrgd_gamma),
            scope=cfg.optimizer.vrgd_scope,
            layer_axes=layer_axes if cfg.optimizer.vrgd_scope == "layer" else None,
        )
    elif scaling_name == "agvm":
        inner = _lazy_agvm(inner, cfg)
    state_keys = ()
    if isinstance(aux_shapes, dict) and isinstance(aux_shapes.get("model_state"), dict):
        state_keys = tuple(k for k, v in aux_shapes["model_state"].items() if jax.tree.leaves(v))
    group_task = None
    if cfg.task == "lm" and cfg.loss.implementation != "reference":
        group_task = tasks_lib.make_task(cfg, None)  # the chunked loss without its shard_map
    try:
        settings = noise_lib.settings(
            cfg,
            model_state_keys=state_keys,
            pair_loss=cfg.task == "contrastive",
            group_task=group_task,
        )
    except noise_lib.NoiseConfigError as e:
        raise config_lib.ConfigError(str(e)) from None
    if scaling_name == "vrgd" and not settings.groups_allowed and cfg.micro_batches == 1:
        raise config_lib.ConfigError(
            f"config.optimizer.gradient_scaling='vrgd' with micro_batches=1 needs noise groups, "
            f"which cannot be used here: {settings.why_no_groups}; use micro_batches > 1"
        )
    if settings.enabled and not settings.groups_allowed and settings.groups == 0:
        if jax.process_index() == 0:
            print(
                "noise statistics: per-replica groups off ("
                + settings.why_no_groups
                + (
                    "); B_simple from the micro-batches"
                    if cfg.micro_batches > 1 and cfg.task != "contrastive"
                    else "); no B_simple"
                ),
                flush=True,
            )
    tx = noise_lib.accumulate_for_training(
        inner, cfg.micro_batches, gradient_scaling=scaling_name, aux_shapes=aux_shapes
    )
    return noise_lib.with_settings(tx, settings, gradient_scaling=scaling_name)


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
