"""Validation, dispatch errors, block sizes and padding plans of the contrastive kernels' API."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.contrastive import BlockSizes, contrastive_loss
from pallas_kernels.contrastive._common import plan

X = jnp.ones((4, 8), jnp.float32)


@pytest.mark.parametrize(
    "x,y,scale,bias,kwargs,match",
    [
        (X, jnp.ones((5, 8)), 1.0, None, {}, r"same \[N, D\] shape.*\(4, 8\).*\(5, 8\)"),
        (X, jnp.ones((4, 7)), 1.0, None, {}, r"same \[N, D\] shape"),
        (jnp.ones(8), jnp.ones(8), 1.0, None, {}, r"must be \[N, D\] arrays"),
        (jnp.ones((0, 8)), jnp.ones((0, 8)), 1.0, None, {}, r"N >= 1"),
        (X, X, jnp.ones(2), None, {}, r"logit_scale must be a scalar, got shape \(2,\)"),
        (X, X, 1.0, jnp.ones((1,)), {}, r"logit_bias must be a scalar or None"),
        (X, X, 1.0, None, {"kind": "hinge"}, r"kind must be one of.*'hinge'"),
        (X, X, 1.0, None, {"block_size": 0}, r"block_size must be positive, got 0"),
        (X, X, 1.0, None, {"block_size": -128}, r"block_size must be positive"),
        (X, X, 1.0, None, {"block_size": 2.5}, r"block_size must be a positive int"),
    ],
)
def test_bad_input_raises_value_error(x, y, scale, bias, kwargs, match):
    with pytest.raises(ValueError, match=match):
        contrastive_loss(x, y, scale, bias, **kwargs)


@pytest.mark.parametrize(
    "x,y,kwargs,match",
    [
        (X.astype(jnp.int32), X.astype(jnp.int32), {}, r"support.*got int32"),
        (X, X.astype(jnp.bfloat16), {}, r"share a dtype"),
        (X, X, {"backend": "metal"}, r"no contrastive Pallas kernel for backend 'metal'"),
        (X, X, {"backend": "cpu", "interpret": False}, r"only run with interpret=True"),
        (jnp.ones((300, 8)), jnp.ones((300, 8)), {"block_size": 100}, r"multiples of 128"),
        (
            jnp.ones((40, 8)),
            jnp.ones((40, 8)),
            {"block_size": 24, "backend": "gpu"},
            r"powers of two >= 16",
        ),
    ],
)
def test_unsupported_input_raises_not_implemented(x, y, kwargs, match):
    # NotImplementedError lets jaxbatch.losses.contrastive_loss fall back to its XLA version.
    with pytest.raises(NotImplementedError, match=match):
        contrastive_loss(x, y, 1.0, **kwargs)


def test_block_sizes_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"block_rows must be a positive int, got 0"):
        BlockSizes(0, 128)
    with pytest.raises(ValueError, match=r"block_cols must be a positive int, got True"):
        BlockSizes(128, True)
    with pytest.raises(ValueError, match=r"backend must be 'tpu' or 'gpu'"):
        BlockSizes.get_default("cpu", 10, 10, jnp.float32)


@pytest.mark.parametrize("d", [64, 256, 1024, 4096])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_default_blocks_follow_tiling_rules(d, dtype):
    tpu = BlockSizes.get_default("tpu", 1 << 16, d, dtype)
    gpu = BlockSizes.get_default("gpu", 1 << 16, d, dtype)
    tpu.check_for("tpu")
    gpu.check_for("gpu")
    assert tpu.block_rows % 128 == 0 and tpu.block_cols % 128 == 0
    # the [block_rows, d] f32 gradient accumulator stays within 4 MiB of VMEM
    assert tpu.block_rows * d * 4 <= 4 << 20
    assert gpu.block_rows & (gpu.block_rows - 1) == 0 and gpu.block_rows >= 16


@pytest.mark.parametrize(
    "backend,n,d,dtype,blocks,expected",
    [
        # (n_pad, d_pad, block_rows, block_cols)
        ("tpu", 5, 24, jnp.float32, BlockSizes(512, 512), (8, 24, 8, 8)),  # 8 f32 sublanes
        ("tpu", 5, 24, jnp.bfloat16, BlockSizes(512, 512), (16, 24, 16, 16)),  # 16 for bf16
        ("tpu", 300, 24, jnp.float32, BlockSizes(128, 128), (384, 24, 128, 128)),
        ("tpu", 300, 24, jnp.float32, BlockSizes(128, 256), (512, 24, 128, 256)),
        ("tpu", 200, 24, jnp.float32, BlockSizes(128, 256), (256, 24, 128, 256)),
        ("gpu", 1, 3, jnp.float32, BlockSizes(64, 64), (16, 16, 16, 16)),
        ("gpu", 40, 24, jnp.float32, BlockSizes(16, 16), (48, 32, 16, 16)),
        ("gpu", 33, 100, jnp.bfloat16, BlockSizes(64, 64), (64, 128, 64, 64)),
    ],
)
def test_plan_pads_to_whole_legal_tiles(backend, n, d, dtype, blocks, expected):
    p = plan("softmax", n, d, dtype, blocks, backend, interpret=True)
    assert (p.n_pad, p.d_pad, p.block_rows, p.block_cols) == expected
    assert p.n_pad % p.block_rows == 0 and p.n_pad % p.block_cols == 0 and p.n_pad >= n


def test_python_scalars_and_missing_bias_are_accepted():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    got = contrastive_loss(x, x, 2.0, kind="softmax")
    logits = 2.0 * np.asarray(x, np.float64) @ np.asarray(x, np.float64).T
    lse_r = np.log(np.exp(logits).sum(1))
    lse_c = np.log(np.exp(logits).sum(0))
    want = 0.5 * np.mean(lse_r - np.diag(logits)) + 0.5 * np.mean(lse_c - np.diag(logits))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
