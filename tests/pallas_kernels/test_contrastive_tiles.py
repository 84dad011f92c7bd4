"""Per-block kernels of one ring step (pallas_kernels.contrastive.tiles), home and off home.

Oracle: a float64 NumPy transcription of the partial statistics of one (x shard, y block) pair,
written from their definitions: on the home block the diagonal holds the positive pairs (left out
of DCL's LSEs, z = +1 for SigLIP, −δ in the gradients); off home every pair is a negative. Both
kernel families run in interpret mode, on one tile and on a ragged multi-tile grid.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.losses._contrastive_specs import noisy_unit_pair
from pallas_kernels.contrastive import tiles

D = 24  # not a multiple of 128 (TPU: full-dim block) nor a power of two (GPU: zero-padded)
# (backend, n, block): one tile, and a ragged grid (TPU 2 × 2 tiles of 128, GPU 3 × 3 of 16).
GRIDS = [("tpu", 5, 128), ("tpu", 130, 128), ("gpu", 5, 16), ("gpu", 40, 16)]
CASES = [(*grid, "float32") for grid in GRIDS] + [("tpu", 130, 128, "bfloat16")]
CASES += [("gpu", 40, 16, "bfloat16")]


def _lse(a, axis):
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def numpy_partials(kind, x, y, scale, bias, home, row_lse=None, col_lse=None):
    """The partial statistics of one block in float64 (see tiles.py for their definitions)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    logits = float(scale) * x @ y.T + float(bias)
    n = x.shape[0]
    pos = np.eye(n, dtype=bool) if home else np.zeros((n, n), bool)
    if kind == "sigmoid":
        z = np.where(pos, 1.0, -1.0)
        rows = np.sum(np.log1p(np.exp(-z * logits)), axis=1)
        g = 1.0 / (1.0 + np.exp(-logits)) - pos
        return {"rows": rows, "u_x": g @ y, "u_y": g.T @ x, "gsum": g.sum(axis=1)}
    keep = ~pos if kind == "decoupled" else np.ones((n, n), bool)
    kept = np.where(keep, logits, -np.inf)
    out = {"row_lse": _lse(kept, 1), "col_lse": _lse(kept, 0)}
    if row_lse is not None:
        r, c = np.asarray(row_lse, np.float64)[:, None], np.asarray(col_lse, np.float64)[None]
        g = np.where(keep, np.exp(logits - r) + np.exp(logits - c), 0.0) - 2.0 * pos
        out.update(u_x=g @ y, u_y=g.T @ x)
    return out


def _assert_close(got, want, rtol, name):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    atol = rtol * max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


def _plan(kind, backend, n, block, dtype):
    return tiles.block_plan(kind, n, D, dtype, block, backend=backend, interpret=True)


@pytest.mark.parametrize("home", [True, False])
@pytest.mark.parametrize("backend,n,block,dtype", CASES)
@pytest.mark.parametrize("kind", ["softmax", "decoupled"])
def test_lse_block_and_its_gradients(kind, backend, n, block, dtype, home):
    x, y, scale, bias = noisy_unit_pair(kind, n, D, dtype)
    plan = _plan(kind, backend, n, block, dtype)
    want = numpy_partials(kind, x, y, scale, bias, home)
    # Global statistics stand in for the whole ring: the block's own LSE plus what the other
    # blocks would add (any finite values do; these keep every exp below 1).
    rng = np.random.default_rng(1)
    row_lse = want["row_lse"] + rng.uniform(0.0, 2.0, n)
    col_lse = want["col_lse"] + rng.uniform(0.0, 2.0, n)
    want = numpy_partials(kind, x, y, scale, bias, home, row_lse, col_lse)

    def run(x, y, scale, bias, row_lse, col_lse):
        xp, yp = tiles.pad(x, plan), tiles.pad(y, plan)
        r, c = tiles.block_lse(xp, yp, scale, bias, plan, home=home)
        pad = (0, plan.n_pad - n)
        lse = (jnp.pad(row_lse, pad), jnp.pad(col_lse, pad))
        u_x, u_y = tiles.block_lse_grads(xp, yp, scale, bias, *lse, plan, home=home)
        return r[:n], c[:n], u_x[:n, :D], u_y[:n, :D]

    lse = (jnp.asarray(row_lse, jnp.float32), jnp.asarray(col_lse, jnp.float32))
    r, c, u_x, u_y = jax.jit(run)(x, y, scale, bias, *lse)
    # Products of the (rounded) inputs are exact in f32 accumulation: the LSEs are tight for both
    # dtypes. For bf16 the kernels round G to bf16 before the matmul (2^-9 relative).
    _assert_close(r, want["row_lse"], 1e-5, "row_lse")
    _assert_close(c, want["col_lse"], 1e-5, "col_lse")
    grad_rtol = 1e-5 if dtype == "float32" else 5e-3
    _assert_close(u_x, want["u_x"], grad_rtol, "G·y")
    _assert_close(u_y, want["u_y"], grad_rtol, "Gᵀ·x")


