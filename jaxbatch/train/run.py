"""A run before its first step: the mesh, the task, the optimizer, the jitted steps, the state.

``build(cfg)`` turns a validated config into a ``Run`` (nothing allocated but the init batch: the
planner compiles its steps from shapes alone); ``init_or_restore`` gives its state, fresh or from
the newest intact checkpoint (docs/architecture.md, "The path of one run"). ``jaxbatch.train.loop``
trains it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from jaxbatch import data as jdata
from jaxbatch import parallel
from jaxbatch.nn import axes as nn_axes
from jaxbatch.train import checkpoint as ckpt
from jaxbatch.train import config as config_lib
from jaxbatch.train import optimizer as optimizer_lib
from jaxbatch.train import precise_bn
from jaxbatch.train import step as step_lib
from jaxbatch.train import tasks as tasks_lib


@dataclasses.dataclass
class Run:
    """The pieces of a run that the loop, the planner and the tests share."""

    cfg: ml_collections.ConfigDict
    changes: list
    task: tasks_lib.Task
    mesh: Any
    tx: Any
    ema: Any
    state_shardings: Any
    batch_sharding: Any
    abstract_state: Any
    train_step: Any  # jitted (state, batch) -> (state, metrics), state donated
    eval_step: Any  # jitted (variables, batch) -> per-example outputs
    init_batch: dict
    fingerprint: dict
    rules: tuple = parallel.DEFAULT_RULES  # logical axis -> mesh axes

    @property
    def total_steps(self) -> int:
        return self.cfg.total_samples // self.cfg.batch_size

    @functools.cached_property
    def injected_step(self):
        """``train_step`` with a third argument multiplying gradients and loss (fault injection,
        ``config.faults.inject_*``); compiled only by runs that inject."""
        step = step_lib.make_train_step(
            self.task,
            self.tx,
            self.ema,
            micro_batches=self.cfg.micro_batches,
            guard=guard_config(self.cfg),
        )
        replicated = parallel.replicated(self.mesh)
        return jax.jit(
            traced_under_mesh(step, self.mesh, self.rules),
            in_shardings=(self.state_shardings, self.batch_sharding, replicated),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )

    @functools.cached_property
    def bn_stats_fn(self):
        """Jitted ``precise_bn.make_stats_fn(task)`` under the mesh (compiled once per run)."""
        stats = precise_bn.make_stats_fn(self.task)
        return jax.jit(traced_under_mesh(stats, self.mesh, self.rules))


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _init_batch(split: jdata.DataSplit) -> dict:
    """The first two examples (through the evaluation transform): enough to trace init."""
    return split.examples([0, 1] if len(split) > 1 else [0, 0])


def state_shardings(
    ema, mesh, abstract_vars, abstract_state, rules=parallel.DEFAULT_RULES
) -> step_lib.TrainState:
    """Shardings of every leaf of the train state, from the models' logical axes and ``rules``."""
    var_shardings = parallel.param_shardings(abstract_vars, mesh, rules)
    var_shardings = dict(var_shardings)
    param_sh = var_shardings.pop("params")
    replicated = parallel.replicated(mesh)
    s = abstract_state
    opt_sh = parallel.opt_state_shardings(s.opt_state, s.params, param_sh)
    ema_sh = None
    if ema is not None:
        ema_sh = parallel.opt_state_shardings(
            s.ema_state,
            {"params": s.params, **s.model_state},
            {"params": param_sh, **var_shardings},
        )
    return step_lib.TrainState(
        step=replicated,
        params=param_sh,
        model_state=var_shardings,
        opt_state=opt_sh,
        ema_state=ema_sh,
        noise=jax.tree.map(lambda _: replicated, s.noise),
        rng=replicated,
        guard=jax.tree.map(lambda _: replicated, s.guard),
    )


def guard_config(cfg: ml_collections.ConfigDict) -> step_lib.GuardConfig:
    """The in-step guard of ``config.faults``."""
    f = cfg.faults
    return step_lib.GuardConfig(
        skip_nonfinite=f.skip_nonfinite,
        spike_factor=float(f.spike_factor),
        spike_warmup_steps=f.spike_warmup_steps,
        loss_ema_decay=float(f.loss_ema_decay),
        max_consecutive_skips=f.max_consecutive_skips,
    )


def traced_under_mesh(fn, mesh, rules=parallel.DEFAULT_RULES):
    """``fn`` traced with ``mesh`` and the logical-axis rules active.

    Inside, the models' ``nn.with_logical_constraint`` calls become sharding constraints on the
    activations (outside any mesh context they are silently dropped). ``jax.set_mesh`` cannot be
    entered under ``jax.jit``, the abstract mesh can, so the context is entered by the traced
    function itself and every trace of it (first call, ``.lower``) is constrained.
    """

    @functools.wraps(fn)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            with nn.logical_axis_rules(rules):
                return fn(*args)

    return traced


