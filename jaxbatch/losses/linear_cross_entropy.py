"""Cross-entropy of a linear output layer, chunked so the [T, V] logits never exist at once.

For hidden states h [T, D], the output kernel w [D, V] (flax ``Dense`` layout) and labels y [T]:

  loss = (1/|M|) Σ_{t∈M} [ lse_v (h_t·w_v) − h_t·w_{y_t} ],   M = {t : y_t ≠ ignore_index}

The naive form holds T×V logits (and as many softmax probabilities for the backward): for a
32K-token batch and a 256K vocabulary that is 32 GiB in float32. Here the tokens are processed
``chunk_size`` at a time (``lax.scan``), in a ``custom_vjp``:

- forward: per chunk, logits_c = h_c·w (float32 accumulation), lse_c, the target logit; keeps
  only lse [T] (float32) besides the inputs;
- backward: per chunk, recompute logits_c, G_c = (softmax(logits_c) − onehot(y_c))·g/|M| (zero
  on ignored rows), dh_c = G_c·wᵀ, dw += h_cᵀ·G_c (float32 accumulator).

Peak memory beyond inputs and gradients: O(chunk_size·V + D·V), never O(T·V). The extra cost is
one more h·w matmul in the backward (3 instead of 2). The idea is that of cut cross-entropy
(Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models"): never store the
logits, recompute them blockwise in the backward; here blocks are token chunks in XLA. The value
and both gradients equal the naive form's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("reference", "xla", "auto")
# Logit elements per chunk when chunk_size is None: 16M float32 = 64 MiB for logits_c (and as
# much again for the backward's softmax), whatever the vocabulary.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _acc(h: jax.Array, w: jax.Array):
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return jnp.promote_types(jnp.promote_types(h.dtype, w.dtype), jnp.float32)


def linear_cross_entropy(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    chunk_size: int | None = None,
    ignore_index: int | None = None,
    implementation: str = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """Mean softmax cross-entropy of ``h @ w`` against ``labels``, without the [T, V] logits.

    Args:
      h: hidden states [T, D] (float32 or bfloat16; flatten batch and sequence first).
      w: output kernel [D, V], the layout of ``flax.linen.Dense``'s kernel.
      labels: int [T] in [0, V), or ``ignore_index`` for tokens that do not count.
      chunk_size: tokens per chunk; the logits held at once are chunk_size × V. Default:
        ``DEFAULT_CHUNK_ELEMENTS // V`` (at least 8), at most T.
      ignore_index: label value whose tokens are left out of the mean (e.g. padding).
      implementation: 'reference' (the naive [T, V] form, for tests), 'xla' (chunked), 'auto'
        (= 'xla').
      axis_name: mesh axis (or tuple of axes) the tokens are sharded over, inside
        ``jax.shard_map``: h and labels are then this device's token rows, w the whole kernel
        (the same on every device), and the result is the mean over the tokens of all devices,
        Σ_devices (sum of losses) / Σ_devices (count), the same on every device. The chunks
        stay within the local rows, so no device gathers another's hidden states; the gradient
        of w is summed over the axis. None: one device.

    Returns:
      float32 scalar (float64 for float64 inputs): the mean over counted tokens (0 if none
      counts). Gradients flow to h and w.
    """
    h, w, labels = _check(h, w, labels)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if ignore_index is not None and not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
    valid = jnp.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if axis_name is not None:
        w = _varying(w, axis_name)
    if implementation == "reference":
        loss = _reference(h, w, labels, valid)
    else:
        t, v = h.shape[0], w.shape[1]
        chunk = min(chunk_size or max(8, DEFAULT_CHUNK_ELEMENTS // v), t)
        loss = _chunked(h, w, jnp.where(valid, labels, 0), valid, chunk)
    if axis_name is None:
        return loss
    count = jnp.sum(valid).astype(loss.dtype)
    total = lax.psum(jnp.stack([loss * count, count]), axis_name)
    return total[0] / jnp.maximum(total[1], 1)


def _varying(w: jax.Array, axis_name) -> jax.Array:
    """w typed as varying over ``axis_name`` (inside shard_map): each device's dw is then its
    own partial gradient, and the transpose of the cast sums them over the axis."""
    names = tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)
    try:
        lax.axis_size(names)
    except NameError as err:
        raise ValueError(
            f"axis_name={axis_name!r} is not a bound mesh axis: call linear_cross_entropy inside "
            "jax.shard_map over that axis (tokens sharded over it), or pass axis_name=None"
        ) from err
    varying = set(jax.typeof(w).manual_axis_type.varying)
    missing = tuple(n for n in names if n not in varying)
    return lax.pcast(w, missing, to="varying") if missing else w


def _check(h, w, labels):
    h, w, labels = jnp.asarray(h), jnp.asarray(w), jnp.asarray(labels)
    if h.ndim != 2 or w.ndim != 2 or labels.ndim != 1:
        raise ValueError(
            f"expected h [T, D], w [D, V], labels [T]; got shapes {h.shape}, {w.shape}, "
            f"{labels.shape}"
        )
    if h.shape[1] != w.shape[0] or h.shape[0] != labels.shape[0]:
        raise ValueError(
            f"shapes do not match: h {h.shape} (T, D), w {w.shape} (D, V), labels {labels.shape} "
            "(T,)"
        )
    if h.shape[0] == 0:
        raise ValueError("h has no tokens (T = 0)")
    for name, a in (("h", h), ("w", w)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got {a.dtype}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    return h, w, labels


def _reference(h, w, labels, valid):
    logits = jnp.dot(h, w, preferred_element_type=_acc(h, w))
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[:, None], axis=-1)[:, 0]
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, lse - target, 0.0)) / jnp.maximum(count, 1)


def _zeros(shape, dtype, *refs) -> jax.Array:
    """Zeros varying over the mesh axes the refs vary over (scan carries inside shard_map)."""
    axes = set().union(*(jax.typeof(r).manual_axis_type.varying for r in refs))
    out = jnp.zeros(shape, dtype)
    return lax.pcast(out, tuple(sorted(axes)), to="varying") if axes else out


def _chunks(a: jax.Array, chunk: int, fill=0) -> jax.Array:
    """[T, ...] -> [ceil(T / chunk), chunk, ...], the tail padded with ``fill``."""
    pad = -a.shape[0] % chunk
    if pad:
        a = jnp.concatenate([a, jnp.full((pad, *a.shape[1:]), fill, a.dtype)])
    return a.reshape(-1, chunk, *a.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked(h, w, labels, valid, chunk):
    return _forward(h, w, labels, valid, chunk)[0]


def _forward(h, w, labels, valid, chunk):
    acc = _acc(h, w)

    def body(total, xs):
        h_c, y_c, m_c = xs
        logits = jnp.dot(h_c, w, preferred_element_type=acc)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
        return total + jnp.sum(jnp.where(m_c, lse - target, 0.0)), lse

    xs = (_chunks(h, chunk), _chunks(labels, chunk), _chunks(valid, chunk, False))
    total, lse = lax.scan(body, _zeros((), acc, h, w), xs)
    count = jnp.maximum(jnp.sum(valid), 1).astype(acc)
    return total / count, (lse, count)


def _fwd(h, w, labels, valid, chunk):
    loss, (lse, count) = _forward(h, w, labels, valid, chunk)
    return loss, (h, w, labels, valid, lse, count)


def _bwd(chunk, residuals, g):
    h, w, labels, valid, lse, count = residuals
    acc = _acc(h, w)
    scale = (g / count).astype(acc)

    def body(dw, xs):
        h_c, y_c, m_c, lse_c = xs
        logits = jnp.dot(h_c, w, preferred_element_type=acc)
        probs = jnp.exp(logits - lse_c[:, None])
        grad = probs - jax.nn.one_hot(y_c, w.shape[1], dtype=acc)
        grad = jnp.where(m_c[:, None], grad * scale, 0.0)
        dh_c = jnp.dot(grad.astype(w.dtype), w.T, preferred_element_type=acc)
        dw = dw + jnp.dot(h_c.T, grad.astype(h.dtype), preferred_element_type=acc)
        return dw, dh_c.astype(h.dtype)

    xs = (_chunks(h, chunk), _chunks(labels, chunk), _chunks(valid, chunk, False), lse)
    dw, dh = lax.scan(body, _zeros(w.shape, acc, h, w), xs)
    dh = dh.reshape(-1, h.shape[1])[: h.shape[0]]
    return dh, dw.astype(w.dtype), None, None


_chunked.defvjp(_fwd, _bwd)
