"""Parameter / optimizer-state / batch shardings from logical axes, on the 8 simulated devices."""

import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbatch import parallel

VOCAB, EMBED, MLP, HEADS, HEAD_DIM, LAYERS = 32, 16, 64, 4, 8, 2


def _init(names, init=None):
    return nn.with_logical_partitioning(init or nn.initializers.normal(0.02), names)


class TinyModel(nn.Module):
    """Every logical axis the jaxbatch models use, on small parameters."""

    mlp: int = MLP

    @nn.compact
    def __call__(self, tokens, image):
        table = self.param("embedding", _init(("vocab", "embed")), (VOCAB, EMBED))
        h = table[tokens]  # [batch, length, embed]
        h = nn.LayerNorm(
            scale_init=_init(("norm",), nn.initializers.ones),
            bias_init=_init(("norm",), nn.initializers.zeros),
        )(h)
        qkv = nn.DenseGeneral(
            (HEADS, HEAD_DIM), kernel_init=_init(("embed", "heads", "kv")), use_bias=False
        )(h)
        h = h + nn.DenseGeneral(
            EMBED, axis=(-2, -1), kernel_init=_init(("heads", "kv", "embed")), use_bias=False
        )(qkv)
        stacked = self.param(
            "stacked", _init(("layers", "embed", "mlp")), (LAYERS, EMBED, self.mlp)
        )
        up = nn.Dense(self.mlp, kernel_init=_init(("embed", "mlp")), name="up")
        down = nn.Dense(EMBED, kernel_init=_init(("mlp", "embed")), name="down")
        h = h + down(nn.relu(up(h) + h @ jnp.sum(stacked, axis=0)))
        counts = self.variable("batch_stats", "count", jnp.zeros, (EMBED,))
        counts.value = counts.value + jnp.mean(h, axis=(0, 1))
        conv = nn.Conv(16, (3, 3), kernel_init=_init((None, None, "conv_in", "conv_out")))
        pooled = jnp.mean(conv(image), axis=(1, 2))  # [batch, 16]
        return h @ table.T + jnp.mean(pooled, axis=-1)[:, None, None]


def _inputs(batch=8):
    tokens = (np.arange(batch * 5).reshape(batch, 5) * 7) % VOCAB
    image = np.linspace(-1, 1, batch * 6 * 6 * 3, dtype=np.float32).reshape(batch, 6, 6, 3)
    return tokens, image


def _abstract(model=None):
    model = model or TinyModel()
    return jax.eval_shape(model.init, jax.random.key(0), *_inputs())


EXPECTED_SPECS = {
    "params/embedding": P("tensor", "fsdp"),
    "params/LayerNorm_0/scale": P(None),
    "params/LayerNorm_0/bias": P(None),
    "params/DenseGeneral_0/kernel": P("fsdp", "tensor", None),
    "params/DenseGeneral_1/kernel": P("tensor", None, "fsdp"),
    "params/stacked": P(None, "fsdp", "tensor"),
    "params/up/kernel": P("fsdp", "tensor"),
    "params/up/bias": P(),  # not annotated → replicated
    "params/down/kernel": P("tensor", "fsdp"),
    "params/Conv_0/kernel": P(None, None, None, "fsdp"),
    "batch_stats/count": P(),
}


def _by_path(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat}


def _per_device_bytes(tree):
    """Bytes each device really holds, from the arrays' addressable shards."""
    totals = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] += shard.data.nbytes
    return totals


def test_param_shardings_follow_the_rules(eight_devices):
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = _by_path(parallel.param_shardings(_abstract(), mesh))
    for path, spec in EXPECTED_SPECS.items():
        ndim = len(_by_path(nn.unbox(_abstract()))[path].shape)
        assert shardings[path].mesh is mesh
        assert shardings[path].is_equivalent_to(NamedSharding(mesh, spec), ndim), (path, spec)


def test_logical_to_mesh_sharding_accepts_logical_specs(eight_devices):
    mesh = parallel.make_mesh(data=2, fsdp=4)
    specs = nn.get_partition_spec(_abstract())
    shardings = _by_path(parallel.logical_to_mesh_sharding(specs, mesh))
    assert shardings["params/up/kernel"].spec == P("fsdp", "tensor")
    activation = parallel.logical_to_mesh_sharding({"h": P("batch", "length", "embed")}, mesh)
    assert activation["h"].spec == P(("data", "fsdp"), "context", None)  # length → context


def _apply(model, variables, tokens, image):
    return model.apply(variables, tokens, image, mutable=["batch_stats"])[0]


