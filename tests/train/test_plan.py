"""The ahead-of-time planner and the pod configs.

The planner compiles the train step on ShapeDtypeStruct inputs; here its numbers are checked
against a real scaled-down run on 8 simulated devices (arrays actually allocated, the same step
compiled on them), against hand-counted HLO, and the pod configs are loaded, validated, built
abstractly at full size (parameter counts against the papers' architectures) and planned scaled
down.
"""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxbatch import parallel
from jaxbatch.train import cli, loop, plan, shapes
from jaxbatch.train import config as config_lib

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
POD_CONFIGS = (
    "imagenet_resnet50_lars.py",
    "bert_lamb.py:phase1",
    "bert_lamb.py:phase2",
    "siglip_pod.py",
)


def load(name: str, *overrides: str):
    return config_lib.load_config(str(CONFIGS / name), list(overrides))


def small_resnet(mesh="mesh.data=2,mesh.fsdp=4,mesh.tensor=1", *extra):
    """The ImageNet/ResNet/LARS pod config, scaled down ('runlocal': 32×32 images, 2 stages)."""
    return load("imagenet_resnet50_lars.py:runlocal", *mesh.split(","), *extra)


@pytest.fixture(scope="module")
def small_plan(eight_devices):
    return plan.plan(small_resnet())


def test_plan_agrees_with_a_real_scaled_down_run(eight_devices, small_plan):
    cfg = small_resnet()
    predicted = small_plan

    # The real thing: allocate the state, feed real arrays, compile the step on them, run it.
    example = shapes.example_shapes(cfg)
    rng = np.random.default_rng(0)
    arrays = {
        "image": rng.normal(size=(cfg.batch_size, *example["image"].shape)).astype(np.float32),
        "label": rng.integers(0, 16, size=(cfg.batch_size,)).astype(np.int32),
    }
    run = loop.build(cfg, train_data=arrays)
    state, _ = loop.init_or_restore(run, None)
    batch = parallel.make_global_batch(arrays, run.mesh)
    memory = run.train_step.lower(state, batch).compile().memory_analysis()
    state, metrics = run.train_step(state, batch)
    assert np.isfinite(float(metrics["loss"]))

    def held(tree):  # bytes on device 0, from the arrays' own shards
        device = eight_devices[0]
        return sum(
            s.data.nbytes
            for x in jax.tree.leaves(tree)
            for s in x.addressable_shards
            if s.device == device
        )

    assert predicted.param_bytes == held(state.params)
    assert predicted.opt_state_bytes == held(state.opt_state)
    assert predicted.state_bytes == held(state)
    assert predicted.batch_bytes == held(batch)
    real_peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    assert abs(predicted.peak_bytes - real_peak) <= 0.1 * real_peak
    assert abs(predicted.temp_bytes - memory.temp_size_in_bytes) <= 0.1 * memory.temp_size_in_bytes
    assert predicted.argument_bytes == memory.argument_size_in_bytes
    assert predicted.per_device_batch == cfg.batch_size // 8 and predicted.devices == 8


def test_plan_reports_the_collectives_of_the_mesh(eight_devices, small_plan):
    data_parallel = plan.plan(small_resnet("mesh.data=8,mesh.fsdp=1,mesh.tensor=1"))
    fsdp = small_plan  # data=2, fsdp=4
    # Pure data parallelism: replicated parameters, gradients all-reduced, nothing gathered.
    assert data_parallel.collectives["all-reduce"] > 0
    assert data_parallel.collectives["all-gather"] == 0
    # FSDP: parameters gathered for the forward/backward pass, ~1/4 of the state per device.
    assert fsdp.collectives["all-gather"] > 0
    assert fsdp.param_bytes < data_parallel.param_bytes / 2
    assert fsdp.opt_state_bytes < data_parallel.opt_state_bytes / 2
    # Same global work, so the same FLOPs per device.
    assert fsdp.flops == pytest.approx(data_parallel.flops, rel=1e-3)


