"""Context-parallel attention on the 8 simulated devices against one-device dense attention.

Every strategy × context ∈ {1, 2, 4, 8} × layout ∈ {contiguous, zigzag} × {non-causal, causal} is
checked in output and q/k/v gradients. The mask cases are rows of a B = 4 batch, so each call
covers several: non-causal (no padding / right padding / scattered padding / all padding), and
causal (plain causal: one segment, no padding / packed segments / packed + padding / every key
padded). One program per (strategy, context) holds its 4 (layout, causal) calls: 12 compiles in
all, each with XLA:CPU's cheapest options (``FAST``). Compile time is the whole cost: one program
per strategy for all four meshes compiles slower than four (XLA's passes grow faster than the
program), and every call is its own code (causal is static), so the calls cannot be batched.
The dense oracle is ``attention.reference_attention`` on the original order.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbatch import parallel
from jaxbatch.nn import attention
from jaxbatch.nn import context_parallel as cp

B, T, H, D = 4, 16, 8, 2  # H = 8: Ulysses at context 8; T = 16: 2 × 8 zig-zag chunks of 1
CHUNK = 3  # most local lengths are not multiples: the padded-tile path runs
MESHES = {  # context -> the other axes (the batch over data/fsdp, heads over tensor)
    1: dict(data=2, fsdp=2, tensor=2),
    2: dict(data=2, context=2, tensor=2),
    4: dict(data=2, context=4),
    8: dict(data=1, context=8),
}
# Compile cheaply: LLVM at -O0 (tests/nn/conftest.py's fast_jit), the legacy elemental emitters
# and one LLVM module per program (no split for parallel codegen): together a third of the
# default compile time of these small programs; the HLO and IEEE semantics are unchanged.
FAST = {
    "xla_backend_optimization_level": 0,
    "xla_cpu_use_fusion_emitters": False,
    "xla_cpu_parallel_codegen_split_count": 1,
}


def _masks():
    pos = np.arange(T)
    key_mask = np.stack([pos >= 0, pos < 13, pos % 3 != 1, pos < 0])  # full .. every key padded
    seg = np.stack(
        [
            np.zeros(T),  # plain causal
            np.repeat([0, 1, 2], [5, 7, 4]),
            np.repeat([3, 5], [10, 6]),
            np.repeat([0, 1], [8, 8]),
        ]
    ).astype(np.int32)
    causal_mask = np.stack([pos >= 0, pos >= 0, pos < 14, pos < 0])
    return jnp.asarray(key_mask), jnp.asarray(seg), jnp.asarray(causal_mask)


@pytest.fixture(scope="module")
def case():
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v, w_full, w_causal = (jax.random.normal(kk, (B, T, H, D), jnp.float32) for kk in keys)
    key_mask, seg, causal_mask = _masks()

    @functools.partial(jax.jit, compiler_options=FAST)
    def dense(q, k, v):
        full = functools.partial(attention.reference_attention, key_mask=key_mask)
        causal = functools.partial(
            attention.reference_attention, causal=True, query_segment_ids=seg,
            key_segment_ids=seg, key_mask=causal_mask,
        )  # fmt: skip
        return [_value_and_grads(f, w, q, k, v) for f, w in ((full, w_full), (causal, w_causal))]

    inputs = (q, k, v, w_full, w_causal, key_mask, seg, causal_mask)
    return inputs, jax.device_get(dense(q, k, v))


def _value_and_grads(f, w, q, k, v):
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(w))


def _program(strategy, mesh, context):
    """Both layouts of one strategy on one mesh: the non-causal and the causal call each, value
    and q/k/v gradients, in the original order."""

    def one(layout, q, k, v, w_full, w_causal, key_mask, seg, causal_mask):
        zig = layout == "zigzag"
        if zig:  # once, on the input batch; gradients flow back through the permutation
            q, k, v, w_full, w_causal, key_mask, seg, causal_mask = cp.zigzag_shard_batch(
                (q, k, v, w_full, w_causal, key_mask, seg, causal_mask), context
            )
        attend = functools.partial(
            cp.sharded_context_parallel_attention, mesh=mesh, strategy=strategy, layout=layout,
            chunk_size=CHUNK,
        )  # fmt: skip
        full = functools.partial(attend, key_mask=key_mask)
        causal = functools.partial(attend, causal=True, segment_ids=seg, key_mask=causal_mask)
        got = [_value_and_grads(f, w, q, k, v) for f, w in ((full, w_full), (causal, w_causal))]
        return cp.unzigzag(got, context) if zig else got

    return lambda *inputs: {layout: one(layout, *inputs) for layout in cp.LAYOUTS}


@pytest.mark.parametrize("context", sorted(MESHES))
@pytest.mark.parametrize("strategy", cp.STRATEGIES)
def test_every_layout_and_mask_equals_dense_attention(eight_devices, case, strategy, context):
    inputs, want = case
    mesh = parallel.make_mesh(**MESHES[context])
    assert mesh.shape["context"] == context
    got = jax.device_get(jax.jit(_program(strategy, mesh, context), compiler_options=FAST)(*inputs))
    assert sorted(got) == sorted(cp.LAYOUTS)
    for layout, calls in got.items():
        for call, name in enumerate(("full", "causal")):
            for part, label in enumerate(("out", "dq", "dk", "dv")):
                np.testing.assert_allclose(
                    calls[call][part], want[call][part], atol=1e-5, rtol=1e-5,
                    err_msg=f"{strategy} {name} context={context} {layout}: {label}",
                )  # fmt: skip
        # Row 3 of the causal call (every key padded) sees no key: exactly 0, no gradient.
        assert not np.any(calls[1][0][3]) and not np.any(calls[1][1][3])


@pytest.mark.parametrize("seq_len, context", [(8, 1), (8, 2), (32, 4), (48, 8), (64, 8)])
def test_zigzag_permutation_is_a_bijection_with_an_exact_inverse(seq_len, context):
    perm = cp.zigzag_permutation(seq_len, context)
    inv = cp.zigzag_inverse_permutation(seq_len, context)
    np.testing.assert_array_equal(np.sort(perm), np.arange(seq_len))
    np.testing.assert_array_equal(perm[inv], np.arange(seq_len))
    np.testing.assert_array_equal(inv[perm], np.arange(seq_len))
    # Shard d of the reordered sequence is chunks d and 2P - 1 - d of the original.
    chunk = seq_len // (2 * context)
    for d, shard in enumerate(perm.reshape(context, 2 * chunk)):
        late = 2 * context - 1 - d
        want = np.r_[d * chunk : (d + 1) * chunk, late * chunk : (late + 1) * chunk]
        np.testing.assert_array_equal(shard, want)


def test_zigzag_shard_batch_and_unzigzag_restore_the_order():
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(0, 100, (2, 16)),
        "targets": rng.integers(0, 100, (2, 16)),
        "loss_mask": rng.random((2, 16)) < 0.5,
        "segment_ids": np.repeat([[0, 1]], 8, axis=1),
    }
    zz = cp.zigzag_shard_batch(batch, 4, add_positions="positions")
    perm = cp.zigzag_permutation(16, 4)
    np.testing.assert_array_equal(zz["positions"], np.broadcast_to(perm, (2, 16)))
    for key, value in batch.items():
        np.testing.assert_array_equal(zz[key], value[:, perm])
    back = cp.unzigzag(zz, 4)
    for key, value in batch.items():
        np.testing.assert_array_equal(back[key], value)
    np.testing.assert_array_equal(back["positions"][0], np.arange(16))
    # JAX arrays and a trailing feature axis: the same permutation on axis 1.
    h = jnp.arange(2 * 16 * 3).reshape(2, 16, 3)
    np.testing.assert_array_equal(cp.unzigzag(cp.zigzag_shard_batch(h, 4), 4), h)


def _long_case(mesh, t, heads=4, head_dim=32):
    spec = NamedSharding(mesh, P(None, "context", None, None))
    return jax.ShapeDtypeStruct((1, t, heads, head_dim), jnp.float32, sharding=spec)


def _grad_step(mesh, strategy):
    def loss(q, k, v):
        out = cp.sharded_context_parallel_attention(
            q, k, v, mesh=mesh, strategy=strategy, causal=True, layout="zigzag", chunk_size=128
        )
        return jnp.sum(out**2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)), compiler_options=FAST)


def test_ring_sends_kv_around_and_needs_less_memory_than_all_gather(eight_devices):
    """Compile only, at T = 16,384 on context 8: the ring moves K/V by collective-permutes and
    never gathers them; its temp memory per device is below the all-gather baseline's."""
    mesh = parallel.make_mesh(data=1, context=8)
    x = _long_case(mesh, 16384)
    compiled = {s: _grad_step(mesh, s).lower(x, x, x).compile() for s in ("ring", "all_gather")}
    ring_hlo, gather_hlo = compiled["ring"].as_text(), compiled["all_gather"].as_text()
    assert "collective-permute" in ring_hlo
    assert "all-gather" not in ring_hlo and "all-to-all" not in ring_hlo
    assert "all-gather" in gather_hlo
    temp = {s: c.memory_analysis().temp_size_in_bytes for s, c in compiled.items()}
    full_kv = 2 * 16384 * 4 * 32 * 4  # K and V of the whole sequence, f32
    assert temp["all_gather"] > full_kv, temp
    assert temp["ring"] < temp["all_gather"] / 2, temp


