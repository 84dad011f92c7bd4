"""DecoderLM: scanned vs unrolled layers, causality, hidden states, sharding under a mesh."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbatch.nn import DecoderLM
from jaxbatch.nn.axes import unstack_layers

DEPTH = 3
SMALL = dict(vocab_size=32, width=8, depth=DEPTH, heads=2, mlp_dim=16, max_len=8)


def _tokens(b=2, length=8, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, length), 0, SMALL["vocab_size"])


def test_scanned_and_unrolled_layers_give_the_same_logits(fast_jit):
    scanned = DecoderLM(**SMALL, scan_layers=True)
    unrolled = DecoderLM(**SMALL, scan_layers=False)
    tokens = _tokens()
    params = nn.meta.unbox(fast_jit(scanned.init)(jax.random.key(0), tokens))["params"]
    unstacked = unstack_layers(params, DEPTH)
    expected_tree = jax.eval_shape(unrolled.init, jax.random.key(0), tokens)["params"]
    assert jax.tree.structure(unstacked) == jax.tree.structure(nn.meta.unbox(expected_tree))
    logits_scan = fast_jit(scanned.apply)({"params": params}, tokens)
    logits_unrolled = fast_jit(unrolled.apply)({"params": unstacked}, tokens)
    np.testing.assert_allclose(logits_scan, logits_unrolled, rtol=1e-5, atol=1e-5)
    # The layers really differ from each other (the scan does not reuse one layer's params).
    q = params["layers"]["attn"]["query"]["kernel"]
    assert q.shape[0] == DEPTH and not np.allclose(q[0], q[1])


def test_stacked_layers_carry_the_layers_axis_name():
    boxed = jax.eval_shape(DecoderLM(**SMALL).init, jax.random.key(0), _tokens())["params"]
    leaves = jax.tree.leaves(boxed["layers"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert leaf.names[0] == "layers" and leaf.value.shape[0] == DEPTH, leaf


@pytest.mark.parametrize("scan_layers", [True, False])
def test_changing_a_future_token_does_not_change_earlier_logits(scan_layers, fast_jit):
    model = DecoderLM(**SMALL, scan_layers=scan_layers)
    tokens = _tokens()
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % SMALL["vocab_size"])
    variables = fast_jit(model.init)(jax.random.key(0), tokens)
    apply = fast_jit(model.apply)
    a, b = np.asarray(apply(variables, tokens)), np.asarray(apply(variables, changed))
    np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=1e-6, atol=1e-6)
    assert np.abs(a[:, 5:] - b[:, 5:]).max(axis=-1).min() > 1e-4  # every later position moves


@pytest.mark.parametrize("tie", [False, True])
def test_hidden_states_and_output_kernel_reproduce_the_logits(tie, fast_jit):
    model = DecoderLM(**SMALL, tie_embeddings=tie)
    tokens = _tokens()
    variables = fast_jit(model.init)(jax.random.key(0), tokens)
    logits, h = fast_jit(lambda v, t: model.apply(v, t, return_hidden=True))(variables, tokens)
    h2 = model.apply(variables, tokens, method="hidden")
    w = model.apply(variables, method="output_kernel")
    np.testing.assert_allclose(h, h2, rtol=1e-5, atol=1e-5)
    assert h.shape == (2, 8, SMALL["width"]) and w.shape == (SMALL["width"], SMALL["vocab_size"])
    ref = np.einsum("bld,dv->blv", np.asarray(h, np.float64), np.asarray(w, np.float64))
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-5)
    params = nn.meta.unbox(variables["params"])
    if tie:
        assert "head_kernel" not in params
        np.testing.assert_array_equal(w, params["embed"]["embedding"].T)
    else:
        np.testing.assert_array_equal(w, params["head_kernel"])


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="unknown remat policy 'dotz'"):
        DecoderLM(**SMALL, remat_policy="dotz")
    with pytest.raises(ValueError, match="width=8 is not divisible by heads=3"):
        DecoderLM(**{**SMALL, "heads": 3})
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_len=8"):
        DecoderLM(**SMALL).init(jax.random.key(0), _tokens(length=9))


def test_sharded_init_and_apply_under_mesh_rules_match_single_device(eight_devices, fast_jit):
    mesh = jax.make_mesh(
        (2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
        devices=eight_devices,
    )  # fmt: skip
    rules = (("batch", "data"), ("heads", "model"), ("mlp", "model"), ("vocab", "model"))
    model = DecoderLM(**{**SMALL, "heads": 4, "width": 16})
    tokens = _tokens(b=4)
    ref = fast_jit(model.apply)(fast_jit(model.init)(jax.random.key(1), tokens), tokens)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(model.init, jax.random.key(1), tokens)
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
        variables = fast_jit(model.init, out_shardings=shardings)(jax.random.key(1), tokens)
        tokens = jax.device_put(tokens, NamedSharding(mesh, P("data")))
        logits = fast_jit(model.apply)(variables, tokens)
    query = variables["params"]["layers"]["attn"]["query"]["kernel"].value
    assert query.sharding.spec == P(None, None, "model", None)  # ('layers','embed','heads','kv')
    assert logits.sharding.spec == P("data", None, "model")  # ('batch','length','vocab')
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
