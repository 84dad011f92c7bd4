"""A training process killed with SIGKILL after a checkpoint resumes to the uninterrupted result.

Unlike ``stop_after_step`` (a clean stop), the process here dies wherever it is, possibly in the
middle of an asynchronous orbax save; the restarted run must pick the last *complete* checkpoint
and, with the same data order, reach the parameters of a run that was never interrupted.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from jaxbatch.train import checkpoint as ckpt
from jaxbatch.train import config as config_lib
from jaxbatch.train import loop

CONFIG = "configs/stdlib_lm.py:runlocal"
OVERRIDES = ["total_samples=64000", "checkpoint_every_steps=1", "max_checkpoints=3"]


def test_sigkill_after_a_checkpoint_then_resume(tmp_path):
    workdir = tmp_path / "killed"
    env = dict(os.environ)  # conftest.py's XLA_FLAGS: 8 devices and the same compile flags
    cmd = [sys.executable, "-m", "jaxbatch.train.cli", "train", "--config", CONFIG]
    cmd += ["--workdir", str(workdir), "--no-progress", *(f"--config.{o}" for o in OVERRIDES)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = workdir / "checkpoints"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            names = [p.name for p in checkpoints.iterdir()] if checkpoints.exists() else []
            steps = [int(n) for n in names if n.isdigit()]  # finished saves, not '*-tmp' ones
            if steps and max(steps) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"trainer exited early:\n{proc.stderr.read().decode()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    cfg = config_lib.load_config(CONFIG, OVERRIDES)
    killed_at = ckpt.Checkpointer(str(checkpoints)).latest_step()
    assert killed_at is not None and killed_at >= 2
    target = killed_at + 3
    assert target < cfg.total_samples // cfg.batch_size, "the run must have been cut short"
    resumed = loop.train(cfg, str(workdir), progress=False, stop_after_step=target)
    straight = loop.train(cfg, str(tmp_path / "straight"), progress=False, stop_after_step=target)
    assert resumed["step"] == straight["step"] == target
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        jax.device_get(resumed["state"].params),
        jax.device_get(straight["state"].params),
    )
