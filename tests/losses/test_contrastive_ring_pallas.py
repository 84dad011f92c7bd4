"""The device ring with Pallas tiles: contrastive_loss(implementation='pallas', axis_name=...).

Oracle: the single-device float32 Precision.HIGHEST reference on the global (concatenated) batch,
as in test_contrastive_ring.py. On this CPU machine the kernels run in the Pallas interpreter (the
TPU family through the public entry, the GPU family through the ring's ``PallasTiles``); lowering
the ring for TPU and CUDA checks that each ring step really calls the kernels.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbatch.losses import contrastive_loss
from jaxbatch.losses._contrastive_ring import PallasTiles, tiled_loss
from jaxbatch.losses._contrastive_specs import (
    KINDS,
    default_spec,
    reference_value_and_grads,
    ring_value_and_grads,
)
from pallas_kernels.contrastive import tiles

AXIS = "data"
NAMES = ("dx", "dy", "dlogit_scale", "dlogit_bias")
D = 16


def _mesh(devices):
    return jax.make_mesh((devices,), (AXIS,), devices=jax.devices()[:devices])


def _args(kind, n, dtype, seed=5):
    x, y, scale, bias = default_spec(kind, n, D, dtype, seed=seed).make_args()
    return x, y, scale, jnp.float32(0.5) if bias is None else bias


def _assert_matches_reference(got, want, dtype):
    (loss, grads), (want_loss, want_grads) = got, want
    rtol = 2e-5 if dtype == "float32" else 2e-2
    _assert_close(loss, want_loss, rtol, "loss", floor=1.0)
    for g, w, name in zip(grads, want_grads, NAMES, strict=True):
        # Scalar gradients are sums over the batch of size ~1; dlogit_bias is 0 for softmax.
        _assert_close(g, w, rtol, name, floor=1.0 if g.ndim == 0 else 1e-2)


def _assert_close(got, want, rtol, what, floor):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    atol = rtol * max(float(np.max(np.abs(want))), floor)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


# (devices, local rows, block_size): one tile per step (20 rows padded to 24 or 32); 37 rows (odd);
# a ragged 2 × 2 grid of 128-row TPU tiles per step (130 rows padded to 256).
CASES = [(8, 20, None), (4, 37, None), (2, 130, 128)]


# Every case in float32; bfloat16 (which only changes the tolerances and the MXU input dtype) on
# the first.
DTYPE_CASES = [("float32", *case) for case in CASES] + [("bfloat16", *CASES[0])]


@pytest.mark.parametrize(("dtype", "devices", "n_local", "block"), DTYPE_CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_pallas_ring_matches_single_device_loss(
    eight_devices, kind, dtype, devices, n_local, block
):
    del eight_devices
    x, y, scale, bias = _args(kind, devices * n_local, dtype)

    def local(x, y, s, b):
        return contrastive_loss(
            x, y, s, b, kind=kind, axis_name=AXIS, block_size=block, implementation="pallas"
        )

    got = ring_value_and_grads(_mesh(devices), local, AXIS, x, y, scale, bias)
    assert got[0].dtype == x.dtype and got[1][0].dtype == x.dtype
    _assert_matches_reference(got, reference_value_and_grads(x, y, scale, bias, kind), dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_ring_of_gpu_kernels_matches(eight_devices, kind):
    # The Triton family, interpreted, in the ring: 20 local rows in a ragged 2 × 2 grid of 16.
    del eight_devices
    devices, n_local = 4, 20
    x, y, scale, bias = _args(kind, devices * n_local, "float32")
    plan = tiles.block_plan(kind, n_local, D, x.dtype, 16, backend="gpu", interpret=True)
    assert (plan.n_pad, plan.block_rows) == (32, 16)

    def local(x, y, s, b):
        return tiled_loss(x, y, s, b, kind, PallasTiles(plan, D), AXIS)

    got = ring_value_and_grads(_mesh(devices), local, AXIS, x, y, scale, bias)
    _assert_matches_reference(got, reference_value_and_grads(x, y, scale, bias, kind), "float32")


def test_auto_with_axis_name_is_xla_on_cpu(eight_devices):
    del eight_devices
    x, y, scale, bias = _args("decoupled", 8 * 12, "float32")

    def run(implementation):
        def local(x, y, s, b):
            return contrastive_loss(
                x, y, s, b, kind="decoupled", axis_name=AXIS, block_size=8,
                implementation=implementation,
            )  # fmt: skip

        return ring_value_and_grads(_mesh(8), local, AXIS, x, y, scale, bias)

    (auto, auto_grads), (xla, xla_grads) = run("auto"), run("xla")
    assert float(auto) == float(xla)
    for a, b in zip(auto_grads, xla_grads, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pallas_ring_rejects_illegal_tiles(eight_devices):
    # 'pallas' does not fall back: TPU tiles (the CPU interpreter runs that family) must be
    # multiples of 128 once the local batch spans several.
    del eight_devices
    x, y, scale, bias = _args("softmax", 2 * 130, "float32")

    def local(x, y, s, b):
        return contrastive_loss(x, y, s, b, axis_name=AXIS, block_size=100, implementation="pallas")

    with pytest.raises(NotImplementedError, match="multiples of 128"):
        ring_value_and_grads(_mesh(2), local, AXIS, x, y, scale, bias)


# ---------------------------------------------------------------------------------- lowering

TARGETS = [
    ("tpu", "tpu", "tpu_custom_call"),
    ("cuda", "gpu", "__gpu$xla.gpu.triton"),
]
N_LOCAL, D_LOWER = 300, 256
# Kernel calls per ring step: forward rows of L and of Lᵀ (sigmoid: rows only); backward G·y and
# Gᵀ·x; SigLIP's VJP forward computes its gradients too (1 + 2). The ring traces three steps:
# home (step 0), the loop body (off home) and the last step (off home, no send); two with P = 2.
PER_STEP = {  # kind -> (forward, value_and_grad)
    "softmax": (2, 4),
    "decoupled": (2, 4),
    "sigmoid": (1, 3),
}
SHAPE = re.compile(r"tensor<((?:\d+x)+)")


def _lowered_text(fn, mesh, platform, dtype):
    rows = NamedSharding(mesh, P(AXIS))
    n = mesh.shape[AXIS] * N_LOCAL
    emb = jax.ShapeDtypeStruct((n, D_LOWER), jnp.dtype(dtype), sharding=rows)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    traced = jax.jit(fn).trace(emb, emb, scalar, scalar)
    return traced.lower(lowering_platforms=(platform,)).as_text()


def _ring(kind, implementation, block_size=None):
    def local(x, y, s, b):
        return contrastive_loss(
            x, y, s, b, kind=kind, axis_name=AXIS, block_size=block_size,
            implementation=implementation,
        )  # fmt: skip

    return local


def _has_pair_matrix(text):
    """Whether any array has two dims of at least N_LOCAL: a slice of the N×N logits."""
    for match in SHAPE.finditer(text):
        dims = [int(v) for v in match.group(1).rstrip("x").split("x")]
        if sum(v >= N_LOCAL for v in dims) >= 2:
            return True
    return False


# 'auto' resolves to 'pallas' before the ring is built: one ring size is enough to show it.
@pytest.mark.parametrize("devices,implementation", [(8, "pallas"), (2, "pallas"), (8, "auto")])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("platform,backend,custom_call", TARGETS)
def test_ring_lowers_to_kernels(
    monkeypatch, eight_devices, platform, backend, custom_call, kind, devices, implementation
):
    del eight_devices
    # As on a TPU/GPU host: the kernels compile (no interpreter) and 'auto' picks 'pallas'.
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    mesh = _mesh(devices)
    sharded = jax.shard_map(
        _ring(kind, implementation, block_size=128),
        mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(), P()), out_specs=P(),
    )  # fmt: skip
    forward = _lowered_text(sharded, mesh, platform, "bfloat16")
    grad_fn = jax.value_and_grad(sharded, argnums=(0, 1, 2, 3))
    gradient = _lowered_text(grad_fn, mesh, platform, "bfloat16")
    call = re.compile(rf"custom_call @{re.escape(custom_call)}\(")
    steps = 3 if devices > 2 else 2
    fwd_per_step, grad_per_step = PER_STEP[kind]
    assert len(call.findall(forward)) == steps * fwd_per_step
    assert len(call.findall(gradient)) == steps * grad_per_step
    assert "collective_permute" in forward and "collective_permute" in gradient
    assert not _has_pair_matrix(forward) and not _has_pair_matrix(gradient)


def test_auto_falls_back_to_xla_tiles_for_illegal_tiles(monkeypatch, eight_devices):
    # Blocks of 100 break the TPU tiling rules: 'auto' runs the ring on XLA tiles instead.
    del eight_devices
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    mesh = _mesh(8)
    sharded = jax.shard_map(
        _ring("softmax", "auto", block_size=100),
        mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(), P()), out_specs=P(),
    )  # fmt: skip
    text = _lowered_text(sharded, mesh, "tpu", "float32")
    assert "tpu_custom_call" not in text and "collective_permute" in text


def test_pair_matrix_check_detects_the_gathering_reference(eight_devices):
    # Guards the check above: the reference gathers y and holds [n_local, N] logits.
    del eight_devices
    mesh = _mesh(8)
    sharded = jax.shard_map(
        _ring("softmax", "reference"),
        mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(), P()), out_specs=P(),
    )  # fmt: skip
    assert _has_pair_matrix(_lowered_text(sharded, mesh, "tpu", "float32"))
