"""Every attention implementation against the materialising reference (value and q/k/v grads).

The implementations that run on this CPU host ('chunked'; 'pallas_tpu' in the Pallas interpreter;
the 'cudnn' mask translation through JAX's XLA path) are compared numerically on shared argument
specs; 'pallas_tpu' and 'cudnn' are also lowered for TPU / CUDA and their custom calls counted.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.nn import attention as attn

B, H, D = 2, 2, 8
F32_TOL = dict(atol=2e-5, rtol=2e-5)
# bf16 inputs: the implementations round P (and dS) to bf16 at different points; the reference
# is run on the same bf16 inputs. 2^-8 relative rounding over ~40 keys stays well inside 5e-2.
BF16_TOL = dict(atol=5e-2, rtol=5e-2)


def _inputs(tq, tk, dtype=jnp.float32, seed=0):
    r = np.random.RandomState(seed)
    q = jnp.asarray(r.randn(B, tq, H, D), dtype)
    k, v = (jnp.asarray(r.randn(B, tk, H, D), dtype) for _ in range(2))
    return q, k, v


def _segments(t, seed=1):
    r = np.random.RandomState(seed)
    return jnp.asarray(np.sort(r.randint(0, 3, (B, t)), axis=1), jnp.int32)


def _key_mask(t, seed=2, empty_row=True):
    mask = jnp.asarray(np.random.RandomState(seed).rand(B, t) > 0.3)
    return mask.at[1].set(False) if empty_row else mask  # example 1: no key at all


def _case(name):
    """(tq, tk, kwargs) for the shared argument specs."""
    t = 37  # not a multiple of the chunk (8)
    seg = _segments(t)
    return {
        "plain": (t, t, {}),
        "causal_padding": (t, t, dict(causal=True, key_mask=_key_mask(t))),
        "segments": (t, t, dict(causal=True, query_segment_ids=seg, key_segment_ids=seg)),
        "segments_padding": (
            t, t, dict(query_segment_ids=seg, key_segment_ids=seg, key_mask=_key_mask(t)),
        ),
        # a StreamBP chunk: queries 20..29 against the key prefix 0..36
        "offset": (10, t, dict(causal=True, query_offset=20)),
        "offset_segments": (
            10, t, dict(causal=True, query_offset=20, query_segment_ids=seg[:, 20:30],
                        key_segment_ids=seg, key_mask=_key_mask(t, empty_row=False)),
        ),
    }[name]  # fmt: skip


CASES = ["plain", "causal_padding", "segments", "segments_padding", "offset", "offset_segments"]
EMPTY_ROW = ("causal_padding", "segments_padding")  # example 1 has no valid key


def _value_and_grads(fn, q, k, v):
    """(fn(q, k, v), d/dq,k,v of sum(sin(fn))), jitted (one compile instead of op-by-op)."""

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_close(got, want, tol):
    out, grads = got
    out_ref, grads_ref = want
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(out), f32(out_ref), **tol, err_msg="value")
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert np.all(np.isfinite(f32(g))), f"d{name} not finite"
        np.testing.assert_allclose(f32(g), f32(g_ref), **tol, err_msg=f"d{name}")


def _reference(q, k, v, **kw):
    return _value_and_grads(
        lambda q, k, v: attn.dot_product_attention(q, k, v, implementation="reference", **kw),
        q, k, v,
    )  # fmt: skip


@functools.cache
def _reference_case(case):
    tq, tk, kw = _case(case)
    return _reference(*_inputs(tq, tk), **kw)


def _assert_empty_row_is_zero(out, grads):
    assert np.all(np.asarray(out[1]) == 0.0) and np.any(np.asarray(out[0]) != 0.0)
    assert np.all(np.asarray(grads[0][1]) == 0.0)  # no gradient flows into its queries


@pytest.mark.parametrize("case", CASES)
def test_chunked_equals_reference(case):
    tq, tk, kw = _case(case)
    q, k, v = _inputs(tq, tk)
    got = _value_and_grads(
        lambda q, k, v: attn.dot_product_attention(
            q, k, v, implementation="chunked", chunk_size=8, **kw
        ),
        q, k, v,
    )  # fmt: skip
    want = _reference_case(case)
    _assert_close(got, want, F32_TOL)
    if case in EMPTY_ROW:  # a query that sees no key outputs 0, with finite (zero) gradients
        _assert_empty_row_is_zero(*want)
        _assert_empty_row_is_zero(*got)


def test_chunked_with_a_traced_query_offset_under_jit():
    tq, tk, kw = _case("offset_segments")
    q, k, v = _inputs(tq, tk)
    offset = kw.pop("query_offset")

    @jax.jit
    def run(q, k, v, offset):
        return _value_and_grads(
            lambda q, k, v: attn.dot_product_attention(
                q, k, v, query_offset=offset, implementation="auto", chunk_size=4, **kw
            ),
            q, k, v,
        )  # fmt: skip

    _assert_close(run(q, k, v, jnp.int32(offset)), _reference_case("offset_segments"), F32_TOL)


def test_chunked_bf16_equals_reference():
    tq, tk, kw = _case("segments_padding")
    kw = dict(kw, causal=True)
    q, k, v = _inputs(tq, tk, jnp.bfloat16)
    got = _value_and_grads(
        lambda q, k, v: attn.dot_product_attention(
            q, k, v, implementation="chunked", chunk_size=16, **kw
        ),
        q, k, v,
    )  # fmt: skip
    assert got[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got[1])
    _assert_close(got, _reference(q, k, v, **kw), BF16_TOL)
    _assert_empty_row_is_zero(*got)


@pytest.mark.parametrize("causal", [False, True])
def test_rows_with_a_visible_key_matches_brute_force(causal):
    t = 23
    seg = _segments(t, seed=5)
    seg = seg.at[0, 3].set(7)  # a segment whose only key is padding below
    valid = _key_mask(t, seed=6, empty_row=False).at[0, 3].set(False)
    got = attn.rows_with_a_visible_key(
        t, causal=causal, query_segment_ids=seg, key_segment_ids=seg, key_valid=valid,
        query_offset=0,
    )  # fmt: skip
    pos = np.arange(t)
    want = (np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :]) & np.asarray(valid)[
        :, None, :
    ]
    if causal:
        want &= pos[None, None, :] <= pos[None, :, None]
    np.testing.assert_array_equal(np.asarray(got), want.any(-1))
    assert not bool(got[0, 3])


# ----------------------------------------------------------------------------- pallas_tpu


def test_pallas_tpu_interpreted_equals_reference():
    # One combined spec (segments + padding + causal, T = 37 padded to 128) keeps the
    # interpreter's run time at a few seconds.
    t = 37
    seg = _segments(t)
    kw = dict(causal=True, query_segment_ids=seg, key_segment_ids=seg, key_mask=_key_mask(t))
    q, k, v = _inputs(t, t)
    got = _value_and_grads(
        lambda q, k, v: attn.pallas_tpu_attention(q, k, v, interpret=True, **kw), q, k, v
    )
    _assert_close(got, _reference(q, k, v, **kw), F32_TOL)


def _lowered(fn, platform, *specs):
    return jax.jit(fn).trace(*specs).lower(lowering_platforms=(platform,)).as_text()


SQUARE = re.compile(r"tensor<(\d+x)*1024x1024x")


@pytest.mark.parametrize("with_masks", [False, True])
def test_pallas_tpu_lowers_to_splash_kernels(with_masks):
    t = 1000  # padded to 1024 inside
    qkv = jax.ShapeDtypeStruct((1, t, 2, 64), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, t), jnp.bool_)

    def loss(q, k, v, seg, key_mask):
        kw = dict(query_segment_ids=seg, key_segment_ids=seg, key_mask=key_mask)
        out = attn.dot_product_attention(
            q, k, v, causal=True, implementation="pallas_tpu", **(kw if with_masks else {})
        )
        return jnp.sum(out.astype(jnp.float32))

    specs = (qkv, qkv, qkv, ids, mask)
    call = re.compile(r"custom_call @tpu_custom_call\(")
    forward = _lowered(loss, "tpu", *specs)
    backward = _lowered(jax.grad(loss, argnums=(0, 1, 2)), "tpu", *specs)
    assert len(call.findall(forward)) == 1  # the forward kernel
    assert len(call.findall(backward)) == 3  # forward, dq and dkv kernels
    assert not SQUARE.search(forward) and not SQUARE.search(backward), "a T×T array in XLA"


def test_square_pattern_detects_the_reference():
    qkv = jax.ShapeDtypeStruct((1, 1024, 2, 64), jnp.bfloat16)
    text = _lowered(
        lambda q, k, v: attn.dot_product_attention(q, k, v, implementation="reference"),
        "tpu", qkv, qkv, qkv,
    )  # fmt: skip
    assert SQUARE.search(text)


def test_pallas_tpu_rejects_a_traced_offset_and_auto_routes_it_to_chunked():
    q, k, v = _inputs(4, 8)

    @jax.jit
    def explicit(offset):
        return attn.dot_product_attention(
            q, k, v, causal=True, query_offset=offset, implementation="pallas_tpu"
        )

    with pytest.raises(NotImplementedError, match="pallas_tpu.*Python int query_offset"):
        explicit(jnp.int32(4))
    name, why = attn.choose_attention_implementation("auto", backend="tpu", query_offset=None)
    assert name == "chunked" and "query_offset" in why


# ----------------------------------------------------------------------------- cudnn


@pytest.mark.parametrize("case", ["right_padding", "causal_right_padding"])
def test_cudnn_mask_translation_equals_reference(case):
    # The arguments cudnn_attention builds, run through jax.nn.dot_product_attention's XLA path.
    t = 36
    lengths = jnp.array([[29], [0]])  # example 1: no key
    key_mask = jnp.arange(t)[None] < lengths
    kw = {
        "right_padding": dict(key_mask=key_mask),
        "causal_right_padding": dict(causal=True, key_mask=key_mask),
    }[case]
    q, k, v = _inputs(t, t)
    got = _value_and_grads(
        lambda q, k, v: attn.cudnn_attention(q, k, v, backend_impl="xla", **kw), q, k, v
    )
    _assert_close(got, _reference(q, k, v, **kw), F32_TOL)


def test_cudnn_poisons_a_key_mask_that_is_not_right_padded():
    q, k, v = _inputs(8, 8)
    key_mask = jnp.array([[True] * 8, [False, True] + [True] * 6])  # example 1: a hole at 0
    out = attn.cudnn_attention(q, k, v, key_mask=key_mask, backend_impl="xla")
    assert np.all(np.isfinite(np.asarray(out[0]))) and np.all(np.isnan(np.asarray(out[1])))


@pytest.mark.parametrize(
    "dtype,kw,match",
    [
        (jnp.float32, {}, "bfloat16/float16"),
        (jnp.bfloat16, dict(segments=True), "segment ids"),
        (jnp.bfloat16, dict(query_offset=3), "query_offset=3"),
    ],
)
def test_cudnn_explicit_request_it_cannot_serve_raises(dtype, kw, match):
    q, k, v = _inputs(8, 8, dtype)
    extra = dict(query_offset=kw.get("query_offset", 0), causal=True)
    if kw.get("segments"):
        extra.update(query_segment_ids=_segments(8), key_segment_ids=_segments(8))
    with pytest.raises(NotImplementedError, match=match):
        attn.dot_product_attention(q, k, v, implementation="cudnn", **extra)


@pytest.fixture
def pretend_cudnn(monkeypatch):
    """Patch the three probes that ask a GPU for its cuDNN version and compute capability; the
    rest of JAX's cuDNN lowering then runs on this CPU host (test-only, private module)."""
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    for name in ("check_cudnn_version", "check_compute_capability"):
        if not hasattr(fused, name):
            pytest.skip(f"jax moved {name}; cannot lower cuDNN attention without a GPU")
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(fused, "is_cuda_compute_capability_equal", lambda c: False, raising=False)


