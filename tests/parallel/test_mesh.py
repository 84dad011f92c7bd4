"""make_mesh / mesh_from_config / parse_mesh_spec on the 8 simulated CPU devices."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxbatch import parallel


@pytest.mark.parametrize(
    "sizes, expected",
    [
        # expected in MESH_AXES order: (data, fsdp, context, tensor)
        ({"data": 8, "fsdp": 1, "tensor": 1}, (8, 1, 1, 1)),
        ({"data": 2, "fsdp": 4, "tensor": 1}, (2, 4, 1, 1)),
        ({"data": 4, "fsdp": 1, "tensor": 2}, (4, 1, 1, 2)),
        ({"data": 1, "fsdp": 8, "tensor": 1}, (1, 8, 1, 1)),
        ({}, (8, 1, 1, 1)),  # defaults: data takes every device
        ({"data": 2, "fsdp": -1}, (2, 4, 1, 1)),
        ({"data": -1, "tensor": 4}, (2, 1, 1, 4)),
        ({"data": 2, "context": 4}, (2, 1, 4, 1)),
        ({"fsdp": 2, "context": 2, "tensor": 2, "data": 1}, (1, 2, 2, 2)),
        ({"context": -1, "data": 1}, (1, 1, 8, 1)),
        ({"data": -1, "context": 2}, (4, 1, 2, 1)),
    ],
)
def test_make_mesh_shapes(eight_devices, sizes, expected):
    mesh = parallel.make_mesh(**sizes)
    assert mesh.axis_names == ("data", "fsdp", "context", "tensor") == parallel.MESH_AXES
    assert tuple(mesh.devices.shape) == expected
    assert dict(mesh.shape) == dict(zip(parallel.MESH_AXES, expected, strict=True))
    # Every device exactly once: jax.make_mesh alone would silently drop the surplus.
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in eight_devices)
    assert mesh.axis_types == (AxisType.Auto,) * 4


def test_context_axis_of_size_one_changes_no_sharding(eight_devices):
    """With context=1 the mesh lays the devices out as the three-axis mesh did, so every existing
    sharding (data, fsdp, tensor) places the same rows on the same devices."""
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh.shape["context"] == 1
    legacy = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), devices=eight_devices)
    np.testing.assert_array_equal(
        np.vectorize(lambda d: d.id)(mesh.devices[:, :, 0, :]),
        np.vectorize(lambda d: d.id)(legacy.devices),
    )
    x = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
    placed = jax.device_put(x, parallel.batch_sharding(mesh))
    shards = {s.device.id: np.asarray(s.data) for s in placed.addressable_shards}
    old = jax.device_put(x, jax.sharding.NamedSharding(legacy, jax.P(("data", "fsdp"))))
    for s in old.addressable_shards:
        np.testing.assert_array_equal(shards[s.device.id], np.asarray(s.data))


def test_resolve_mesh_shape_order():
    assert parallel.resolve_mesh_shape(8, data=2, context=-1) == (2, 1, 4, 1)
    assert parallel.resolve_mesh_shape(8, fsdp=2, tensor=2) == (2, 2, 1, 2)


def test_make_mesh_on_a_subset_of_devices(eight_devices):
    mesh = parallel.make_mesh(1, 1, 1, devices=eight_devices[:1])
    assert mesh.devices.shape == (1, 1, 1, 1)
    assert mesh.devices.flat[0] == eight_devices[0]
    mesh = parallel.make_mesh(data=2, fsdp=2, devices=eight_devices[4:])
    assert {d.id for d in mesh.devices.flat} == {d.id for d in eight_devices[4:]}


def test_auto_axes_let_jit_propagate_a_sharded_contraction(eight_devices):
    """An un-annotated matmul over a dimension sharded along fsdp compiles and is exact."""
    mesh = parallel.make_mesh(data=2, fsdp=4)
    x = np.arange(8 * 16, dtype=np.float32).reshape(8, 16) / 100
    w = np.linspace(-1, 1, 16 * 4, dtype=np.float32).reshape(16, 4)
    xs = jax.device_put(x, parallel.batch_sharding(mesh))
    ws = jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.P("fsdp", None)))
    got = np.asarray(jax.jit(lambda a, b: a @ b)(xs, ws))
    np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-6)  # sums of 16 terms of O(1)


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"data": 3}, "mesh data=3 × fsdp=1 × tensor=1 = 3 does not match 8 devices"),
        ({"data": 2, "fsdp": 2, "tensor": 1}, "= 4 does not match 8 devices"),
        ({"data": 4, "fsdp": 4}, "= 16 does not match 8 devices"),
        ({"data": -1, "fsdp": 3}, "fixed axes multiply to 3, which does not divide 8 devices"),
        ({"data": -1, "fsdp": -1}, "at most one mesh axis may be -1"),
        ({"data": 0}, "mesh axis data=0 must be a positive int or -1"),
        ({"tensor": -2}, "mesh axis tensor=-2 must be a positive int or -1"),
        ({"data": 2, "context": 3}, "mesh data=2 × fsdp=1 × context=3 × tensor=1 = 6 does not"),
        ({"context": 0}, "mesh axis context=0 must be a positive int or -1"),
        ({"data": -1, "context": 3}, "fixed axes multiply to 3, which does not divide 8"),
    ],
)
def test_make_mesh_errors(eight_devices, sizes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parallel.make_mesh(**sizes)


def test_parse_mesh_spec():
    assert parallel.parse_mesh_spec("data=2,fsdp=4,tensor=1") == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parallel.parse_mesh_spec(" fsdp = -1 , tensor=2 ") == {"fsdp": -1, "tensor": 2}
    assert parallel.parse_mesh_spec("data=2,context=4") == {"data": 2, "context": 4}
    with pytest.raises(ValueError, match="unknown mesh axis 'model'.*data, fsdp, context, tensor"):
        parallel.parse_mesh_spec("data=2,model=4")
    with pytest.raises(ValueError, match="must look like 'axis=size'"):
        parallel.parse_mesh_spec("data2")
    with pytest.raises(ValueError, match=r"mesh axis fsdp='four'.*must be an int"):
        parallel.parse_mesh_spec("fsdp=four")
    with pytest.raises(ValueError, match="'data' given twice"):
        parallel.parse_mesh_spec("data=2,data=4")


def test_mesh_from_config(eight_devices):
    cfg = ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2})
    shape = dict(parallel.mesh_from_config(cfg).shape)
    assert shape == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    shape = dict(parallel.mesh_from_config({"fsdp": 8}).shape)
    assert shape == {"data": 1, "fsdp": 8, "context": 1, "tensor": 1}
    shape = dict(parallel.mesh_from_config("tensor=2").shape)
    assert shape == {"data": 4, "fsdp": 1, "context": 1, "tensor": 2}
    cfg = ml_collections.ConfigDict({"data": 2, "fsdp": 1, "tensor": 1, "context": 4})
    assert parallel.mesh_from_config(cfg).shape["context"] == 4
    assert parallel.mesh_from_config("data=4,context=2").shape["context"] == 2
    with pytest.raises(ValueError, match="unknown mesh axis 'pipeline'"):
        parallel.mesh_from_config({"data": 4, "pipeline": 2})
    with pytest.raises(ValueError, match="does not match 8 devices"):
        parallel.mesh_from_config({"data": 3})