@pytest.mark.parametrize(
    "mesh_sizes, t, h, kv_h, kw, message",
    [
        (dict(data=1, context=8), 36, 8, 8, {}, "length 36 is not divisible by context = 8"),
        (
            dict(data=2, context=4), 36, 8, 8, dict(layout="zigzag"),
            r"sequence length 36 is not divisible by 2 × context = 8 \(zig-zag",
        ),
        (
            dict(data=1, context=8), 32, 4, 4, dict(strategy="ulysses"),
            "per-device query heads 4 are not divisible by 8",
        ),
        (
            dict(data=2, context=2, tensor=2), 32, 6, 6, dict(strategy="ulysses"),
            "per-device query heads 3 are not divisible by 2",
        ),
        (
            dict(data=2, context=4), 32, 4, 1, dict(strategy="ulysses"),
            "context = 4, but there is a single KV head",
        ),
        (dict(data=2, context=4), 32, 4, 4, dict(strategy="rings"), "unknown strategy 'rings'"),
    ],
)  # fmt: skip
def test_bad_sizes_fail_before_compiling(eight_devices, mesh_sizes, t, h, kv_h, kw, message):
    mesh = parallel.make_mesh(**mesh_sizes)
    q = jax.ShapeDtypeStruct((2, t, h, 4), jnp.float32)
    k = jax.ShapeDtypeStruct((2, t, kv_h, 4), jnp.float32)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(
            functools.partial(cp.sharded_context_parallel_attention, mesh=mesh, **kw), q, k, k
        )


