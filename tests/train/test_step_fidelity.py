"""The trainer's step computes what the papers and the library define, not an approximation:

- LARS / LAMB give every layer of a scanned (stacked) block its own trust ratio, so one update of a
  scanned model equals the update of the same model unscanned, slice by slice (You et al. 2017,
  Alg. 1; You et al. 2019, Alg. 2);
- every micro-batch of a step draws its own dropout masks, and k micro-batches give the mean of the
  k per-micro-batch gradients computed with those keys.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbatch.nn.axes import unstack_layers
from jaxbatch.optim.accumulate import micro_batch_rng, split_micro_batches
from jaxbatch.train import config as config_lib
from jaxbatch.train import loop

ONE_DEVICE = ["mesh.data=1"]


def _lm_run(optimizer: str, scan_layers: bool, depth: int = 3):
    overrides = [
        f"optimizer.name={optimizer}",
        f"model.scan_layers={scan_layers}",
        f"model.depth={depth}",
        "optimizer.weight_decay=0.01",
        "optimizer.grad_clip_norm=0.0",
        "schedule.name=constant",
        "ema.decay=0.0",
        *ONE_DEVICE,
    ]
    if optimizer == "lars":
        overrides += ["optimizer.learning_rate=1.0", "optimizer.trust_coefficient=0.02"]
    cfg = config_lib.load_config("configs/stdlib_lm.py:runlocal", overrides)
    tokens = np.random.default_rng(0).integers(0, 258, (cfg.batch_size, 33)).astype(np.int32)
    run = loop.build(cfg, train_data={"tokens": tokens}, devices=jax.devices()[:1])
    return run, {"tokens": jnp.asarray(tokens)}


def _ratios(opt_state):
    found = []

    def visit(node):
        if hasattr(node, "ratios") and hasattr(node, "_fields"):
            found.append(node.ratios)
        elif isinstance(node, (tuple, list)):
            for child in node:
                visit(child)

    visit(opt_state)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("optimizer", ["lamb", "lars"])
def test_scanned_update_equals_unscanned_update_slice_by_slice(optimizer):
    depth = 3
    scanned, batch = _lm_run(optimizer, scan_layers=True, depth=depth)
    unscanned, _ = _lm_run(optimizer, scan_layers=False, depth=depth)
    state_s, _ = loop.init_or_restore(scanned, None)
    state_u, _ = loop.init_or_restore(unscanned, None)
    params_u = unstack_layers(jax.device_get(state_s.params), depth)
    assert jax.tree.structure(params_u) == jax.tree.structure(state_u.params)
    state_u = state_u.replace(params=params_u, opt_state=unscanned.tx.init(params_u))
    # An eager init may hand one buffer to several leaves (equal zeros); the step donates its
    # state, and a buffer cannot be donated twice: give every leaf its own copy.
    state_u = jax.tree.map(lambda x: jnp.array(x, copy=True), state_u)
    before = unstack_layers(jax.device_get(state_s.params), depth)

    state_s, metrics_s = scanned.train_step(state_s, batch)
    state_u, metrics_u = unscanned.train_step(state_u, batch)
    np.testing.assert_allclose(metrics_s["loss"], metrics_u["loss"], rtol=1e-6)
    after_s = unstack_layers(jax.device_get(state_s.params), depth)
    after_u = jax.device_get(state_u.params)
    for i in range(depth):
        # A key bias adds one constant to all scores of a query, which softmax cancels: its
        # gradient is zero up to rounding, and an Adam-type step turns rounding into ±lr.
        for tree in (after_s, after_u, before):
            del tree[f"layers_{i}"]["attn"]["key"]["bias"]
    # atol: ~0.1 % of the step (1e-3 here); Adam's first step also amplifies rounding in the
    # small gradient entries, which the scanned and unrolled programs sum in different orders.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), after_s, after_u
    )
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), after_u, before)
    assert (
        min(jax.tree.leaves(moved)) > 1e-4
    )  # every leaf took a step: the comparison means something

    ratios = jax.device_get(_ratios(state_s.opt_state.inner_state))
    stacked = jax.tree.leaves(ratios["layers"])
    assert stacked and all(r.shape == (depth,) for r in stacked)  # one ratio per layer
    assert all(
        np.ndim(r) == 0 for k, r in ratios.items() if k != "layers" for r in jax.tree.leaves(r)
    )
    # The per-layer ratios differ between layers (one shared ratio would make them equal).
    spreads = [float(np.ptp(r)) for r in stacked]
    assert max(spreads) > 1e-6, spreads
    # ... and equal the ratios of the unscanned model's layers.
    ratios_u = jax.device_get(_ratios(state_u.opt_state.inner_state))
    for i in range(depth):
        jax.tree.map(
            lambda s, u, i=i: np.testing.assert_allclose(s[i], u, rtol=2e-5),
            ratios["layers"],
            ratios_u[f"layers_{i}"],
        )


def _mlm_run(micro_batches: int):
    cfg = config_lib.load_config(
        "configs/bert_lamb.py:runlocal",
        [
            "optimizer.name=sgd",
            "optimizer.momentum=0.0",
            "optimizer.weight_decay=0.0",
            "optimizer.grad_clip_norm=0.0",
            "optimizer.learning_rate=1.0",
            "schedule.name=constant",
            "ema.decay=0.0",
            "model.dropout=0.3",
            f"micro_batches={micro_batches}",
            *ONE_DEVICE,
        ],
    )
    rng = np.random.default_rng(0)
    b, length, p = cfg.batch_size, cfg.dataset.options.seq_len, cfg.dataset.options.max_predictions
    arrays = {
        "input_ids": rng.integers(5, cfg.model.vocab_size, (b, length)).astype(np.int32),
        "masked_lm_positions": rng.integers(0, length, (b, p)).astype(np.int32),
        "masked_lm_ids": rng.integers(5, cfg.model.vocab_size, (b, p)).astype(np.int32),
        "masked_lm_weights": np.ones((b, p), np.float32),
    }
    run = loop.build(cfg, train_data=arrays, devices=jax.devices()[:1])
    return run, jax.tree.map(jnp.asarray, arrays)


def test_micro_batches_draw_their_own_dropout_and_average_their_gradients():
    k = 4
    run, batch = _mlm_run(k)
    state, _ = loop.init_or_restore(run, None)
    params, model_state = jax.device_get(state.params), state.model_state
    _, step_rng = jax.random.split(state.rng)
    micro = [jax.tree.map(lambda x, j=j: x[j], split_micro_batches(batch, k)) for j in range(k)]

    @jax.jit  # one compile for all 2k calls (same shapes); eager BERT gradients take minutes
    def grad(micro_batch, key):
        return jax.grad(lambda p: run.task.loss_fn(p, model_state, micro_batch, key)[0])(params)

    keys = [micro_batch_rng(step_rng, j) for j in range(k)]
    want = jax.tree.map(
        lambda *g: sum(g) / k, *[grad(m, key) for m, key in zip(micro, keys, strict=True)]
    )
    shared_key = jax.tree.map(lambda *g: sum(g) / k, *[grad(m, step_rng) for m in micro])

    new_state, _ = run.train_step(state, batch)
    got = jax.tree.map(lambda new, old: old - new, jax.device_get(new_state.params), params)  # lr 1
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)
    # One key for every micro-batch (the old step) is measurably another gradient.
    gap = optax.tree.norm(jax.tree.map(jnp.subtract, got, shared_key))
    assert float(gap) > 1e-2 * float(optax.tree.norm(want))


def test_classification_step_draws_dropout_from_its_key():
    """A classifier with dropout (ViT) trains through the step, its masks from the step's key."""
    cfg = config_lib.load_config("configs/digits_resnet_lars.py:runlocal", ONE_DEVICE)
    cfg.model = config_lib.ml_collections.ConfigDict(
        dict(name="vit", patch_size=4, hidden=16, depth=1, heads=2, mlp_dim=32, num_classes=10)
    )
    cfg.model.dropout = 0.3
    images = np.random.default_rng(0).random((cfg.batch_size, 8, 8, 1), np.float32)
    labels = np.arange(cfg.batch_size, dtype=np.int32) % 10
    run = loop.build(cfg, train_data={"image": images, "label": labels}, devices=jax.devices()[:1])
    state, _ = loop.init_or_restore(run, None)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    loss_fn = jax.jit(lambda key: run.task.loss_fn(state.params, state.model_state, batch, key)[0])
    losses = [float(loss_fn(jax.random.PRNGKey(i))) for i in (0, 0, 1)]
    assert losses[0] == losses[1] != losses[2]
    new_state, metrics = run.train_step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1
