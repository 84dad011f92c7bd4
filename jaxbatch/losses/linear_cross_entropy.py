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

``implementation='pallas'`` runs the fused kernels of ``pallas_kernels.cross_entropy`` instead
(token blocks × vocabulary tiles with the log-sum-exp kept on chip, a recomputing backward; see
its api.py), and 'auto' picks them on TPU and GPU. Every implementation shares the validation
(`check_inputs`) and the label rule (`label_mask`) of this module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

IMPLEMENTATIONS = ("reference", "xla", "pallas", "auto")
# Logit elements per chunk when chunk_size is None: 16M float32 = 64 MiB for logits_c (and as
# much again for the backward's softmax), whatever the vocabulary.
DEFAULT_CHUNK_ELEMENTS = 1 << 24
# Backends on which the Pallas kernels run compiled (elsewhere only in the slow interpreter).
_KERNEL_PLATFORMS = ("tpu", "gpu")
# Bad labels listed in a ValueError at most.
_SHOW_BAD = 5


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
      chunk_size: tokens per chunk of 'xla'; the logits held at once are chunk_size × V.
        Default: ``DEFAULT_CHUNK_ELEMENTS // V`` (at least 8), at most T. 'pallas' tiles with
        ``pallas_kernels.cross_entropy.BlockSizes.get_default`` instead and ignores it.
      ignore_index: label value whose tokens are left out of the mean (e.g. padding).
      implementation: 'reference' (the naive [T, V] form, for tests), 'xla' (chunked),
        'pallas' (the fused kernels of ``pallas_kernels.cross_entropy``: Mosaic TPU, Triton GPU,
        the TPU kernels in the interpreter on CPU), 'auto' ('pallas' then 'xla' on TPU and GPU,
        falling back when the kernels refuse the input; 'xla' elsewhere). See
        `choose_implementation` for the choice and its reason.
      axis_name: mesh axis (or tuple of axes) the tokens are sharded over, inside
        ``jax.shard_map``: h and labels are then this device's token rows, w the whole kernel
        (the same on every device), and the result is the mean over the tokens of all devices,
        Σ_devices (sum of losses) / Σ_devices (count), the same on every device. The chunks
        (or kernel tiles) stay within the local rows, so no device gathers another's hidden
        states; the gradient of w is summed over the axis. None: one device.

    Labels out of range: a label outside [0, V) that is not ``ignore_index`` is an error. With
    concrete labels (not traced under ``jit``) it raises ValueError naming the values before
    anything compiles. With traced labels the values are unknown until run time; then the loss
    is NaN, and so are dw and the dh rows of the counted tokens (all implementations; with
    ``axis_name`` on every device), so that a wrong label never gives a plausible number. The
    test is one comparison and one reduction over the T labels (no checkify).

    Returns:
      float32 scalar (float64 for float64 inputs): the mean over counted tokens (0 if none
      counts). Gradients flow to h and w.

    Raises:
      ValueError: wrong ranks, mismatched shapes, T or V = 0, concrete out-of-range labels, or a
        bad option; TypeError: non-float h or w, non-integer labels or ignore_index;
      NotImplementedError: implementation 'pallas' with inputs the kernels do not handle
        (never raised by 'auto', which falls back to 'xla').
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    h, w, labels = check_inputs(h, w, labels, ignore_index)
    valid, poison = label_mask(labels, w.shape[1], ignore_index)
    if axis_name is not None:
        w = _varying(w, axis_name)
    for impl in _candidates(implementation):
        try:
            loss = _IMPLS[impl](h, w, labels, valid, chunk_size, poison)
            break
        except NotImplementedError:
            if implementation != "auto":
                raise
    else:
        raise NotImplementedError(f"no implementation of linear_cross_entropy for {h.dtype} h")
    if axis_name is None:
        return loss
    count = jnp.sum(valid).astype(loss.dtype)
    total = lax.psum(jnp.stack([loss * count, count]), axis_name)
    return total[0] / jnp.maximum(total[1], 1)


