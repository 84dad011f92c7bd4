"""End-to-end runs of the trainer on the bundled data (small 'runlocal' configs).

The runs use the test session's 8 simulated devices (data parallel, mesh 8×1×1).
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxbatch.train import checkpoint as ckpt
from jaxbatch.train import config as config_lib
from jaxbatch.train import loop

DIGITS = "configs/digits_resnet_lars.py:runlocal"
# The shared digits run checkpoints every 2 of its 6 steps, so the resume test can stop after one.
DIGITS_OVERRIDES = ("checkpoint_every_steps=2",)


def _cfg(path, *overrides):
    return config_lib.load_config(path, list(overrides))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One uninterrupted digits runlocal run, shared (read-only) by the tests of this module."""
    workdir = tmp_path_factory.mktemp("digits") / "run"
    summary = loop.train(_cfg(DIGITS, *DIGITS_OVERRIDES), str(workdir), progress=False)
    return workdir, summary


def _copy_run(digits_run, tmp_path):
    """A private copy of the shared run directory, for a test that writes into it."""
    workdir, summary = digits_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    return copy, summary


@pytest.mark.parametrize(
    "path, metric",
    [
        (DIGITS, "accuracy"),
        ("configs/codesearch_clip.py:runlocal", "recall@1"),
        ("configs/stdlib_lm.py:runlocal", "bits_per_byte"),
    ],
)
def test_runlocal_trains_and_writes_its_run_directory(request, tmp_path, capsys, path, metric):
    if path == DIGITS:
        cfg = _cfg(path, *DIGITS_OVERRIDES)
        tmp_path, summary = request.getfixturevalue("digits_run")
    else:
        cfg = _cfg(path)
        summary = loop.train(cfg, str(tmp_path), progress=False)
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"], "the loss did not go down"
    assert metric in summary["eval"]
    assert summary["step"] == cfg.total_samples // cfg.batch_size
    for name in ("config.json", "summary.json", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert os.listdir(tmp_path / "tensorboard")
    assert ckpt.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == summary["step"]
    if metric == "recall@1":
        assert set(summary["baseline"]) == {"recall@1", "recall@10"}
        # 'auto' says what it chose, at the start of the run and in config.json (CPU: XLA tiles)
        resolved = json.load(open(tmp_path / "config.json"))["resolved"]
        assert cfg.loss.implementation == "auto" and resolved["loss.implementation"] == "xla"
        assert "loss.implementation: xla (" in printed


def _params(summary):
    return jax.device_get(summary["state"].params)


def test_accumulation_equals_full_batch_step(tmp_path):
    """k micro-batches inside one step give the same parameters as one full-batch step.

    SGD with momentum: Adam-style optimizers divide by the gradient's own scale, which turns
    the rounding noise of analytically-zero gradients (e.g. the query bias, to which softmax is
    invariant) into O(learning-rate) differences.
    """
    common = (
        "total_samples=64",
        "schedule.warmup_samples=32",
        "log_every_steps=1",
        "optimizer.name=sgd",
    )
    one = loop.train(
        _cfg("configs/stdlib_lm.py:runlocal", *common), str(tmp_path / "k1"), progress=False
    )
    four = loop.train(
        _cfg("configs/stdlib_lm.py:runlocal", *common, "micro_batches=4"),
        str(tmp_path / "k4"),
        progress=False,
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
        _params(one),
        _params(four),
    )
    records = [json.loads(line) for line in open(tmp_path / "k4" / "metrics.jsonl")]
    assert all(np.isfinite(r["b_simple"]) for r in records if r["kind"] == "train")


def test_resume_after_stop_reaches_the_same_parameters(tmp_path, digits_run):
    """A run stopped after a checkpoint and restarted ends where an uninterrupted run ends."""
    cfg = _cfg(DIGITS, *DIGITS_OVERRIDES)
    _, straight = digits_run
    stopped = loop.train(cfg, str(tmp_path / "resumed"), progress=False, stop_after_step=3)
    assert stopped["step"] == 3 and "eval" not in stopped
    resumed = loop.train(cfg, str(tmp_path / "resumed"), progress=False)
    assert resumed["step"] == straight["step"]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        _params(straight),
        _params(resumed),
    )
    assert resumed["eval"]["accuracy"] == pytest.approx(straight["eval"]["accuracy"])


def test_checkpoint_of_another_model_is_refused(tmp_path, digits_run):
    workdir, _ = _copy_run(digits_run, tmp_path)
    wider = _cfg(DIGITS, *DIGITS_OVERRIDES, "model.num_filters=8")
    with pytest.raises(ckpt.CheckpointError, match="different model.*shapes differ"):
        loop.train(wider, str(workdir), progress=False)


def test_corrupt_checkpoint_is_reported(tmp_path, digits_run):
    workdir, _ = _copy_run(digits_run, tmp_path)
    steps = [name for name in os.listdir(workdir / "checkpoints") if name.isdigit()]
    assert steps
    for step in steps:  # every checkpoint damaged: nothing intact to fall back to
        for root, _, files in os.walk(workdir / "checkpoints" / str(step) / "meta"):
            for name in files:
                with open(os.path.join(root, name), "w") as f:
                    f.write("{not json")
    with pytest.raises(ckpt.CheckpointError, match="cannot be read"):
        loop.train(_cfg(DIGITS, *DIGITS_OVERRIDES), str(workdir), progress=False)


def test_init_from_starts_with_the_weights_of_an_earlier_run(tmp_path, digits_run):
    """A second phase (e.g. BERT phase 2) starts from the first phase's params and batch stats."""
    phase1, first = digits_run
    cfg = _cfg(DIGITS, "ema.decay=0.9")
    cfg.init_from = str(phase1)
    second = loop.train(cfg, str(tmp_path / "phase2"), progress=False, stop_after_step=0)
    state = second["state"]
    assert int(state.step) == 0
    for got, want in (
        (state.params, first["state"].params),
        (state.model_state, first["state"].model_state),
        (state.ema_state.ema["params"], first["state"].params),
    ):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))


def test_init_from_another_model_is_refused(tmp_path, digits_run):
    cfg = _cfg(DIGITS, "model.num_filters=8")
    cfg.init_from = str(digits_run[0])
    with pytest.raises(ckpt.CheckpointError, match="different model"):
        loop.train(cfg, str(tmp_path / "wide"), progress=False, stop_after_step=0)
    cfg.init_from = str(tmp_path / "nowhere")
    with pytest.raises(ckpt.CheckpointError, match="no such directory"):
        loop.train(cfg, str(tmp_path / "wide2"), progress=False, stop_after_step=0)
