"""exclude_bias_and_norm and from_rules on flax parameter trees."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch import optim
from jaxbatch.optim import masks


class _Net(nn.Module):
    partitioned: bool = False

    @nn.compact
    def __call__(self, tokens):
        init = nn.initializers.lecun_normal()
        if self.partitioned:
            init = nn.with_partitioning(init, ("embed", "mlp"))
        x = nn.Embed(11, 8, name="embed")(tokens)
        x = nn.LayerNorm(name="LayerNorm_0")(x)
        x = nn.Dense(8, kernel_init=init, name="dense")(x)
        x = nn.DenseGeneral((2, 4), name="heads")(x)  # 2-D bias [2, 4]
        x = nn.BatchNorm(use_running_average=False, name="BatchNorm_0")(x)
        scale = self.param("logit_scale", nn.initializers.zeros, ())
        return x * scale


def _init(partitioned=False):
    variables = _Net(partitioned).init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
    return variables["params"]


EXPECTED = {
    "embed": {"embedding": True},
    "LayerNorm_0": {"scale": False, "bias": False},
    "dense": {"kernel": True, "bias": False},
    "heads": {"kernel": True, "bias": False},
    "BatchNorm_0": {"scale": False, "bias": False},
    "logit_scale": False,
}


def test_flax_params():
    assert masks.exclude_bias_and_norm(_init()) == EXPECTED


def test_stacked_layers_and_norm_modules():
    params = {
        "layers": {
            "mlp": {"kernel": jnp.zeros((4, 8, 16)), "bias": jnp.zeros((4, 16))},
            "final_norm": {"weight": jnp.zeros((4, 8, 8))},  # a 3-D leaf inside a norm module
        },
        "head": jnp.zeros((8, 3)),
        "temperature": jnp.zeros((1,)),
    }
    expected = {
        "layers": {"mlp": {"kernel": True, "bias": False}, "final_norm": {"weight": False}},
        "head": True,
        "temperature": False,
    }
    assert masks.exclude_bias_and_norm(params) == expected


def test_partitioned_tree_keeps_boxes_and_drives_an_optimizer():
    params = _init(partitioned=True)
    assert isinstance(params["dense"]["kernel"], nn.Partitioned)
    mask = masks.exclude_bias_and_norm(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert nn.unbox(mask) == EXPECTED
    tx = optim.scale_by_trust_ratio(mask=masks.exclude_bias_and_norm)
    grads = jax.tree.map(jnp.ones_like, params)
    out, state = tx.update(grads, tx.init(params), params)
    # Masked-out leaves pass through; the kernel is rescaled by ||w|| / ||g||.
    np.testing.assert_array_equal(nn.unbox(out)["dense"]["bias"], 1.0)
    w = nn.unbox(params)["dense"]["kernel"]
    np.testing.assert_allclose(
        nn.unbox(out)["dense"]["kernel"], np.linalg.norm(w) / np.sqrt(w.size), rtol=1e-6
    )


def test_param_path_ignores_box_attribute():
    boxed = _init(partitioned=True)
    paths = [masks.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(boxed)[0]]
    assert "dense/kernel" in paths


def test_from_rules_first_match_wins():
    params = _init()
    rules = [(r".*Norm.*", False), (r".*/bias", False), (r"logit_scale", False), (r".*", True)]
    assert masks.from_rules(params, rules) == EXPECTED


def test_from_rules_values_drive_layer_axes():
    params = {"layers": {"kernel": jnp.ones((3, 4, 4))}, "head": jnp.ones((4, 2))}
    axes = masks.from_rules(params, [(r"layers/.*", 0), (r".*", None)])
    assert axes == {"layers": {"kernel": 0}, "head": None}
    tx = optim.scale_by_trust_ratio(layer_axes=axes)
    assert tx.init(params).ratios["layers"]["kernel"].shape == (3,)


def test_from_rules_fails_loudly_on_unmatched_params():
    params = _init()
    with pytest.raises(ValueError, match=r"'embed/embedding'.*'logit_scale'.*match none"):
        masks.from_rules(params, [(r".*/(kernel|bias|scale)", True)])
    with pytest.raises(ValueError, match=r"not a valid regex"):
        masks.from_rules(params, [(r"(", True)])
