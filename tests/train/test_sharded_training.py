"""Sharded training on 8 simulated devices: every mesh trains to the same result.

The same tiny digits / CIFAR-ResNet / LARS + EMA config (two micro-batches per step) is trained for
three steps by the trainer's own pieces (``loop.build``, ``loop.init_or_restore``, the grain
iterator, ``make_global_batch``) on the meshes data×fsdp×tensor = 1×1×1, 8×1×1, 2×4×1, 4×1×2 and
1×8×1. Loss curves and final parameters, optimizer state and EMA must agree with the one-device
run; the per-device bytes, read from the arrays' addressable shards, must fall with fsdp.
"""

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch import data as jdata
from jaxbatch import parallel
from jaxbatch.train import config as config_lib
from jaxbatch.train import loop
from jaxbatch.train import optimizer as optimizer_lib

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits_resnet_lars.py"
STEPS = 3
MESHES = ((1, 1, 1), (8, 1, 1), (2, 4, 1), (4, 1, 2), (1, 8, 1))
OVERRIDES = (
    "batch_size=64",
    "reference_batch_size=64",
    f"total_samples={64 * STEPS}",
    "micro_batches=2",
    "schedule.warmup_samples=64",
    "model.stage_sizes=(1,)",
    "model.num_filters=8",
    "eval_batch_size=360",
    "log_every_steps=1",
    "ema.decay=0.9",
)


def make_config(mesh=(8, 1, 1), *extra: str):
    data, fsdp, tensor = mesh
    mesh_keys = (f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}")
    return config_lib.load_config(f"{CONFIG}:runlocal", [*OVERRIDES, *mesh_keys, *extra])


def mesh_devices(mesh, devices):
    return devices[: int(np.prod(mesh))]


def per_device_bytes(tree) -> int:
    """Largest number of bytes any one device holds, summed from the arrays' own shards."""
    held: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


@pytest.fixture(scope="module")
def train_arrays():
    return jdata.load_arrays("digits", "train")


@pytest.fixture(scope="module")
def trajectories(eight_devices, train_arrays):
    """mesh → {'losses', 'state' (on device), 'host' (NumPy copy of the state)}."""
    out = {}
    for mesh in MESHES:
        cfg = make_config(mesh)
        run = loop.build(cfg, train_data=train_arrays, devices=mesh_devices(mesh, eight_devices))
        state, _ = loop.init_or_restore(run, None)
        it = jdata.make_train_iterator(
            {f: train_arrays[f] for f in run.task.fields}, batch_size=cfg.batch_size, seed=cfg.seed
        )
        losses = []
        with jax.transfer_guard("disallow"):  # no stray host<->device copies inside the loop
            for _ in range(STEPS):
                batch = parallel.make_global_batch(next(it), run.mesh)
                state, metrics = run.train_step(state, batch)
                losses.append(metrics["loss"])
        out[mesh] = {
            "run": run,
            "losses": np.asarray(jax.device_get(losses)),
            "state": state,
            "host": jax.device_get(state),
        }
    return out


def test_every_mesh_gives_the_same_loss_curve_and_final_state(trajectories):
    ref = trajectories[(1, 1, 1)]
    assert ref["losses"].shape == (STEPS,) and np.all(np.isfinite(ref["losses"]))
    assert not np.allclose(ref["losses"][0], ref["losses"][-1])  # it trained
    for mesh in MESHES[1:]:
        got = trajectories[mesh]
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, err_msg=str(mesh))
        for part in ("params", "model_state", "opt_state", "ema_state"):
            chex.assert_trees_all_close(
                getattr(got["host"], part), getattr(ref["host"], part), rtol=1e-4, atol=1e-6
            )


