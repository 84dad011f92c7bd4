"""make_global_batch on one process with 8 devices."""

import jax
import numpy as np
import pytest

from jaxbatch import parallel


def test_make_global_batch_single_process(eight_devices):
    mesh = parallel.make_mesh(data=2, fsdp=4)
    rng = np.random.default_rng(0)
    local = {
        "image": rng.normal(size=(16, 4, 4, 3)).astype(np.float32),
        "label": np.arange(16, dtype=np.int32),
    }
    batch = parallel.make_global_batch(local, mesh)
    assert batch["image"].shape == (16, 4, 4, 3) and batch["label"].dtype == np.int32
    for key in local:
        assert batch[key].sharding == parallel.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(batch[key]), local[key])
    # Device (d, f) of the mesh holds rows 2·(4d + f) … 2·(4d + f) + 1.
    by_device = {s.device: s for s in batch["label"].addressable_shards}
    for d in range(2):
        for f in range(4):
            shard = by_device[mesh.devices[d, f, 0, 0]]  # (data, fsdp, context, tensor)
            start = 2 * (4 * d + f)
            np.testing.assert_array_equal(np.asarray(shard.data), np.arange(start, start + 2))


def test_make_global_batch_feeds_a_jitted_step(eight_devices):
    mesh = parallel.make_mesh(data=4, tensor=2)
    x = np.linspace(-1, 1, 8 * 5, dtype=np.float32).reshape(8, 5)
    batch = parallel.make_global_batch({"x": x}, mesh)
    total = jax.jit(lambda b: (b["x"] ** 2).sum(), out_shardings=parallel.replicated(mesh))(batch)
    np.testing.assert_allclose(float(total), float((x.astype(np.float64) ** 2).sum()), rtol=1e-6)


def test_make_global_batch_errors(eight_devices):
    mesh = parallel.make_mesh(data=2, fsdp=4)
    with pytest.raises(ValueError, match=r"batch 12 is not divisible by data×fsdp = 8"):
        parallel.make_global_batch({"x": np.zeros((12, 2))}, mesh)
    with pytest.raises(ValueError, match="different leading dimensions"):
        parallel.make_global_batch({"x": np.zeros((8, 2)), "y": np.zeros((16,))}, mesh)
    with pytest.raises(ValueError, match=r"batch entry \['n'\] is a scalar"):
        parallel.make_global_batch({"n": np.float32(3.0)}, mesh)
