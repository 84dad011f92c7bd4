"""ViT: the ViT-B/16 parameter count, pooling, dropout, bad options."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.nn import ViT

SMALL = dict(patch_size=4, hidden=8, depth=1, heads=2, mlp_dim=16)


def test_vit_b16_has_the_published_parameter_count():
    # ViT-B/16 at 224x224 with a 1000-way head (timm vit_base_patch16_224): 86,567,656.
    model = ViT(patch_size=16, hidden=768, depth=12, heads=12, mlp_dim=3072, num_classes=1000,
                pool="cls")  # fmt: skip
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nn.meta.unbox(params))) == 86_567_656


@pytest.mark.parametrize("pool,tokens", [("gap", 4), ("cls", 5)])
def test_pooling_and_token_count(pool, tokens, fast_jit):
    model = ViT(**SMALL, pool=pool)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = fast_jit(model.init)(jax.random.key(1), x)
    assert variables["params"]["pos_embedding"].value.shape == (1, tokens, 8)
    out, state = fast_jit(
        lambda v: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    )(variables)
    h = np.asarray(state["intermediates"]["encoder_norm"]["__call__"][0])  # [B, N, D]
    np.testing.assert_allclose(out, h[:, 0] if pool == "cls" else h.mean(1), rtol=1e-6, atol=1e-6)


def test_dropout_only_in_training(fast_jit):
    model = ViT(**SMALL, num_classes=3, dropout=0.5)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = fast_jit(model.init)(jax.random.key(1), x)
    eval_out = fast_jit(model.apply)(variables, x)
    no_dropout = fast_jit(
        lambda v: ViT(**SMALL, num_classes=3, dropout=0.0).apply(v, x, train=True)
    )(variables)
    np.testing.assert_allclose(eval_out, no_dropout, rtol=1e-6)
    train = fast_jit(lambda v, k: model.apply(v, x, train=True, rngs={"dropout": k}))
    a, b = train(variables, jax.random.key(2)), train(variables, jax.random.key(3))
    assert np.abs(np.asarray(a - b)).max() > 1e-4


def test_bad_options_raise():
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        ViT(**SMALL, pool="max")
    with pytest.raises(ValueError, match="hidden=8 is not divisible by heads=3"):
        ViT(**{**SMALL, "heads": 3})
    with pytest.raises(ValueError, match="image size 10x10 is not divisible by patch_size=4"):
        ViT(**SMALL).init(jax.random.key(0), jnp.ones((1, 10, 10, 3)))
