"""int8-saved activations: exact forward, gradient errors under the docstring's bounds, less memory.

Each bound is computed from the quantization scales alone (|x̂ - x| <= s / 2), never from the
measured error, so a quantizer or a backward that is wrong by more than the analysis allows fails.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.nn import compressed_activations as ca
from jaxbatch.nn import layers

# XLA:CPU spends most of these tests in LLVM; level 0 changes nothing they compare.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# Inputs: Gaussian, and heavy-tailed Student-t with 2 degrees of freedom (outliers set the scales).
KINDS = ("normal", "student_t")


def _inputs(kind, shape, seed=0, dtype=jnp.float32):
    key = jax.random.key(seed)
    if kind == "normal":
        x = jax.random.normal(key, shape)
    else:
        x = jax.random.t(key, 2.0, shape)
    return x.astype(dtype)


def _norm(a):
    return float(jnp.linalg.norm(jnp.asarray(a, jnp.float32).ravel()))


def _rel(a, b):
    return _norm(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)) / _norm(b)


def _step(x, axis=-1):
    """The per-element bound |x̂ - x| <= s / 2, broadcast to x's shape."""
    _, s = ca.quantize(x, axis=axis)
    return jnp.broadcast_to(s / 2, x.shape)


# -- quantizer -------------------------------------------------------------------------------


def test_quantize_round_trip_is_within_half_a_step_and_keeps_the_absmax():
    x = _inputs("student_t", (6, 5, 16))
    p = jax.nn.softmax(x, axis=-1).at[0].set(0.0)
    (q, s), (qp, sp) = _jit(lambda: (ca.quantize(x, axis=-1), ca.quantize(p, axis=(0, 1))))()
    assert q.dtype == jnp.int8 and s.dtype == jnp.float32 and s.shape == (1, 1, 16)
    err = np.abs(np.asarray(q, np.float32) * np.asarray(s) - np.asarray(x))
    assert np.all(err <= np.asarray(s) / 2 * (1 + 1e-6))
    assert int(np.max(np.abs(np.asarray(q)))) == 127
    # Per-row groups of softmax-like data, and an all-zero group.
    assert (
        sp.shape == (6, 5, 1) and np.all(np.asarray(qp[0]) == 0) and np.all(np.asarray(sp[0]) == 0)
    )


def test_stochastic_rounding_is_unbiased_and_within_one_step():
    x = jnp.linspace(-1.0, 1.0, 64)
    keys = jax.random.split(jax.random.key(3), 500)
    gelu8 = ca.int8_saved(jax.nn.gelu, stochastic=True)

    @jax.jit
    def draws(keys):
        qs = jax.vmap(lambda k: ca.dequantize(*ca.quantize(x, axis=None, key=k)))(keys)
        return (
            qs,
            jax.grad(lambda t: gelu8(keys[0], t).sum())(x),
            jax.grad(lambda t: jax.nn.gelu(t).sum())(x),
        )

    qs, grad, ref = draws(keys)
    step = 1.0 / 127
    assert bool(jnp.all(jnp.abs(qs - x) < step * (1 + 1e-6)))
    # Mean of 500 draws: standard error <= step / (2 sqrt(500)) = 0.022 step; allow 5.4 sigma.
    assert float(jnp.max(jnp.abs(qs.mean(0) - x))) < 0.12 * step
    np.testing.assert_allclose(grad, ref, atol=ca.GELU_SECOND_DERIVATIVE_MAX * step)


def test_bad_names_and_axes_fail_clearly():
    assert ca.validate_names(("mlp_input", "softmax")) == ("mlp_input", "softmax")
    assert ca.validate_names(None) == ()
    with pytest.raises(ValueError, match=r"unknown activation name\(s\) \['mlp_out'\].*softmax"):
        ca.validate_names(("mlp_input", "mlp_out"))
    with pytest.raises(ValueError, match="not a string"):
        ca.validate_names("mlp_input")
    with pytest.raises(ValueError, match="axis 3 is out of range for an array of rank 2"):
        ca.quantize(jnp.ones((2, 2)), axis=3)