@pytest.mark.parametrize("home", [True, False])
@pytest.mark.parametrize("backend,n,block,dtype", CASES)
def test_sigmoid_block_and_its_gradients(backend, n, block, dtype, home):
    x, y, scale, bias = noisy_unit_pair("sigmoid", n, D, dtype)
    plan = _plan("sigmoid", backend, n, block, dtype)
    want = numpy_partials("sigmoid", x, y, scale, bias, home)

    def run(x, y, scale, bias):
        xp, yp = tiles.pad(x, plan), tiles.pad(y, plan)
        rows = tiles.block_sigmoid(xp, yp, scale, bias, plan, home=home)
        u_x, u_y, gsum = tiles.block_sigmoid_grads(xp, yp, scale, bias, plan, home=home)
        return rows[:n], u_x[:n, :D], u_y[:n, :D], gsum[:n]

    rows, u_x, u_y, gsum = jax.jit(run)(x, y, scale, bias)
    _assert_close(rows, want["rows"], 1e-5, "rows")
    grad_rtol = 1e-5 if dtype == "float32" else 5e-3
    _assert_close(u_x, want["u_x"], grad_rtol, "G·y")
    _assert_close(u_y, want["u_y"], grad_rtol, "Gᵀ·x")
    _assert_close(gsum, want["gsum"], 1e-5, "ΣG")


def test_home_and_off_home_blocks_sum_to_the_whole_loss():
    # Two shards: the SigLIP loss of the 2n batch is the sum of the four block partials, each
    # x shard meeting its home block once and the other shard's block off home.
    kind, n = "sigmoid", 5
    x, y, scale, bias = noisy_unit_pair(kind, 2 * n, D, "float32", seed=3)
    plan = _plan(kind, "tpu", n, 128, "float32")
    parts = []
    for a in range(2):
        xa = tiles.pad(x[a * n : (a + 1) * n], plan)
        for b in range(2):
            yb = tiles.pad(y[b * n : (b + 1) * n], plan)
            parts.append(tiles.block_sigmoid(xa, yb, scale, bias, plan, home=a == b)[:n])
    got = float(sum(jnp.sum(p) for p in parts)) / (2 * n)
    want = float(np.sum(numpy_partials(kind, x, y, scale, bias, True)["rows"])) / (2 * n)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_block_plan_and_inputs_are_checked():
    with pytest.raises(ValueError, match=r"kind must be one of .*'hinge'"):
        tiles.block_plan("hinge", 8, 8, jnp.float32)
    with pytest.raises(ValueError, match=r"n >= 1 and d >= 1, got \[n, d\] = \[0, 8\]"):
        tiles.block_plan("softmax", 0, 8, jnp.float32)
    with pytest.raises(NotImplementedError, match=r"got int32"):
        tiles.block_plan("softmax", 8, 8, jnp.int32)
    with pytest.raises(NotImplementedError, match=r"multiples of 128"):
        tiles.block_plan("softmax", 300, 8, jnp.float32, 100, backend="tpu", interpret=True)
    plan = tiles.block_plan("softmax", 8, 8, jnp.float32, backend="tpu", interpret=True)
    x = tiles.pad(jnp.ones((8, 8)), plan)
    with pytest.raises(TypeError, match=r"home must be a static Python bool"):
        tiles.block_lse(x, x, 1.0, 0.0, plan, home=jnp.bool_(True))
    with pytest.raises(ValueError, match=r"padded shards of shape \(8, 8\).*\(4, 8\)"):
        tiles.block_lse(x, x[:4], 1.0, 0.0, plan, home=True)
    with pytest.raises(ValueError, match=r"plan of kind \('sigmoid',\), got kind='softmax'"):
        tiles.block_sigmoid(x, x, 1.0, 0.0, plan, home=True)
    with pytest.raises(ValueError, match=r"does not fit the plan"):
        tiles.pad(jnp.ones((5, 8)), plan)