@pytest.mark.parametrize("with_mask", [False, True])
def test_cudnn_lowers_to_cudnn_fmha(pretend_cudnn, with_mask):
    qkv = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((2, 256), jnp.bool_)

    def loss(q, k, v, key_mask):
        out = attn.dot_product_attention(
            q, k, v, causal=True, key_mask=key_mask if with_mask else None, implementation="cudnn"
        )
        return jnp.sum(out.astype(jnp.float32))

    forward = _lowered(loss, "cuda", qkv, qkv, qkv, mask)
    backward = _lowered(jax.grad(loss, argnums=(0, 1, 2)), "cuda", qkv, qkv, qkv, mask)
    assert re.findall(r"custom_call @(__cudnn\$fmha\w*)\(", forward) == ["__cudnn$fmhaSoftmax"]
    assert sorted(re.findall(r"custom_call @(__cudnn\$fmha\w*)\(", backward)) == [
        "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward",
    ]  # fmt: skip


# ----------------------------------------------------------------------------- auto


@pytest.mark.parametrize(
    "backend,kw,want",
    [
        ("cpu", {}, "chunked"),
        ("tpu", {}, "pallas_tpu"),
        ("tpu", dict(segment_ids=True, key_mask=True, query_offset=5), "pallas_tpu"),
        ("gpu", dict(dtype=jnp.bfloat16), "cudnn"),
        ("gpu", dict(dtype=jnp.float32), "chunked"),
        ("gpu", dict(dtype=jnp.bfloat16, head_dim=12), "chunked"),
        ("gpu", dict(dtype=jnp.bfloat16, segment_ids=True), "chunked"),
        ("gpu", dict(dtype=jnp.bfloat16, key_mask=True), "chunked"),
        ("gpu", dict(dtype=jnp.bfloat16, query_offset=4), "chunked"),
    ],
)
def test_auto_choice(backend, kw, want):
    name, reason = attn.choose_attention_implementation("auto", backend=backend, **kw)
    assert name == want and reason
    assert attn.choose_attention_implementation("reference", backend=backend)[0] == "reference"