def build(
    cfg: ml_collections.ConfigDict,
    *,
    train_data: jdata.DataSplit | dict | None = None,
    devices: list | None = None,
) -> Run:
    """Everything up to (not including) the first step: nothing is allocated but the init batch.

    Args:
      cfg: a training config (validated and rescaled to its batch here).
      train_data: the training split (a ``DataSplit`` or a dict of arrays); only its first two
        examples are used (to trace init), so arrays of zeros with the right shapes build a run
        without data (the planner). Default: ``cfg.dataset``'s train split.
      devices: devices of the mesh; default all devices of all processes.
    """
    config_lib.validate(cfg)
    cfg, changes = config_lib.rescale_for_batch(cfg)
    mesh = parallel.make_mesh(**cfg.mesh.to_dict(), devices=devices)
    parallel.check_batch_divisible(cfg.batch_size, mesh)
    parallel.check_batch_divisible(cfg.eval_batch_size, mesh)
    micro = cfg.batch_size // cfg.micro_batches
    if micro % parallel.batch_axis_size(mesh):
        raise config_lib.ConfigError(
            f"micro-batch {micro} (batch_size {cfg.batch_size} / micro_batches "
            f"{cfg.micro_batches}) is not divisible by data×fsdp = {parallel.batch_axis_size(mesh)}"
        )
    rules = parallel.make_rules(cfg.sharding_rules.to_dict())
    task = tasks_lib.make_task(cfg, mesh)
    if train_data is None:
        train_data = jdata.load_split(cfg.dataset.name, "train", **cfg.dataset.options)
    init_batch = _init_batch(jdata.as_split(train_data).select(task.fields))

    rng = jax.random.PRNGKey(cfg.seed)
    abstract_vars = jax.eval_shape(task.init_fn, rng, init_batch)
    abstract_params, abstract_model_state = tasks_lib.split_variables(nn.meta.unbox(abstract_vars))
    abstract_micro = {
        f: jax.ShapeDtypeStruct((micro, *init_batch[f].shape[1:]), init_batch[f].dtype)
        for f in task.fields
    }
    aux = step_lib.aux_shapes(task, abstract_params, abstract_model_state, abstract_micro)
    layer_axes = nn_axes.stacked_layer_axes(abstract_vars)["params"]
    tx = optimizer_lib.make_optimizer(cfg, aux_shapes=aux, layer_axes=layer_axes)
    ema = optimizer_lib.make_ema(cfg)
    init = functools.partial(step_lib.init_state, task, tx, ema)
    abstract_state = jax.eval_shape(init, rng, init_batch)
    shardings = state_shardings(ema, mesh, abstract_vars, abstract_state, rules)
    batch_sharding = parallel.batch_sharding(mesh)
    train_step = jax.jit(
        traced_under_mesh(
            step_lib.make_train_step(
                task, tx, ema, micro_batches=cfg.micro_batches, guard=guard_config(cfg)
            ),
            mesh,
            rules,
        ),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )
    eval_step = jax.jit(traced_under_mesh(task.eval_fn, mesh, rules), out_shardings=batch_sharding)
    fp = ckpt.fingerprint(cfg.task, cfg.model.to_dict(), abstract_state.params, abstract_state)
    return Run(
        cfg,
        changes,
        task,
        mesh,
        tx,
        ema,
        shardings,
        batch_sharding,
        abstract_state,
        train_step,
        eval_step,
        init_batch,
        fp,
        rules,
    )


def _abstract_with_shardings(run: Run):
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        run.abstract_state,
        run.state_shardings,
    )


def restore_newest_intact(run: Run, checkpointer: ckpt.Checkpointer):
    """(step, state, data state) of the newest checkpoint that restores, or None if none exists.

    A damaged checkpoint (unreadable files) is reported in one line and moved aside
    (``Checkpointer.move_aside``); the next older one is tried. A checkpoint of another model is
    not damage: its ``CheckpointError`` propagates.

    Raises:
      CheckpointError: every checkpoint was damaged (they are kept aside), or another model's.
    """
    damaged = []
    for step in reversed(checkpointer.all_steps()):
        try:
            checkpointer.check_compatible(step, run.fingerprint)
            state, data_state = checkpointer.restore(step, _abstract_with_shardings(run))
        except ckpt.DamagedCheckpoint as e:
            aside = checkpointer.move_aside(step)
            damaged.append(step)
            log(f"checkpoint {step} is damaged ({e.cause}); moved aside to {aside}")
            continue
        if damaged:
            log(f"resuming from the newest intact checkpoint, step {step}")
        return step, state, data_state
    if damaged:
        raise ckpt.CheckpointError(
            f"no intact checkpoint to resume from: checkpoint(s) {sorted(damaged)} in "
            f"{checkpointer.directory} cannot be read (kept in "
            f"{checkpointer.directory}{ckpt.DAMAGED_SUFFIX}); move a good copy back, or run "
            "again to start from step 0"
        )
    return None


def fresh_state(run: Run):
    init = jax.jit(
        traced_under_mesh(
            functools.partial(step_lib.init_state, run.task, run.tx, run.ema),
            run.mesh,
            run.rules,
        ),
        out_shardings=run.state_shardings,
    )
    return init(jax.random.PRNGKey(run.cfg.seed), run.init_batch)


def init_or_restore(run: Run, checkpointer: ckpt.Checkpointer | None):
    """(state, data-iterator state or None): restored from the newest intact checkpoint, else
    fresh (with ``init_from``'s weights when set)."""
    restored = restore_newest_intact(run, checkpointer) if checkpointer is not None else None
    if restored is not None:
        step, state, data_state = restored
        log(f"resumed from checkpoint at step {step}")
        return state, data_state
    state = fresh_state(run)
    if run.cfg.init_from:
        state = _with_weights_from(run, state, run.cfg.init_from)
    return state, None


def _with_weights_from(run: Run, state, source: str):
    """``state`` with params and model state (and a fresh EMA of them) from run ``source``."""
    abstract = {
        key: jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            getattr(run.abstract_state, key),
            getattr(run.state_shardings, key),
        )
        for key in ("params", "model_state")
    }
    weights = ckpt.restore_weights(source, abstract, run.fingerprint)
    ema_state = state.ema_state
    if run.ema is not None:
        ema_state = run.ema.init({"params": weights["params"], **weights["model_state"]})
    log(f"initialised params and model state from {source}")
    return state.replace(
        params=weights["params"], model_state=weights["model_state"], ema_state=ema_state
    )