# -- forward: bit for bit ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_forward_equals_the_uncompressed_op_bit_for_bit(dtype):
    x = _inputs("student_t", (4, 8, 16), dtype=dtype)
    scale = 1 + 0.1 * _inputs("normal", (16,), 1)
    bias = 0.1 * _inputs("normal", (16,), 2)
    kernel = 0.1 * _inputs("normal", (16, 12), 3)
    logits = _inputs("normal", (2, 3, 8, 8), 4)
    v = _inputs("normal", (2, 8, 3, 4), 5, dtype)
    ln = nn.LayerNorm(dtype=dtype)
    dense = nn.Dense(12, dtype=dtype)
    pairs = [
        (ca.compressed_gelu, nn.gelu, (x,)),
        (
            lambda t, s, b: ca.compressed_layer_norm(t, s, b, dtype=dtype),
            lambda t, s, b: ln.apply({"params": {"scale": s, "bias": b}}, t),
            (x, scale, bias),
        ),
        (
            lambda t, k, b: ca.gelu_dense(t, k, b, dtype=dtype),
            lambda t, k, b: dense.apply({"params": {"kernel": k, "bias": b}}, nn.gelu(t)),
            (x, kernel, bias[:12]),
        ),
        (
            ca.compressed_softmax_values,
            lambda lg, vv: jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(lg).astype(vv.dtype), vv),
            (logits, v),
        ),
    ]
    for compressed, plain, args in pairs:
        out, ref = _jit(compressed)(*args), _jit(plain)(*args)
        assert out.dtype == ref.dtype
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def test_flax_modules_have_the_parameters_and_outputs_of_the_flax_layers():
    x = _inputs("normal", (3, 5, 8))
    dense = nn.Dense(6)
    for mine, theirs, apply in (
        (ca.CompressedLayerNorm(), nn.LayerNorm(), nn.LayerNorm().apply),
        (ca.GeluDense(6), dense, lambda p, t: dense.apply(p, nn.gelu(t))),
    ):
        params = theirs.init(jax.random.key(0), x)
        assert jax.tree.structure(mine.init(jax.random.key(0), x)) == jax.tree.structure(params)
        np.testing.assert_array_equal(_jit(mine.apply)(params, x), _jit(apply)(params, x))


# -- gradients: measured error under the derived bound ----------------------------------------


def _check(measure, kind):
    """Runs ``measure(kind) -> {name: (error norm, bound, reference norm)}`` as one program."""
    results = _jit(measure, static_argnums=0)(kind)
    for name, (err, bound, ref) in results.items():
        err, bound, ref = float(err), float(bound), float(ref)
        # float32 rounding of both backward passes on top of the int8 bound.
        assert err <= bound * (1 + 1e-3) + 1e-6 * ref, (kind, name, err / ref, bound / ref)
        assert bound < ref, (kind, name, bound / ref)  # the bound says something
    return results


def _gelu_errors(kind):
    x = 2 * _inputs(kind, (64, 32))
    g = _inputs("normal", x.shape, 7)
    grad = jax.vjp(ca.compressed_gelu, x)[1](g)[0]
    ref = jax.vjp(nn.gelu, x)[1](g)[0]
    bound = ca.GELU_SECOND_DERIVATIVE_MAX * jnp.linalg.norm(g * _step(x))
    return {"dx": (jnp.linalg.norm(grad - ref), bound, jnp.linalg.norm(ref))}


