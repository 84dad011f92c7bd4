"""Tests of jaxbatch.losses.contrastive_loss on one device.

Oracles: an independent float64 NumPy transcription of each paper's formula (CLIP's symmetric
cross-entropy, SigLIP's pairwise sigmoid, DCL's decoupled denominator) for the reference and for the
gradients (central differences), and the float32 Precision.HIGHEST reference for every other
implementation, on the shared argument specs of ``jaxbatch.losses._contrastive_specs``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.losses import contrastive_loss
from jaxbatch.losses._contrastive_specs import KINDS, TEST_DIM, TEST_SHAPES, default_spec

IMPLEMENTATIONS = ("reference", "xla")
NAMES = ("dx", "dy", "dlogit_scale", "dlogit_bias")


# ---------------------------------------------------------------- NumPy transcriptions (float64)


def _logsumexp(a, axis):
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def numpy_loss(x, y, scale, bias, kind):
    """The three losses written from their papers, in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.shape[0]
    logits = float(scale) * x @ y.T + (0.0 if bias is None else float(bias))
    eye = np.eye(n, dtype=bool)
    pos = np.diag(logits)
    if kind == "softmax":  # CLIP: (CE over rows + CE over columns) / 2
        return 0.5 * (np.mean(_logsumexp(logits, 1) - pos) + np.mean(_logsumexp(logits, 0) - pos))
    if kind == "decoupled":  # DCL: the positive pair is left out of each denominator
        neg = np.where(eye, -np.inf, logits)
        return 0.5 * (np.mean(_logsumexp(neg, 1) - pos) + np.mean(_logsumexp(neg, 0) - pos))
    z = np.where(eye, 1.0, -1.0)  # SigLIP: -1/N Σ_ij log 1 / (1 + exp(-z_ij·L_ij))
    return np.sum(np.log1p(np.exp(-z * logits))) / n


def numerical_grads(x, y, scale, bias, kind, eps=1e-5):
    """Central differences of ``numpy_loss`` in float64 wrt x, y, scale and bias."""
    args = [np.asarray(a, np.float64) for a in (x, y, scale, bias)]

    def f(a):
        return numpy_loss(*a, kind)

    grads = []
    for k, a in enumerate(args):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            hi = [b.copy() for b in args]
            lo = [b.copy() for b in args]
            hi[k][idx] += eps
            lo[k][idx] -= eps
            g[idx] = (f(hi) - f(lo)) / (2 * eps)
        grads.append(g)
    return grads


def _value_and_grads(x, y, scale, bias, *, kind, implementation, block_size=None):
    def loss(x, y, s, b):
        return contrastive_loss(
            x, y, s, b, kind=kind, block_size=block_size, implementation=implementation
        )

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, y, scale, bias)


def _args(kind, n, dtype="float32", seed=0):
    x, y, scale, bias = default_spec(kind, n, TEST_DIM, dtype, seed).make_args()
    # Every kind gets a bias so its gradient is always checked (0 for the softmax kinds).
    return x, y, scale, jnp.float32(0.7) if bias is None else bias


def _cases():
    for kind in KINDS:
        for n, block in TEST_SHAPES:
            if kind == "decoupled" and n == 1:
                continue  # needs a negative; rejected, see test_decoupled_needs_two
            yield kind, n, block