@pytest.fixture(scope="module")
def unsharded_reference():
    """Variables and output of the model on one device, without any sharding."""
    model = TinyModel()
    tokens, image = _inputs()
    variables = jax.device_get(nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens, image)))
    output = jax.device_get(jax.jit(_apply, static_argnums=0)(model, variables, tokens, image))
    return variables, output


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)])
def test_sharded_init_and_apply_match_single_device(eight_devices, unsharded_reference, shape):
    model = TinyModel()
    tokens, image = _inputs()
    mesh = parallel.make_mesh(*shape)
    shardings = parallel.param_shardings(_abstract(model), mesh)
    variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), tokens, image)
    ref_variables, ref_output = unsharded_reference
    for path, leaf in _by_path(nn.unbox(variables)).items():
        expected = _by_path(ref_variables)[path]
        np.testing.assert_allclose(np.asarray(leaf), expected, rtol=1e-5, atol=1e-7)
        assert leaf.sharding.is_equivalent_to(_by_path(shardings)[path], leaf.ndim)
    batch = jax.device_put((tokens, image), parallel.batch_sharding(mesh))
    output = jax.jit(_apply, static_argnums=0)(model, variables, *batch)
    # Activations stay split over the batch (the vocab dimension may be split over tensor too).
    per_device_rows = output.sharding.shard_shape(output.shape)[0]
    assert per_device_rows == output.shape[0] // parallel.batch_axis_size(mesh)
    np.testing.assert_allclose(np.asarray(output), ref_output, rtol=2e-5, atol=2e-6)


def test_fsdp_really_shards_parameters(eight_devices, unsharded_reference):
    params = unsharded_reference[0]["params"]
    abstract = _abstract()["params"]
    per_device = {}
    for fsdp in (1, 2, 4, 8):
        mesh = parallel.make_mesh(data=8 // fsdp, fsdp=fsdp)
        sharded = jax.device_put(params, parallel.param_shardings(abstract, mesh))
        held = _per_device_bytes(sharded)
        assert len(held) == 8 and len(set(held.values())) == 1, held  # all devices hold the same
        assert parallel.bytes_per_device(sharded) == next(iter(held.values()))
        per_device[fsdp] = next(iter(held.values()))
    # Everything with an embed / conv_out axis divides by fsdp; only norms and biases stay whole.
    total = parallel.global_bytes(params)
    whole = sum(
        leaf.nbytes
        for path, leaf in _by_path(params).items()
        if path.endswith("bias") or path.startswith("LayerNorm")
    )
    for fsdp, held in per_device.items():
        assert held == whole + (total - whole) // fsdp, (fsdp, held)
    assert per_device[1] > per_device[2] > per_device[4] > per_device[8]


def test_indivisible_dimension_is_named(eight_devices):
    mesh = parallel.make_mesh(data=2, tensor=4)
    with pytest.raises(
        ValueError,
        match=r"parameter params/down/kernel: dimension 0 \(logical axis 'mlp'\) has size 30, "
        r"which mesh axis 'tensor' of size 4 does not divide",
    ):
        parallel.param_shardings(_abstract(TinyModel(mlp=30)), mesh)
    rules = parallel.make_rules({"mlp": ("fsdp", "tensor")})
    with pytest.raises(
        ValueError,
        match=r"'mlp'\) has size 30, which mesh axes \('fsdp', 'tensor'\) of total size 4 does",
    ):
        parallel.param_shardings(_abstract(TinyModel(mlp=30)), parallel.make_mesh(2, 2, 2), rules)


def test_unknown_logical_axis_is_an_error(eight_devices):
    mesh = parallel.make_mesh()
    rules = tuple((n, a) for n, a in parallel.DEFAULT_RULES if n != "kv")
    with pytest.raises(ValueError, match="params/DenseGeneral_0/kernel: logical axis 'kv' has no"):
        parallel.param_shardings(_abstract(), mesh, rules)


@pytest.mark.parametrize(
    "make_tx", [lambda: optax.adam(1e-2), lambda: optax.lamb(1e-2, weight_decay=1e-3)]
)
def test_opt_state_shardings_mirror_params(eight_devices, unsharded_reference, make_tx):
    tx = make_tx()
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    abstract_params = nn.unbox(_abstract())["params"]
    p_shardings = parallel.param_shardings(_abstract(), mesh)["params"]
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    s_shardings = parallel.opt_state_shardings(abstract_state, abstract_params, p_shardings)

    # mu and nu leaves get exactly their parameter's sharding; everything else is replicated.
    flat_params = _by_path(p_shardings)
    mirrored, replicated = 0, 0
    for path, sharding in jax.tree_util.tree_flatten_with_path(s_shardings)[0]:
        name = "/".join(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        if name in flat_params:
            assert sharding == flat_params[name], name
            mirrored += 1
        else:
            assert sharding.spec == P(), path
            replicated += 1
    assert mirrored == 2 * len(flat_params)  # mu and nu
    assert replicated >= 1  # the step count

    plain_params = unsharded_reference[0]["params"]
    params = jax.device_put(plain_params, p_shardings)
    state = jax.jit(tx.init, out_shardings=s_shardings)(params)
    count_bytes = 4
    assert parallel.bytes_per_device(state) == 2 * parallel.bytes_per_device(params) + count_bytes

    # One sharded update equals the unsharded optax update.
    plain_grads = jax.tree.map(lambda p: np.cos(p * 50) * 0.1, plain_params)
    grads = jax.device_put(plain_grads, p_shardings)
    update = jax.jit(tx.update, out_shardings=(p_shardings, s_shardings))
    updates, new_state = update(grads, state, params)
    ref_updates, _ = jax.jit(tx.update)(plain_grads, tx.init(plain_params), plain_params)
    for path, leaf in _by_path(updates).items():
        np.testing.assert_allclose(np.asarray(leaf), _by_path(ref_updates)[path], rtol=1e-5)
    assert _per_device_bytes(new_state) == _per_device_bytes(state)


def test_opt_state_shardings_accepts_boxed_params(eight_devices):
    mesh = parallel.make_mesh(fsdp=8, data=1)
    boxed = _abstract()["params"]
    p_shardings = parallel.param_shardings(boxed, mesh)
    state = jax.eval_shape(optax.adam(1e-3).init, boxed)
    s_shardings = parallel.opt_state_shardings(state, boxed, p_shardings)
    assert s_shardings[0].mu["stacked"].spec == P(None, "fsdp", "tensor")
    assert s_shardings[0].count.spec == P()


def test_batch_sharding_and_divisibility(eight_devices):
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    assert parallel.batch_axis_size(mesh) == 4
    x = jax.device_put(np.arange(8 * 3).reshape(8, 3), parallel.batch_sharding(mesh))
    assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}
    parallel.check_batch_divisible(12, mesh)
    with pytest.raises(ValueError, match=r"batch 100 is not divisible by data×fsdp = 8"):
        parallel.check_batch_divisible(100, parallel.make_mesh(data=2, fsdp=4))
    with pytest.raises(ValueError, match=r"batch 6 is not divisible by data×fsdp = 4 \(data=2"):
        parallel.check_batch_divisible(6, mesh)


def test_activation_sharding_applies_logical_constraints(eight_devices):
    mesh = parallel.make_mesh(data=2, fsdp=4)

    def f(x):
        return nn.with_logical_constraint(x * 2, ("batch", "embed"))

    x = jnp.ones((8, 16))
    with parallel.activation_sharding(mesh):
        lowered = jax.jit(f).lower(x).as_text()
    assert re.search(r'sharding_constraint %\w+ <@mesh, \[\{"data", "fsdp"\}, \{\}\]>', lowered)
    # Without the context the constraint is dropped: the models' annotations would be lost.
    assert "sharding_constraint" not in jax.jit(f).lower(x).as_text()


def _flattened_adam(learning_rate):
    """An optimizer whose second moment is one flat vector: it mirrors no parameter."""

    def init(params):
        flat = jnp.concatenate([jnp.ravel(p) for p in jax.tree.leaves(params)])
        return {"count": jnp.zeros((), jnp.int32), "flat_nu": jnp.zeros_like(flat)}

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: -learning_rate * g, updates), state

    return optax.GradientTransformation(init, update)


