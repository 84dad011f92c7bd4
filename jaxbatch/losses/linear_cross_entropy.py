"""Cross-entropy of a linear output layer, chunked so the [T, V] logits never exist at once.

For hidden states h [T, D], the output kernel w [D, V] (flax ``Dense`` layout) and labels y [T]:

  loss = (1/|M|) Σ_{t∈M} [ lse_v (h_t·w_v) − h_t·w_{y_t} ],   M = {t : y_t ≠ ignore_index}

The naive form holds T×V logits (and as many softmax probabilities for the backward): for a
32K-token batch and a 256K vocabulary that is 32 GiB in float32. Here the tokens are processed
``chunk_size`` at a time (``lax.scan`` over [T / chunk, chunk, D]), in a ``custom_vjp``:

- loss alone (no gradient taken): per chunk, logits_c = h_c·w (float32 accumulation), their
  log-sum-exp and the target logit;
- loss with gradients: the same sweep also forms G_c = softmax(logits_c)·m/|M| (zero on ignored
  rows; the −onehot(y) part of ∂loss/∂logits is applied once for all tokens, as a gather of w's
  columns and a scatter-add into dw), dh_c = G_c·wᵀ and dw += h_cᵀ·G_c (float32 accumulator).
  The gradients are the residuals; the backward pass only multiplies them by the cotangent.

Peak memory beyond inputs and gradients: O(chunk_size·V + D·V), never O(T·V). The matmuls are
the naive form's three (h·w, G·wᵀ, hᵀ·G): computing the gradients during the forward pass, as
the fused linear cross-entropy of Liger Kernel does (Hsu et al. 2024, "Liger Kernel: Efficient
Triton Kernels for LLM Training"), avoids recomputing the logits in the backward. The cost is
holding dh [T, D] and dw [D, V] from the forward to the backward pass (the size of h and w). The
idea of never storing the logits is that of cut cross-entropy (Wijmans et al. 2024, "Cut Your
Losses in Large-Vocabulary Language Models"); here blocks are token chunks in XLA. The value and
both gradients equal the naive form's.
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
    """The loss alone (no gradient wanted): one h·w matmul per chunk."""
    acc = _acc(h, w)

    def body(total, xs):
        h_c, y_c, m_c = xs
        logits = jnp.dot(h_c, w, preferred_element_type=acc)  # [chunk, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
        return total + jnp.sum(jnp.where(m_c, lse - target, 0.0)), None

    xs = (_chunks(h, chunk), _chunks(labels, chunk), _chunks(valid, chunk, False))
    total, _ = lax.scan(body, _zeros((), acc, h, w), xs)
    return total / jnp.maximum(jnp.sum(valid), 1).astype(acc)


def _fwd(h, w, labels, valid, chunk):
    """Loss and both gradients (for a cotangent of 1) in one sweep over the chunks.

    Per chunk: logits_c = h_c·w, e = exp(logits_c − max), s = Σ_v e, lse = max + log s and
    P_c = e · (m_t / |M|) / s, the softmax weighted by each token's share of the mean (0 on
    ignored tokens), with no second exp. Then dh_c = P_c·wᵀ and dw += h_cᵀ·P_c; the one-hot
    part of G = P − onehot(y) is subtracted once for all tokens outside the loop:
    dh −= (m/|M|)·w[:, y]ᵀ and dw[:, y_t] −= (m_t/|M|)·h_t, a gather and a scatter-add of T rows
    instead of a [chunk, V] pass each. Residuals are these gradients, so the backward pass
    only scales them by the cotangent: 3 matmuls in all, as many as the naive form.
    """
    acc = _acc(h, w)
    count = jnp.maximum(jnp.sum(valid), 1).astype(acc)
    share = valid.astype(acc) / count  # [T]: each token's weight in the mean

    def body(dw, xs):
        h_c, y_c, s_c = xs
        logits = jnp.dot(h_c, w, preferred_element_type=acc)  # [chunk, V]
        top = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - top)
        total = jnp.sum(e, axis=-1, keepdims=True)
        lse = (top + jnp.log(total))[:, 0]
        target = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
        probs = e * (s_c[:, None] / total)  # [chunk, V]: G + the one-hot part
        dh_c = jnp.dot(probs.astype(w.dtype), w.T, preferred_element_type=acc)
        dh_c = dh_c - s_c[:, None] * jnp.take(w.T, y_c, axis=0).astype(acc)
        dw = dw + jnp.dot(h_c.T, probs.astype(h.dtype), preferred_element_type=acc)
        return dw, (jnp.sum(s_c * (lse - target)), dh_c.astype(h.dtype))

    # The one-hot part of dw, −Σ_t (m_t/|M|)·h_t e_{y_t}ᵀ, starts the accumulator.
    onehot_dw = jax.ops.segment_sum(h.astype(acc) * share[:, None], labels, w.shape[1]).T
    dw0 = _zeros(w.shape, acc, h, w) - onehot_dw
    xs = (_chunks(h, chunk), _chunks(labels, chunk), _chunks(share, chunk))
    dw, (losses, dh) = lax.scan(body, dw0, xs)
    dh = dh.reshape(-1, h.shape[1])[: h.shape[0]]
    return jnp.sum(losses), (dh, dw.astype(w.dtype))


def _bwd(chunk, residuals, g):
    del chunk
    dh, dw = residuals
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, None


_chunked.defvjp(_fwd, _bwd)