# ----------------------------------------------------------------------------- memory


def test_chunked_value_and_grad_holds_no_t_by_t_buffer():
    t = 1024
    qkv = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, t), jnp.bool_)

    def temp_bytes(implementation):
        def loss(q, k, v, key_mask):
            out = attn.dot_product_attention(
                q, k, v, causal=True, key_mask=key_mask, implementation=implementation,
                chunk_size=128,
            )  # fmt: skip
            return jnp.sum(out)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return step.lower(qkv, qkv, qkv, mask).compile().memory_analysis().temp_size_in_bytes

    chunked, reference = temp_bytes("chunked"), temp_bytes("reference")
    assert chunked * 4 < reference, (chunked, reference)
    # and below a single [H, T, T] float32 score matrix
    assert chunked < 2 * t * t * 4, chunked


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q=jnp.ones((2, 8, 16))), r"q must be \[B, T, H, D\]"),
        (dict(v=jnp.ones((2, 9, 2, 8))), "k and v must have one shape"),
        (dict(k=jnp.ones((2, 8, 2, 4)), v=jnp.ones((2, 8, 2, 4))), "share B, H and D"),
        (dict(v=jnp.ones((2, 8, 2, 8), jnp.bfloat16)), "share a dtype"),
        (dict(q=jnp.ones((2, 8, 2, 8), jnp.int32)), "floating point"),
        (dict(query_segment_ids=jnp.zeros((2, 7), jnp.int32)), "give query_segment_ids and"),
        (
            dict(query_segment_ids=jnp.zeros((2, 7), jnp.int32),
                 key_segment_ids=jnp.zeros((2, 8), jnp.int32)),
            r"query_segment_ids must be int \[B, Tq\] = \(2, 8\), got int32\[2, 7\]",
        ),
        (
            dict(query_segment_ids=jnp.zeros((2, 8), jnp.int32),
                 key_segment_ids=jnp.zeros((2, 8), jnp.float32)),
            "key_segment_ids must be int",
        ),
        (dict(key_mask=jnp.ones((2, 8), jnp.int32)), r"key_mask must be bool \[B, Tk\]"),
        (dict(key_mask=jnp.ones((8,), bool)), r"key_mask must be bool \[B, Tk\] = \(2, 8\)"),
        (dict(chunk_size=0), "chunk_size must be a positive int, got 0"),
        (dict(chunk_size=-4), "chunk_size must be a positive int, got -4"),
        (dict(chunk_size=2.5), "chunk_size must be a positive int, got 2.5"),
        (dict(query_offset=-1), "query_offset must be >= 0, got -1"),
        (dict(query_offset=jnp.zeros((2,), jnp.int32)), "query_offset must be an integer scalar"),
        (dict(implementation="flash"), "unknown attention implementation 'flash'"),
        (dict(causal=1), "causal must be a bool"),
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_error(change, match):
    args = dict(q=jnp.ones((2, 8, 2, 8)), k=jnp.ones((2, 8, 2, 8)), v=jnp.ones((2, 8, 2, 8)))
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        attn.dot_product_attention(q, k, v, **args)


