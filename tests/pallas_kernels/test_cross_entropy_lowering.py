"""Compilation of the cross-entropy kernels for real targets, lowered from this CPU-only machine.

``lower(lowering_platforms=...)`` runs the Mosaic TPU and Triton lowerings, so these tests fail if
a kernel does not lower, if the program silently falls back to XLA (a wrong number of custom
calls), or if a [T, V] array appears in the XLA part of the program. Memory is measured on the
CPU compile of the interpret-mode program (see the test's docstring for what that measures).
"""

import re

import jax
import jax.numpy as jnp
import pytest

from jaxbatch.losses import linear_cross_entropy as jaxbatch_lce
from pallas_kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

TARGETS = [
    ("tpu", "tpu", "tpu_custom_call"),
    ("cuda", "gpu", "__gpu$xla.gpu.triton"),
]
T, D, V = 1000, 256, 5000
# Default tiles pad T = 1000 to 1024 (TPU: 4 blocks of 256; GPU: 16 of 64) and V = 5000 to 5120
# (TPU: 10 tiles of 512) or 5056 (GPU: 79 of 64). Any array with a token and a vocabulary dim:
TOKEN_BY_VOCAB = re.compile(
    r"tensor<(1000|1024)x(5000|5056|5120)x|tensor<(5000|5056|5120)x(1000|1024)x"
)


def _lowered_text(fn, platform, dtype, t=T, d=D, v=V):
    args = (
        jax.ShapeDtypeStruct((t, d), jnp.dtype(dtype)),
        jax.ShapeDtypeStruct((d, v), jnp.dtype(dtype)),
        jax.ShapeDtypeStruct((t,), jnp.int32),
    )
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _calls(text: str, custom_call: str) -> list[str]:
    return [line for line in text.splitlines() if f"custom_call @{custom_call}(" in line]


