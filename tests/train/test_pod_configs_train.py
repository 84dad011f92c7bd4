"""The pod configs' 'runlocal' variants train end to end on record files the test writes.

Each reads its dataset through the same loader as the full config would on a pod (ArrayRecord
shards decoded on the fly: JPEG digits for imagenet2012 and image_text, pre-masked stdlib source
for bert_pretraining), on the test session's 8 simulated devices.
"""

import json
import math

import jax
import numpy as np
import pytest

from jaxbatch.train import config as config_lib
from jaxbatch.train import loop

CASES = {
    # The tiny ResNet on Inception crops of 8×8 digits barely moves in 16 steps of LARS, so this
    # case checks the run, not learning (the digits/LARS config shows LARS learning).
    "imagenet": (
        "configs/imagenet_resnet50_lars.py:runlocal",
        "imagenet_like_dir",
        ["dataset.options.format=array_record", "model.num_classes=10"],
        "accuracy",
    ),
    "siglip": ("configs/siglip_pod.py:runlocal", "image_text_dir", [], "recall@1"),
    "bert": (
        "configs/bert_lamb.py:runlocal",
        "bert_pretraining_dir",
        ["model.vocab_size=260"],
        "mlm_accuracy",
    ),
}


def _overrides(case, data_dir):
    samples = IMAGENET_SAMPLES if case == "imagenet" else 1024
    extra = ["checkpoint_every_steps=3"] if case == "imagenet" else []
    return [
        f"dataset.options.data_dir={data_dir}",
        f"total_samples={samples}",
        "log_every_steps=1",
        *CASES[case][2],
        *extra,
    ]


# The imagenet run is shared by the two tests below (its second use stops and resumes it).
IMAGENET_SAMPLES = 512


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory, imagenet_like_dir):
    cfg = config_lib.load_config(CASES["imagenet"][0], _overrides("imagenet", imagenet_like_dir))
    workdir = tmp_path_factory.mktemp("imagenet") / "straight"
    return cfg, workdir, loop.train(cfg, str(workdir), progress=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_runlocal_pod_config_trains_on_its_record_files(tmp_path, request, case):
    path, fixture, _, metric = CASES[case]
    if case == "imagenet":
        cfg, tmp_path, summary = request.getfixturevalue("imagenet_run")
        samples = IMAGENET_SAMPLES
    else:
        data_dir = request.getfixturevalue(fixture)
        cfg = config_lib.load_config(path, _overrides(case, data_dir))
        summary = loop.train(cfg, str(tmp_path), progress=False)
        samples = 1024
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert summary["step"] == samples // cfg.batch_size == len(losses)
    assert all(math.isfinite(x) for x in losses)
    if case != "imagenet":
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        assert last < first, f"{case}: loss went from {first:.3f} to {last:.3f}"
    assert 0.0 <= summary["eval"][metric] <= 1.0
    held_out = {"imagenet": 360, "siglip": 360, "bert": None}[case]
    if held_out:  # every test example evaluated once: metrics are multiples of 1 / n
        assert summary["eval"][metric] * held_out == pytest.approx(
            round(summary["eval"][metric] * held_out), abs=1e-6
        )


def test_resumed_imagenet_run_sees_the_same_random_crops(tmp_path, imagenet_run):
    """Stopped after a checkpoint and restarted, a run with random crops and flips ends with the
    parameters of an uninterrupted run: the augmentation RNG is keyed by epoch position."""
    cfg, _, straight = imagenet_run
    stopped = loop.train(cfg, str(tmp_path / "resumed"), progress=False, stop_after_step=3)
    assert stopped["step"] == 3
    resumed = loop.train(cfg, str(tmp_path / "resumed"), progress=False)
    assert resumed["step"] == straight["step"] == 8
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        jax.device_get(straight["state"].params),
        jax.device_get(resumed["state"].params),
    )