def test_bad_options_inside_shard_map(eight_devices):
    mesh = parallel.make_mesh(data=2, context=4)
    x = jax.ShapeDtypeStruct((1, 16, 4, 4), jnp.float32)

    def local(**kw):
        f = functools.partial(cp.context_parallel_attention, **kw)
        spec = P(None, "context")
        return jax.shard_map(
            lambda a: f(a, a, a), mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False
        )

    with pytest.raises(NotImplementedError, match="implementation='cudnn'"):
        jax.eval_shape(local(strategy="ring", implementation="cudnn"), x)
    with pytest.raises(ValueError, match="unknown layout 'striped'"):
        jax.eval_shape(local(layout="striped"), x)
    odd = jax.ShapeDtypeStruct((1, 12, 4, 4), jnp.float32)  # 3 positions per device
    with pytest.raises(ValueError, match="local length 3 must be even"):
        jax.eval_shape(local(layout="zigzag"), odd)
    with pytest.raises(ValueError, match="mesh axis 'context' is not bound"):
        cp.context_parallel_attention(jnp.ones((1, 4, 1, 2)), *[jnp.ones((1, 4, 1, 2))] * 2)
    with pytest.raises(ValueError, match="2 × context = 6"):
        cp.zigzag_permutation(8, 3)


def test_bert_mlm_task_under_a_context_mesh_equals_one_device(eight_devices):
    """BertMLM with Ulysses attention in the zig-zag layout through the 'mlm' task's loss (ids
    reordered, masked positions remapped, original positions to the table): loss and gradients
    on the mesh (data 2, context 4) equal the one-device ones."""
    import ml_collections
    from flax import linen as nn

    from jaxbatch.nn.bert import BertMLM
    from jaxbatch.train.tasks_mlm import mlm_task

    model = BertMLM(
        vocab_size=40, width=16, depth=1, heads=4, mlp_dim=32, max_len=16, dropout=0.0,
        attention="chunked", attention_chunk_size=4, context_parallel="ulysses",
        context_layout="zigzag",
    )  # fmt: skip
    task = mlm_task(ml_collections.ConfigDict({"model": {"context_layout": "zigzag"}}), model)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 40, (2, 16)).astype(np.int32)
    ids[1, 12:] = 0  # padding: a key_mask in every strategy
    batch = {
        "input_ids": ids,
        "masked_lm_positions": np.array([[1, 5, 14], [0, 9, 3]], np.int32),
        "masked_lm_ids": rng.integers(1, 40, (2, 3)).astype(np.int32),
        "masked_lm_weights": np.array([[1, 1, 1], [1, 1, 0]], np.float32),
    }
    params = nn.meta.unbox(model.init(jax.random.key(0), ids, batch["masked_lm_positions"]))
    params = params["params"]

    def loss(p, b):
        return task.loss_fn(p, {}, b, jax.random.key(1))[0]

    want = jax.jit(jax.value_and_grad(loss), compiler_options=FAST)(params, batch)
    mesh = parallel.make_mesh(data=2, context=4)

    def on_mesh(p, b):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.value_and_grad(loss)(p, b)

    rows = NamedSharding(mesh, P(("data", "fsdp")))
    args = jax.device_put(params, NamedSharding(mesh, P())), jax.device_put(batch, rows)
    lowered = jax.jit(on_mesh, compiler_options=FAST).lower(*args)  # traced once
    assert "all_to_all" in lowered.as_text()  # Ulysses ran
    got = lowered.compile()(*args)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), got[1], want[1]
    )
