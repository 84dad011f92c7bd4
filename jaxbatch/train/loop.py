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

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from jaxbatch import data as jdata
from jaxbatch import parallel
from jaxbatch.train import checkpoint as ckpt
from jaxbatch.train import config as config_lib
from jaxbatch.train import evaluation, faults, grad_cache
from jaxbatch.train import metrics as metrics_lib
from jaxbatch.train import optimizer as optimizer_lib
from jaxbatch.train.evaluation import evaluate, with_precise_bn  # noqa: F401  (public here too)
from jaxbatch.train.run import (  # noqa: F401  (public here too)
    Run,
    build,
    fresh_state,
    guard_config,
    init_or_restore,
    log,
    restore_newest_intact,
    state_shardings,
    traced_under_mesh,
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
    new_state = fresh_state(run) if restored is None else restored[1]
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
    log(
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
        log(
            f"scaling: {change.key} {change.old:g} -> {change.new:g} ({change.rule}, "
            f"batch {cfg.reference_batch_size} -> {cfg.batch_size})"
        )
    for key, value in run.task.choices.items():
        if not key.endswith(".reason"):
            reason = run.task.choices.get(f"{key}.reason")
            log(f"{key}: {value}" + (f" ({reason})" if reason else ""))
    if grad_cache.applies(run.task, cfg.micro_batches):
        log(
            f"micro_batches={cfg.micro_batches} with a contrastive loss: gradients through cached "
            "embeddings (the full-batch loss over all pairs; one extra forward pass per step)"
        )
    log(
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
            log(
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
