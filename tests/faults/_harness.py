"""Real ``jaxbatch train`` subprocesses for the fault tests and ``scripts/fault_table.py``.

A run is the digits/ResNet/LARS runlocal config shrunk further (one stage of 4 filters, batch 64,
a checkpoint every 2 steps) with a model EMA, spike detection on, and injected faults: NaN
gradients at batch position 3 and a loss spike at position 7. A subprocess is watched through its
checkpoint directory (orbax writes ``<step>.orbax-checkpoint-tmp-*`` while a save is in flight
and renames it to ``<step>`` on commit) and signalled at chosen moments.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = f"{ROOT / 'configs' / 'digits_resnet_lars.py'}:runlocal"
STEPS = 24
NAN_AT = 3
SPIKE_AT = 7
OVERRIDES = (
    "batch_size=64",
    "reference_batch_size=64",
    f"total_samples={64 * STEPS}",
    "schedule.warmup_samples=64",
    "model.stage_sizes=(1,)",
    "model.num_filters=4",
    "eval_batch_size=360",
    "log_every_steps=2",
    "checkpoint_every_steps=2",
    "max_checkpoints=3",
    "ema.decay=0.9",
    "faults.spike_factor=3.0",
    "faults.spike_warmup_steps=2",
    f"faults.inject_nan_at=({NAN_AT},)",
    f"faults.inject_spike_at=({SPIKE_AT},)",
)
TIMEOUT_S = 300


def config(*extra: str):
    from jaxbatch.train import config as config_lib

    return config_lib.load_config(CONFIG, [*OVERRIDES, *extra])


def command(workdir: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "jaxbatch.train.cli", "train", "--config", CONFIG]
    cmd += ["--workdir", str(workdir), "--no-progress"]
    return cmd + [f"--config.{o}" for o in (*OVERRIDES, *extra)]


def env(devices: int) -> dict[str, str]:
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}


def committed(checkpoints: Path) -> list[int]:
    names = [p.name for p in checkpoints.iterdir()] if checkpoints.exists() else []
    return sorted(int(n) for n in names if n.isdigit())


def in_flight(checkpoints: Path) -> list[str]:
    names = [p.name for p in checkpoints.iterdir()] if checkpoints.exists() else []
    return [n for n in names if "tmp" in n]


class Launch:
    """One ``jaxbatch train`` process; ``log`` is its combined output once it has ended."""

    def __init__(self, workdir: Path, *extra: str, devices: int = 1, cluster: dict | None = None):
        self.workdir = Path(workdir)
        self.checkpoints = self.workdir / "checkpoints"
        self.proc = subprocess.Popen(
            command(self.workdir, *extra),
            env={**env(devices), **(cluster or {})},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.log = ""

    def wait_until(self, predicate, what: str) -> bool:
        """Polls ``predicate()`` until True (returns True) or the process ends (False)."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.01)
        self.kill()
        raise TimeoutError(f"{what}: not reached in {TIMEOUT_S} s")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def finish(self) -> int:
        self.log, _ = self.proc.communicate(timeout=TIMEOUT_S)
        return self.proc.returncode


def cluster_env(process_id: int, num_processes: int, port: int) -> dict[str, str]:
    """The variables ``jaxbatch.parallel.initialize`` reads to join a localhost cluster."""
    return {
        "JAXBATCH_COORDINATOR": f"127.0.0.1:{port}",
        "JAXBATCH_NUM_PROCESSES": str(num_processes),
        "JAXBATCH_PROCESS_ID": str(process_id),
    }


def truncate_newest(checkpoints: Path) -> int:
    """Truncates every array file of the newest committed checkpoint to half; returns its step."""
    step = committed(checkpoints)[-1]
    state = checkpoints / str(step) / "state"
    for root, _, names in os.walk(state):
        for name in names:
            path = Path(root) / name
            if name.startswith("_") or name.endswith(".json"):
                continue  # keep orbax's metadata; damage the data files
            size = path.stat().st_size
            with open(path, "r+b") as f:
                f.truncate(size // 2)
    return step


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def final_state(workdir: Path) -> dict:
    """Every array of the train state in the newest committed checkpoint of ``workdir``, by path
    (params, optimizer state, EMA, model state, guard, noise statistics, rng, step), as NumPy.

    Read straight from the files (no model, no device placement), so runs on any mesh and in any
    process compare the same way."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    path = Path(workdir) / "checkpoints" / str(committed(Path(workdir) / "checkpoints")[-1])
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path / "state").item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(path / "state", restore_args=args)
    checkpointer.close()
    leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def bitwise_differences(a: dict, b: dict) -> list[str]:
    """Paths of :func:`final_state` trees whose arrays differ in dtype, shape or any bit."""
    out = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            out.append(key)
    return out
