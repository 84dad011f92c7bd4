"""Checks every jaxbatch.nn model passes: a training step, logical axis names, dtypes.

A model joins with one entry in CASES: a builder ``(dtype, param_dtype) -> (module, args, kwargs,
loss_fn)`` where ``loss_fn(outputs) -> scalar`` and ``kwargs`` are the training-mode call options.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbatch import nn as jnn

B = 4


def _xent(logits, labels):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def _images(size=8):
    return jax.random.normal(jax.random.key(10), (B, size, size, 3))


def _labels(n=3):
    return jnp.arange(B) % n


def _tokens(length=6, vocab=258):
    tokens = jax.random.randint(jax.random.key(11), (B, length), 1, vocab)
    return tokens.at[0, -2:].set(0)  # some padding


def _resnet(dtype, param_dtype, norm="batch", **kw):
    model = jnn.resnet_cifar(
        stage_sizes=(1, 1), num_filters=4, num_classes=3, norm=norm, dtype=dtype,
        param_dtype=param_dtype, **kw,
    )  # fmt: skip
    return model, (_images(),), {"train": True}, lambda y: _xent(y, _labels())


def _resnet_ghost(dtype, param_dtype):
    return _resnet(dtype, param_dtype, norm="ghost", virtual_batch_size=2)


def _resnet_bottleneck(dtype, param_dtype):
    model = jnn.ResNet(
        stage_sizes=(1, 1), block="bottleneck", num_filters=2, num_classes=3, stem="imagenet",
        dtype=dtype, param_dtype=param_dtype,
    )  # fmt: skip
    return model, (_images(16),), {"train": True}, lambda y: _xent(y, _labels())


def _vit(dtype, param_dtype, pool="gap"):
    model = jnn.ViT(
        patch_size=4, hidden=8, depth=1, heads=2, mlp_dim=16, num_classes=3, pool=pool,
        dropout=0.1, dtype=dtype, param_dtype=param_dtype,
    )  # fmt: skip
    return model, (_images(),), {"train": True}, lambda y: _xent(y, _labels())


def _vit_cls(dtype, param_dtype):
    return _vit(dtype, param_dtype, pool="cls")


def _text(dtype, param_dtype, **kw):
    return jnn.TextEncoder(
        width=8, depth=1, heads=2, mlp_dim=16, max_len=8, dtype=dtype, param_dtype=param_dtype, **kw
    )


def _text_encoder(dtype, param_dtype):
    model = _text(dtype, param_dtype, out_dim=3)
    return model, (_tokens(),), {"train": True}, lambda y: _xent(y, _labels())


def _clip_loss(outputs):
    zx, zy, scale, bias = outputs
    logits = scale * zx @ zy.T + (0.0 if bias is None else bias)
    labels = jnp.arange(zx.shape[0])
    return 0.5 * (_xent(logits, labels) + _xent(logits.T, labels))


def _dual_encoder(dtype, param_dtype):
    model = jnn.DualEncoder(
        _text(dtype, param_dtype, pool="mean"), _text(dtype, param_dtype, pool="last"),
        embed_dim=6, logit_bias_init=-1.0, dtype=dtype, param_dtype=param_dtype,
    )  # fmt: skip
    return model, (_tokens(), _tokens(5)[::-1]), {"train": True}, _clip_loss


def _dual_encoder_images(dtype, param_dtype):
    image_tower = jnn.ViT(
        patch_size=4, hidden=8, depth=1, heads=2, mlp_dim=16, dtype=dtype, param_dtype=param_dtype
    )
    model = jnn.DualEncoder(
        image_tower, _text(dtype, param_dtype), embed_dim=6, dtype=dtype, param_dtype=param_dtype
    )
    return model, (_images(), _tokens()), {"train": True}, _clip_loss


def _lm(dtype, param_dtype, **kw):
    model = jnn.DecoderLM(
        width=8, depth=2, heads=2, mlp_dim=16, max_len=8, dtype=dtype, param_dtype=param_dtype, **kw
    )
    tokens = _tokens(7)
    return model, (tokens[:, :-1],), {}, lambda y: _xent(y, tokens[:, 1:])


def _lm_unrolled_tied(dtype, param_dtype):
    return _lm(dtype, param_dtype, scan_layers=False, tie_embeddings=True, remat_policy="full")


def _bert(dtype, param_dtype):
    # attention='auto': the chunked attention on this CPU host, padding as a key_mask
    model = jnn.BertMLM(
        vocab_size=50, width=8, depth=2, heads=2, mlp_dim=16, max_len=8, dtype=dtype,
        param_dtype=param_dtype,
    )  # fmt: skip
    positions = jnp.tile(jnp.array([[0, 2]]), (B, 1))
    return model, (_tokens(vocab=50), positions), {"train": True}, lambda y: _xent(y, _labels())


CASES = {
    "resnet_batch": _resnet,
    "resnet_ghost": _resnet_ghost,
    "resnet_bottleneck": _resnet_bottleneck,
    "vit_gap": _vit,
    "vit_cls": _vit_cls,
    "text_encoder": _text_encoder,
    "dual_encoder_text": _dual_encoder,
    "dual_encoder_images": _dual_encoder_images,
    "decoder_lm_scan": _lm,
    "decoder_lm_unrolled_tied": _lm_unrolled_tied,
    "bert_mlm": _bert,
}


_CLASSES = [(B, 3)]
EXPECTED_OUTPUT_SHAPES = {
    "resnet_batch": _CLASSES,
    "resnet_ghost": _CLASSES,
    "resnet_bottleneck": _CLASSES,
    "vit_gap": _CLASSES,
    "vit_cls": _CLASSES,
    "text_encoder": _CLASSES,
    "dual_encoder_text": [(B, 6), (B, 6), (), ()],  # zx, zy, logit_scale, logit_bias
    "dual_encoder_images": [(B, 6), (B, 6), ()],  # logit_bias is None: not a leaf
    "decoder_lm_scan": [(B, 6, 258)],
    "decoder_lm_unrolled_tied": [(B, 6, 258)],
    "bert_mlm": [(B, 2, 50)],
}


def _init(model, args, kwargs):
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return model.init(rngs, *args, **kwargs)


def _loss_fn(model, variables, args, kwargs, loss_of_outputs):
    """loss(params) in training mode, threading batch_stats and a fixed dropout key."""
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss(params):
        out = model.apply(
            {"params": params, **rest},
            *args,
            **kwargs,
            rngs={"dropout": jax.random.key(5)},
            mutable=["batch_stats"],
        )[0]
        return loss_of_outputs(out)

    return loss


# Variants that only change a block type, a pooling or a tower get the (cheap) shape-level checks
# below; the compiled training step runs once per model family to keep the suite fast on CPU.
STEP_CASES = [
    "resnet_batch",
    "resnet_ghost",
    "vit_cls",
    "text_encoder",
    "dual_encoder_text",
    "decoder_lm_scan",
    "decoder_lm_unrolled_tied",
]


@pytest.mark.parametrize("name", STEP_CASES)
def test_one_sgd_step_decreases_the_loss(name, fast_jit):
    model, args, kwargs, loss_of_outputs = CASES[name](jnp.float32, jnp.float32)

    @fast_jit
    def init_and_step():
        variables = nn.meta.unbox(_init(model, args, kwargs))
        loss = _loss_fn(model, variables, args, kwargs, loss_of_outputs)
        value, grads = jax.value_and_grad(loss)(variables["params"])
        grad_norm = optax.tree.norm(grads)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        step = 0.05 / grad_norm  # a step of length 0.05 along -g: small enough to descend
        new_params = jax.tree.map(lambda p, g: p - step * g, variables["params"], grads)
        return value, loss(new_params), grad_norm, finite

    before, after, grad_norm, finite = init_and_step()
    assert bool(finite), name
    assert float(grad_norm) > 0.0
    assert float(after) < float(before)


def _boxed_leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@pytest.mark.parametrize("name", CASES)
def test_forward_shapes_and_every_param_has_logical_axis_names(name):
    model, args, kwargs, _ = CASES[name](jnp.float32, jnp.float32)
    shapes = jax.eval_shape(lambda: _init(model, args, kwargs))
    out = jax.eval_shape(
        lambda v: model.apply(
            v, *args, **kwargs, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]
        )[0],
        nn.meta.unbox(shapes),
    )
    out_shapes = [o.shape for o in jax.tree.leaves(out)]
    assert out_shapes == EXPECTED_OUTPUT_SHAPES[name], out_shapes
    leaves = _boxed_leaves(shapes["params"])
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == leaf.value.ndim, leaf
        assert set(leaf.names) - {None} <= set(jnn.LOGICAL_AXES), leaf.names
    specs = nn.get_partition_spec(shapes["params"])
    for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
        assert isinstance(spec, jax.sharding.PartitionSpec)


@pytest.mark.parametrize(
    "name", ["resnet_batch", "dual_encoder_images", "decoder_lm_scan", "bert_mlm"]
)
def test_dtype_and_param_dtype(name, fast_jit):
    model, args, kwargs, _ = CASES[name](jnp.bfloat16, jnp.bfloat16)

    @fast_jit
    def init_and_apply():
        variables = nn.meta.unbox(_init(model, args, kwargs))
        rngs = {"dropout": jax.random.key(1)}
        out = model.apply(variables, *args, **kwargs, rngs=rngs, mutable=["batch_stats"])[0]
        return variables["params"], out

    params, out = init_and_apply()
    param_dtypes = {leaf.dtype for leaf in jax.tree.leaves(params)}
    assert param_dtypes == {jnp.dtype(jnp.bfloat16)}
    first = out[0] if isinstance(out, tuple) else out
    # Classifiers compute in bf16; the LMs and the dual encoder return float32 by design.
    float32_out = ("dual_encoder_images", "decoder_lm_scan", "bert_mlm")
    expected = jnp.float32 if name in float32_out else jnp.bfloat16
    assert first.dtype == expected
    assert np.all(np.isfinite(np.asarray(first, np.float32)))