def _gelu_dense_errors(kind):
    h = 2 * _inputs(kind, (64, 32))
    kernel = 0.2 * _inputs("normal", (32, 16), 1)
    bias = jnp.zeros((16,))
    g = _inputs("normal", (64, 16), 7)
    dh, dw, db = jax.vjp(ca.gelu_dense, h, kernel, bias)[1](g)
    dh_ref, dw_ref, db_ref = jax.vjp(lambda t, k, b: nn.gelu(t) @ k + b, h, kernel, bias)[1](g)
    s = _step(h)
    bound_h = ca.GELU_SECOND_DERIVATIVE_MAX * jnp.linalg.norm((g @ kernel.T) * s)
    bound_w = ca.GELU_DERIVATIVE_MAX * jnp.linalg.norm(s[0]) * jnp.linalg.norm(jnp.abs(g).sum(0))
    n = jnp.linalg.norm
    return {
        "dh": (n(dh - dh_ref), bound_h, n(dh_ref)),
        "dw": (n(dw - dw_ref), bound_w, n(dw_ref)),
        "db": (n(db - db_ref), 1e-6 * n(db_ref), n(db_ref)),
    }


def _layer_norm_errors(kind):
    d = 32
    x = 3 + _inputs(kind, (64, d))  # an offset: the centring matters
    gamma = 1 + 0.2 * _inputs("normal", (d,), 1)
    beta = jnp.zeros((d,))
    g = _inputs("normal", x.shape, 7)
    ln = nn.LayerNorm()

    def plain(t, s, b):
        return ln.apply({"params": {"scale": s, "bias": b}}, t)

    dx, dgamma, dbeta = jax.vjp(ca.compressed_layer_norm, x, gamma, beta)[1](g)
    dx_ref, dgamma_ref, dbeta_ref = jax.vjp(plain, x, gamma, beta)[1](g)
    c_norm = jnp.linalg.norm(x - x.mean(-1, keepdims=True), axis=-1)
    sigma = c_norm / jnp.sqrt(d)
    eps = jnp.linalg.norm(_step(x)[0]) / c_norm  # [rows], from the scales alone (all < 1 here)
    g_hat = jnp.linalg.norm(g * gamma, axis=-1)
    n = jnp.linalg.norm
    return {
        "dx": (n(dx - dx_ref), n(2 * eps / (1 - eps) * g_hat / sigma), n(dx_ref)),
        "dgamma": (
            n(dgamma - dgamma_ref),
            n(g, axis=0).max() * 2 * jnp.sqrt(d) * n(eps),
            n(dgamma_ref),
        ),
        "dbeta": (n(dbeta - dbeta_ref), 1e-6 * n(dbeta_ref), n(dbeta_ref)),
        "eps_below_one": (eps.max(), 0.2, 1.0),
    }


def _softmax_values_errors(kind):
    b, h, t, d = 2, 2, 16, 8
    logits = 2 * _inputs(kind, (b, h, t, t))
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(jnp.float32).min)
    v = _inputs("normal", (b, t, h, d), 1)
    g = _inputs("normal", (b, t, h, d), 7)

    def plain(lg, vv):
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(lg), vv)

    dl, dv = jax.vjp(ca.compressed_softmax_values, logits, v)[1](g)
    dl_ref, dv_ref = jax.vjp(plain, logits, v)[1](g)
    p = jax.nn.softmax(logits)
    s = jnp.max(p, -1) / 127 / 2  # [b, h, q]: half a step per row
    bound_v = jnp.sqrt(t) * jnp.linalg.norm(jnp.einsum("bhq,bqhd->bhd", s, jnp.abs(g)))
    dp = jnp.einsum("bqhd,bkhd->bhqk", g, v)
    p_hat = ca.dequantize(*ca.quantize(p, axis=(0, 1, 2)))
    centred = dp - jnp.sum(p_hat * dp, -1, keepdims=True)
    n = jnp.linalg.norm
    row = s * (n(centred, axis=-1) + n(p, axis=-1) * jnp.abs(dp).sum(-1))
    masked = jnp.max(jnp.abs(jnp.where(p == 0, dl, 0.0)))  # masked keys get no gradient
    return {
        "dv": (n(dv - dv_ref), bound_v, n(dv_ref)),
        "dlogits": (n(dl - dl_ref), n(row), n(dl_ref)),
        "masked": (masked, 0.0, 1.0),
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "measure",
    [_gelu_errors, _gelu_dense_errors, _layer_norm_errors, _softmax_values_errors],
    ids=["gelu", "gelu_dense", "layer_norm", "softmax_values"],
)
def test_gradient_errors_are_under_the_derived_bounds(measure, kind):
    results = _check(measure, kind)
    assert max(float(err) for err, _, _ in results.values()) > 0  # the int8 copy is really read


