"""Two processes × two CPU devices on localhost (jax.distributed + gloo) vs one process × four.

Each worker (``_multiprocess_worker.py``) joins through ``parallel.initialize()`` from the
``JAXBATCH_*`` variables, feeds only its half of the batch through ``make_global_batch`` and runs
a mean, a psum, a sharded matmul and a sharded gradient. The same ``compute`` runs here on four of
the eight simulated devices, and both are checked against NumPy.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxbatch import parallel
from jaxbatch.parallel import local_cluster

WORKER = Path(__file__).with_name("_multiprocess_worker.py")
TIMEOUT_S = 120


def _load_worker():
    spec = importlib.util.spec_from_file_location("_multiprocess_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_two_processes(tmp_path) -> list[dict]:
    local_cluster.run_local_cluster(
        lambda pid: [sys.executable, str(WORKER), str(tmp_path / f"out{pid}.json")],
        timeout_s=TIMEOUT_S,
    )
    return [json.loads((tmp_path / f"out{pid}.json").read_text()) for pid in range(2)]


@pytest.mark.multiprocess
def test_two_processes_match_one_process(eight_devices, tmp_path):
    worker = _load_worker()
    results = _run_two_processes(tmp_path)

    for pid, r in enumerate(results):
        assert r["source"] == "env" and r["process_id"] == pid == r["process_index"]
        assert r["second_call_source"] == "existing"  # initialize() is idempotent
        assert r["process_count"] == 2 and r["global_devices"] == 4 and r["local_devices"] == 2
        assert r["cpu_collectives"] == "gloo"
        # The host boundary is on the data axis: mesh row d belongs to process d.
        assert r["mesh_process_grid"] == [[0, 0], [1, 1]]
        # Each process holds only its own rows of the global batch, and half of w per device.
        assert r["batch_shape"] == [worker.GLOBAL_BATCH, worker.FEATURES]
        assert r["local_shard_starts"] == [4 * pid, 4 * pid + 2]
        assert r["w_shard_shape"] == [worker.FEATURES // 2, worker.OUTPUTS]

    # Same computation in this process on four devices.
    data = worker.full_data()
    mesh = parallel.make_mesh(data=2, fsdp=2, devices=eight_devices[:4])
    single = worker.compute(mesh, {k: data[k] for k in ("x", "t")}, data["w"])["results"]

    x, t, w = (data[k].astype(np.float64) for k in ("x", "t", "w"))
    y = x @ w
    numpy_ref = {
        "mean": x.mean(axis=0),
        "psum": x.sum(axis=0),
        "matmul": y,
        "loss": np.mean((y - t) ** 2),
        "grad": 2 * x.T @ (y - t) / y.size,
    }
    for key, expected in numpy_ref.items():
        for r in results:
            np.testing.assert_allclose(r["results"][key], single[key], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(r["results"][key], expected, rtol=1e-5, atol=1e-6)
