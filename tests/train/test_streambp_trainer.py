"""model.backprop='streambp' through the trainer's step: the same update as 'full' backprop.

``configs/stdlib_lm.py:runlocal`` (T = 32, stream chunks of 5 that do not divide it) on a batch
with padding (tokens -1) and packed sequences (segment ids), two micro-batches per step, plain SGD
with learning rate 1 (so the update is the gradient itself), on one device and on 8 simulated
devices (data 2 × fsdp 4) against one device. Also the LM task's padding and packing.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.nn.decoder_lm import segment_positions
from jaxbatch.train import config as config_lib
from jaxbatch.train import loop
from jaxbatch.train import step as step_lib
from jaxbatch.train import tasks as tasks_lib

FAST = {"xla_backend_optimization_level": 0}

# f32: rtol 1e-4 per entry, atol 1e-6 of the largest update entry (the attention key bias has an
# exactly-zero gradient, i.e. rounding only, which the two backprops round differently).
RTOL, ATOL = 1e-4, 1e-6


def _batch(b: int, length: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (b, length + 1)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, b)
    for row, n in enumerate(lengths):
        tokens[row, n:] = -1  # padding
    segments = np.zeros((b, length + 1), np.int32)
    for row in range(b):
        for cut in sorted(rng.choice(np.arange(2, length), size=2, replace=False)):
            segments[row, cut:] += 1  # three packed sequences per row
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(segments)}


def _config(backprop: str, scan_layers: bool, mesh):
    overrides = [
        "optimizer.name=sgd",
        "optimizer.momentum=0.0",
        "optimizer.weight_decay=0.0",
        "optimizer.grad_clip_norm=0.0",
        "optimizer.learning_rate=1.0",
        "schedule.name=constant",
        "ema.decay=0.0",
        "micro_batches=2",
        # In-step noise statistics split the batch into data x fsdp groups, which changes how the
        # loss of a padded batch is averaged on 8 devices (for 'full' as well); off, so that the
        # 8-device step is compared with the 1-device one.
        "noise.enabled=False",
        f"model.scan_layers={scan_layers}",
        f"mesh.data={mesh[0]}",
        f"mesh.fsdp={mesh[1]}",
    ]
    cfg = config_lib.load_config("configs/stdlib_lm.py:runlocal", overrides)
    cfg.model.backprop = backprop
    cfg.model.stream_chunk_size = 5
    return cfg


def _step(backprop: str, scan_layers: bool, mesh=(1, 1), params=None):
    """(loss, update) of one train step from fresh state (or from ``params``), with the step
    compiled as the trainer builds it (cheap XLA:CPU backend optimisation, like ``fast_jit``)."""
    cfg = _config(backprop, scan_layers, mesh)
    batch = _batch(cfg.batch_size, cfg.dataset.options.seq_len, cfg.model.vocab_size)
    devices = jax.devices()[: mesh[0] * mesh[1]]
    run = loop.build(cfg, train_data={"tokens": np.asarray(batch["tokens"])}, devices=devices)
    init = jax.jit(
        loop.traced_under_mesh(
            functools.partial(step_lib.init_state, run.task, run.tx, run.ema), run.mesh, run.rules
        ),
        out_shardings=run.state_shardings,
        compiler_options=FAST,
    )
    state = init(jax.random.PRNGKey(cfg.seed), run.init_batch)
    if params is not None:
        state = state.replace(params=jax.device_put(params, run.state_shardings.params))
    before = jax.device_get(state.params)
    step = run.train_step.lower(state, batch).compile(compiler_options=FAST)
    state, metrics = step(state, batch)
    update = jax.tree.map(lambda a, b: a - b, jax.device_get(state.params), before)
    return float(metrics["loss"]), update, before


def _assert_same_update(got, want):
    loss_got, update_got, _ = got
    loss_want, update_want, _ = want
    np.testing.assert_allclose(loss_got, loss_want, rtol=1e-6)
    scale = max(float(np.max(np.abs(u))) for u in jax.tree.leaves(update_want))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL * scale),
        update_got,
        update_want,
    )
    # Every parameter but the key biases moved: the comparison means something.
    moved = jax.tree_util.tree_leaves_with_path(update_want)
    assert (
        min(
            float(np.max(np.abs(u))) for path, u in moved if "key" not in jax.tree_util.keystr(path)
        )
        > 1e-5
    )


@pytest.fixture(scope="module")
def full_scanned():
    return _step("full", True)


def test_streambp_step_equals_full_backprop_step(full_scanned):
    # Unrolled layers: tests/nn/test_decoder_lm.py (the same model gradients, without the step).
    _assert_same_update(_step("streambp", True, params=full_scanned[2]), full_scanned)


def test_streambp_step_on_eight_devices_equals_one_device(eight_devices, full_scanned):
    del eight_devices
    got = _step("streambp", True, mesh=(2, 4), params=full_scanned[2])
    _assert_same_update(got, full_scanned)


def test_lm_task_ignores_padding_and_splits_packed_sequences():
    cfg = _config("full", True, (1, 1))
    batch = _batch(4, 12, cfg.model.vocab_size)
    tasks = {}
    for implementation in ("reference", "xla"):
        cfg.loss.implementation = implementation
        tasks[implementation] = tasks_lib.make_task(cfg)
    task = tasks["xla"]
    variables = jax.jit(task.init_fn, compiler_options=FAST)(jax.random.PRNGKey(0), batch)
    params, state = tasks_lib.split_variables(nn.meta.unbox(variables))

    def loss(name, b):
        fn = jax.jit(lambda p, b: tasks[name].loss_fn(p, state, b, None)[0], compiler_options=FAST)
        return float(fn(params, b))

    xla = loss("xla", batch)
    np.testing.assert_allclose(loss("reference", batch), xla, rtol=1e-5)
    # By hand: next-token NLL of the tokens that are not padding and stay within their segment.
    tokens, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
    inputs = np.where(tokens[:, :-1] < 0, 0, tokens[:, :-1])
    positions = segment_positions(jnp.asarray(seg[:, :-1]))
    logits = task.model.apply(variables, inputs, seg[:, :-1], positions)
    logp = np.asarray(jax.nn.log_softmax(logits))
    labels = tokens[:, 1:]
    counted = (labels >= 0) & (seg[:, 1:] == seg[:, :-1])
    assert counted.sum() < counted.size  # padding and segment ends were left out
    nll = -np.take_along_axis(logp, np.where(counted, labels, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(xla, nll[counted].mean(), rtol=1e-5)
    # ... but the segments do: without them the loss changes.
    assert abs(loss("xla", {"tokens": batch["tokens"]}) - xla) > 1e-4
    with pytest.raises(ValueError, match=r"segment_ids'\] has shape \(4, 12\)"):
        loss("xla", {**batch, "segment_ids": batch["segment_ids"][:, :-1]})


def _bad_lm_input(case):
    """Raises what ``case`` should, without compiling anything (tracing at most)."""
    from jaxbatch import losses
    from jaxbatch.train.models import build_model

    if case == "chunk <= 0":
        return build_model({"name": "decoder_lm", "backprop": "streambp", "stream_chunk_size": 0})
    if case == "streambp for bert_mlm":
        return build_model({"name": "bert_mlm", "backprop": "streambp"})
    if case == "labels out of range":
        h, w = jnp.ones((4, 8)), jnp.ones((8, 16))
        return losses.linear_cross_entropy(h, w, jnp.array([0, 16, -1, 3]), ignore_index=-1)
    if case == "h/w mismatch":
        return losses.linear_cross_entropy(jnp.ones((4, 8)), jnp.ones((16, 8)), jnp.zeros(4, int))
    cfg = config_lib.load_config("configs/stdlib_lm.py:runlocal")
    with cfg.unlocked():
        cfg.model.backprop = "streambp"
        cfg.model.stream_chunk_size = 64 if case == "chunk > T" else 8
    task = tasks_lib.make_task(cfg)
    batch = _batch(2, cfg.dataset.options.seq_len, cfg.model.vocab_size)
    if case == "segment ids shape":
        batch["segment_ids"] = batch["tokens"][:, :-1]
    variables = jax.eval_shape(task.init_fn, jax.random.key(0), {"tokens": batch["tokens"]})
    params, state = tasks_lib.split_variables(nn.meta.unbox(variables))
    return jax.eval_shape(task.loss_fn, params, state, batch, jax.random.key(1))


@pytest.mark.parametrize(
    "case, match",
    [
        ("chunk <= 0", "stream_chunk_size must be a positive int, got 0"),
        ("chunk > T", r"chunk_size=64 must be in \[1, sequence length 32\]"),
        ("segment ids shape", r"segment_ids'\] has shape \(2, 32\); expected .* \(2, 33\)"),
        ("streambp for bert_mlm", r"unknown key\(s\) \['backprop'\] .* 'bert_mlm'"),
        ("labels out of range", r"labels\[1\] = 16; expected values in \[0, 16\)"),
        ("h/w mismatch", r"h \(4, 8\) has D = 8 .* w \(16, 8\) has 16 rows"),
    ],
)
def test_bad_input_is_a_clear_error_before_compiling(case, match):
    with pytest.raises(ValueError, match=match):
        _bad_lm_input(case)
