"""One process of the two-process training test (run by test_multiprocess_training.py).

Usage: python _train_worker.py WORKDIR OUT.npz, with JAXBATCH_COORDINATOR, JAXBATCH_NUM_PROCESSES,
JAXBATCH_PROCESS_ID and XLA_FLAGS=--xla_force_host_platform_device_count=2 set by the test.

The process joins the cluster with ``parallel.initialize()``, trains ``config()`` on a data=2 ×
fsdp=2 mesh over the four devices of both processes with ``loop.train`` (each process loads only
its half of every batch) until ``STOP_STEP``, where the trainer writes its sharded checkpoint, and
process 0 saves the gathered final parameters and what each process fed (``OUT.npz``).
"""

import os
import sys
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits_resnet_lars.py"
MESH = "mesh.data=2,mesh.fsdp=2,mesh.tensor=1"
STOP_STEP = 2
OVERRIDES = (
    "batch_size=64",
    "reference_batch_size=64",
    "total_samples=192",
    "micro_batches=2",
    "schedule.warmup_samples=64",
    "model.stage_sizes=(1,)",
    "model.num_filters=8",
    "eval_batch_size=360",
    "log_every_steps=1",
)


def config(mesh: str = MESH):
    """The tiny digits/ResNet/LARS config both the workers and the test train."""
    from jaxbatch.train import config as config_lib

    return config_lib.load_config(f"{CONFIG}:runlocal", [*OVERRIDES, *mesh.split(",")])


def flat(tree) -> dict:
    """{path: NumPy array} of a tree of fully addressable or gathered arrays."""
    import jax
    import numpy as np

    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def main(workdir: str, out_path: str) -> None:
    from jaxbatch import parallel

    info = parallel.initialize(initialization_timeout=60)
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from jaxbatch import data as jdata
    from jaxbatch.train import loop

    cfg = config()
    summary = loop.train(cfg, workdir, progress=False, stop_after_step=STOP_STEP)
    params = multihost_utils.process_allgather(summary["state"].params, tiled=True)

    # What this process fed into the first global batch: only its own rows.
    arrays = jdata.load_arrays("digits", "train")
    local = next(
        jdata.make_train_iterator(
            {k: arrays[k] for k in ("image", "label")},
            batch_size=cfg.batch_size // jax.process_count(),
            seed=cfg.seed,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )
    )
    run_mesh = parallel.make_mesh(data=2, fsdp=2)
    batch = parallel.make_global_batch(local, run_mesh)
    starts = sorted(int(s.index[0].start or 0) for s in batch["label"].addressable_shards)
    fed = multihost_utils.process_allgather(
        {"starts": np.asarray(starts), "labels": local["label"]}
    )
    if info.process_id == 0:
        np.savez(
            out_path,
            **{f"param{k}": v for k, v in flat(params).items()},
            fed_starts=np.asarray(fed["starts"]),
            fed_labels=np.asarray(fed["labels"]),
            global_shape=np.asarray(batch["label"].shape),
            process_count=np.asarray(jax.process_count()),
            train_loss=np.asarray(summary["train_loss"]),
        )
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main(sys.argv[1], sys.argv[2])
