"""The 'lm' task on a sharded batch: chunked cross-entropy over each device's own token rows.

``configs/stdlib_lm.py:runlocal`` on the 8 simulated devices, with token chunks of 40 that do not
line up with a device's 128 tokens: contiguous chunks of the flattened global batch would make
XLA gather the hidden states across devices. The compiled train step must not, and the loss and
its gradients must equal the one-device task's.
"""

import math
import re

import jax
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbatch import parallel
from jaxbatch.data import load_arrays
from jaxbatch.train import config as config_lib
from jaxbatch.train import plan, tasks

MESHES = {
    "data8": dict(data=8, fsdp=1, tensor=1),
    "data2_fsdp4": dict(data=2, fsdp=4, tensor=1),
}
_ALL_GATHER = re.compile(r"= ([a-z0-9]+)\[([0-9,]*)\][^ ]* all-gather(?:-start)?\(")


def _cfg(mesh):
    overrides = [f"mesh.{k}={v}" for k, v in MESHES[mesh].items()]
    return config_lib.load_config(
        "configs/stdlib_lm.py:runlocal",
        [*overrides, "loss.implementation=xla", "loss.block_size=40"],
    )


def _gathered_shapes(hlo_text):
    return [
        tuple(int(v) for v in dims.split(",") if v) for _, dims in _ALL_GATHER.findall(hlo_text)
    ]


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_compiled_step_never_gathers_the_hidden_states(eight_devices, mesh):
    del eight_devices
    cfg = _cfg(mesh)
    run, lowered = plan.lower_step(cfg)
    gathered = _gathered_shapes(lowered.compile().as_text())
    b, seq, width = cfg.batch_size, cfg.dataset.options.seq_len, cfg.model.width
    tokens = b * seq
    hidden_like = {(tokens, width), (b, seq, width), (tokens,)}
    assert not hidden_like & set(gathered), f"hidden states gathered: {gathered}"
    # Stronger: nothing larger than one parameter is gathered (FSDP gathers parameters only).
    largest_param = max(math.prod(p.shape) for p in jax.tree.leaves(run.abstract_state.params))
    biggest = max((math.prod(s) for s in gathered), default=0)
    assert biggest <= largest_param, f"all-gather of {biggest} elements: {gathered}"
    assert "shard_map over data × fsdp = 8" in run.task.choices["loss.implementation.reason"]


@pytest.fixture(scope="module")
def one_device(eight_devices):
    """(params, state, tokens, (loss, grads)) of the one-device task."""
    del eight_devices
    cfg = _cfg("data8")
    task = tasks.make_task(cfg)
    tokens = load_arrays("stdlib_text", "train", **cfg.dataset.options)["tokens"][: cfg.batch_size]
    variables = jax.jit(task.init_fn)(jax.random.PRNGKey(0), {"tokens": tokens})
    params, state = tasks.split_variables(nn.meta.unbox(variables))
    grad = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))
    (loss, _), grads = grad(params, state, {"tokens": tokens}, jax.random.PRNGKey(1))
    return params, state, tokens, (loss, grads)


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_sharded_loss_and_gradients_equal_one_device(one_device, mesh):
    params, state, tokens, (ref_loss, ref_grads) = one_device
    device_mesh = parallel.make_mesh(**MESHES[mesh])
    task = tasks.make_task(_cfg(mesh), device_mesh)
    rows = NamedSharding(device_mesh, P(parallel.BATCH_AXES))
    grad = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))
    (loss, _), grads = grad(
        params, state, {"tokens": jax.device_put(tokens, rows)}, jax.random.PRNGKey(1)
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, ref_grads
    )
