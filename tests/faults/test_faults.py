"""Faults on real ``jaxbatch train`` subprocesses, compared bitwise with an uninterrupted run.

One run directory goes through every fault in turn (``_harness``): the run injects NaN gradients
at batch position 3 (skipped and counted) and a loss spike at position 7 (rolled back); it is
stopped by SIGTERM mid-run (exit 0, checkpoint of the interrupted step), resumed and killed with
SIGKILL at ``KILLS`` points drawn with a fixed seed (while a checkpoint is being written, right
after one was committed, at a random moment between), its newest checkpoint is then truncated,
and the last launch reports it in one line, keeps it aside, resumes from the older one and
finishes. Its final checkpoint must equal, bit for bit, that of the same command run without
interruption (another subprocess: same device count, same XLA flags, same compiled programs):
params, optimizer state, EMA, model state, the guard's counters, noise statistics, rng and step.
The 8-device (2×4×1 mesh) and two-process variants are one SIGTERM each;
``scripts/fault_table.py`` runs the larger matrix (ten SIGKILLs).

The subprocesses inherit the test session's persistent compilation cache (tests/conftest.py):
the reference compiles, the later launches load its programs.
"""

from __future__ import annotations

import json
import random
import re
import signal
import time

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
KILLS = 3  # SIGKILLs in the shared scenario (each is one more process start)
PREEMPTED = re.compile(r"preempted \(SIGTERM\): saved the checkpoint of step (\d+)")


