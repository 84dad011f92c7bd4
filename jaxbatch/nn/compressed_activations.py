"""8-bit stored activations: exact forward, the backward recomputed from int8 copies of the inputs.

Activation-compressed training (Pan et al. 2021, "Mesa: A Memory-saving Training Framework for
Transformers"; Liu et al. 2022, "GACT: Activation Compressed Training for Generic Network
Architectures") keeps, for the backward pass, a low-precision copy of what a layer saves instead of
the full-precision tensor. Here an op ``y = f(x, *params)`` is wrapped in a ``jax.custom_vjp``:

  forward:   y = f(x, *params)                       (exactly the uncompressed op, bit for bit)
  residual:  q = round(x / s) ∈ int8 [-127, 127],  s = max|x| / 127  over each quantization group
  backward:  x̂ = q · s;  (dx, dparams) = vjp(f, x̂, *params)(dy)

so the saved input costs 1 byte per element (+ one float32 scale per group) instead of 2 (bf16) or
4 (float32), and none of the op's internal intermediates are kept. Rounding is to nearest (half to
even), so |x̂ - x| <= s / 2 element-wise and the result is deterministic; ``quantize(..., key=)``
offers the unbiased stochastic rounding of GACT (|x̂ - x| < s) for callers that thread a key.

Quantization groups (``axis``): one scale per index along the kept axes, the absmax taken over all
the other axes. ``axis=-1`` (the default) is per channel: [B, T, D] activations get D scales,
shared by all tokens (activation outliers sit in a few channels). Softmax probabilities get one
scale per row (``axis`` = all but the key axis), since causal rows differ in their largest weight
by orders of magnitude.

Ops and the bounds on the gradient error they introduce (Δ = x̂ - x, |Δ_i| <= s_i / 2 for
float32 x; g = dy; the tests check the measured error against each bound, which they compute
from the scales alone, on Gaussian and heavy-tailed (Student-t, 2 degrees of freedom) inputs):

- :func:`compressed_gelu` (the MLP activation input). dx = g ⊙ gelu'(x) and
  max|gelu''| = 2φ(0) = 0.7979 (exact and tanh forms), so ||dx̂ - dx|| <= 0.399 ||g ⊙ s||.
- :func:`gelu_dense`: y = gelu(h) W + b saving only int8 h (uncompressed, the MLP keeps h, the
  gelu internals and gelu(h) for dW). With dz = g Wᵀ: ||dĥ - dh|| <= 0.399 ||dz ⊙ s||; and as
  max|gelu'| = 1.129, |gelu(ĥ) - gelu(h)| <= 0.565 s, so
  ||dŴ - dW||_F <= 0.565 ||s|| · ||Σ_t |g_t| ||  (Σ over the rows t of g); db is exact.
- :func:`compressed_layer_norm` (the layer-norm input). Row r: centred input c_r, σ_r its
  standard deviation, ε_r = ||Δ_r|| / ||c_r|| <= ||s|| / (2 ||c_r||), ĝ = g ⊙ γ. The Jacobian is
  (P - u uᵀ) / σ (P: centring, u = c / ||c||); u turns by sin θ <= ε and σ moves by <= ε σ, so
  ||dx̂_r - dx_r|| <= 2 ε_r / (1 - ε_r) · ||ĝ_r|| / σ_r; with ||x̂n_r - xn_r|| <= 2 √D ε_r and
  Cauchy-Schwarz over the rows, ||dγ̂ - dγ|| <= max_j ||g_{:, j}|| · 2 √D ||ε||; dβ is exact
  (the layer norm's own ε is neglected beside σ²).
- :func:`compressed_softmax_values` (the softmax output of reference attention, which both the
  softmax and the probabilities·values backward read). Per row q, s_q = max_k p_qk / 127:
  ||dv̂ - dv||_F <= √T_k ||Σ_q (s_q / 2) |g_q| ||, and with dp = g vᵀ (exact),
  ||dl̂_q - dl_q|| <= (s_q / 2)(||dp_q - <p̂_q, dp_q>|| + ||p_q|| ||dp_q||_1).

Model-facing switch: ``compress_activations: tuple[str, ...]`` with names from
:data:`COMPRESSIBLE`, checked by :func:`validate_names`.

References:
  Pan, Chen, Liang, Zhuang, Shen, Yang, Shen, Shen 2021, "Mesa: A Memory-saving Training Framework
  for Transformers" (8-bit activations with head-wise scales, Section 3);
  Liu, Zhou, Li, Chen, Hu 2022, "GACT: Activation Compressed Training for Generic Network
  Architectures" (per-group quantization with stochastic rounding, Section 3).
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

MLP_INPUT = "mlp_input"
LAYER_NORM_INPUT = "layer_norm_input"
SOFTMAX = "softmax"
COMPRESSIBLE: tuple[str, ...] = (MLP_INPUT, LAYER_NORM_INPUT, SOFTMAX)

INT8_MAX = 127
GELU_SECOND_DERIVATIVE_MAX = 0.7979  # 2 φ(0) = sqrt(2/π); also bounds the tanh form's |gelu''|
GELU_DERIVATIVE_MAX = 1.1290  # max gelu'(x), at x ≈ 1.4 (tanh form 1.1289)


def validate_names(names: Sequence[str] | None, *, where: str = "compress_activations") -> tuple:
    """Checks a ``compress_activations`` value; returns it as a tuple.

    Raises:
      ValueError: a plain string instead of a sequence, or a name not in :data:`COMPRESSIBLE`.
    """
    if names is None:
        return ()
    if isinstance(names, str):
        raise ValueError(
            f"{where}={names!r}: expected a tuple of names from {COMPRESSIBLE}, e.g. "
            f"({names!r},), not a string"
        )
    names = tuple(names)
    unknown = [n for n in names if n not in COMPRESSIBLE]
    if unknown:
        raise ValueError(
            f"{where}: unknown activation name(s) {unknown}; expected names from {COMPRESSIBLE}"
        )
    return names


def _kept_axes(ndim: int, axis: int | Sequence[int] | None) -> tuple[int, ...]:
    axes = () if axis is None else (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"quantization axis {a} is out of range for an array of rank {ndim}")
        out.append(a % ndim)
    return tuple(sorted(set(out)))


def quantize(
    x: jax.Array, *, axis: int | Sequence[int] | None = -1, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 quantization with one float32 scale per group.

    q = round(x / s) clipped to [-127, 127], s = max|x| / 127 over the axes not in ``axis``
    (a group of zeros gets s = 0 and q = 0).

    Args:
      x: a float array.
      axis: the axes the scales keep (one scale per index along them); None: one scale in all.
      key: if given, stochastic rounding q = floor(x / s + u), u ~ U[0, 1): E[q s] = x and
        |q s - x| < s; otherwise round to nearest, |q s - x| <= s / 2.

    Returns:
      (q int8 of x's shape, s float32 broadcastable to it).
    """
    kept = _kept_axes(x.ndim, axis)
    reduce = tuple(a for a in range(x.ndim) if a not in kept)
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=reduce, keepdims=True) / INT8_MAX
    y = xf / jnp.where(scale > 0, scale, 1.0)
    if key is None:
        y = jnp.round(y)
    else:
        y = jnp.floor(y + jax.random.uniform(key, y.shape, jnp.float32))
    return jnp.clip(y, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    """x̂ = q · s, cast to ``dtype``."""
    return (q.astype(jnp.float32) * scale).astype(dtype)


def _materialized(q: jax.Array) -> jax.Array:
    """q itself, computed so that XLA keeps the int8 array instead of recomputing it later.

    Left alone, XLA fuses the element-wise quantization into its only consumer, the backward's
    dequantization, which then reads the float input: that stays alive through the whole forward
    pass and nothing is saved. ``lax.optimization_barrier`` does not prevent it on every backend
    (XLA:CPU removes barriers before fusion); a reduction is not fused into its consumers, so q
    is the sum of [q, 0] over a new last axis (exact in int8).
    """
    return jnp.stack([q, jnp.zeros_like(q)], axis=-1).sum(axis=-1, dtype=jnp.int8)


def _after(scale: jax.Array, cotangent: Any) -> jax.Array:
    """``scale``, made to depend on the cotangent so the backward's recomputation is scheduled
    after the cotangent exists (else XLA may hoist it into the forward pass, where the
    recomputed float tensors of every layer are alive at once). Adds 0 · (one element of the
    cotangent): a non-finite cotangent gives a non-finite gradient, as it would anyway."""
    first = jax.tree.leaves(cotangent)[0].ravel()[0]
    return scale + 0 * first.astype(scale.dtype)


def int8_saved(
    fn: Callable[..., Any], *, axis: int | Sequence[int] | None = -1, stochastic: bool = False
) -> Callable[..., Any]:
    """Wraps ``fn(x, *args)`` so its backward pass keeps x only as int8 (see the module docstring).

    The forward is ``fn`` itself; the residuals are int8 x, its scales and ``args`` as they are
    (parameters, which the step keeps anyway); the backward is ``jax.vjp(fn, x̂, *args)``.

    Args:
      fn: a function of a float array x and further differentiable arrays.
      axis: quantization groups, as in :func:`quantize`.
      stochastic: round stochastically; the wrapped function then takes a PRNG key first:
        ``wrapped(key, x, *args)``.

    Returns:
      The wrapped function, composable with jit, vmap, grad and remat.

    Examples:
      >>> gelu8 = int8_saved(jax.nn.gelu)
      >>> g = jax.grad(lambda x: gelu8(x).sum())(jnp.linspace(-3.0, 3.0, 8))
    """

    def save(key, x, args):
        q, s = quantize(x, axis=axis, key=key)
        return _materialized(q), s, jnp.zeros((0,), x.dtype), args

    def backward(res, g):
        q, s, proto, args = res
        _, vjp = jax.vjp(fn, dequantize(q, _after(s, g), proto.dtype), *args)
        return vjp(g)

    if stochastic:

        @jax.custom_vjp
        def wrapped_key(key, x, *args):
            del key
            return fn(x, *args)

        def fwd_key(key, x, *args):
            return fn(x, *args), save(key, x, args)

        wrapped_key.defvjp(fwd_key, lambda res, g: (None, *backward(res, g)))
        return wrapped_key

    @jax.custom_vjp
    def wrapped(x, *args):
        return fn(x, *args)

    def fwd(x, *args):
        return fn(x, *args), save(None, x, args)

    wrapped.defvjp(fwd, backward)
    return wrapped


def compressed_gelu(
    x: jax.Array, *, approximate: bool = True, axis: int | Sequence[int] | None = -1
) -> jax.Array:
    """gelu(x) (``jax.nn.gelu``; ``approximate=True`` is flax's ``nn.gelu``) saving int8 x."""
    return int8_saved(lambda h: jax.nn.gelu(h, approximate=approximate), axis=axis)(x)


def _layer_norm(epsilon: float, dtype: Dtype | None, param_dtype: Dtype) -> Callable[..., Any]:
    module = nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype)
    return lambda x, scale, bias: module.apply({"params": {"scale": scale, "bias": bias}}, x)


