"""One training run, as one straight line (docs/architecture.md, "The path of one run").

config → validated, batch-rescaled config → mesh → grain pipeline (this process's shard) →
``jax.eval_shape`` of init → shardings from logical axes → ``jax.jit(init, out_shardings)`` or orbax
restore into those shardings → jitted, donated train step → metrics (progress bar, JSONL,
TensorBoard) and periodic eval / checkpoint → final summary.

Faults (``jaxbatch.train.faults``): SIGTERM / SIGINT save the current step and return; a damaged
checkpoint is moved aside and the next older one used; non-finite steps are skipped inside the step
and a run of them, or a loss spike, rolls back to the last checkpoint with a lower learning rate.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from jaxbatch import data as jdata
from jaxbatch import parallel
from jaxbatch.nn import axes as nn_axes
from jaxbatch.train import checkpoint as ckpt
from jaxbatch.train import config as config_lib
from jaxbatch.train import evaluation, faults, grad_cache, precise_bn
from jaxbatch.train import metrics as metrics_lib
from jaxbatch.train import optimizer as optimizer_lib
from jaxbatch.train import step as step_lib
from jaxbatch.train import tasks as tasks_lib
from jaxbatch.train.evaluation import evaluate, with_precise_bn  # noqa: F401  (public here too)


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


def _log(message: str) -> None:
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
            _log(f"checkpoint {step} is damaged ({e.cause}); moved aside to {aside}")
            continue
        if damaged:
            _log(f"resuming from the newest intact checkpoint, step {step}")
        return step, state, data_state
    if damaged:
        raise ckpt.CheckpointError(
            f"no intact checkpoint to resume from: checkpoint(s) {sorted(damaged)} in "
            f"{checkpointer.directory} cannot be read (kept in "
            f"{checkpointer.directory}{ckpt.DAMAGED_SUFFIX}); move a good copy back, or run "
            "again to start from step 0"
        )
    return None


def _fresh_state(run: Run):
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
        _log(f"resumed from checkpoint at step {step}")
        return state, data_state
    state = _fresh_state(run)
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
    _log(f"initialised params and model state from {source}")
    return state.replace(
        params=weights["params"], model_state=weights["model_state"], ema_state=ema_state
    )


def _fetch(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def check_workdir(workdir: str) -> None:
    """Raises ConfigError, before any work, if ``workdir`` cannot be (or become) a run directory.

    A local path must be a directory or not exist yet, and its nearest existing ancestor must be
    a writable directory; URLs (``gs://...``) are left to the storage layer.
    """
    if "://" in workdir:
        return
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise config_lib.ConfigError(
            f"--workdir {workdir!r} is a file; expected a directory (a new one, or the run "
            "directory of the run to resume)"
        )
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise config_lib.ConfigError(
            f"--workdir {workdir!r} cannot be created: {existing!r} is a file, not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise config_lib.ConfigError(
            f"--workdir {workdir!r} is not writable: no write permission on {existing!r}"
        )


def _load_data(cfg: ml_collections.ConfigDict, split: str) -> jdata.DataSplit:
    """``cfg.dataset``'s split; bad dataset options become a ConfigError naming the option."""
    try:
        return jdata.load_split(cfg.dataset.name, split, **cfg.dataset.options)
    except TypeError as e:  # unknown / missing options (registry._check_split_and_options)
        raise config_lib.ConfigError(f"config.dataset.options: {e}") from None


def _set_guard(state, **values):
    """``state`` with guard fields replaced by replicated scalars of the same dtype."""
    guard = state.guard
    new = {
        k: faults.replicated_scalar(v, getattr(guard, k).dtype, getattr(guard, k))
        for k, v in values.items()
    }
    return state.replace(guard=guard.replace(**new))


def _roll_back(run: Run, state, checkpointer: ckpt.Checkpointer, reason: str, done: int):
    """(state, step) after a fault at step ``done``: the last checkpoint's state (fresh when
    there is none) with the fault counters carried over, one more rollback, the learning rate
    times ``faults.lr_factor``, and the batches since that checkpoint skipped (the iterator is not
    rewound, so they are never seen again).

    Raises:
      faults.TrainingFault: the fault recurred after ``faults.max_rollbacks`` rollbacks.
    """
    f = run.cfg.faults
    g = jax.device_get(state.guard)
    rollbacks = int(g.rollbacks) + 1
    checkpointer.wait()
    restored = restore_newest_intact(run, checkpointer)
    to_step = 0 if restored is None else restored[0]
    if rollbacks > f.max_rollbacks:
        raise faults.TrainingFault(
            f"stopped at step {done}: {reason}, after {rollbacks - 1} rollback(s) (learning rate "
            f"now x{float(g.lr_scale):g}; faults.max_rollbacks={f.max_rollbacks}); "
            f"{int(g.skipped)} steps skipped and {int(g.spikes)} loss spikes in all; the last "
            f"good checkpoint is step {to_step}. Look at the data near batch position "
            f"{done + int(g.data_offset)}, or lower optimizer.learning_rate"
        )
    new_state = _fresh_state(run) if restored is None else restored[1]
    lr_scale = float(g.lr_scale) * f.lr_factor
    new_state = _set_guard(
        new_state,
        skipped=int(g.skipped),
        spikes=int(g.spikes),
        streaks=int(g.streaks),
        consecutive=0,
        rollbacks=rollbacks,
        lr_scale=lr_scale,
        data_offset=int(g.data_offset) + done - to_step,
    )
    first = to_step + int(g.data_offset) + 1
    _log(
        f"fault at step {done}: {reason}; rolled back to step {to_step} (rollback {rollbacks} of "
        f"at most {f.max_rollbacks}), skipping batch positions {first}..{done + int(g.data_offset)}"
        f", learning rate x{lr_scale:g}"
    )
    return new_state, to_step


def train(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    progress: bool = True,
    stop_after_step: int | None = None,
    devices: list | None = None,
) -> dict[str, Any]:
    """Trains (or resumes) the run of ``cfg`` in ``workdir``; returns the final summary.

    Every error a user can cause (config, workdir, data) is raised before the run directory is
    created. SIGTERM / SIGINT during training save the step in progress and return a summary
    with ``'preempted'`` (the signal's name); calling again resumes.

    Args:
      cfg: a config from ``config.load_config`` (validated again here).
      workdir: run directory: resolved config, checkpoints, metrics.jsonl, TensorBoard, plots.
      progress: show a tqdm progress bar.
      stop_after_step: stop (after checkpointing) once this step is reached, as a pre-empted job
        would; a later call resumes. None trains to the end.
      devices: devices of the mesh (default: all devices of all processes).

    Returns:
      {'step', 'samples', 'train_loss', 'eval': {...}, 'eval_ema': {...}?, 'baseline': {...}?,
      'preempted'?, 'state'}.

    Raises:
      faults.TrainingFault: a numerical fault recurred after ``faults.max_rollbacks`` rollbacks.
    """
    from jaxbatch.data import validate as validate_lib

    config_lib.validate(cfg)
    check_workdir(workdir)
    train_data = _load_data(cfg, "train")
    test_data = _load_data(cfg, "test")
    validate_lib.validate_splits(cfg, {"train": train_data, "test": test_data})
    run = build(cfg, train_data=train_data, devices=devices)
    train_data = train_data.select(run.task.fields)
    test_data = test_data.select(run.task.fields)
    cfg = run.cfg
    for change in run.changes:
        _log(
            f"scaling: {change.key} {change.old:g} -> {change.new:g} ({change.rule}, "
            f"batch {cfg.reference_batch_size} -> {cfg.batch_size})"
        )
    for key, value in run.task.choices.items():
        if not key.endswith(".reason"):
            reason = run.task.choices.get(f"{key}.reason")
            _log(f"{key}: {value}" + (f" ({reason})" if reason else ""))
    if grad_cache.applies(run.task, cfg.micro_batches):
        _log(
            f"micro_batches={cfg.micro_batches} with a contrastive loss: gradients through cached "
            "embeddings (the full-batch loss over all pairs; one extra forward pass per step)"
        )
    _log(
        f"schedule in samples: warm-up {cfg.schedule.warmup_samples} and total "
        f"{cfg.total_samples} samples = {cfg.schedule.warmup_samples // cfg.batch_size} and "
        f"{run.total_steps} steps at batch {cfg.batch_size}"
    )
    is_main = jax.process_index() == 0
    run_dir = epath.Path(workdir)  # a local path or a URL such as gs://bucket/run
    with faults.Preemption() as preemption:
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            # The resolved config, with what the run decided itself ('auto' implementations).
            resolved = {**cfg.to_dict(), "resolved": dict(run.task.choices)}
            (run_dir / "config.json").write_text(json.dumps(resolved, indent=2, default=str))
        checkpointer = ckpt.Checkpointer(
            str(run_dir / "checkpoints"), max_to_keep=cfg.max_checkpoints
        )
        state, data_state = init_or_restore(run, checkpointer)
        local_batch = cfg.batch_size // jax.process_count()
        iterator = train_data.train_iterator(
            batch_size=local_batch,
            seed=cfg.seed,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            transform_threads=cfg.dataset.transform_threads,
        )
        if data_state is not None:
            iterator.set_state(data_state)
        writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
        try:
            summary = _train_loop(
                run,
                state,
                iterator,
                checkpointer,
                writer,
                preemption,
                stop_after_step,
                train_data,
                test_data,
                progress and is_main,
            )
        finally:
            checkpointer.close()
            writer.close()
    return summary


def _train_loop(
    run,
    state,
    iterator,
    checkpointer,
    writer,
    preemption,
    stop_after_step,
    train_data,
    test_data,
    progress,
) -> dict[str, Any]:
    cfg = run.cfg
    is_main = jax.process_index() == 0
    run_dir = epath.Path(writer.path).parent
    start = int(jax.device_get(state.step))
    guard = jax.device_get(state.guard)
    offset = int(guard.data_offset)  # batches skipped by earlier rollbacks
    seen = (int(guard.streaks), int(guard.spikes))
    total = run.total_steps
    end = total if stop_after_step is None else min(total, stop_after_step)
    bar = tqdm(
        total=total,
        initial=start,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
        desc=f"{cfg.task}/{cfg.dataset.name} B={cfg.batch_size}",
    )
    log_every = max(1, cfg.log_every_steps)
    schedule = optimizer_lib.make_schedule(cfg)  # for logging the learning rate
    inject = faults.injects(cfg.faults)
    last = {"time": time.perf_counter(), "step": start}
    metrics = None
    step = start
    while step < end:
        batch = parallel.make_global_batch(next(iterator), run.mesh)
        scale = faults.fault_scale(cfg.faults, step + offset + 1) if inject else None
        if scale is None:
            state, metrics = run.train_step(state, batch)
        else:
            factor = faults.replicated_scalar(scale, np.float32, state.step)
            state, metrics = run.injected_step(state, batch, factor)
        step += 1
        done = step
        stopping = preemption.requested(done)
        save_now = (
            (cfg.checkpoint_every_steps and done % cfg.checkpoint_every_steps == 0)
            or done == end
            or stopping
        )
        if done % log_every == 0 or done == end or save_now:
            values = _fetch(metrics)
            now = time.perf_counter()
            values["examples_per_sec"] = (
                (done - last["step"]) * cfg.batch_size / max(now - last["time"], 1e-9)
            )
            values["samples"] = done * cfg.batch_size
            values["learning_rate"] = float(schedule(step - 1)) * values.get("lr_scale", 1.0)
            last.update(time=now, step=done)
            writer.write(done, values)
            bar.set_postfix(loss=f"{values['loss']:.4f}", ex_s=f"{values['examples_per_sec']:.0f}")
            if not cfg.faults.skip_nonfinite and not np.isfinite(values["loss"]):
                raise faults.TrainingFault(
                    f"loss is {values['loss']} at step {done} (faults.skip_nonfinite=False); "
                    "stopping"
                )
            reason = faults.diagnose(values, cfg.faults, seen)
            if reason is not None:
                state, step = _roll_back(run, state, checkpointer, reason, done)
                guard = jax.device_get(state.guard)
                offset, seen = int(guard.data_offset), (int(guard.streaks), int(guard.spikes))
                writer.write(
                    done,
                    {"rolled_back_to": step, "lr_scale": float(guard.lr_scale), "reason": reason},
                    prefix="fault",
                )
                bar.n = step
                bar.refresh()
                continue
        bar.update(1)
        eval_now = bool(cfg.eval_every_steps) and done % cfg.eval_every_steps == 0
        if cfg.precise_bn_batches and (eval_now or done == total):
            state = evaluation.with_precise_bn(
                run, state, train_data
            )  # before the save: checkpoints
        if eval_now and done != total and not stopping:  # hold the statistics that were evaluated
            evaluation.eval_and_log(run, state, test_data, writer, done)
        if save_now:
            checkpointer.save(done, state, iterator.get_state(), run.fingerprint)
        if stopping:
            checkpointer.wait()
            bar.close()
            _log(
                f"preempted ({preemption.signal_name}): saved the checkpoint of step {done} in "
                f"{checkpointer.directory}; run the same command again to resume"
            )
            summary = {"step": done, "samples": done * cfg.batch_size}
            summary["preempted"] = preemption.signal_name
            summary["train_loss"] = _fetch(metrics)["loss"]
            summary["state"] = state
            return summary
    bar.close()
    checkpointer.wait()

    summary: dict[str, Any] = {"step": end, "samples": end * cfg.batch_size}
    if metrics is not None:
        summary["train_loss"] = _fetch(metrics)["loss"]
        for key in ("skipped_steps", "loss_spikes"):
            summary[key] = int(_fetch(metrics).get(key, 0))
        summary["rollbacks"] = int(jax.device_get(state.guard.rollbacks))
    if end == total:
        summary.update(evaluation.eval_and_log(run, state, test_data, writer, end))
        if run.task.baseline is not None:
            summary["baseline"] = run.task.baseline()
        if is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            metrics_lib.plot_curves(
                writer.path,
                str(run_dir / "curves.png"),
                title=f"{cfg.task} {cfg.dataset.name} {cfg.model.name} batch {cfg.batch_size}",
            )
    summary["state"] = state
    return summary
