"""One process of the two-process localhost test (run by test_multiprocess.py, not by pytest).

Usage: python _multiprocess_worker.py OUT.json, with JAXBATCH_COORDINATOR, JAXBATCH_NUM_PROCESSES,
JAXBATCH_PROCESS_ID and XLA_FLAGS=--xla_force_host_platform_device_count=2 set by the test.

The process joins the cluster with ``initialize()``, builds a data=2 × fsdp=2 mesh over the four
devices of both processes, feeds only its own half of the batch, and writes what ``compute`` returns
(plus what it saw of the cluster) as JSON. The test runs the same ``compute`` in one process on four
devices and compares.
"""

import json
import sys

import numpy as np

GLOBAL_BATCH = 8
FEATURES = 6
OUTPUTS = 4


def full_data() -> dict[str, np.ndarray]:
    """The global batch and weights, identical in every process (fixed seed)."""
    rng = np.random.default_rng(0)
    return {
        "x": rng.normal(size=(GLOBAL_BATCH, FEATURES)).astype(np.float32),
        "t": rng.normal(size=(GLOBAL_BATCH, OUTPUTS)).astype(np.float32),
        "w": rng.normal(size=(FEATURES, OUTPUTS)).astype(np.float32),
    }


def compute(mesh, local_batch: dict[str, np.ndarray], w: np.ndarray) -> dict:
    """Mean, psum, a sharded matmul and a sharded gradient over the global batch."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxbatch import parallel

    batch = parallel.make_global_batch(local_batch, mesh)
    # The weight is sharded ZeRO-style along fsdp: each device holds FEATURES / fsdp rows.
    w_sharding = NamedSharding(mesh, P("fsdp", None))
    w_global = jax.make_array_from_callback(w.shape, w_sharding, lambda index: w[index])
    rep = parallel.replicated(mesh)

    def column_sums(x):
        local = jnp.sum(x, axis=0)
        return jax.lax.psum(local, parallel.BATCH_AXES)

    psum = jax.shard_map(
        column_sums, mesh=mesh, in_specs=P(parallel.BATCH_AXES), out_specs=P(), check_vma=False
    )

    def step(batch, w):
        def loss_fn(w):
            return jnp.mean((batch["x"] @ w - batch["t"]) ** 2)

        loss, grad = jax.value_and_grad(loss_fn)(w)
        return {
            "mean": jnp.mean(batch["x"], axis=0),
            "psum": psum(batch["x"]),
            "matmul": batch["x"] @ w,
            "loss": loss,
            "grad": grad,
        }

    out = jax.jit(step, out_shardings=rep)(batch, w_global)
    local_rows = sorted({int(s.index[0].start or 0) for s in batch["x"].addressable_shards})
    return {
        "results": {k: np.asarray(v).tolist() for k, v in out.items()},
        "batch_shape": list(batch["x"].shape),
        "local_shard_starts": local_rows,
        "w_shard_shape": list(w_global.addressable_shards[0].data.shape),
    }


def main(out_path: str) -> None:
    from jaxbatch import parallel

    info = parallel.initialize(initialization_timeout=60)
    import jax

    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=1)
    data = full_data()
    rows = GLOBAL_BATCH // info.num_processes
    start = info.process_id * rows
    local = {k: data[k][start : start + rows] for k in ("x", "t")}
    result = compute(mesh, local, data["w"])
    result.update(
        source=info.source,
        second_call_source=parallel.initialize().source,
        process_id=info.process_id,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        global_devices=jax.device_count(),
        local_devices=jax.local_device_count(),
        mesh_process_grid=[[d.process_index for d in row] for row in mesh.devices[:, :, 0, 0]],
        cpu_collectives=str(jax.config.jax_cpu_collectives_implementation),
    )
    with open(out_path, "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