# ------------------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_numpy_formula(kind):
    x, y, scale, bias = _args(kind, 37)
    got = contrastive_loss(x, y, scale, bias, kind=kind, implementation="reference")
    want = numpy_loss(x, y, scale, bias, kind)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_finite_differences(kind, implementation):
    x, y, scale, bias = _args(kind, 6, seed=1)
    x, y = x[:, :4], y[:, :4]  # 6×4 embeddings: 2·24 + 2 finite differences
    _, grads = _value_and_grads(
        x, y, scale, bias, kind=kind, implementation=implementation, block_size=4
    )
    for got, want, name in zip(
        grads, numerical_grads(x, y, scale, bias, kind), "xysb", strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("kind", ["softmax", "decoupled"])
def test_softmax_kinds_ignore_the_bias(kind):
    # The bias shifts every logit of a row (column) alike, which log-softmax cancels.
    x, y, scale, _ = _args(kind, 20)
    with_bias = contrastive_loss(x, y, scale, 3.0, kind=kind, block_size=8, implementation="xla")
    without = contrastive_loss(x, y, scale, kind=kind, block_size=8, implementation="xla")
    np.testing.assert_allclose(float(with_bias), float(without), rtol=0, atol=2e-6)


# --------------------------------------------------------- every implementation vs the reference


def _assert_close(got, want, rtol, what, floor=1e-2):
    """Elementwise close, with an absolute tolerance of rtol × the largest |want| (or floor)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    atol = rtol * max(float(np.max(np.abs(want))), floor)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("kind", "n", "block"), list(_cases()))
def test_matches_reference(kind, n, block, implementation, dtype):
    x, y, scale, bias = _args(kind, n, dtype)
    # Oracle: float32 at Precision.HIGHEST on the same (rounded) inputs.
    want_loss, want_grads = _value_and_grads(
        x.astype(jnp.float32), y.astype(jnp.float32), scale, bias,
        kind=kind, implementation="reference",
    )  # fmt: skip
    loss, grads = _value_and_grads(
        x, y, scale, bias, kind=kind, implementation=implementation, block_size=block
    )
    assert loss.dtype == x.dtype
    assert [g.dtype for g in grads] == [x.dtype, y.dtype, scale.dtype, bias.dtype]
    rtol = 2e-5 if dtype == "float32" else 2e-2
    # The loss is a difference of terms of the size of the logits (~logit_scale): floor 1.
    _assert_close(loss, want_loss, rtol, "loss", floor=1.0)
    for got, want, name in zip(grads, want_grads, NAMES, strict=True):
        # Scalar gradients are sums over the batch of size ~1; dlogit_bias is 0 for softmax.
        _assert_close(got, want, rtol, name, floor=1.0 if got.ndim == 0 else 1e-2)


@pytest.mark.parametrize("n", [24, 21])
def test_sigmoid_tiles_match_reference_with_saturated_logits(n):
    # Logits of about ±20…±100 (σ down to ~1e-44, subnormal), ragged n: the tiles' σ
    # (lax.logistic) and softplus stay finite and match the reference's autodiff, relative to
    # the largest gradient however small the logits make it.
    x, y, _, _ = _args("sigmoid", n)
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    y = y / jnp.linalg.norm(y, axis=1, keepdims=True)
    scale, bias = jnp.float32(60.0), jnp.float32(-40.0)
    want_loss, want_grads = _value_and_grads(
        x, y, scale, bias, kind="sigmoid", implementation="reference"
    )
    loss, grads = _value_and_grads(
        x, y, scale, bias, kind="sigmoid", implementation="xla", block_size=8
    )
    _assert_close(loss, want_loss, 2e-5, "loss", floor=1e-30)
    for got, want, name in zip(grads, want_grads, NAMES, strict=True):
        # Tolerance relative to the largest |gradient| itself, however small the logits make it.
        _assert_close(got, want, 2e-5, name, floor=1e-30)


@pytest.mark.parametrize("kind", KINDS)
def test_pallas_dispatch_matches_reference(kind):
    # pallas_kernels.contrastive runs its TPU kernels in interpret mode on CPU; their tiles must be
    # multiples of 128 (n = 200 pads the second block). Kernel numerics are tested beside them.
    x, y, scale, bias = _args(kind, 200)
    want_loss, want_grads = _value_and_grads(
        x, y, scale, bias, kind=kind, implementation="reference"
    )
    loss, grads = _value_and_grads(
        x, y, scale, bias, kind=kind, implementation="pallas", block_size=128
    )
    assert loss.dtype == x.dtype
    _assert_close(loss, want_loss, 2e-5, "loss", floor=1.0)
    for got, want, name in zip(grads, want_grads, NAMES, strict=True):
        _assert_close(got, want, 2e-5, name, floor=1.0 if got.ndim == 0 else 1e-2)


def test_auto_is_xla_on_cpu():
    x, y, scale, bias = _args("sigmoid", 37)
    auto = contrastive_loss(x, y, scale, bias, kind="sigmoid", block_size=16)
    xla = contrastive_loss(x, y, scale, bias, kind="sigmoid", block_size=16, implementation="xla")
    assert float(auto) == float(xla)


# ------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_xla_never_holds_the_logit_matrix(kind):
    n, d = 16384, 256
    spec = default_spec(kind, n, d)
    emb, emb_y, scalar = spec.shape_dtypes()[:3]
    n2_bytes = n * n * 4

    def compiled(implementation):
        def loss(x, y, s, b):
            return contrastive_loss(x, y, s, b, kind=kind, implementation=implementation)

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
        return fn.lower(emb, emb_y, scalar, scalar).compile()

    xla, ref = compiled("xla"), compiled("reference")
    assert ref.memory_analysis().temp_size_in_bytes > n2_bytes
    # O(N·D + B²): inputs are 2·16 MiB here, the logit matrix 1 GiB.
    assert xla.memory_analysis().temp_size_in_bytes < n2_bytes / 16
    assert f"{n},{n}]" not in xla.as_text()


# -------------------------------------------------------------------------------- bad inputs


def _good():
    return _args("softmax", 8)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: a.update(y=a["y"][:5]), ValueError, "same shape"),
        (lambda a: a.update(y=a["y"][:, :8]), ValueError, "same shape"),
        (lambda a: a.update(x=a["x"][None]), ValueError, "rank 2"),
        (lambda a: a.update(y=a["y"][0]), ValueError, "rank 2"),
        (lambda a: a.update(x=a["x"].astype(jnp.int32)), TypeError, "floating dtype"),
        (lambda a: a.update(y=a["y"].astype(jnp.bfloat16)), TypeError, "same dtype"),
        (lambda a: a.update(logit_scale=jnp.ones(2)), ValueError, "scalar"),
        (lambda a: a.update(logit_scale=jnp.int32(3)), TypeError, "floating dtype"),
        (lambda a: a.update(logit_bias=jnp.ones((1,))), ValueError, "logit_bias must be a scalar"),
        (lambda a: a.update(kind="infonce"), ValueError, "kind must be one of"),
        (lambda a: a.update(implementation="cuda"), ValueError, "implementation must be one of"),
        (lambda a: a.update(block_size=0), ValueError, "block_size must be a positive int"),
        (lambda a: a.update(block_size=-4), ValueError, "block_size must be a positive int"),
        (lambda a: a.update(block_size=16.0), ValueError, "block_size must be a positive int"),
        (lambda a: a.update(axis_name="data"), ValueError, "not a bound mesh axis"),
    ],
)
def test_bad_input(change, error, match):
    x, y, scale, bias = _good()
    kwargs = dict(x=x, y=y, logit_scale=scale, logit_bias=bias)
    change(kwargs)
    with pytest.raises(error, match=match):
        contrastive_loss(**kwargs)


def test_decoupled_needs_two():
    x, y, scale, _ = _args("decoupled", 1)
    with pytest.raises(ValueError, match="at least 2"):
        contrastive_loss(x, y, scale, kind="decoupled")
