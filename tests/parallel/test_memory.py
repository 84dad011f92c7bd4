"""bytes_per_device against the bytes the arrays' addressable shards really hold."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbatch import parallel

SPECS = {
    "matrix": ((32, 16), jnp.float32, P("fsdp", "tensor")),
    "stacked": ((4, 16, 8), jnp.bfloat16, P(None, "fsdp", None)),
    "vector": ((24,), jnp.float32, P()),
    "batchy": ((16, 3), jnp.int32, P(("data", "fsdp"), None)),
    "count": ((), jnp.int32, P()),
}


def _arrays(mesh):
    return {
        name: jax.device_put(np.ones(shape, dtype=dtype), NamedSharding(mesh, spec))
        for name, (shape, dtype, spec) in SPECS.items()
    }


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (1, 4, 2), (1, 8, 1)])
def test_bytes_per_device_matches_addressable_shards(eight_devices, shape):
    mesh = parallel.make_mesh(*shape)
    arrays = _arrays(mesh)
    held = collections.Counter()
    for leaf in jax.tree.leaves(arrays):
        for shard in leaf.addressable_shards:
            held[shard.device] += shard.data.nbytes
    assert len(held) == 8 and len(set(held.values())) == 1
    expected = next(iter(held.values()))
    assert parallel.bytes_per_device(arrays) == expected
    # The same from shapes alone: ShapeDtypeStructs carrying their sharding, or a shardings tree.
    abstract = {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
        for name, (shape, dtype, spec) in SPECS.items()
    }
    assert parallel.bytes_per_device(abstract) == expected
    bare = {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype, _) in SPECS.items()}
    shardings = {name: leaf.sharding for name, leaf in arrays.items()}
    assert parallel.bytes_per_device(bare, shardings) == expected
    assert parallel.global_bytes(arrays) == sum(
        np.prod(s, dtype=int) * np.dtype(d).itemsize for s, d, _ in SPECS.values()
    )


def test_shardings_may_be_a_prefix(eight_devices):
    mesh = parallel.make_mesh(data=1, fsdp=8)
    tree = {"a": {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32)}, "b": [jnp.zeros((8,))]}
    shardings = {"a": NamedSharding(mesh, P("fsdp")), "b": parallel.replicated(mesh)}
    assert parallel.bytes_per_device(tree, shardings) == 2 * 8 * 4 + 8 * 4


def test_leaf_without_sharding_is_an_error():
    with pytest.raises(ValueError, match=r"leaf \['w'\] \(ShapeDtypeStruct\) has no sharding"):
        parallel.bytes_per_device({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
