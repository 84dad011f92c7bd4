"""Chunked linear cross-entropy: the naive form's value and gradients without its [T, V] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.losses import linear_cross_entropy
from jaxbatch.losses.linear_cross_entropy import choose_implementation


def _inputs(t=37, d=16, v=50, dtype=jnp.float32, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    h = jax.random.normal(k1, (t, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(k2, (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
    labels = jax.random.randint(k3, (t,), 0, v)
    return h, w, labels


def _numpy_loss(h, w, labels, ignore=None):
    """float64 transcription: mean over counted tokens of lse(h·w) − (h·w)[label]."""
    logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    labels = np.asarray(labels)
    keep = np.ones_like(labels, bool) if ignore is None else labels != ignore
    target = logits[np.arange(len(labels)), np.where(keep, labels, 0)]
    return float(np.sum((lse - target)[keep]) / max(keep.sum(), 1))


@pytest.mark.parametrize("chunk_size", [1, 8, 10, 37, 64, None])
def test_value_and_gradients_equal_the_naive_form(chunk_size):
    h, w, labels = _inputs()

    def loss(impl):
        return lambda h, w: linear_cross_entropy(
            h, w, labels, chunk_size=chunk_size, implementation=impl
        )

    value, grads = jax.value_and_grad(loss("xla"), argnums=(0, 1))(h, w)
    ref_value, ref_grads = jax.value_and_grad(loss("reference"), argnums=(0, 1))(h, w)
    np.testing.assert_allclose(value, _numpy_loss(h, w, labels), rtol=1e-5)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_gradient_matches_finite_differences_in_float64():
    with jax.enable_x64():
        h, w, labels = _inputs(t=9, d=4, v=7)
        h, w = h.astype(jnp.float64), w.astype(jnp.float64)
        f = lambda h, w: linear_cross_entropy(h, w, labels, chunk_size=4)  # noqa: E731
        dh, dw = jax.grad(f, argnums=(0, 1))(h, w)
        eps = 1e-6
        for idx in [(0, 0), (3, 2), (8, 3)]:
            e = jnp.zeros_like(h).at[idx].set(eps)
            fd = (f(h + e, w) - f(h - e, w)) / (2 * eps)
            np.testing.assert_allclose(dh[idx], fd, rtol=1e-6, atol=1e-9)
        for idx in [(0, 0), (2, 6)]:
            e = jnp.zeros_like(w).at[idx].set(eps)
            fd = (f(h, w + e) - f(h, w - e)) / (2 * eps)
            np.testing.assert_allclose(dw[idx], fd, rtol=1e-6, atol=1e-9)


def test_ignored_tokens_leave_the_mean_and_get_no_gradient():
    h, w, labels = _inputs(t=20)
    labels = labels.at[jnp.array([0, 5, 19])].set(-100)
    f = lambda h: linear_cross_entropy(h, w, labels, chunk_size=6, ignore_index=-100)  # noqa: E731
    value, dh = jax.value_and_grad(f)(h)
    np.testing.assert_allclose(value, _numpy_loss(h, w, labels, ignore=-100), rtol=1e-5)
    assert np.all(np.asarray(dh)[[0, 5, 19]] == 0) and np.any(np.asarray(dh)[1] != 0)
    all_ignored = jnp.full_like(labels, -100)
    assert float(linear_cross_entropy(h, w, all_ignored, ignore_index=-100)) == 0.0


def test_bfloat16_inputs_accumulate_in_float32():
    h, w, labels = _inputs(t=64, d=32, v=128, dtype=jnp.bfloat16)
    f = lambda impl: (
        lambda h, w: linear_cross_entropy(  # noqa: E731
            h, w, labels, chunk_size=16, implementation=impl
        )
    )
    value, (dh, dw) = jax.value_and_grad(f("xla"), argnums=(0, 1))(h, w)
    ref, (rdh, rdw) = jax.value_and_grad(f("reference"), argnums=(0, 1))(h, w)
    assert value.dtype == jnp.float32 and dh.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(value, _numpy_loss(h, w, labels), rtol=1e-5)
    np.testing.assert_allclose(value, ref, rtol=1e-6)
    for got, want in ((dh, rdh), (dw, rdw)):
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-4
        )


def test_compiled_memory_never_holds_the_logits():
    """T = 16,384 tokens × V = 32,768: the logits alone are 2 GiB in float32."""
    t, d, v = 16384, 256, 32768
    h = jax.ShapeDtypeStruct((t, d), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((d, v), jnp.bfloat16)
    labels = jax.ShapeDtypeStruct((t,), jnp.int32)
    logits_bytes = t * v * 4

    def compiled(impl):
        f = jax.grad(
            lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=512, implementation=impl),
            argnums=(0, 1),
        )
        return jax.jit(f).lower(h, w, labels).compile().memory_analysis().temp_size_in_bytes

    assert compiled("reference") > logits_bytes
    # 512 × 32,768 float32 logits and probabilities (64 MiB each) + the float32 dw (32 MiB).
    assert compiled("xla") < logits_bytes / 8


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((np.zeros((4, 3)), np.zeros((2, 5)), np.zeros(4, int)), {}, ValueError, "do not match"),
        ((np.zeros((4, 3)), np.zeros((3, 5)), np.zeros(3, int)), {}, ValueError, "do not match"),
        ((np.zeros((4,)), np.zeros((3, 5)), np.zeros(4, int)), {}, ValueError, r"h \[T, D\]"),
        ((np.zeros((4, 3)), np.zeros((3, 5)), np.zeros(4)), {}, TypeError, "labels must be int"),
        ((np.zeros((4, 3), int), np.zeros((3, 5)), np.zeros(4, int)), {}, TypeError, "floating"),
        ((np.zeros((0, 3)), np.zeros((3, 5)), np.zeros(0, int)), {}, ValueError, "T = 0"),
        (
            (np.zeros((4, 3)), np.zeros((3, 5)), np.zeros(4, int)),
            {"chunk_size": 0},
            ValueError,
            "chunk_size must be a positive int",
        ),
        (
            (np.zeros((4, 3)), np.zeros((3, 5)), np.zeros(4, int)),
            {"implementation": "fused"},
            ValueError,
            "implementation must be one of",
        ),
        # the D mismatch names both values and spots a transposed kernel
        ((np.zeros((4, 3)), np.zeros((5, 3)), np.zeros(4, int)), {}, ValueError, r"D = 3.*5 rows"),
        ((np.zeros((4, 3)), np.zeros((5, 3)), np.zeros(4, int)), {}, ValueError, "transposed"),
        ((np.zeros((4, 3)), np.zeros((3, 5)), np.zeros(3, int)), {}, ValueError, r"T = 4.*has 3"),
        ((np.zeros((4, 3)), np.zeros((3, 0)), np.zeros(4, int)), {}, ValueError, "V = 0"),
        ((np.zeros((4, 3)), np.zeros((3, 5, 1)), np.zeros(4, int)), {}, ValueError, r"w must be"),
        (
            (np.zeros((4, 3)), np.zeros((3, 5)), np.zeros((4, 1), int)),
            {},
            ValueError,
            "labels must",
        ),
        (
            (np.zeros((4, 3)), np.zeros((3, 5)), np.zeros(4, bool)),
            {},
            TypeError,
            "integers, got bool",
        ),
        (
            (np.zeros((4, 3)), np.zeros((3, 5)), np.zeros(4, int)),
            {"ignore_index": True},
            TypeError,
            "ignore_index must be an int",
        ),
    ],
)
def test_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        linear_cross_entropy(*args, **kwargs)


@pytest.mark.parametrize("implementation", ["reference", "xla", "pallas", "auto"])
@pytest.mark.parametrize(
    "labels, ignore_index, match",
    [
        (
            [0, 5, 1, 2],
            None,
            r"1 label\(s\) out of range: labels\[1\] = 5; expected values in \[0, 5\)",
        ),
        (
            [0, -1, 1, 2],
            None,
            r"labels\[1\] = -1; expected values in \[0, 5\) \(V = w\.shape\[1\]\)$",
        ),
        ([0, -1, 7, -100], -100, r"labels\[1\] = -1, labels\[2\] = 7.* or ignore_index = -100"),
        (list(range(-8, 0)), None, r"8 label\(s\).*labels\[4\] = -4 and 3 more"),
    ],
)
def test_concrete_labels_out_of_range_raise_before_compiling(
    implementation, labels, ignore_index, match
):
    labels = np.asarray(labels)
    h, w = np.zeros((labels.size, 3), np.float32), np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(h, w, labels, ignore_index=ignore_index, implementation=implementation)


@pytest.mark.parametrize("implementation", ["reference", "xla", "pallas"])
def test_traced_labels_out_of_range_give_nan_loss_and_gradients(implementation):
    """Under jit the values are unknown before running: the documented rule is NaN, never a
    plausible number: the loss, dw, and dh of every counted token (an ignored token's dh may stay
    0); in-range labels stay finite."""
    h, w, labels = _inputs(t=12, d=8, v=20)
    f = jax.jit(
        jax.value_and_grad(
            lambda h, w, y: linear_cross_entropy(
                h, w, y, ignore_index=-100, implementation=implementation
            ),
            argnums=(0, 1),
        )
    )
    good = labels.at[3].set(-100)
    value, (dh, dw) = f(h, w, good)
    assert np.isfinite(float(value)) and np.all(np.isfinite(dh)) and np.all(np.isfinite(dw))
    counted = np.arange(12) != 3
    for bad in (20, -1):
        value, (dh, dw) = f(h, w, good.at[5].set(bad))
        assert np.isnan(float(value)) and np.all(np.isnan(dw)), bad
        assert np.all(np.isnan(np.asarray(dh)[counted & (np.arange(12) != 5)])), bad


def test_pallas_equals_the_naive_form_through_the_public_entry():
    # The kernels themselves are tested in tests/pallas_kernels; here the dispatch, the label
    # rule and the chunk_size option (ignored by 'pallas') around them, with the default backend
    # (CPU: the TPU kernels interpreted) and default tiles (one tile of 40 × 256).
    h, w, labels = _inputs(t=37, d=16, v=150)
    labels = labels.at[jnp.array([2, 30])].set(-100)

    def loss(impl, chunk):
        return lambda h, w: linear_cross_entropy(
            h, w, labels, chunk_size=chunk, ignore_index=-100, implementation=impl
        )

    value, grads = jax.value_and_grad(loss("pallas", 5), argnums=(0, 1))(h, w)
    ref_value, ref_grads = jax.value_and_grad(loss("reference", None), argnums=(0, 1))(h, w)
    np.testing.assert_allclose(value, _numpy_loss(h, w, labels, ignore=-100), rtol=1e-5)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_pallas_refuses_what_the_kernels_cannot_run_and_auto_does_not_pick_it_on_cpu():
    h, w, labels = _inputs(t=8, d=4, v=10)
    with jax.enable_x64():
        h64, w64 = h.astype(jnp.float64), w.astype(jnp.float64)
        with pytest.raises(NotImplementedError, match="got float64"):
            linear_cross_entropy(h64, w64, labels, implementation="pallas")
    with pytest.raises(NotImplementedError, match="share a dtype"):
        linear_cross_entropy(h, w.astype(jnp.bfloat16), labels, implementation="pallas")

    def primitives(impl):
        jaxpr = jax.make_jaxpr(lambda h, w: linear_cross_entropy(h, w, labels, implementation=impl))
        return str(jaxpr(h, w))

    assert "pallas_call" in primitives("pallas")
    assert "pallas_call" not in primitives("auto")  # CPU: the chunked XLA form


@pytest.mark.parametrize(
    "requested, backend, dtype, expected",
    [
        ("auto", "cpu", "float32", "xla"),
        ("auto", "tpu", "bfloat16", "pallas"),
        ("auto", "gpu", "float32", "pallas"),
        ("auto", "tpu", "float64", "xla"),  # no kernels for float64: the reason says why
        ("pallas", "cpu", "float32", "pallas"),  # explicit: kept (the interpreter)
        ("xla", "tpu", "float32", "xla"),
        ("reference", "gpu", "float32", "reference"),
    ],
)
def test_choose_implementation_reports_the_choice(requested, backend, dtype, expected):
    name, reason = choose_implementation(requested, 4096, 512, 32000, dtype, backend=backend)
    assert name == expected and reason
    if (requested, expected) == ("auto", "xla"):
        assert f"auto on {backend}" in reason


def test_choose_implementation_refuses_an_explicit_pallas_it_cannot_run():
    with pytest.raises(ValueError, match=r"implementation='pallas' cannot run on backend 'tpu'"):
        choose_implementation("pallas", 4096, 512, 32000, "float64", backend="tpu")
    with pytest.raises(ValueError, match="implementation must be one of"):
        choose_implementation("fused", 4096, 512, 32000)


@pytest.mark.parametrize("implementation", ["xla", "reference", "pallas"])
def test_axis_name_gives_the_global_mean_over_sharded_tokens(eight_devices, implementation):
    """Inside shard_map over 8 devices, with ignored tokens spread unevenly over the devices:
    Σ losses / Σ counted tokens of all devices, and the one-device gradients."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.Mesh(np.array(eight_devices), ("data",))
    h, w, labels = _inputs(t=64, d=16, v=50, seed=3)
    labels = labels.at[jnp.array([0, 1, 2, 3, 5, 9, 40])].set(-1)  # device 0 loses 4 of its 8

    def local(h, w, labels):
        return linear_cross_entropy(
            h, w, labels, chunk_size=3, ignore_index=-1, implementation=implementation,
            axis_name="data",
        )  # fmt: skip

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P("data")), out_specs=P())
    rows = NamedSharding(mesh, P("data"))
    args = (jax.device_put(h, rows), w, jax.device_put(labels, rows))
    value, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(*args)

    def single(h, w):
        return linear_cross_entropy(h, w, labels, ignore_index=-1, implementation="reference")

    ref_value, ref_grads = jax.value_and_grad(single, argnums=(0, 1))(h, w)
    np.testing.assert_allclose(value, _numpy_loss(h, w, labels, ignore=-1), rtol=1e-5)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_axis_name_outside_shard_map_is_refused():
    h, w, labels = _inputs()
    with pytest.raises(ValueError, match="not a bound mesh axis"):
        linear_cross_entropy(h, w, labels, axis_name="data")