def test_bf16_gradients_are_close_to_the_float32_ones():
    x = 2 * _inputs("normal", (64, 32))
    g = _inputs("normal", x.shape, 7)
    dtype = jnp.bfloat16

    def grads(x, g):
        def vjp(f, t, c):
            return jax.vjp(f, t)[1](c)[0]

        xb, gb = x.astype(dtype), g.astype(dtype)
        return vjp(nn.gelu, x, g), vjp(ca.compressed_gelu, xb, gb), vjp(nn.gelu, xb, gb)

    ref, grad, plain = _jit(grads)(x, g)
    assert grad.dtype == dtype
    # int8 error (< 1 % here) on top of the bf16 error of the plain op.
    assert _rel(grad, ref) <= _rel(plain, ref) + 0.01, (_rel(grad, ref), _rel(plain, ref))


def test_composes_with_jit_vmap_grad_and_remat():
    x = _inputs("normal", (4, 6, 8))

    def loss(t):
        return jnp.sum(ca.compressed_gelu(t, axis=-1) ** 2)

    grad = jax.grad(loss)
    per_example, whole, remat, hvp = _jit(
        lambda t: (
            jax.vmap(grad)(t),
            jax.vmap(lambda u: grad(u[None])[0])(t),  # same groups as per example
            jax.vmap(jax.grad(jax.checkpoint(loss)))(t),
            jax.jvp(grad, (t,), (jnp.ones_like(t),))[1],
        )
    )(x)
    # Under vmap each example is its own quantization group (axis -1 of the example's [6, 8]).
    np.testing.assert_allclose(per_example, whole, rtol=1e-6)
    np.testing.assert_allclose(remat, per_example, rtol=1e-6)
    np.testing.assert_allclose(per_example[1], _jit(grad)(x[1]), rtol=1e-5)
    assert bool(jnp.all(jnp.isfinite(hvp)))


# -- memory -----------------------------------------------------------------------------------


def _mlp_stack(compress: bool, depth: int):
    """Pre-LN residual MLP blocks: x + MlpBlock(LN(x)), as in the transformer layers."""
    names = ("mlp_input", "layer_norm_input") if compress else ()

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(depth):
                h = layers.layer_norm(
                    dtype=jnp.float32, param_dtype=jnp.float32, compress=bool(names), name=f"ln{i}"
                )(x)
                x = x + layers.MlpBlock(
                    4 * x.shape[-1], compress_activations=names, name=f"mlp{i}"
                )(h)
            return x

    return Stack()


def test_layers_with_compression_keep_parameters_and_forward(fast_jit):
    x = _inputs("normal", (4, 8, 16))
    plain, compressed = _mlp_stack(False, 2), _mlp_stack(True, 2)
    params = plain.init(jax.random.key(0), x)
    assert jax.tree.structure(compressed.init(jax.random.key(0), x)) == jax.tree.structure(params)

    def both(p):
        def loss(m):
            return lambda q: jnp.sum(m.apply(q, x) ** 2)

        return (
            plain.apply(p, x),
            compressed.apply(p, x),
            jax.grad(loss(plain))(p),
            jax.grad(loss(compressed))(p),
        )

    y, y8, g, g8 = fast_jit(both)(params)
    np.testing.assert_allclose(y8, y, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g), strict=True):
        assert _rel(a, b) < 0.05, _rel(a, b)
    with pytest.raises(ValueError, match="MlpBlock.compress_activations: unknown"):
        layers.MlpBlock(8, compress_activations=("gelu",))
    # Active dropout: only the gelu is compressed; the same mask as the plain block.
    rngs = {"dropout": jax.random.key(5)}
    drop = layers.MlpBlock(32, 0.5, compress_activations=("mlp_input",))
    ref = layers.MlpBlock(32, 0.5)
    p = ref.init(jax.random.key(0), x)
    out, out_ref = fast_jit(
        lambda q: (
            drop.apply(q, x, deterministic=False, rngs=rngs),
            ref.apply(q, x, deterministic=False, rngs=rngs),
        )
    )(p)
    np.testing.assert_allclose(out, out_ref, rtol=1e-6, atol=1e-6)


