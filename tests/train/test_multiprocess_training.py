"""Two processes × two CPU devices (jax.distributed + gloo) train like one process × four.

The workers (``_train_worker.py``) run ``loop.train`` on a data=2 × fsdp=2 mesh spanning both
processes, each loading only its half of every batch, and stop after ``STOP_STEP`` with a sharded
checkpoint. Here, one process trains the same config on four of the eight simulated devices; the
parameters must agree. Then this process resumes the two-process checkpoint on a *different* mesh
(1 × 8 × 1 over eight devices) and must finish with the parameters of an uninterrupted run.
"""

import importlib.util
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from jaxbatch import data as jdata
from jaxbatch import parallel
from jaxbatch.parallel import local_cluster
from jaxbatch.train import loop

WORKER = Path(__file__).with_name("_train_worker.py")
TIMEOUT_S = 300


def _load_worker():
    spec = importlib.util.spec_from_file_location("_train_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


def _run_two_processes(workdir: Path, out: Path) -> None:
    local_cluster.run_local_cluster(
        lambda pid: [sys.executable, str(WORKER), str(workdir), str(out)], timeout_s=TIMEOUT_S
    )


def _train_steps(cfg, devices, steps: int):
    """Single-process reference: the trainer's build/init and data order, `steps` steps."""
    arrays = jdata.load_arrays("digits", "train")
    run = loop.build(cfg, train_data=arrays, devices=devices)
    state, _ = loop.init_or_restore(run, None)
    it = jdata.make_train_iterator(
        {f: arrays[f] for f in run.task.fields}, batch_size=cfg.batch_size, seed=cfg.seed
    )
    first = None
    for _ in range(steps):
        batch = next(it)
        first = batch if first is None else first
        state, _ = run.train_step(state, parallel.make_global_batch(batch, run.mesh))
    return state, first


@pytest.mark.multiprocess
def test_two_processes_train_like_one_and_resume_on_another_mesh(eight_devices, tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "two_process.npz"
    _run_two_processes(workdir, out)
    result = dict(np.load(out, allow_pickle=False))
    two_proc = {k.removeprefix("param"): v for k, v in result.items() if k.startswith("param")}

    # One process, four devices, same mesh shape: same parameters after STOP_STEP steps.
    cfg = worker.config()
    state, first_batch = _train_steps(cfg, eight_devices[:4], worker.STOP_STEP)
    single = worker.flat(jax.device_get(state.params))
    assert set(single) == set(two_proc)
    chex.assert_trees_all_close(two_proc, single, rtol=1e-5, atol=1e-6)

    # Each process fed only its half of the global batch: process p owns rows [32p, 32p + 32),
    # which are exactly those rows of the single-process batch.
    assert int(result["process_count"]) == 2
    assert result["global_shape"].tolist() == [cfg.batch_size]
    np.testing.assert_array_equal(result["fed_starts"], [[0, 16], [32, 48]])
    np.testing.assert_array_equal(
        result["fed_labels"].reshape(-1), np.asarray(first_batch["label"])
    )

    # Resume the two-process checkpoint in this process on a 1 × 8 × 1 mesh, to the end.
    other = worker.config("mesh.data=1,mesh.fsdp=8,mesh.tensor=1")
    summary = loop.train(other, str(workdir), progress=False)
    total = other.total_samples // other.batch_size
    assert summary["step"] == total > worker.STOP_STEP
    resumed = summary["state"].params
    kernel = resumed["conv_init"]["kernel"]
    assert kernel.sharding.spec[-1] == "fsdp" and len(kernel.sharding.device_set) == 8
    reference, _ = _train_steps(cfg, eight_devices[:4], total)
    chex.assert_trees_all_close(
        worker.flat(jax.device_get(resumed)),
        worker.flat(jax.device_get(reference.params)),
        rtol=1e-5,
        atol=1e-6,
    )
