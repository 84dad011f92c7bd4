"""ResNet: published parameter counts, zero-init residuals, ghost vs batch norm, bad options."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.nn import ResNet, resnet18, resnet50, resnet_cifar


def _param_count(model, image_size=32):
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)["params"]
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nn.meta.unbox(params)))


@pytest.mark.parametrize(
    "build,count",
    # torchvision's published parameter counts (weights + BN scale/bias, fc with bias).
    [(resnet18, 11_689_512), (resnet50, 25_557_032)],
    ids=["resnet18", "resnet50"],
)
def test_parameter_counts_match_the_reference_architectures(build, count):
    assert _param_count(build(num_classes=1000)) == count


def test_cifar_depth_maps_to_three_stages_and_runs_on_8x8_and_32x32():
    model = resnet_cifar(20)
    assert model.stage_sizes == (3, 3, 3) and model.stem == "cifar"
    # He et al. 2016 (Table 6): ResNet-20 for CIFAR-10 has 0.27M parameters.
    assert round(_param_count(model) / 1e6, 2) == 0.27
    for size in (8, 32):
        x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
        out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)
        assert out[0].shape == (2, 10)


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_of_the_last_norm_in_each_residual_branch(zero_init, fast_jit):
    model = ResNet((1, 1), block="bottleneck", num_filters=2, num_classes=3,
                   zero_init_residual=zero_init)  # fmt: skip
    init = fast_jit(lambda x: model.init(jax.random.key(0), x, train=False))
    params = nn.meta.unbox(init(jnp.ones((2, 16, 16, 3))))
    for block in ("stage1_block1", "stage2_block1"):
        p = params["params"][block]
        np.testing.assert_array_equal(p["norm3"]["scale"], 0.0 if zero_init else 1.0)
        for other in ("norm1", "norm2", "norm_proj"):
            np.testing.assert_array_equal(p[other]["scale"], 1.0)


def test_ghost_norm_at_full_virtual_batch_equals_batch_norm(fast_jit):
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    kw = dict(stage_sizes=(1, 1), num_filters=4, num_classes=3, zero_init_residual=False)
    bn, ghost = resnet_cifar(**kw), resnet_cifar(**kw, norm="ghost", virtual_batch_size=4)
    variables = nn.meta.unbox(fast_jit(lambda x: bn.init(jax.random.key(0), x, train=True))(x))
    ghost_shapes = jax.eval_shape(lambda: nn.meta.unbox(ghost.init(jax.random.key(0), x, True)))
    assert jax.tree.structure(ghost_shapes) == jax.tree.structure(variables)

    def train_apply(model):
        return fast_jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))

    (y_bn, s_bn), (y_gh, s_gh) = train_apply(bn)(variables), train_apply(ghost)(variables)
    np.testing.assert_allclose(y_gh, y_bn, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s_gh), jax.tree.leaves(s_bn), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Smaller ghost batches change the output (statistics of 2 examples instead of 4).
    small = resnet_cifar(**kw, norm="ghost", virtual_batch_size=2)
    assert np.abs(np.asarray(train_apply(small)(variables)[0] - y_bn)).max() > 1e-3


def test_bad_options_raise():
    with pytest.raises(ValueError, match="unknown norm 'group'"):
        ResNet((1,), norm="group")
    with pytest.raises(ValueError, match="unknown block 'wide'"):
        ResNet((1,), block="wide")
    with pytest.raises(ValueError, match="unknown stem 'tiny'"):
        ResNet((1,), stem="tiny")
    with pytest.raises(ValueError, match="virtual_batch_size=8 needs norm='ghost'"):
        ResNet((1,), virtual_batch_size=8)
    with pytest.raises(ValueError, match="stage_sizes must be a non-empty"):
        ResNet(())
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2 with n >= 1, got 21"):
        resnet_cifar(21)
    with pytest.raises(ValueError, match="give depth or stage_sizes, not both"):
        resnet_cifar(20, stage_sizes=(1, 1))
    ghost = resnet_cifar(stage_sizes=(1,), num_filters=2, norm="ghost", virtual_batch_size=3)
    with pytest.raises(ValueError, match="batch size 4 .* not divisible by virtual_batch_size=3"):
        ghost.init(jax.random.key(0), jnp.ones((4, 8, 8, 3)), train=True)