# (t, d, v) -> padded (t_pad, d_pad, v_pad) per kernel family and dtype with the default tiles.
SHAPES = {
    (T, D, V): {"tpu": (1024, 256, 5120), "gpu": (1024, 256, 5056)},
    # one tile: TPU 8 (f32) / 16 (bf16) rows, D whole, 128 lanes; GPU powers of two >= 16
    (5, 24, 100): {"tpu": (8, 24, 128), "gpu": (16, 32, 128)},
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("platform,backend,custom_call", TARGETS)
def test_value_and_gradient_lower_to_kernels(platform, backend, custom_call, dtype, shape):
    def loss(h, w, y):
        return linear_cross_entropy(h, w, y, ignore_index=-1, backend=backend, interpret=False)

    forward = _calls(_lowered_text(loss, platform, dtype, *shape), custom_call)
    text = _lowered_text(jax.value_and_grad(loss, argnums=(0, 1)), platform, dtype, *shape)
    both = _calls(text, custom_call)
    # Value: the forward kernel only. Value and gradient: forward, dh and dw kernels.
    assert len(forward) == 1 and len(both) == 3
    if shape == (T, D, V):
        assert not TOKEN_BY_VOCAB.search(text), "a [T, V] array in the XLA part of the program"
    # The gradient kernels return f32 accumulators whatever the input dtype: dh [t_pad, d_pad]
    # and dwᵀ [v_pad, d_pad]; their h and w operands keep the input dtype.
    t_pad, d_pad, v_pad = SHAPES[shape][backend]
    if backend == "tpu" and dtype == "bfloat16" and t_pad == 8:
        t_pad = 16  # bf16 packs 16 rows per sublane tile
    results = [line.rsplit("->", 1)[1] for line in both[1:]]
    assert f"tensor<{t_pad}x{d_pad}xf32>" in results[0]
    assert f"tensor<{v_pad}x{d_pad}xf32>" in results[1]
    short = "bf16" if dtype == "bfloat16" else "f32"
    operands = [line.rsplit("->", 1)[0] for line in both]
    assert all(f"tensor<{t_pad}x{d_pad}x{short}>" in line for line in operands)
    assert all(f"tensor<{d_pad}x{v_pad}x{short}>" in line for line in operands)


@pytest.mark.parametrize("platform,backend,custom_call", TARGETS)
def test_public_entry_picks_the_kernels_for_pallas(platform, backend, custom_call, monkeypatch):
    # Through jaxbatch.losses with axis_name=None, the same three kernels; 'auto' on a TPU/GPU
    # backend picks them too (the default backend is patched: lowering does not change it).
    monkeypatch.setattr(jax, "default_backend", lambda: backend)

    def loss(impl):
        return jax.value_and_grad(
            lambda h, w, y: jaxbatch_lce(h, w, y, ignore_index=-1, implementation=impl),
            argnums=(0, 1),
        )

    for impl in ("pallas", "auto"):
        assert len(_calls(_lowered_text(loss(impl), platform, "bfloat16"), custom_call)) == 3


@pytest.mark.parametrize("platform,backend,custom_call", TARGETS)
def test_sharded_tokens_lower_to_the_same_kernels_and_one_psum(
    platform, backend, custom_call, monkeypatch, eight_devices
):
    # With axis_name inside shard_map over 8 devices: each device runs the three kernels on its
    # own 125 token rows (compiled kernels, operands cast to varying), and the mean is composed
    # around them by a psum of (Σ losses, count) plus the psum of w's gradient.
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    mesh = jax.sharding.Mesh(eight_devices, ("data",))

    def local(h, w, y):
        return jaxbatch_lce(h, w, y, ignore_index=-1, implementation="pallas", axis_name="data")

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P("data")), out_specs=P())
    rows = NamedSharding(mesh, P("data"))
    args = (
        jax.ShapeDtypeStruct((T, D), jnp.bfloat16, sharding=rows),
        jax.ShapeDtypeStruct((D, V), jnp.bfloat16),
        jax.ShapeDtypeStruct((T,), jnp.int32, sharding=rows),
    )
    grad_fn = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))
    text = grad_fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert len(_calls(text, custom_call)) == 3
    assert text.count("stablehlo.all_reduce") >= 2
    # local rows: 125 padded to one GPU block of 128 / TPU 8-row multiple (128); V padded as above
    assert "tensor<128x256xbf16>" in text


def test_token_by_vocab_pattern_detects_the_reference():
    # Guards the [T, V] check above: the materialising reference must trip it.
    text = _lowered_text(linear_cross_entropy_reference, "tpu", "float32")
    assert TOKEN_BY_VOCAB.search(text)


def test_compiled_temp_memory_is_linear_in_t_and_v_not_their_product():
    """Temp memory of value+grad, T = 4,096, D = 128, V = 8,192 (f32 logits: 128 MiB).

    No accelerator compiles here, so this is the CPU compile of the interpret-mode program: the
    XLA part of the real program (padding, the f32 dh and dwᵀ the kernels return, the casts and
    the transpose) plus the interpreter's buffers, which hold one tile per step and the kernels'
    whole operands. It is an upper bound of the XLA-side memory of the compiled TPU program, whose
    kernels keep their tiles in VMEM; that none of its arrays is [T, V] is checked above.
    """
    t, d, v = 4096, 128, 8192
    args = (
        jax.ShapeDtypeStruct((t, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((t,), jnp.int32),
    )

    def temp(impl):
        f = jax.value_and_grad(
            lambda h, w, y: jaxbatch_lce(h, w, y, ignore_index=-1, implementation=impl),
            argnums=(0, 1),
        )
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    linear = (t * d + d * v) * 4  # one f32 copy of h and of w: 6 MiB
    pallas, reference = temp("pallas"), temp("reference")
    assert reference > t * v * 4  # the logits (and their softmax): at least 128 MiB
    assert pallas < 6 * linear  # measured about 4.1 copies (24.6 MiB)
    assert reference / pallas > 8  # measured about 10×
