"""Gradient caching: accumulating k micro-batches of a contrastive loss gives the gradient of the
full-batch loss (all B² pairs), not of the mean of k smaller losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jaxbatch import optim
from jaxbatch.data import load_arrays
from jaxbatch.optim.accumulate import merge_micro_batches, micro_batch_rng, split_micro_batches
from jaxbatch.train import config as config_lib
from jaxbatch.train import grad_cache, loop, step, tasks
from jaxbatch.train.tasks import split_variables

TOWER = dict(name="text_encoder", width=16, depth=1, heads=2, mlp_dim=32, max_len=32, dropout=0.2)


def _setup(kind, *extra):
    cfg = config_lib.load_config(
        "configs/codesearch_clip.py:runlocal",
        [
            "dataset.options.doc_len=32",
            "dataset.options.code_len=32",
            f"loss.kind={kind}",
            *extra,
        ],
    )
    cfg.model.x_encoder = TOWER  # transformer towers with dropout: both passes must agree
    cfg.model.share_towers = False
    cfg.model.y_encoder = TOWER
    if kind == "sigmoid":
        cfg.model.logit_bias_init = -2.0
    task = tasks.make_task(cfg)
    arrays = load_arrays("codesearch", "train", doc_len=32, code_len=32)
    batch = {k: jnp.asarray(arrays[k][:24]) for k in ("doc", "code")}
    variables = nn.meta.unbox(task.init_fn(jax.random.PRNGKey(0), batch))
    params, model_state = split_variables(variables)
    return task, params, model_state, batch


def _accumulated_grads(task, params, model_state, batch, rng, k, *, cached):
    if cached:
        batch, d_shared, loss, metrics = grad_cache.embedding_cotangents(
            task, params, model_state, batch, rng, k
        )
        grad_fn = grad_cache.grad_fn_for(task, model_state, d_shared, loss, metrics)
    else:
        grad_fn = step.grad_fn_for(task, model_state)
    first = jax.tree.map(lambda x: x[0], split_micro_batches(batch, k))
    aux = jax.eval_shape(lambda p, b: grad_fn(p, b, rng)[1], params, first)
    tx = optim.accumulate(optax.identity(), k, aux_shapes=aux)
    grads, state = tx.update(None, tx.init(params), params, grad_fn=grad_fn, batch=batch, rng=rng)
    return grads, state.aux["loss"]


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_cached_accumulation_equals_the_full_batch_gradient(kind):
    task, params, model_state, batch = _setup(kind)
    rng = jax.random.PRNGKey(7)
    # The full-batch reference sees the same dropout masks: micro-batch j of the strided split
    # is embedded with its own key micro_batch_rng(rng, j) in both passes, so embed the full
    # batch micro-batch by micro-batch with those keys here and differentiate the loss of all
    # B embeddings.
    k = 4

    def full_loss(p):
        def embed(indexed):
            j, mb = indexed
            return task.embed_fn(p, model_state, mb, micro_batch_rng(rng, j))[0]

        micro = split_micro_batches(batch, k)
        per_example, shared = jax.lax.map(embed, (jnp.arange(k), micro))
        per_example = merge_micro_batches(per_example, k)
        return task.pair_loss_fn(per_example, jax.tree.map(lambda x: x[0], shared))[0]

    want_loss, want = jax.jit(jax.value_and_grad(full_loss))(params)
    got, got_loss = jax.jit(functools.partial(_accumulated_grads, task, k=k, cached=True))(
        params, model_state, batch, rng
    )
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), got, want)
    assert set(jax.tree.leaves(jax.tree.map(lambda g: bool(jnp.any(g != 0)), got))) == {True}

    # Plain accumulation optimises the mean of k losses over B/k examples each: another loss.
    plain, plain_loss = jax.jit(functools.partial(_accumulated_grads, task, k=k, cached=False))(
        params, model_state, batch, rng
    )
    assert abs(float(plain_loss) - float(want_loss)) > 1e-3
    diff = max(
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(want), strict=True)
    )
    assert diff > 1e-2


def test_training_with_micro_batches_follows_the_full_batch_run(tmp_path):
    """SGD on the ring-sharded contrastive loss (8 devices): micro_batches=4 == micro_batches=1."""
    common = [
        "optimizer.name=sgd",
        "optimizer.learning_rate=0.5",
        "total_samples=256",
        "ema.decay=0.0",
        "log_every_steps=1",
    ]
    runs = {}
    for k in (1, 4):
        cfg = config_lib.load_config(
            "configs/codesearch_clip.py:runlocal", [*common, f"micro_batches={k}"]
        )
        runs[k] = loop.train(cfg, str(tmp_path / f"k{k}"), progress=False)
    assert runs[1]["step"] == runs[4]["step"] == 4
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
        jax.device_get(runs[1]["state"].params),
        jax.device_get(runs[4]["state"].params),
    )
    assert runs[4]["train_loss"] == pytest.approx(runs[1]["train_loss"], rel=1e-4)
