"""Faults on real ``jaxbatch train`` subprocesses, compared bitwise with an uninterrupted run.

One run directory goes through every fault in turn (``_harness``): the run injects NaN gradients
at batch position 3 (skipped and counted) and a loss spike at position 7 (rolled back); it is
stopped by SIGTERM mid-run (exit 0, checkpoint of the interrupted step), resumed and killed with
SIGKILL while a checkpoint is being written and again after one was committed, at points drawn
with a fixed seed; its newest checkpoint is then truncated, and the last launch reports it in one
line, keeps it aside, resumes from the older one and finishes. Params, optimizer state and EMA must
equal those of the same config trained without interruption in this process, bit for bit. The
scenario runs on one device; the 8-device (2×4×1 mesh) and two-process variants are one SIGTERM
each. ``scripts/fault_table.py`` runs the larger matrix.
"""

from __future__ import annotations

import json
import random
import signal

import jax
import numpy as np
import pytest

from jaxbatch.train import checkpoint as ckpt
from jaxbatch.train import loop


def _load_harness():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("_harness.py")
    spec = importlib.util.spec_from_file_location("_faults_harness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


h = _load_harness()
SEED = 13
# Written, not yet run end to end (the machine was saturated); enable once it passes.
pytestmark = pytest.mark.skip(reason="issue 13 fault scenarios: not yet run, see the report")


def _records(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def _assert_bitwise(a, b):
    for name in ("params", "opt_state", "ema_state", "model_state", "step"):
        jax.tree.map(
            np.testing.assert_array_equal,
            jax.device_get(getattr(a, name)),
            jax.device_get(getattr(b, name)),
        )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same config, uninterrupted, in this process on one device."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    summary = loop.train(h.config(), str(workdir), progress=False, devices=jax.devices()[:1])
    return workdir, summary


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """One run directory through SIGTERM, two SIGKILLs and a truncated checkpoint."""
    rng = random.Random(SEED)
    workdir = tmp_path_factory.mktemp("faults") / "run"
    out = {"workdir": workdir}

    # 1. SIGTERM once the spike's rollback is behind us (a checkpoint >= 10 committed).
    term_after = rng.choice([10, 12])
    launch = h.Launch(workdir)
    launch.wait_until(lambda: max(h.committed(launch.checkpoints), default=0) >= term_after, "ckpt")
    launch.signal(signal.SIGTERM)
    out["term_rc"], out["term_log"] = launch.finish(), launch.log
    out["term_steps"] = h.committed(launch.checkpoints)

    # 2. SIGKILL while a checkpoint is in flight, 3. SIGKILL right after one committed.
    kill_at = sorted(rng.sample(range(out["term_steps"][-1] + 2, h.STEPS - 4, 2), 2))
    out["kills"] = []
    for mode, at in zip(("during a save", "after a commit"), kill_at, strict=True):
        launch = h.Launch(workdir)
        if mode == "during a save":
            hit = launch.wait_until(
                lambda at=at, launch=launch: (
                    any(n.startswith(f"{at}.") for n in h.in_flight(launch.checkpoints))
                    or max(h.committed(launch.checkpoints), default=0) >= at
                ),
                "save in flight",
            )
        else:
            hit = launch.wait_until(
                lambda at=at, launch=launch: max(h.committed(launch.checkpoints), default=0) >= at,
                "commit",
            )
        launch.kill()
        rc = launch.finish()
        out["kills"].append((mode, at, hit, rc, h.in_flight(launch.checkpoints)))

    # 4. Damage the newest checkpoint; the last launch must fall back and finish.
    out["truncated"] = h.truncate_newest(workdir / "checkpoints")
    launch = h.Launch(workdir)
    out["last_rc"], out["last_log"] = launch.finish(), launch.log
    return out


def test_sigterm_saves_the_interrupted_step_and_exits_zero(scenario):
    assert scenario["term_rc"] == 0, scenario["term_log"][-3000:]
    saved = scenario["term_steps"][-1]
    assert f"preempted (SIGTERM): saved the checkpoint of step {saved}" in scenario["term_log"]
    assert saved < h.STEPS


def test_sigkill_at_random_points_then_resume(scenario):
    for mode, at, hit, rc, _ in scenario["kills"]:
        assert hit, f"the run ended before the kill {mode} at step {at}"
        assert rc == -signal.SIGKILL
    assert scenario["last_rc"] == 0, scenario["last_log"][-3000:]
    checkpoints = scenario["workdir"] / "checkpoints"
    assert not h.in_flight(checkpoints), "tmp directories of killed saves were not cleaned up"
    assert h.committed(checkpoints)[-1] == h.STEPS


def test_truncated_checkpoint_is_set_aside_and_an_older_one_used(scenario):
    step = scenario["truncated"]
    log = scenario["last_log"]
    lines = [line for line in log.splitlines() if f"checkpoint {step} is damaged" in line]
    assert len(lines) == 1, log[-3000:]
    assert "tensorstore_spec" not in log and len(lines[0]) < 600
    aside = scenario["workdir"] / ("checkpoints" + ckpt.DAMAGED_SUFFIX) / str(step)
    assert aside.is_dir() and any(aside.rglob("*")), "the damaged step was not kept"
    assert "resuming from the newest intact checkpoint" in log


def test_nan_gradients_are_skipped_and_counted(scenario):
    train = [r for r in _records(scenario["workdir"]) if r["kind"] == "train"]
    first = next(r for r in train if r["step"] >= h.NAN_AT)
    assert first["skipped_steps"] >= 1
    assert all(np.isfinite(r["loss"]) for r in train if r["step"] % 2 == 0)


def test_loss_spike_rolls_back_and_the_run_completes(scenario, reference):
    faults = [r for r in _records(scenario["workdir"]) if r["kind"] == "fault"]
    assert faults and "loss spike" in faults[0]["reason"]
    assert faults[0]["lr_scale"] == pytest.approx(0.5)
    assert "rolled back to step" in scenario["term_log"]
    summary = json.loads((scenario["workdir"] / "summary.json").read_text())
    assert summary["step"] == h.STEPS and summary["rollbacks"] == 1
    assert summary["skipped_steps"] == reference[1]["skipped_steps"] >= 2  # the NaN + the spike


def test_interrupted_run_ends_bitwise_equal_to_the_uninterrupted_one(scenario, reference):
    cfg = h.config()
    resumed = loop.train(cfg, str(scenario["workdir"]), progress=False, devices=jax.devices()[:1])
    assert resumed["step"] == h.STEPS  # nothing left to train: restored from the last checkpoint
    _assert_bitwise(resumed["state"], reference[1]["state"])


def test_eight_devices_2x4x1_sigterm_resume_bitwise(tmp_path):
    mesh = ("mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1")
    workdir = tmp_path / "run"
    launch = h.Launch(workdir, *mesh, devices=8)
    launch.wait_until(lambda: max(h.committed(launch.checkpoints), default=0) >= 10, "ckpt")
    launch.signal(signal.SIGTERM)
    assert launch.finish() == 0, launch.log[-3000:]
    assert "preempted (SIGTERM)" in launch.log
    cfg = h.config(*mesh)
    resumed = loop.train(cfg, str(workdir), progress=False)
    straight = loop.train(cfg, str(tmp_path / "straight"), progress=False)
    assert resumed["step"] == straight["step"] == h.STEPS
    _assert_bitwise(resumed["state"], straight["state"])


@pytest.mark.multiprocess
def test_two_process_gloo_sigterm_saves_the_agreed_step(tmp_path):
    """SIGTERM to one process of two: both save the same step (JAX's preemption sync point)."""
    from jaxbatch.parallel import local_cluster

    workdir = tmp_path / "run"
    port = local_cluster.free_port()
    launches = [
        h.Launch(workdir, devices=2, cluster=h.cluster_env(pid, 2, port)) for pid in range(2)
    ]
    try:
        first = launches[0]
        first.wait_until(lambda: max(h.committed(first.checkpoints), default=0) >= 4, "ckpt")
        launches[1].signal(signal.SIGTERM)
        codes = [launch.finish() for launch in launches]
    finally:
        for launch in launches:
            launch.kill()
    assert codes == [0, 0], "\n".join(launch.log[-2000:] for launch in launches)
    saved = h.committed(workdir / "checkpoints")[-1]
    assert saved < h.STEPS
    assert f"preempted (SIGTERM): saved the checkpoint of step {saved}" in launches[0].log


def test_a_nan_step_leaves_params_opt_state_and_ema_unchanged():
    run = loop.build(h.config(), devices=jax.devices()[:1])
    state, _ = loop.init_or_restore(run, None)
    from jaxbatch import data as jdata
    from jaxbatch import parallel
    from jaxbatch.train import faults

    split = jdata.load_split("digits", "train").select(run.task.fields)
    batch = parallel.make_global_batch(next(split.train_iterator(batch_size=64, seed=0)), run.mesh)
    before = jax.device_get(state)
    nan = faults.replicated_scalar(float("nan"), np.float32, state.step)
    after, metrics = run.injected_step(state, batch, nan)
    after, metrics = jax.device_get((after, metrics))
    for name in ("params", "opt_state", "ema_state", "model_state", "noise"):
        jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))
    assert int(after.step) == 1 and int(after.guard.skipped) == 1
    assert metrics["skipped_steps"] == 1 and metrics["consecutive_skips"] == 1
