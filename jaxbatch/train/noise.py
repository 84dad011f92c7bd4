"""The trainer's in-step gradient-noise statistics (``config.noise``).

Every step of ``jaxbatch train`` measures the squared norms of small-batch gradients and of their
mean, the inputs of the two-batch estimators of McCandlish et al. 2018 (App. A.1)::

  E|G_B|^2 = |G|^2 + tr(Sigma) / B
  |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
  tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)
  B_simple  = EMA(tr Sigma) / EMA(|G|^2)                              (their Sec. 2, Eq. 2.8)

The small gradients are the k micro-batch gradients of ``optim.accumulate`` and/or, with G noise
groups, the G gradients of contiguous blocks of every micro-batch, computed side by side
(``jax.vmap``) with the group axis on the mesh's batch axes: the per-replica gradients of data
parallelism before their mean. |G_small|^2 is the mean of the k·G squared norms (not the square
of the mean norm), each norm summed over every parameter shard; B_small = B/(k·G), B_big = B.
Both are counted in examples, in tokens for the 'lm' task (every position of a sequence is a
term of the mean loss). Norms are f32 and taken before clipping (the gradient as averaged).
Each estimate has its own EMA, with a decay exp(-B/ema_samples) per step: the horizon is stated
in samples, so it covers the same stretch of training at every batch size.

Which G (``config.noise.groups``):

- 0 (automatic): G = data × fsdp, the number of data-parallel replicas, one group per replica;
  on a mesh with one batch shard, G = 2 when micro_batches == 1 (two half-batch gradients
  side by side: the same FLOPs as one gradient, one more gradient buffer) and G = 1 when
  micro_batches > 1 (the micro-batches are the small gradients already).
- 1: no groups; statistics from micro-batches only (none when micro_batches == 1).
- on a mesh with a 'context' axis > 1, automatic groups are off and explicit ones refused: the
  context-parallel attention's shard_map over the batch axes cannot sit inside the group vmap.
- G > 1: G groups; it must divide the micro-batch.

The group axis lies on the longest prefix of the batch axes ('data', 'fsdp') whose size divides
G; inside a group the model's logical axis 'batch' maps to the remaining batch axes and no
other logical axis maps to the group's mesh axes, so the activation constraints stay valid
(each group on its own devices). With G = data × fsdp every
device holds the whole (tensor-sharded) gradient of its group; ``noise.groups = mesh.data``
keeps the group gradients fsdp-sharded (batch inside a group over 'fsdp').

Models whose per-group gradients are not independent estimates of per-example gradients:

- batch norm (the model keeps 'batch_stats'): a group's gradient would normalise by the group's
  statistics instead of the micro-batch's, which changes the update itself (ghost batch norm),
  not only the measurement;
- contrastive losses (the task embeds pairs, ``Task.embed_fn``): a group's loss has only the
  group's negatives, a different objective.

For these, automatic groups are switched off with a logged line (the micro-batch statistics of
``micro_batches > 1`` remain, as before: those gradients are the ones the update averages, and
contrastive accumulation goes through gradient caching, which has none), and an explicit
``noise.groups > 1`` is refused with a ConfigError when the run is built: disabling silently
what the user asked for would be worse than an error, and enabling it would change training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import PartitionSpec as P

from jaxbatch import optim
from jaxbatch.optim.accumulate import AccumulateState

BATCH_AXES = ("data", "fsdp")
GRADIENT_SCALINGS = ("none", "vrgd", "agvm")
DEFAULT_EMA_SAMPLES = 5120  # exp(-256/5120) = 0.951: the old per-step decay 0.95 at batch 256


class NoiseConfigError(ValueError):
    """``config.noise`` that cannot run with this model or mesh (``make_optimizer`` re-raises
    it as a ``ConfigError``)."""


@dataclasses.dataclass(frozen=True)
class NoiseSettings:
    """What the train step needs of ``config.noise`` (static; built by :func:`settings`).

    Attributes:
      enabled: compute and log the statistics.
      groups: as configured (0 = automatic, see the module docstring).
      ema_samples: horizon of the two EMAs, in samples.
      groups_allowed: False for batch-norm models and contrastive losses (see above).
      why_no_groups: the reason when ``groups_allowed`` is False.
      vrgd: the optimizer is VRGD, which needs the small gradients even when the statistics
        are off.
      group_task: the task whose loss runs inside a group, or None for the step's own task (the
        'lm' task's chunked loss on a sharded batch runs in a ``shard_map`` over the batch axes,
        which cannot sit inside the vmap over groups; inside a group it runs unsharded).
    """

    enabled: bool = True
    groups: int = 0
    ema_samples: float = DEFAULT_EMA_SAMPLES
    groups_allowed: bool = True
    why_no_groups: str = ""
    group_task: Any = None
    vrgd: bool = False


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """How one step computes its small gradients (from the mesh, at trace time).

    Attributes:
      groups: G, small gradients per micro-batch (1 = none).
      axes: mesh axes the group axis is sharded over (None: not sharded).
      inner_batch_axes: mesh axes of the logical axis 'batch' inside a group.
    """

    groups: int
    axes: tuple[str, ...] | None = None
    inner_batch_axes: tuple[str, ...] | None = None


def why_groups_do_not_apply(task_name: str, model_state_keys, pair_loss: bool) -> str:
    """'' when per-group gradients are independent small-batch gradients, else why not."""
    if pair_loss or task_name == "contrastive":
        return (
            "the contrastive loss couples every example of the batch with every other (a group's "
            "loss would have only the group's negatives)"
        )
    if "batch_stats" in model_state_keys:
        return (
            "the model has batch norm ('batch_stats'): a group's gradient would use the group's "
            "statistics, which changes the update (ghost batch norm), not only the measurement"
        )
    return ""


def settings(cfg, *, model_state_keys=(), pair_loss: bool = False, group_task=None):
    """``NoiseSettings`` of a validated config; raises NoiseConfigError for explicit groups on a
    model where they do not apply (see the module docstring)."""
    n = cfg.noise
    why = why_groups_do_not_apply(cfg.task, tuple(model_state_keys), pair_loss)
    if n.enabled and n.groups > 1 and why:
        raise NoiseConfigError(
            f"config.noise.groups={n.groups} cannot be used with task {cfg.task!r} / model "
            f"{cfg.model.name!r}: {why}; set config.noise.groups=0 (automatic: off for this "
            "model) or 1 (micro-batch statistics only)"
        )
    return NoiseSettings(
        enabled=bool(n.enabled),
        groups=int(n.groups),
        ema_samples=float(n.ema_samples),
        groups_allowed=not why,
        why_no_groups=why,
        group_task=group_task,
    )


def plan_groups(
    s: NoiseSettings, mesh_shape: Mapping[str, int], batch_size: int, micro_batches: int
) -> GroupPlan:
    """The :class:`GroupPlan` of a step of ``batch_size`` examples on a mesh of ``mesh_shape``.

    Raises:
      NoiseConfigError: G does not divide the micro-batch, or a group's examples do not split
        over the batch axes left inside a group.
    """
    if not (s.enabled or s.vrgd) or not s.groups_allowed or s.groups == 1:
        return GroupPlan(1)
    sizes = {a: int(mesh_shape.get(a, 1)) for a in BATCH_AXES}
    shards = math.prod(sizes.values())
    g = s.groups
    context = int(mesh_shape.get("context", 1))
    if context > 1:  # context-parallel attention: a shard_map over the batch and context axes
        if g > 1:
            raise NoiseConfigError(
                f"config.noise.groups={g} with mesh.context={context}: the context-parallel "
                "attention runs in a shard_map over the batch axes, which cannot sit inside "
                "the vmap over groups; use noise.groups=0 (off on this mesh) or 1"
            )
        return GroupPlan(1)
    if g == 0:
        g = shards if shards > 1 else (2 if micro_batches == 1 else 1)
    if g == 1:
        return GroupPlan(1)
    micro = batch_size // micro_batches
    if micro % g:
        raise NoiseConfigError(
            f"config.noise.groups: {g} groups do not divide the micro-batch of {micro} examples "
            f"(batch {batch_size} / micro_batches {micro_batches}); choose groups dividing {micro}"
        )
    axes, prod = [], 1
    for a in BATCH_AXES:
        if g % (prod * sizes[a]):
            break
        axes.append(a)
        prod *= sizes[a]
    inner = tuple(a for a in BATCH_AXES if a not in axes and sizes[a] > 1)
    inner_size = math.prod(sizes[a] for a in inner)
    if (micro // g) % inner_size:
        raise NoiseConfigError(
            f"config.noise.groups={g}: a group of {micro // g} examples does not split over the "
            f"batch axes {inner} (size {inner_size}) left inside a group on the mesh {sizes}; "
            f"choose groups = data × fsdp = {shards} or a divisor of it"
        )
    if prod == 1:
        return GroupPlan(g, None, inner or None)
    return GroupPlan(g, tuple(axes), inner or None)


def ema_decay(s: NoiseSettings, batch_examples: int) -> float:
    """Per-step decay exp(-B / ema_samples) of the two EMAs (horizon in samples)."""
    return math.exp(-batch_examples / s.ema_samples)


def rules_inside_group(rules, plan: GroupPlan) -> tuple:
    """``rules`` for the inside of a group: 'batch' → ``plan.inner_batch_axes``, and the group's
    mesh axes taken out of every other rule (they hold the group axis there, e.g. the 'embed' of
    an activation would otherwise land on 'fsdp' once 'batch' no longer takes it)."""
    taken = set(plan.axes or ())
    out = [("batch", plan.inner_batch_axes)]
    for name, axes in rules:
        if name == "batch":
            continue
        if axes is not None:
            names = (axes,) if isinstance(axes, str) else tuple(axes)
            names = tuple(a for a in names if a not in taken)
            axes = names[0] if len(names) == 1 else (names or None)
        out.append((name, axes))
    return tuple(out)


def in_group(grad_fn: Callable, plan: GroupPlan) -> Callable:
    """``grad_fn`` traced with the logical-axis rules of the inside of a group."""
    if plan.axes is None:
        return grad_fn
    rules = rules_inside_group(nn.get_logical_axis_rules(), plan)

    def wrapped(*args):
        with nn.logical_axis_rules(rules):
            return grad_fn(*args)

    return wrapped


def constrain_groups(plan: GroupPlan) -> Callable | None:
    """Puts the [G, ...] stacked group gradients' leading axis on the group's mesh axes."""
    if plan.axes is None:
        return None

    def constrain(tree):
        def leaf(x):
            spec = P(plan.axes, *([P.UNCONSTRAINED] * (x.ndim - 1)))
            return jax.lax.with_sharding_constraint(x, spec)

        return jax.tree.map(leaf, tree)

    return constrain


def examples_unit(task_name: str, batch: dict) -> int:
    """Terms of the mean loss per example: the sequence length for 'lm', else 1."""
    if task_name == "lm":
        return int(batch["tokens"].shape[1]) - 1
    return 1


def accumulate_for_training(
    inner: optax.GradientTransformation,
    micro_batches: int,
    *,
    gradient_scaling: str = "none",
    aux_shapes: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """The trainer's accumulator: ``optim.accumulate`` (or ``accumulate_with_moments`` for vrgd,
    ``accumulate_halves`` for agvm) whose noise groups are chosen per trace.

    ``update(None, state, params, grad_fn=, batch=, rng=, noise_groups=G, group_axis_name=...,
    constrain_group_grads=...)``: the step passes the groups of its mesh (:func:`plan_groups`),
    which the mesh decides at trace time; the state is an ``AccumulateState`` whatever G is, so
    checkpoints do not depend on it. Without ``grad_fn`` the gradients pass to ``inner``.
    """
    if gradient_scaling not in GRADIENT_SCALINGS:
        raise ValueError(
            f"gradient_scaling={gradient_scaling!r}; expected one of {GRADIENT_SCALINGS}"
        )
    plain = optim.accumulate(inner, micro_batches, aux_shapes=aux_shapes)

    def build(groups, axis_name, constrain):
        kwargs = dict(
            aux_shapes=aux_shapes,
            noise_groups=groups,
            group_axis_name=axis_name,
            constrain_group_grads=constrain,
        )
        if gradient_scaling == "vrgd":
            return optim.accumulate_with_moments(inner, micro_batches, **kwargs)
        if gradient_scaling == "agvm":
            return optim.accumulate_halves(inner, micro_batches, **kwargs)
        return optim.accumulate(inner, micro_batches, **kwargs)

    def update_fn(
        updates,
        state: AccumulateState,
        params=None,
        *,
        noise_groups: int = 1,
        group_axis_name=None,
        constrain_group_grads=None,
        **extra_args,
    ):
        if extra_args.get("grad_fn") is None and gradient_scaling == "none":
            return plain.update(updates, state, params, **extra_args)
        tx = build(noise_groups, group_axis_name, constrain_group_grads)
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(plain.init, update_fn)


class TrainOptimizer(optax.GradientTransformationExtraArgs):
    """The optimizer of a run: an optax transformation that also carries the run's
    :class:`NoiseSettings` (``tx.noise``), which ``step.make_train_step`` reads."""

    noise: NoiseSettings = NoiseSettings()


def with_settings(tx, noise: NoiseSettings, *, gradient_scaling: str = "none") -> TrainOptimizer:
    """``tx`` as a :class:`TrainOptimizer` carrying ``noise`` (``vrgd`` set from the scaling)."""
    out = TrainOptimizer(tx.init, tx.update)
    out.noise = dataclasses.replace(noise, vrgd=gradient_scaling == "vrgd")
    return out
