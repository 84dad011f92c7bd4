"""Validation, dispatch errors, block sizes and padding plans of the cross-entropy kernels' API."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cross_entropy import BlockSizes, linear_cross_entropy
from pallas_kernels.cross_entropy._common import TPU_VMEM_BUDGET, plan, tpu_vmem_bytes

H, W, Y = jnp.ones((4, 8)), jnp.ones((8, 10)), jnp.zeros(4, jnp.int32)


@pytest.mark.parametrize(
    "h,w,y,kwargs,error,match",
    [
        (H, jnp.ones((10, 8)), Y, {}, ValueError, r"D = 8 .* 10 rows.*transposed"),
        (H, W, jnp.zeros(5, jnp.int32), {}, ValueError, r"T = 4 tokens but labels \(5,\)"),
        (jnp.ones(8), W, Y, {}, ValueError, r"h must be \[T, D\]"),
        (H, W, Y.astype(jnp.float32), {}, TypeError, "labels must be integers"),
        (H.astype(jnp.int32), W, Y, {}, TypeError, "h must be floating"),
        (H, W, Y.at[2].set(10), {}, ValueError, r"labels\[2\] = 10; expected values in \[0, 10\)"),
        (H, W, Y.at[1].set(-1), {"ignore_index": -100}, ValueError, r"labels\[1\] = -1"),
        (H, W, Y, {"block_sizes": 128}, ValueError, "block_sizes must be a BlockSizes"),
    ],
)
def test_bad_input_raises_before_compiling(h, w, y, kwargs, error, match):
    with pytest.raises(error, match=match):
        linear_cross_entropy(h, w, y, **kwargs)


@pytest.mark.parametrize(
    "h,w,kwargs,match",
    [
        (H.astype(jnp.bfloat16), W, {}, r"share a dtype, got bfloat16 and float32"),
        (H, W, {"backend": "metal"}, r"no cross-entropy Pallas kernel for backend 'metal'"),
        (H, W, {"backend": "cpu", "interpret": False}, r"only run with interpret=True"),
        (
            jnp.ones((300, 8)),
            W,
            {"block_sizes": BlockSizes(12, 128)},
            r"multiples of 8 for float32",
        ),
        (H, jnp.ones((8, 300)), {"block_sizes": BlockSizes(8, 100)}, r"multiples of 128"),
        (H, W, {"block_sizes": BlockSizes(24, 64), "backend": "gpu"}, r"powers of two >= 16"),
        # the TPU kernels hold a block's whole feature dim: D = 65,536 f32 cannot fit
        (jnp.ones((4, 65536)), jnp.ones((65536, 10)), {"backend": "tpu"}, r"MiB of VMEM"),
    ],
)
def test_unsupported_input_raises_not_implemented(h, w, kwargs, match):
    # NotImplementedError lets jaxbatch.losses.linear_cross_entropy('auto') fall back to XLA.
    y = jnp.zeros(h.shape[0], jnp.int32)
    with pytest.raises(NotImplementedError, match=match):
        linear_cross_entropy(h, w, y, **kwargs)


def test_float64_is_refused_as_not_implemented():
    with jax.enable_x64():
        with pytest.raises(NotImplementedError, match=r"got float64"):
            linear_cross_entropy(H.astype(jnp.float64), W.astype(jnp.float64), Y)


def test_block_sizes_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"block_tokens must be a positive int, got 0"):
        BlockSizes(0, 128)
    with pytest.raises(ValueError, match=r"block_vocab must be a positive int, got True"):
        BlockSizes(128, True)
    with pytest.raises(ValueError, match=r"block_d must be a positive int, got -1"):
        BlockSizes(128, 128, -1)
    with pytest.raises(ValueError, match=r"backend must be 'tpu' or 'gpu'"):
        BlockSizes.get_default("cpu", 10, 10, 10, jnp.float32)


@pytest.mark.parametrize("d", [64, 768, 2048, 4096, 8192])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_default_blocks_follow_tiling_rules_and_the_vmem_budget(d, dtype):
    itemsize = jnp.dtype(dtype).itemsize
    tpu = BlockSizes.get_default("tpu", 1 << 16, d, 1 << 17, dtype)
    if tpu_vmem_bytes(128, 128, d, itemsize) > TPU_VMEM_BUDGET:
        # D too wide for a whole-D block even at the smallest tiles (f32 from D = 4,096, bf16
        # from 8,192): refused, so that 'auto' falls back to XLA.
        assert (d, itemsize) in ((4096, 4), (8192, 4), (8192, 2))
        with pytest.raises(ValueError, match="MiB of VMEM"):
            plan(1 << 16, d, 1 << 17, dtype, tpu, "tpu", interpret=False)
    else:
        p = plan(1 << 16, d, 1 << 17, dtype, tpu, "tpu", interpret=False)
        assert p.block_tokens % 16 == 0 and p.block_vocab % 128 == 0
        assert tpu_vmem_bytes(p.block_tokens, p.block_vocab, d, itemsize) <= TPU_VMEM_BUDGET
    gpu = BlockSizes.get_default("gpu", 1 << 16, d, 1 << 17, dtype)
    q = plan(1 << 16, d, 1 << 17, dtype, gpu, "gpu", interpret=False)
    for block in (q.block_tokens, q.block_vocab, q.block_d):
        assert block & (block - 1) == 0 and block >= 16
    assert q.d_pad % q.block_d == 0 and q.d_pad >= d


@pytest.mark.parametrize(
    "backend,t,d,v,dtype,blocks,expected",
    [
        # (t_pad, d_pad, v_pad, block_tokens, block_vocab, block_d)
        ("tpu", 5, 24, 100, jnp.float32, BlockSizes(256, 512), (8, 24, 128, 8, 128, 24)),
        ("tpu", 5, 24, 100, jnp.bfloat16, BlockSizes(256, 512), (16, 24, 128, 16, 128, 24)),
        ("tpu", 37, 24, 300, jnp.float32, BlockSizes(16, 128), (48, 24, 384, 16, 128, 24)),
        ("tpu", 300, 24, 1000, jnp.float32, BlockSizes(256, 512), (512, 24, 1024, 256, 512, 24)),
        ("gpu", 5, 24, 20, jnp.float32, BlockSizes(64, 64, 64), (16, 32, 32, 16, 32, 32)),
        ("gpu", 37, 24, 300, jnp.float32, BlockSizes(16, 64, 16), (48, 32, 320, 16, 64, 16)),
        ("gpu", 100, 768, 5000, jnp.bfloat16, BlockSizes(64, 64, 64), (128, 768, 5056, 64, 64, 64)),
    ],
)
def test_plan_pads_to_whole_legal_tiles(backend, t, d, v, dtype, blocks, expected):
    p = plan(t, d, v, dtype, blocks, backend, interpret=True)
    got = (p.t_pad, p.d_pad, p.v_pad, p.block_tokens, p.block_vocab, p.block_d)
    assert got == expected
    assert p.t_pad % p.block_tokens == 0 and p.v_pad % p.block_vocab == 0
    assert p.t_pad >= t and p.v_pad >= v and p.d_pad % p.block_d == 0


def test_numpy_inputs_and_no_ignore_index_are_accepted():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 4)).astype(np.float32)
    w = rng.standard_normal((4, 5)).astype(np.float32)
    y = np.array([4, 0, 2])
    got = linear_cross_entropy(h, w, y)
    logits = h.astype(np.float64) @ w.astype(np.float64)
    lse = np.log(np.exp(logits).sum(1))
    np.testing.assert_allclose(float(got), np.mean(lse - logits[np.arange(3), y]), rtol=1e-5)
