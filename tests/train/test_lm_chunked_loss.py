"""The 'lm' task's loss through chunked linear cross-entropy equals the materialised-logits loss."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from jaxbatch.data import load_arrays
from jaxbatch.train import config as config_lib
from jaxbatch.train import tasks


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_and_materialised_losses_agree_in_value_and_gradient(tie):
    results = {}
    for impl in ("reference", "xla"):
        cfg = config_lib.load_config(
            "configs/stdlib_lm.py:runlocal",
            [f"loss.implementation={impl}", "loss.block_size=40"],
        )
        with cfg.unlocked():
            cfg.model.tie_embeddings = tie
        task = tasks.make_task(cfg)
        arrays = load_arrays("stdlib_text", "train", **cfg.dataset.options)
        batch = {"tokens": arrays["tokens"][:6]}
        variables = nn.meta.unbox(task.init_fn(jax.random.PRNGKey(0), batch))
        params, state = tasks.split_variables(variables)
        jaxpr = str(jax.make_jaxpr(task.loss_fn)(params, state, batch, jax.random.PRNGKey(1)))
        # the chunked path never forms the [B, L, V] logits (the model's chunked attention is a
        # custom_vjp as well, so that is not a marker of the loss path)
        b, length = batch["tokens"].shape[0], batch["tokens"].shape[1] - 1
        logits = f"f32[{b},{length},{cfg.model.vocab_size}]"
        assert (logits in jaxpr) == (impl == "reference"), logits
        grad_fn = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))
        (loss, _), grads = grad_fn(params, state, batch, jax.random.PRNGKey(1))
        results[impl] = (loss, grads)
    (ref_loss, ref_grads), (loss, grads) = results["reference"], results["xla"]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads
    )


def _lm_task(*overrides):
    cfg = config_lib.load_config("configs/stdlib_lm.py:runlocal", list(overrides))
    return tasks.make_task(cfg)


def test_the_task_records_what_the_cross_entropy_implementation_resolved_to():
    # What the run prints at its start and stores under 'resolved' in config.json.
    choices = _lm_task("loss.implementation=auto").choices
    assert jax.default_backend() == "cpu"
    assert choices["loss.implementation"] == "xla"
    assert choices["loss.implementation.reason"].startswith("auto on cpu")
    choices = _lm_task("loss.implementation=pallas").choices  # explicit: kept (the interpreter)
    assert choices["loss.implementation"] == "pallas"
    assert "Pallas interpreter" in choices["loss.implementation.reason"]


def test_an_explicit_pallas_the_kernels_cannot_run_fails_when_the_task_is_built():
    # D = 4,096 float32 exceeds the TPU kernels' VMEM budget (also used in interpret mode):
    # a clear error before anything is traced, not a silent switch to the XLA form.
    with pytest.raises(ValueError, match=r"implementation='pallas' cannot run .*\[.*, 4096\]"):
        _lm_task("loss.implementation=pallas", "model.width=4096", "model.heads=2")