def test_opt_state_leaf_that_mirrors_no_parameter_is_named(eight_devices):
    mesh = parallel.make_mesh(data=2, fsdp=4)
    boxed = _abstract()["params"]
    p_shardings = parallel.param_shardings(boxed, mesh)
    state = jax.eval_shape(_flattened_adam(0.1).init, nn.unbox(boxed))
    size = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nn.unbox(boxed)))
    with pytest.warns(parallel.ReplicatedStateWarning, match=rf"flat_nu \({size},\)"):
        s = parallel.opt_state_shardings(state, boxed, p_shardings)
    assert s["flat_nu"].spec == P() and s["count"].spec == P()  # still a valid (replicated) tree
    with pytest.raises(ValueError, match=r"mirror no parameter.*flat_nu"):
        parallel.opt_state_shardings(state, boxed, p_shardings, unmatched="error")
    with pytest.raises(ValueError, match=r"unmatched='loud'; expected"):
        parallel.opt_state_shardings(state, boxed, p_shardings, unmatched="loud")


def test_optimizer_states_that_mirror_their_parameters_warn_nothing(eight_devices):
    """Adam, LAMB with per-layer ratios, LARS: every large leaf is sharded like its parameter;
    small ones (counts, ratios) are replicated without a warning."""
    from jaxbatch import optim
    from jaxbatch.nn import axes as nn_axes

    mesh = parallel.make_mesh(data=2, fsdp=4)
    boxed = _abstract()["params"]
    p_shardings = parallel.param_shardings(boxed, mesh)
    layer_axes = nn_axes.stacked_layer_axes(boxed)
    for tx in (
        optax.adam(1e-3),
        optim.lamb(1e-3, layer_axes=layer_axes),
        optim.lars(0.1, layer_axes=layer_axes),
    ):
        state = jax.eval_shape(tx.init, nn.unbox(boxed))
        parallel.opt_state_shardings(state, boxed, p_shardings, unmatched="error")