def compressed_layer_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    epsilon: float = 1e-6,
    dtype: Dtype | None = None,
    axis: int | Sequence[int] | None = -1,
) -> jax.Array:
    """``flax.linen.LayerNorm`` over the last axis (y = (x - μ) / sqrt(σ² + ε) · γ + β) saving
    int8 x; the forward is flax's own computation."""
    fn = _layer_norm(epsilon, dtype, scale.dtype)
    return int8_saved(fn, axis=axis)(x, scale, bias)


def _gelu_dense(dtype: Dtype | None, param_dtype: Dtype, features: int) -> Callable[..., Any]:
    module = nn.Dense(features, dtype=dtype, param_dtype=param_dtype)
    return lambda h, kernel, bias: module.apply(
        {"params": {"kernel": kernel, "bias": bias}}, nn.gelu(h)
    )


def gelu_dense(
    h: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    *,
    dtype: Dtype | None = None,
    axis: int | Sequence[int] | None = -1,
) -> jax.Array:
    """``nn.Dense(kernel, bias)(nn.gelu(h))`` saving only int8 h (not gelu(h) nor its internals)."""
    fn = _gelu_dense(dtype, kernel.dtype, kernel.shape[-1])
    return int8_saved(fn, axis=axis)(h, kernel, bias)