def test_training_with_int8_activations_tracks_the_float_run():
    """60 SGD steps of a 2-block pre-LN MLP regression: the loss curves stay within 0.1 %
    (measured: 1.2e-5 relative at most)."""
    x = _inputs("normal", (64, 16))
    target = jnp.sin(2 * x) @ (0.3 * _inputs("normal", (16, 16), 3))

    def train(model):
        params = model.init(jax.random.key(0), x)

        def step(p, _):
            loss, g = jax.value_and_grad(lambda q: jnp.mean((model.apply(q, x) - target) ** 2))(p)
            return jax.tree.map(lambda a, b: a - 0.05 * b, p, g), loss

        return jax.lax.scan(step, params, length=60)[1]

    plain, compressed = _jit(lambda: (train(_mlp_stack(False, 2)), train(_mlp_stack(True, 2))))()
    assert float(plain[-1]) < 0.5 * float(plain[0])  # it learns
    gap = np.max(np.abs(np.asarray(compressed) - np.asarray(plain)) / np.asarray(plain))
    assert gap < 1e-3, gap


def _mlp_stack_temp_bytes(compress: bool, depth=4, tokens=512, width=64) -> int:
    model = _mlp_stack(compress, depth)
    x = jax.ShapeDtypeStruct((tokens, width), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)

    def loss(p, t):
        return jnp.sum(model.apply(p, t) ** 2)

    compiled = _jit(jax.value_and_grad(loss)).lower(params, x).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def test_int8_mlp_input_cuts_the_compiled_temporary_memory():
    plain, compressed = _mlp_stack_temp_bytes(False), _mlp_stack_temp_bytes(True)
    # Per block the plain MLP keeps h and gelu(h) in float32 (8 bytes per hidden unit and token)
    # and the LN its float input; the compressed one keeps int8 h (1 byte) and the int8 LN input.
    # The rest (the residual stream, the backward's working set) is the same in both.
    assert compressed < 0.5 * plain, (compressed, plain)


class _PreLnBlock(nn.Module):
    """A pre-LN block that names its compressed activations (what pre_ln_block reads)."""

    compress_activations: tuple[str, ...] = ()
    num_heads: int = 2
    mlp_dim: int = 32
    dropout: float = 0.0
    dtype = jnp.float32
    param_dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return layers.pre_ln_block(self, x, None, deterministic=True, causal=True)


def test_pre_ln_block_compresses_what_the_block_names():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 16))
    plain = _PreLnBlock()
    packed = _PreLnBlock(compress_activations=("mlp_input", "layer_norm_input"))
    params = plain.init(jax.random.PRNGKey(1), x)
    assert jax.tree.structure(packed.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(params)
    np.testing.assert_array_equal(plain.apply(params, x), packed.apply(params, x))

    def grads(block):
        return jax.grad(lambda p, x: jnp.sum(block.apply(p, x) ** 2), argnums=(0, 1))(params, x)

    want, got = grads(plain), grads(packed)
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    num = sum(float(jnp.sum((a - b) ** 2)) for a, b in pairs)
    den = sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(want))
    assert 0 < (num / den) ** 0.5 < 0.05  # int8 saved inputs: close, and not the float gradient