# ----------------------------------------------------------------------------- the layer


def _mha(attention="reference", chunk=8):
    from jaxbatch.nn.layers import MultiHeadAttention

    return MultiHeadAttention(num_heads=2, attention=attention, attention_chunk_size=chunk)


def _layer_inputs(t=13, width=8):
    x = jax.random.normal(jax.random.key(3), (B, t, width))
    seg = _segments(t, seed=4)
    return x, dict(causal=True, segment_ids=seg, key_mask=_key_mask(t, seed=5, empty_row=False))


def test_layer_chunked_equals_reference_and_keeps_parameter_paths():
    x, kw = _layer_inputs()
    params = nn.meta.unbox(_mha().init(jax.random.key(0), x, **kw))
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    names = [(m, n) for m in ("query", "key", "value", "out") for n in ("kernel", "bias")]
    assert paths == {f"['params']['{m}']['{n}']" for m, n in names}

    def loss(params, x, attention):
        return jnp.sum(jnp.sin(_mha(attention).apply(params, x, **kw)))

    ref = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    (l_ref, g_ref), (l_chk, g_chk) = ref(params, x, "reference"), ref(params, x, "chunked")
    np.testing.assert_allclose(l_chk, l_ref, **F32_TOL)
    for a, b in zip(jax.tree.leaves(g_chk), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, **F32_TOL)