def _probs_values(probs: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


@jax.custom_vjp
def compressed_softmax_values(logits: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(logits) · v for attention, saving the probabilities as int8 with per-row scales.

    Args:
      logits: float32 [B, H, Tq, Tk] (already scaled and masked; a masked entry at the dtype's
        minimum gets probability 0, exactly representable).
      v: [B, Tk, H, D].

    Returns:
      [B, Tq, H, D] in v.dtype, equal to ``einsum(softmax(logits).astype(v.dtype), v)``.
    """
    return _probs_values(jax.nn.softmax(logits, axis=-1), v)


def _softmax_values_fwd(logits, v):
    probs = jax.nn.softmax(logits, axis=-1)
    q, s = quantize(probs, axis=(0, 1, 2))
    return _probs_values(probs, v), (_materialized(q), s, v, jnp.zeros((0,), logits.dtype))


def _softmax_values_bwd(res, g):
    q, s, v, proto = res
    probs = dequantize(q, _after(s, g), jnp.float32)
    _, vjp = jax.vjp(_probs_values, probs, v)
    dprobs, dv = vjp(g)
    dprobs = dprobs.astype(jnp.float32)
    dlogits = probs * (dprobs - jnp.sum(probs * dprobs, axis=-1, keepdims=True))
    return dlogits.astype(proto.dtype), dv


compressed_softmax_values.defvjp(_softmax_values_fwd, _softmax_values_bwd)


class CompressedLayerNorm(nn.Module):
    """``nn.LayerNorm`` (same parameters 'scale', 'bias' and forward) saving its input as int8."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: Callable[..., Any] = nn.initializers.ones
    bias_init: Callable[..., Any] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        return compressed_layer_norm(x, scale, bias, epsilon=self.epsilon, dtype=self.dtype)


class GeluDense(nn.Module):
    """``nn.Dense(features)(nn.gelu(h))`` (same parameters 'kernel', 'bias') saving int8 h."""

    features: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Any] = nn.initializers.zeros

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        shape = (h.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        return gelu_dense(h, kernel, bias, dtype=self.dtype)