def test_params_and_optimizer_state_are_sharded_along_fsdp(trajectories):
    bytes_ = {
        mesh: {
            part: per_device_bytes(getattr(t["state"], part))
            for part in ("params", "opt_state", "ema_state")
        }
        for mesh, t in trajectories.items()
    }
    for part in ("params", "opt_state", "ema_state"):
        # Replicated on pure data parallelism; falls as fsdp grows (1 → 4 → 8).
        assert bytes_[(8, 1, 1)][part] == bytes_[(1, 1, 1)][part]
        assert bytes_[(1, 8, 1)][part] < bytes_[(2, 4, 1)][part] < bytes_[(8, 1, 1)][part]

    # Independent count for fsdp = 8: every kernel (conv [h, w, in, out] split on out; the head
    # [embed, vocab] split on embed) holds 1/8 per device, vectors (norms, biases) stay whole.
    params = trajectories[(1, 1, 1)]["host"].params
    leaves = jax.tree.leaves(params)
    expected = sum(x.nbytes // 8 if x.ndim >= 2 else x.nbytes for x in leaves)
    assert bytes_[(1, 8, 1)]["params"] == expected
    assert expected < sum(x.nbytes for x in leaves) / 2
    # The optimizer state mirrors the parameters (LARS momentum + the accumulated gradient).
    kernel = trajectories[(1, 8, 1)]["state"].params["conv_init"]["kernel"]
    assert kernel.sharding.spec[-1] == "fsdp"
    for leaf in jax.tree.leaves(trajectories[(1, 8, 1)]["state"].opt_state):
        if leaf.shape == kernel.shape:
            assert leaf.sharding.is_equivalent_to(kernel.sharding, leaf.ndim)
    # The planner's accounting (no arrays, only shapes and shardings) matches the real arrays.
    state = trajectories[(1, 8, 1)]["state"]
    assert parallel.bytes_per_device(state.params) == bytes_[(1, 8, 1)]["params"]


def test_activation_constraints_are_applied_inside_the_step(trajectories):
    run = trajectories[(2, 4, 1)]["run"]
    state = trajectories[(2, 4, 1)]["state"]
    batch = {
        f: jax.ShapeDtypeStruct((64, *s), d, sharding=run.batch_sharding)
        for f, s, d in (("image", (8, 8, 1), jnp.float32), ("label", (), jnp.int32))
    }
    text = run.train_step.lower(state, batch).as_text()
    # ResNet blocks constrain their outputs to ('batch', ..., 'conv_out') → batch over data×fsdp.
    constraints = [line for line in text.splitlines() if "sharding_constraint" in line]
    assert len(constraints) >= 3
    assert any('{"data", "fsdp"}' in line for line in constraints)


def test_optimizer_and_ema_updates_never_gather_sharded_leaves(trajectories):
    """LARS trust ratios and the EMA run on the shards: only scalar norms are all-reduced."""
    run = trajectories[(1, 8, 1)]["run"]
    state = trajectories[(1, 8, 1)]["state"]
    tx = optimizer_lib.make_inner_optimizer(run.cfg)
    ema = optimizer_lib.make_ema(run.cfg)
    param_sh = run.state_shardings.params
    opt_state = jax.jit(tx.init, out_shardings=None)(state.params)

    def update(grads, opt_state, params, ema_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        new_params = jax.tree.map(jnp.add, params, updates)
        _, ema_state = ema.update({"params": new_params, **state.model_state}, ema_state)
        return new_params, opt_state, ema_state

    compiled = (
        jax.jit(update, in_shardings=(param_sh, None, param_sh, run.state_shardings.ema_state))
        .lower(state.params, opt_state, state.params, state.ema_state)
        .compile()
    )
    hlo = compiled.as_text()
    assert "all-gather" not in hlo
    reduces = [line for line in hlo.splitlines() if " all-reduce(" in line]
    assert reduces  # the norms of sharded leaves are summed over the shards ...
    for line in reduces:  # ... as scalars only
        result_type = line.split("=", 1)[1].split("all-reduce(", 1)[0]
        assert "[]" in result_type and "[1" not in result_type and "[8" not in result_type, line


@pytest.mark.parametrize(
    "mesh, extra, pattern",
    [
        ((3, 1, 1), (), r"mesh data=3 × fsdp=1 × tensor=1 = 3 does not match 8 devices"),
        (
            (2, 4, 1),
            ("batch_size=36", "micro_batches=1", "reference_batch_size=36"),
            r"batch 36 is not divisible by data×fsdp = 8 \(data=2, fsdp=4\)",
        ),
        (
            (1, 8, 1),
            ("model.num_filters=12",),
            r"logical axis 'conv_out'\) has size 12, which mesh axis 'fsdp' of size 8 does not",
        ),
    ],
    ids=["mesh-vs-devices", "batch-vs-data-fsdp", "param-dim-vs-fsdp"],
)
def test_bad_sharding_input_fails_in_build_before_training(
    eight_devices, train_arrays, mesh, extra, pattern
):
    cfg = make_config(mesh, *extra)
    with pytest.raises(ValueError, match=pattern):
        loop.build(cfg, train_data=train_arrays, devices=eight_devices)


def test_checkpoint_resumes_on_a_different_mesh(eight_devices, trajectories, tmp_path):
    """Save sharded on 8×1×1, stop, resume on 2×4×1 (and on 4 devices): same final parameters."""
    workdir = str(tmp_path / "run")
    first = loop.train(make_config((8, 1, 1)), workdir, progress=False, stop_after_step=1)
    assert first["step"] == 1
    resumed = loop.train(
        make_config((2, 4, 1)), workdir, progress=False, stop_after_step=2, devices=eight_devices
    )
    assert resumed["step"] == 2
    kernel = resumed["state"].params["conv_init"]["kernel"]
    assert kernel.sharding.spec[-1] == "fsdp" and kernel.sharding.mesh.shape["fsdp"] == 4
    final = loop.train(make_config((1, 4, 1)), workdir, progress=False, devices=eight_devices[:4])
    assert final["step"] == STEPS
    chex.assert_trees_all_close(
        jax.device_get(final["state"].params),
        trajectories[(8, 1, 1)]["host"].params,
        rtol=1e-4,
        atol=1e-6,
    )
    chex.assert_trees_all_close(
        jax.device_get(final["state"].ema_state),
        trajectories[(8, 1, 1)]["host"].ema_state,
        rtol=1e-4,
        atol=1e-6,
    )