def _records(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def _newest(launch) -> int:
    return max(h.committed(launch.checkpoints), default=0)


def _scenario(workdir, rng: random.Random) -> dict:
    """One run directory through SIGTERM, ``KILLS`` SIGKILLs and a truncated checkpoint."""
    out = {"workdir": workdir}

    # 1. SIGTERM once the spike's rollback (at step 8) is behind us.
    term_after = rng.choice([10, 12])
    launch = h.Launch(workdir)
    launch.wait_until(lambda: _newest(launch) >= term_after, "checkpoint before SIGTERM")
    launch.signal(signal.SIGTERM)
    out["term_rc"], out["term_log"] = launch.finish(), launch.log
    out["term_steps"] = h.committed(launch.checkpoints)

    # 2. SIGKILL at KILLS points: during a save, after a commit, at a random moment.
    start = out["term_steps"][-1] if out["term_steps"] else 0
    points = sorted(rng.sample(range(start + 2, h.STEPS - 2, 2), KILLS))
    modes = ["during a save", "after a commit", "at a random moment"]
    out["kills"] = []
    for i, at in enumerate(points):
        mode = modes[i % len(modes)]
        stale = set(h.in_flight(workdir / "checkpoints"))  # left by an earlier kill
        launch = h.Launch(workdir)
        if mode == "during a save":
            hit = launch.wait_until(
                lambda at=at, launch=launch, stale=stale: any(
                    int(n.split(".")[0]) >= at for n in set(h.in_flight(launch.checkpoints)) - stale
                ),
                "save in flight",
            )
        else:
            hit = launch.wait_until(lambda at=at, launch=launch: _newest(launch) >= at, "commit")
            if mode == "at a random moment":
                time.sleep(rng.uniform(0.0, 0.5))
        launch.kill()
        rc = launch.finish()
        tmp = sorted(set(h.in_flight(launch.checkpoints)) - stale)  # an interrupted write
        out["kills"].append(dict(mode=mode, at=at, hit=hit, rc=rc, tmp=tmp, log=launch.log))

    # 3. Damage the newest checkpoint; the last launch must fall back and finish.
    out["truncated"] = h.truncate_newest(workdir / "checkpoints")
    launch = h.Launch(workdir)
    out["last_rc"], out["last_log"] = launch.finish(), launch.log
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted reference and the interrupted scenario, both on one device."""
    root = tmp_path_factory.mktemp("faults")
    reference = h.Launch(root / "reference")
    # Let the reference compile first: the scenario's launches then load the programs.
    reference.wait_until(lambda: _newest(reference) >= 4, "reference checkpoint")
    try:
        out = _scenario(root / "run", random.Random(SEED))
    finally:
        out_rc = reference.finish()
    assert out_rc == 0, reference.log[-3000:]
    out["reference"] = root / "reference"
    return out


def test_sigterm_saves_the_interrupted_step_and_exits_zero(runs):
    assert runs["term_rc"] == 0, runs["term_log"][-3000:]
    found = PREEMPTED.findall(runs["term_log"])
    assert len(found) == 1, runs["term_log"][-3000:]
    saved = int(found[0])
    assert runs["term_steps"][-1] == saved < h.STEPS  # the newest checkpoint is that step
    assert "Traceback" not in runs["term_log"]


def test_sigkill_at_random_points_then_resume(runs):
    for kill in runs["kills"]:
        assert kill["hit"], f"the run ended before the kill {kill['mode']} at step {kill['at']}"
        assert kill["rc"] == -signal.SIGKILL, kill["log"][-2000:]
        if kill["mode"] == "during a save":
            assert kill["tmp"], "the kill did not land while a checkpoint was being written"
    resumed = [k["log"] for k in runs["kills"][1:]] + [runs["last_log"]]
    assert all("resumed from checkpoint at step" in log for log in resumed)
    assert runs["last_rc"] == 0, runs["last_log"][-3000:]
    checkpoints = runs["workdir"] / "checkpoints"
    assert not h.in_flight(checkpoints), "tmp directories of killed saves were not cleaned up"
    assert h.committed(checkpoints)[-1] == h.STEPS


def test_truncated_checkpoint_is_set_aside_and_an_older_one_used(runs):
    step = runs["truncated"]
    log = runs["last_log"]
    lines = [line for line in log.splitlines() if f"checkpoint {step} is damaged" in line]
    assert len(lines) == 1, log[-3000:]
    assert "tensorstore_spec" not in log and len(lines[0]) < 600
    assert "Traceback" not in log
    aside = runs["workdir"] / ("checkpoints" + ckpt.DAMAGED_SUFFIX) / str(step)
    assert aside.is_dir() and any(aside.rglob("*")), "the damaged step was not kept"
    older = max(s for s in h.committed(runs["workdir"] / "checkpoints") if s < step)
    assert f"resuming from the newest intact checkpoint, step {older}" in log


def test_nan_gradients_are_skipped_and_counted(runs):
    train = [r for r in _records(runs["workdir"]) if r["kind"] == "train"]
    first = next(r for r in train if r["step"] >= h.NAN_AT)
    assert first["skipped_steps"] >= 1
    assert all(np.isfinite(r["loss"]) for r in train)  # the NaN never reached the params


def test_loss_spike_rolls_back_and_the_run_completes(runs):
    faults = [r for r in _records(runs["workdir"]) if r["kind"] == "fault"]
    assert len(faults) == 1 and "loss spike" in faults[0]["reason"]
    assert faults[0]["lr_scale"] == pytest.approx(0.5)
    assert "rolled back to step" in runs["term_log"]
    summary = json.loads((runs["workdir"] / "summary.json").read_text())
    reference = json.loads((runs["reference"] / "summary.json").read_text())
    assert summary["step"] == h.STEPS and summary["rollbacks"] == reference["rollbacks"] == 1
    assert summary["skipped_steps"] == reference["skipped_steps"] >= 2  # the NaN + the spike


def test_interrupted_run_ends_bitwise_equal_to_the_uninterrupted_one(runs):
    a, b = h.final_state(runs["workdir"]), h.final_state(runs["reference"])
    assert any(k.startswith("['ema_state']") for k in a) and any("opt_state" in k for k in a)
    assert h.bitwise_differences(a, b) == []


def test_eight_devices_2x4x1_sigterm_resume_bitwise(tmp_path):
    mesh = ("mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1")
    cfg = h.config(*mesh)
    # In this process (8 devices, the subprocess's XLA flags): the launch loads its programs.
    straight = loop.train(cfg, str(tmp_path / "straight"), progress=False)
    assert straight["step"] == h.STEPS
    workdir = tmp_path / "run"
    launch = h.Launch(workdir, *mesh, devices=8)
    launch.wait_until(lambda: _newest(launch) >= 10, "checkpoint before SIGTERM")
    launch.signal(signal.SIGTERM)
    assert launch.finish() == 0, launch.log[-3000:]
    found = PREEMPTED.findall(launch.log)
    assert found and int(found[0]) == h.committed(launch.checkpoints)[-1] < h.STEPS
    resumed = loop.train(cfg, str(workdir), progress=False)
    assert resumed["step"] == h.STEPS
    a, b = h.final_state(workdir), h.final_state(tmp_path / "straight")
    assert h.bitwise_differences(a, b) == []


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
        first.wait_until(lambda: _newest(first) >= 4, "checkpoint before SIGTERM")
        launches[1].signal(signal.SIGTERM)
        codes = [launch.finish() for launch in launches]
    finally:
        for launch in launches:
            launch.kill()
    assert codes == [0, 0], "\n".join(launch.log[-2000:] for launch in launches)
    saved = h.committed(workdir / "checkpoints")[-1]
    assert saved < h.STEPS
    found = PREEMPTED.findall(launches[0].log)
    assert found == [str(saved)], launches[0].log[-2000:]


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