def choose_implementation(
    requested: str, t: int, d: int, v: int, dtype="float32", *, backend: str | None = None
) -> tuple[str, str]:
    """(implementation, reason) that `linear_cross_entropy` runs for [t, d] × [d, v] inputs.

    'reference' and 'xla' are kept. 'auto' picks 'pallas' on TPU and GPU when the kernels
    accept the shapes and dtype, else 'xla' (CPU: the kernels would only run in the slow
    interpreter). An explicit 'pallas' is kept (on CPU: the interpreter), or refused with the
    kernels' reason, never replaced.

    Args:
      requested: an entry of ``IMPLEMENTATIONS``.
      t: tokens per device; d: feature dim; v: vocabulary; dtype: of h and w.
      backend: the platform the step runs on; default ``jax.default_backend()``.

    Raises:
      ValueError: an unknown implementation, or 'pallas' with inputs the kernels do not handle.
    """
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {requested!r}")
    backend = jax.default_backend() if backend is None else backend
    if requested in ("reference", "xla"):
        return requested, f"implementation={requested!r}"
    if requested == "auto" and backend not in _KERNEL_PLATFORMS:
        return "xla", (
            f"auto on {backend}: the Pallas kernels run compiled on {list(_KERNEL_PLATFORMS)} "
            "only, so the chunked XLA form"
        )
    from pallas_kernels.cross_entropy import api  # the kernels package is optional for the rest

    try:
        api.resolve_plan(t, d, v, dtype, backend=backend)
    except NotImplementedError as err:
        if requested == "pallas":
            raise ValueError(
                f"implementation='pallas' cannot run on backend {backend!r} for h [{t}, {d}], "
                f"w [{d}, {v}] of {jnp.dtype(dtype).name}: {err}; expected inputs the kernels "
                "handle, or implementation 'auto' or 'xla'"
            ) from err
        return "xla", f"auto on {backend}: the Pallas kernels refused the inputs ({err})"
    mode = "the Pallas interpreter" if backend == "cpu" else "compiled Pallas kernels"
    return "pallas", f"{requested} on {backend}: {mode}"


def _candidates(implementation: str) -> tuple[str, ...]:
    if implementation != "auto":
        return (implementation,)
    if jax.default_backend() in _KERNEL_PLATFORMS:
        return ("pallas", "xla")
    return ("xla",)


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


def check_inputs(h, w, labels, ignore_index=None):
    """Validates shapes and dtypes (static, before anything compiles); returns jnp arrays.

    Raises:
      ValueError: ranks other than h [T, D], w [D, V], labels [T]; D or T mismatch; T or V = 0.
      TypeError: non-floating h or w, non-integer labels, ignore_index neither int nor None.
    """
    h, w, labels = jnp.asarray(h), jnp.asarray(w), jnp.asarray(labels)
    for name, a, want in (("h", h, "[T, D]"), ("w", w, "[D, V]"), ("labels", labels, "[T]")):
        if a.ndim != len(want.split(",")):
            raise ValueError(
                f"{name} must be {want} (rank {len(want.split(','))}), got shape {a.shape}; "
                "expected h [T, D], w [D, V], labels [T] (flatten batch and sequence first)"
            )
    t, d = h.shape
    if w.shape[0] != d:
        hint = " (w looks transposed: pass the [D, V] Dense kernel)" if w.shape[1] == d else ""
        raise ValueError(
            f"shapes do not match: h {h.shape} has D = {d} features but w {w.shape} has "
            f"{w.shape[0]} rows; expected w of shape ({d}, V){hint}"
        )
    if labels.shape[0] != t:
        raise ValueError(
            f"shapes do not match: h {h.shape} has T = {t} tokens but labels {labels.shape} has "
            f"{labels.shape[0]}; expected labels of shape ({t},)"
        )
    if t == 0:
        raise ValueError(f"h has no tokens (T = 0), shape {h.shape}; expected T >= 1")
    if w.shape[1] == 0:
        raise ValueError(f"w has an empty vocabulary (V = 0), shape {w.shape}; expected V >= 1")
    for name, a in (("h", h), ("w", w)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got {a.dtype}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int | np.integer)
    ):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
    return h, w, labels


