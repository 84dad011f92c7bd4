"""Context parallelism through the trainer: a DecoderLM step with the sequence split over 'context'.

``configs/stdlib_lm.py:runlocal`` (2 layers, width 32, 4 heads, 32 tokens, batch 8) with
``model.context_parallel='ring'`` and ``model.context_layout='zigzag'``: the trainer's own
``loop.build`` / ``init_or_restore`` / ``run.train_step`` on the meshes (data 2, context 4) and
(fsdp 2, context 2, tensor 2) give the loss and the parameters of the one-device step (the 'lm'
task puts the batch in the zig-zag order inside the step; the loss is order-free). The compiled
step moves K/V by collective-permutes. Bad sizes are refused by ``loop.build`` before anything is
traced.
"""

from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from jaxbatch import parallel
from jaxbatch.data import load_arrays
from jaxbatch.train import config as config_lib
from jaxbatch.train import loop

ROOT = Path(__file__).resolve().parents[2]
LM = f"{ROOT / 'configs' / 'stdlib_lm.py'}:runlocal"
OVERRIDES = (
    "batch_size=8",
    "reference_batch_size=8",
    "total_samples=16",
    "schedule.warmup_samples=8",
    "model.heads=4",
    "model.attention=chunked",
    "model.attention_chunk_size=8",
    "model.context_parallel=ring",
    "model.context_layout=zigzag",
    "loss.implementation=xla",
)
MESHES = {
    "data2_context4": dict(data=2, context=4),
    "fsdp2_context2_tensor2": dict(data=1, fsdp=2, context=2, tensor=2),
}


def _cfg(mesh: dict, *extra: str):
    keys = [f"mesh.{k}={v}" for k, v in mesh.items()]
    return config_lib.load_config(LM, [*OVERRIDES, *keys, *extra])


@pytest.fixture(scope="module")
def tokens():
    cfg = _cfg(dict(data=1))
    return load_arrays("stdlib_text", "train", **cfg.dataset.options)["tokens"][: cfg.batch_size]


def _one_step(cfg, tokens, devices):
    run = loop.build(cfg, train_data={"tokens": tokens}, devices=devices)
    state, _ = loop.init_or_restore(run, None)
    batch = parallel.make_global_batch({"tokens": tokens}, run.mesh)
    new_state, metrics = run.train_step(state, batch)
    return run, state, batch, float(metrics["loss"]), jax.device_get(new_state.params)


@pytest.fixture(scope="module")
def one_device(eight_devices, tokens):
    _, _, _, loss, params = _one_step(_cfg(dict(data=1)), tokens, eight_devices[:1])
    return loss, params


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_context_parallel_step_equals_the_one_device_step(eight_devices, tokens, one_device, mesh):
    ref_loss, ref_params = one_device
    run, _, batch, loss, params = _one_step(_cfg(MESHES[mesh]), tokens, eight_devices)
    assert run.mesh.shape["context"] == MESHES[mesh]["context"]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    chex.assert_trees_all_close(params, ref_params, rtol=1e-4, atol=1e-5)
    # The step's ring passes K/V by collective-permutes (lowered only: no second compile).
    lowered = run.train_step.lower(*_abstract(run, batch)).as_text()
    assert "collective_permute" in lowered and "all_to_all" not in lowered


def _abstract(run, batch):
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        run.abstract_state,
        run.state_shardings,
    )
    spec = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batch.items()
    }
    return state, spec


@pytest.mark.parametrize(
    "config, extra, message",
    [
        (
            LM, ("mesh.data=1", "mesh.context=8", "dataset.options.seq_len=40",
                 "model.max_len=40"),
            r"sequence length 40 is not divisible by 2 × context = 16 \(zig-zag",
        ),
        (
            LM, ("mesh.data=1", "mesh.context=8", "model.context_layout=contiguous",
                 "dataset.options.seq_len=36", "model.max_len=36"),
            "sequence length 36 is not divisible by context = 8",
        ),
        (
            LM, ("mesh.data=2", "mesh.context=4", "model.context_parallel=ulysses",
                 "model.heads=2"),
            "per-device query heads 2 are not divisible by 4",
        ),
        (
            LM, ("mesh.data=2", "mesh.context=4", "model.context_parallel=none"),
            "mesh.context=4 splits the sequence, but config.model.context_parallel='none'",
        ),
        (
            LM, ("mesh.data=2", "mesh.context=4", "model.backprop=streambp",
                 "model.stream_chunk_size=8"),
            "backprop='streambp' does not compose with mesh.context=4",
        ),
        (
            f"{ROOT / 'configs' / 'digits_resnet_lars.py'}:runlocal",
            ("mesh.data=2", "mesh.context=4"),
            "mesh.context=4 splits the sequence, but model 'resnet_cifar'",
        ),
    ],
    ids=["zigzag-length", "contiguous-length", "ulysses-heads", "strategy-none", "streambp",
         "resnet"],
)  # fmt: skip
def test_bad_context_parallel_config_fails_in_build(eight_devices, config, extra, message):
    if config == LM:
        cfg = _cfg({}, *extra)
    else:
        cfg = config_lib.load_config(config, list(extra))
    with pytest.raises(ValueError, match=message):
        loop.build(cfg, train_data=_zeros(cfg), devices=eight_devices)


def _zeros(cfg):
    from jaxbatch.train import shapes

    return shapes.zero_examples(shapes.example_shapes(cfg))