def test_count_collectives_on_hand_written_hlo():
    hlo = "\n".join(
        [
            "%all-reduce.1 = f32[] all-reduce(f32[] %a), replica_groups={}, to_apply=%add",
            "%ag = (f32[4], f32[8]) all-gather-start(f32[4] %b), dimensions={0}",
            "%agd = f32[8] all-gather-done((f32[4], f32[8]) %ag)",
            "%rs = f32[2] reduce-scatter(f32[8] %c), dimensions={0}",
            "%cp = f32[8] collective-permute(f32[8] %d), source_target_pairs={{0,1}}",
            "%x = f32[8] add(f32[8] %all-reduce.1, f32[8] %d)",
        ]
    )
    assert plan.count_collectives(hlo) == {
        "all-reduce": 1,
        "all-gather": 1,
        "reduce-scatter": 1,
        "all-to-all": 0,
        "collective-permute": 1,
    }


def test_largest_batch_that_fits_a_budget(eight_devices, small_plan):
    cfg = small_resnet()
    plans, best = plan.largest_fitting_batch(cfg, [4, 16], budget_bytes=2**62)
    assert [p.per_device_batch for p in plans] == [4, 16] and best == 16
    plans = [plans[0], small_plan, plans[1]]  # small_plan: 8 per device
    peaks = [p.peak_bytes for p in plans]
    assert peaks[0] < peaks[1] < peaks[2]
    assert plan.largest_within(plans, (peaks[1] + peaks[2]) // 2) == 8
    assert plan.largest_within(plans, peaks[0] - 1) is None
    with pytest.raises(ValueError, match="per-device batch 6 must be a positive multiple"):
        plan.with_per_device_batch(
            load("imagenet_resnet50_lars.py:runlocal", "micro_batches=4"), 6, 8
        )


def test_cli_plan_in_process_and_in_a_fresh_process(eight_devices, small_plan, tmp_path, capsys):
    config = str(CONFIGS / "imagenet_resnet50_lars.py") + ":runlocal"
    out8 = tmp_path / "plan8.json"
    assert (
        cli.main(
            [
                "plan",
                "--config",
                config,
                "--devices",
                "8",
                "--mesh",
                "data=2,fsdp=4",
                "--json",
                str(out8),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "peak (args + out - alias + temp)" in printed and "all-gather" in printed
    got = json.loads(out8.read_text())
    assert got["peak_bytes"] == small_plan.peak_bytes and got["mesh"] == small_plan.mesh

    # 4 devices != the 8 this process started with: the CLI re-runs itself with XLA_FLAGS set.
    out4 = tmp_path / "plan4.json"
    assert cli.main(["plan", "--config", config, "--devices", "4", "--json", str(out4)]) == 0
    got4 = json.loads(out4.read_text())
    assert got4["devices"] == 4 and got4["mesh"] == {
        "data": 4,
        "fsdp": 1,
        "context": 1,
        "tensor": 1,
    }
    assert got4["per_device_batch"] == 16


def test_parse_bytes():
    assert plan.parse_bytes("16GiB") == 16 * 2**30
    assert plan.parse_bytes("1.5 GB") == 1_500_000_000
    assert plan.parse_bytes("512mib") == 512 * 2**20
    assert plan.parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="memory size '16 gigs'"):
        plan.parse_bytes("16 gigs")


def test_example_shapes_without_data():
    cfg = load("bert_lamb.py:phase2")
    got = {k: (v.shape, str(v.dtype)) for k, v in shapes.example_shapes(cfg).items()}
    assert got == {
        "input_ids": ((512,), "int32"),
        "masked_lm_positions": ((80,), "int32"),
        "masked_lm_ids": ((80,), "int32"),
        "masked_lm_weights": ((80,), "float32"),
    }
    cfg = load("imagenet_resnet50_lars.py", "dataset.name=npz")
    with pytest.raises(ValueError, match="config.dataset.name='npz' has no shape function"):
        shapes.example_shapes(cfg)
    cfg = load("siglip_pod.py")
    cfg.dataset.options.crop = 3
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['crop'\].*'image_text'"):
        shapes.example_shapes(cfg)


def _bert_large_params(vocab, width, depth, mlp, max_len):
    """BERT-Large parameter count from its dimensions (Devlin et al. 2019, Appendix A.2)."""
    attention = 4 * (width * width + width)
    feed_forward = width * mlp + mlp + mlp * width + width
    layer = attention + feed_forward + 2 * 2 * width
    embeddings = vocab * width + max_len * width + 2 * width
    head = width * width + width + 2 * width + vocab
    return depth * layer + embeddings + head


def _vit_b16_params(image, patch, width, depth, mlp):
    layer = 4 * (width * width + width) + width * mlp + mlp + mlp * width + width + 4 * width
    tokens = (image // patch) ** 2
    return patch * patch * 3 * width + width + tokens * width + depth * layer + 2 * width


@pytest.mark.parametrize("name", POD_CONFIGS)
def test_pod_configs_validate_and_build_at_full_size(eight_devices, name):
    cfg = load(name)  # validated on load
    assert cfg.batch_size in (32768, 65536)
    run, state, batch = plan.build_abstract(cfg)  # nothing allocated, 8 devices, data=8
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(run.abstract_state.params))
    if name.startswith("imagenet"):
        assert count == 25_557_032  # ResNet-50 (He et al. 2016), as torchvision counts it
        assert cfg.optimizer.name == "lars" and cfg.loss.label_smoothing == 0.1
    elif name.startswith("bert"):
        assert count == _bert_large_params(30528, 1024, 24, 4096, 512)
        assert 330e6 < count < 340e6
        seq = 128 if name.endswith("phase1") else 512
        assert batch["input_ids"].shape == (cfg.batch_size, seq)
    else:
        vit = _vit_b16_params(224, 16, 768, 12, 3072)
        assert 85e6 < vit < 87e6
        towers = run.abstract_state.params
        vit_count = sum(math.prod(x.shape) for x in jax.tree.leaves(towers["x_encoder"]))
        assert vit_count == vit
        assert cfg.loss.kind == "sigmoid" and cfg.loss.implementation == "auto"
    assert batch[run.task.fields[0]].sharding == run.batch_sharding


@pytest.mark.parametrize("name", ["bert_lamb.py:runlocal", "siglip_pod.py:runlocal"])
def test_pod_configs_plan_scaled_down(eight_devices, name):
    p = plan.plan(load(name, "mesh.data=2", "mesh.fsdp=4"))
    assert p.mesh == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    assert p.per_device_batch == 8 and p.flops > 0 and p.temp_bytes > 0
    assert p.collectives["all-gather"] > 0  # fsdp gathers the sharded parameters


def test_flops_count_every_layer_and_every_micro_batch(eight_devices):
    """XLA counts a loop body once; the planner unrolls layers and micro-batches to count all."""
    flops = {
        (mb, scan): plan.step_flops(
            load(
                "bert_lamb.py:runlocal",
                "mesh.data=8",
                f"micro_batches={mb}",
                f"model.scan_layers={scan}",
            )
        )
        for mb, scan in ((1, True), (2, True), (1, False))
    }
    assert flops[(2, True)] == pytest.approx(flops[(1, True)], rel=0.02)
    assert flops[(1, True)] == pytest.approx(flops[(1, False)], rel=1e-6)
    # Lower bound from the matmuls alone (forward 2·m·n·k, backward twice that): batch 64,
    # length 32, width 32, mlp 64, 2 layers; 5 predictions over a 512 vocabulary.
    tokens, width, mlp, depth, length = 64 * 32, 32, 64, 2, 32
    per_token_layer = 2 * (4 * width * width + 2 * width * mlp) + 2 * 2 * length * width
    head = 64 * 5 * 2 * (width * width + width * 512)
    matmuls = 3 * (tokens * depth * per_token_layer + head)
    assert matmuls <= flops[(1, True)] <= 1.3 * matmuls
