"""DualEncoder: unit-norm embeddings, exp(log scale), CLIP/SigLIP inits, encode_x / encode_y."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.nn import (
    SIGLIP_LOGIT_BIAS_INIT,
    SIGLIP_LOGIT_SCALE_INIT,
    DualEncoder,
    TextEncoder,
    resnet_cifar,
)

TOWER = dict(width=8, depth=1, heads=2, mlp_dim=16, max_len=8)


def _inputs():
    x = jax.random.randint(jax.random.key(0), (3, 8), 1, 258)
    y = jax.random.randint(jax.random.key(1), (3, 6), 1, 258).at[1, 4:].set(0)
    return x, y


def _model(**kw):
    return DualEncoder(TextEncoder(**TOWER), TextEncoder(**TOWER, pool="last"), 6, **kw)


def test_embeddings_are_the_normalised_projections_of_the_towers(fast_jit):
    model = _model()
    x, y = _inputs()
    variables = fast_jit(model.init)(jax.random.key(2), x, y)
    zx, zy, scale, bias = fast_jit(model.apply)(variables, x, y)
    params = nn.meta.unbox(variables["params"])
    for z, inputs, tower, side in ((zx, x, model.x_encoder, "x"), (zy, y, model.y_encoder, "y")):
        feats = np.asarray(
            fast_jit(tower.apply)({"params": params[f"{side}_encoder"]}, inputs), np.float64
        )
        proj = feats @ np.asarray(params[f"{side}_proj"]["kernel"], np.float64)
        ref = proj / np.linalg.norm(proj, axis=-1, keepdims=True)
        np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-6)
    assert bias is None and "logit_bias" not in params
    np.testing.assert_allclose(scale, math.exp(params["log_logit_scale"]), rtol=1e-6)
    np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-6)  # CLIP initialisation


def test_logit_scale_is_exp_of_the_trained_parameter_and_siglip_init(fast_jit):
    model = _model(logit_scale_init=SIGLIP_LOGIT_SCALE_INIT, logit_bias_init=SIGLIP_LOGIT_BIAS_INIT)
    x, y = _inputs()
    variables = nn.meta.unbox(fast_jit(model.init)(jax.random.key(2), x, y))
    apply = fast_jit(model.apply)
    _, _, scale, bias = apply(variables, x, y)
    np.testing.assert_allclose((scale, bias), (10.0, -10.0), rtol=1e-6)
    params = {**variables["params"], "log_logit_scale": 0.3, "logit_bias": -2.5}
    _, _, scale, bias = apply({"params": jax.tree.map(jnp.float32, params)}, x, y)
    np.testing.assert_allclose((scale, bias), (math.exp(0.3), -2.5), rtol=1e-6)


def test_max_logit_scale_clips(fast_jit):
    model = _model(max_logit_scale=100.0)
    x, y = _inputs()
    variables = nn.meta.unbox(fast_jit(model.init)(jax.random.key(2), x, y))
    params = {**variables["params"], "log_logit_scale": jnp.float32(math.log(1000.0))}
    np.testing.assert_allclose(fast_jit(model.apply)({"params": params}, x, y)[2], 100.0, rtol=1e-6)


def test_encode_methods_match_the_call(fast_jit):
    model = _model()
    x, y = _inputs()
    variables = fast_jit(model.init)(jax.random.key(2), x, y)
    zx, zy, _, _ = fast_jit(model.apply)(variables, x, y)
    encode_x = fast_jit(lambda v, x: model.apply(v, x, method="encode_x"))
    encode_y = fast_jit(lambda v, y: model.apply(v, y, method=model.encode_y))
    np.testing.assert_allclose(encode_x(variables, x), zx, rtol=1e-6)
    np.testing.assert_allclose(encode_y(variables, y), zy, rtol=1e-6)


def test_without_normalisation_norms_are_free(fast_jit):
    model = _model(normalize=False)
    x, y = _inputs()
    variables = fast_jit(model.init)(jax.random.key(2), x, y)
    zx = fast_jit(lambda v, x: model.apply(v, x, method="encode_x"))(variables, x)
    assert np.abs(np.linalg.norm(zx, axis=-1) - 1.0).max() > 1e-2


def test_batch_norm_tower_keeps_its_statistics_under_its_name():
    tower = resnet_cifar(stage_sizes=(1,), num_filters=4, num_classes=None)
    model = DualEncoder(tower, TextEncoder(**TOWER), 6)
    images, (_, y) = jnp.ones((3, 8, 8, 3)), _inputs()
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, y, train=True))
    assert set(shapes["batch_stats"]) == {"x_encoder"}
    out = jax.eval_shape(
        lambda v: model.apply(v, images, y, train=True, mutable=["batch_stats"]),
        nn.meta.unbox(shapes),
    )
    assert out[0][0].shape == (3, 6)


def test_bad_embed_dim_raises():
    with pytest.raises(ValueError, match="embed_dim must be >= 1, got 0"):
        DualEncoder(TextEncoder(**TOWER), TextEncoder(**TOWER), 0)
