"""Evaluation of a run: the task's metrics over the whole test split, for the live parameters and
their EMA, and precise batch-norm statistics before each evaluation (Wu & Johnson 2021)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxbatch import data as jdata
from jaxbatch import parallel
from jaxbatch.train import precise_bn
from jaxbatch.train import step as step_lib

if TYPE_CHECKING:
    from jaxbatch.train.run import Run


def evaluate(
    run: Run, state, test_data: jdata.DataSplit | dict, *, use_ema: bool = False
) -> dict[str, float]:
    """The task's metrics on the whole test split (every example exactly once)."""
    cfg = run.cfg
    local = cfg.eval_batch_size // jax.process_count()
    batches = (
        jdata.as_split(test_data)
        .select(run.task.fields)
        .eval_batches(
            transform_threads=cfg.dataset.transform_threads,
            batch_size=local,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )
    )
    variables = step_lib.eval_variables(state, use_ema=use_ema)
    outputs: dict[str, list] = {}
    for batch in batches:
        mask = batch.pop("mask")
        out = run.eval_step(variables, parallel.make_global_batch(batch, run.mesh))
        out = multihost_utils.process_allgather(out, tiled=True)
        mask = (
            multihost_utils.process_allgather(mask, tiled=True) if jax.process_count() > 1 else mask
        )
        for key, value in out.items():
            outputs.setdefault(key, []).append(np.asarray(value)[np.asarray(mask)])
    return run.task.summarize({k: np.concatenate(v) for k, v in outputs.items()})


def with_precise_bn(run: Run, state, train_data: jdata.DataSplit):
    """``state`` with the batch statistics of its parameters (and of its EMA's) recomputed over
    ``config.precise_bn_batches`` training batches (``precise_bn``); unchanged without BN.

    The batches are the first ones of a fixed shuffle of the training split (seed + 1), so the
    statistics depend only on the parameters: a resumed run recomputes the same ones. They have
    the micro-batch size (batch_size / micro_batches), whose activations the step already fits.
    """
    cfg = run.cfg
    if not precise_bn.has_batch_stats(state.model_state):
        return state
    iterator = train_data.select(run.task.fields).train_iterator(
        batch_size=cfg.batch_size // cfg.micro_batches // jax.process_count(),
        seed=cfg.seed + 1,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        transform_threads=cfg.dataset.transform_threads,
    )
    batches = [
        parallel.make_global_batch(next(iterator), run.mesh) for _ in range(cfg.precise_bn_batches)
    ]
    model_state = precise_bn.recompute_batch_stats(
        run.bn_stats_fn, state.params, state.model_state, batches
    )
    state = state.replace(model_state=model_state)
    if run.ema is not None:
        ema = dict(state.ema_state.ema)
        ema_params = ema.pop("params")
        ema_state = precise_bn.recompute_batch_stats(run.bn_stats_fn, ema_params, ema, batches)
        state = state.replace(
            ema_state=state.ema_state._replace(ema={"params": ema_params, **ema_state})
        )
    return state


def eval_and_log(run: Run, state, test_data, writer, step: int) -> dict[str, Any]:
    """Evaluates the live parameters (and the EMA), writes the metrics, returns them."""
    out = {"eval": evaluate(run, state, test_data)}
    writer.write(step, {**out["eval"], "samples": step * run.cfg.batch_size}, prefix="eval")
    if run.ema is not None:
        out["eval_ema"] = evaluate(run, state, test_data, use_ema=True)
        writer.write(
            step, {**out["eval_ema"], "samples": step * run.cfg.batch_size}, prefix="eval_ema"
        )
    return out