def label_mask(labels: jax.Array, v: int, ignore_index: int | None):
    """(valid [T] bool, poison) for labels of a V-way softmax.

    valid: the counted tokens, label in [0, V) and not ``ignore_index``. A label that is neither
    is an error: concrete labels raise here, naming the values and their positions; traced
    labels give ``poison``, a scalar that is NaN when any label is out of range and 1
    otherwise, for the caller to multiply into the loss (None for concrete labels).

    Raises:
      ValueError: concrete labels outside [0, V) other than ignore_index.
    """
    counted = jnp.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    in_range = (labels >= 0) & (labels < v)
    if isinstance(labels, jax.core.Tracer):
        bad = jnp.any(counted & ~in_range)
        return counted & in_range, jnp.where(bad, jnp.nan, 1.0)
    values = np.asarray(jax.device_get(labels))
    bad_at = np.flatnonzero((values < 0) | (values >= v))
    if ignore_index is not None:
        bad_at = bad_at[values[bad_at] != ignore_index]
    if bad_at.size:
        shown = ", ".join(f"labels[{i}] = {values[i]}" for i in bad_at[:_SHOW_BAD])
        more = f" and {bad_at.size - _SHOW_BAD} more" if bad_at.size > _SHOW_BAD else ""
        ignore = "" if ignore_index is None else f" or ignore_index = {ignore_index}"
        raise ValueError(
            f"{bad_at.size} label(s) out of range: {shown}{more}; expected values in "
            f"[0, {v}) (V = w.shape[1]){ignore}"
        )
    return counted, None


def _poisoned(loss_fn):
    """An implementation whose loss is multiplied by ``poison`` (NaN for bad traced labels)."""

    @functools.wraps(loss_fn)
    def with_poison(h, w, labels, valid, chunk_size, poison):
        loss = loss_fn(h, w, labels, valid, chunk_size)
        return loss if poison is None else loss * poison.astype(loss.dtype)

    return with_poison


@_poisoned
def _reference(h, w, labels, valid, chunk_size=None):
    del chunk_size
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunked(h, w, labels, valid, scale, chunk):
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
    return total / jnp.maximum(jnp.sum(valid), 1).astype(acc) * scale.astype(acc)


def _fwd(h, w, labels, valid, scale, chunk):
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
    # [T]: each token's weight in the mean, times ``scale`` (1, or NaN for bad traced labels,
    # which so reaches the loss, dw and the counted rows of dh without another [T, D] pass).
    share = valid.astype(acc) / count * scale.astype(acc)

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
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, None, None


_chunked.defvjp(_fwd, _bwd)


def _xla(h, w, labels, valid, chunk_size, poison):
    t, v = h.shape[0], w.shape[1]
    chunk = min(chunk_size or max(8, DEFAULT_CHUNK_ELEMENTS // v), t)
    # The poison enters the tokens' weights inside the sweep rather than multiplying the loss:
    # a traced factor on the loss would make the backward scale dh and dw by a runtime scalar,
    # an extra [T, D] buffer (measured 194 -> 224 MiB at T = 8,192, D = 1,024, V = 32,768).
    scale = jnp.ones((), jnp.float32) if poison is None else poison
    return _chunked(h, w, jnp.where(valid, labels, 0), valid, scale, chunk)


@_poisoned
def _pallas(h, w, labels, valid, chunk_size):
    del chunk_size  # the kernels tile with their own BlockSizes
    # Imported here so that jaxbatch.losses imports without the kernels package.
    from pallas_kernels.cross_entropy import api

    # Raises NotImplementedError (dtype, backend, tiling) before anything is traced, so that
    # 'auto' can fall back to the chunked XLA form.
    plan = api.resolve_plan(h.shape[0], h.shape[1], w.shape[1], h.dtype, w_dtype=w.dtype)
    return api.masked_loss(h, w, labels, valid, plan)


_IMPLS = {"reference": _reference, "xla": _xla, "pallas": _pallas}