def test_layer_qkv_and_attend_on_a_query_chunk_give_the_rows_of_the_full_call():
    # StreamBP's use: project once, attend a chunk of queries against the key prefix.
    x, kw = _layer_inputs()
    mha = _mha("chunked", chunk=4)
    params = mha.init(jax.random.key(0), x, **kw)
    full = mha.apply(params, x, **kw)
    q, k, v = mha.apply(params, x, method="qkv")
    assert q.shape == (B, 13, 2, 4)
    seg, start, stop = kw["segment_ids"], 5, 9
    chunk = mha.apply(
        params, q[:, start:stop], k[:, :stop], v[:, :stop], method="attend", causal=True,
        query_segment_ids=seg[:, start:stop], key_segment_ids=seg[:, :stop],
        key_mask=kw["key_mask"][:, :stop], query_offset=start,
    )  # fmt: skip
    np.testing.assert_allclose(chunk, full[:, start:stop], **F32_TOL)


def test_layer_legacy_mask_runs_the_reference_and_is_refused_by_chunked():
    x, kw = _layer_inputs()
    params = _mha().init(jax.random.key(0), x, **kw)
    t = x.shape[1]
    legacy = jnp.tril(jnp.ones((t, t), bool))[None, None] & kw["key_mask"][:, None, None, :]
    seg = kw["segment_ids"]
    legacy = legacy & (seg[:, None, :, None] == seg[:, None, None, :])
    np.testing.assert_allclose(
        _mha("auto").apply(params, x, legacy), _mha("chunked").apply(params, x, **kw), **F32_TOL
    )
    with pytest.raises(ValueError, match="only 'reference'"):
        _mha("chunked").apply(params, x, legacy)
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        _mha("flash").init(jax.random.key(0), x)
