"""Precise BN: equal-weight averages of batch statistics over n batches, for any EMA momentum."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxbatch.nn import GhostBatchNorm
from jaxbatch.train import precise_bn


class _Net(nn.Module):
    momentum: float
    ghost: int | None = None

    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(3, name="dense")(x)
        if self.ghost:
            return GhostBatchNorm(
                virtual_batch_size=self.ghost,
                momentum=self.momentum,
                use_running_average=not train,
            )(x)
        return nn.BatchNorm(momentum=self.momentum, use_running_average=not train)(x)


def _task(model):
    def loss_fn(params, model_state, batch, rng):
        del rng
        y, new_state = model.apply(
            {"params": params, **model_state}, batch["x"], train=True, mutable=["batch_stats"]
        )
        return jnp.mean(y**2), ({}, dict(new_state))

    return types.SimpleNamespace(loss_fn=loss_fn)


def _batches(n=5, size=16):
    rng = np.random.default_rng(0)
    return [{"x": (rng.normal(size=(size, 4)) * (1 + i) + i).astype(np.float32)} for i in range(n)]


@pytest.mark.parametrize("momentum", [0.9, 0.5, 0.0])
@pytest.mark.parametrize("ghost", [None, 4])
def test_statistics_are_the_average_of_batch_statistics(momentum, ghost):
    model = _Net(momentum, ghost)
    batches = _batches()
    variables = model.init(jax.random.PRNGKey(0), batches[0]["x"], train=False)
    params = variables["params"]
    state = {"batch_stats": jax.tree.map(lambda x: x + 7.0, variables["batch_stats"])}
    stats_fn = jax.jit(precise_bn.make_stats_fn(_task(model)))
    new = precise_bn.recompute_batch_stats(stats_fn, params, state, batches)["batch_stats"]

    kernel, bias = np.asarray(params["dense"]["kernel"]), np.asarray(params["dense"]["bias"])
    means, variances = [], []
    for batch in batches:
        h = batch["x"] @ kernel + bias
        groups = h.reshape(-1, ghost or h.shape[0], 3)  # ghost batches (or the whole batch)
        means.append(groups.mean(1).mean(0))
        variances.append(groups.var(1).mean(0))
    (leaf,) = new.values()
    np.testing.assert_allclose(leaf["mean"], np.mean(means, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(leaf["var"], np.mean(variances, 0), rtol=1e-4, atol=1e-5)


def test_momentum_one_keeps_the_running_statistics():
    model = _Net(1.0)
    batches = _batches(2)
    variables = model.init(jax.random.PRNGKey(0), batches[0]["x"], train=False)
    state = {"batch_stats": jax.tree.map(lambda x: x + 3.0, variables["batch_stats"])}
    stats_fn = precise_bn.make_stats_fn(_task(model))
    new = precise_bn.recompute_batch_stats(stats_fn, variables["params"], state, batches)
    jax.tree.map(np.testing.assert_array_equal, new, state)


def test_errors():
    model = _Net(0.9)
    stats_fn = precise_bn.make_stats_fn(_task(model))
    with pytest.raises(ValueError, match="no 'batch_stats'"):
        precise_bn.recompute_batch_stats(stats_fn, {}, {}, [])
    variables = model.init(jax.random.PRNGKey(0), _batches(1)[0]["x"], train=False)
    with pytest.raises(ValueError, match="at least one batch"):
        precise_bn.recompute_batch_stats(
            stats_fn, variables["params"], {"batch_stats": variables["batch_stats"]}, []
        )


def test_trainer_evaluates_and_checkpoints_recomputed_statistics(tmp_path):
    """digits/LARS with a slow running average (momentum 0.99): with precise_bn_batches the
    final state holds the average over those batches of the final parameters' statistics, and
    the evaluation uses them."""
    from jaxbatch.train import config as config_lib
    from jaxbatch.train import loop

    overrides = ["model.bn_momentum=0.99", "total_samples=2048", "ema.decay=0.0"]
    plain = loop.train(
        config_lib.load_config("configs/digits_resnet_lars.py:runlocal", overrides),
        str(tmp_path / "plain"),
        progress=False,
    )
    cfg = config_lib.load_config(
        "configs/digits_resnet_lars.py:runlocal", [*overrides, "precise_bn_batches=3"]
    )
    precise = loop.train(cfg, str(tmp_path / "precise"), progress=False)
    # Same training trajectory: running statistics never enter a training-mode forward pass.
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(plain["state"].params),
        jax.device_get(precise["state"].params),
    )
    run = loop.build(cfg)
    again = loop.with_precise_bn(run, plain["state"], loop.jdata.load_split("digits", "train"))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        jax.device_get(again.model_state),
        jax.device_get(precise["state"].model_state),
    )
    # After 32 steps at momentum 0.99 the running statistics still lean on the initial ones
    # (0.99^32 = 0.72 of them); the recomputed ones give the trained model's accuracy.
    assert precise["eval"]["accuracy"] > plain["eval"]["accuracy"] + 0.1
