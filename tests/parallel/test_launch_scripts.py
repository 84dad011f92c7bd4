"""scripts/launch_tpu_pod.sh and scripts/launch_slurm.sh: syntax, usage, validation, dry runs."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from jaxbatch import parallel

ROOT = Path(__file__).resolve().parents[2]
TPU = ROOT / "scripts" / "launch_tpu_pod.sh"
SLURM = ROOT / "scripts" / "launch_slurm.sh"
CONFIG = "configs/digits_resnet_lars.py"


def _run(script, *args):
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_syntax_help_and_executable(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    result = _run(script, "--help")
    assert result.returncode == 0 and result.stdout.startswith("Usage: scripts/")


@pytest.mark.parametrize(
    "script, args, message",
    [
        (TPU, ["--zone", "z", "--config", CONFIG], "missing --tpu NAME"),
        (TPU, ["--tpu", "t", "--zone", "z", "--config", "configs/nope.py"], "not found"),
        (TPU, ["--tpu", "t", "--zone", "z", "--config", CONFIG, "--bogus"], "unknown argument"),
        (SLURM, ["--gpus-per-node", "4", "--config", CONFIG], "missing --nodes N"),
        (SLURM, ["--nodes", "two", "--gpus-per-node", "4", "--config", CONFIG], "'two' must be"),
        (
            SLURM,
            ["--nodes", "2", "--gpus-per-node", "4", "--config", CONFIG, "--mode", "per-rack"],
            "--mode 'per-rack' must be per-gpu or per-node",
        ),
    ],
)
def test_bad_arguments_fail_with_a_message(script, args, message):
    result = _run(script, *args, "--dry-run")
    assert result.returncode == 2
    assert message in result.stderr
    assert "gcloud" not in result.stdout and "srun" not in result.stdout


def test_tpu_pod_dry_run():
    result = _run(
        TPU, "--tpu", "pod-256", "--zone", "us-central2-b", "--project", "proj",
        "--config", CONFIG, "--workdir", "gs://bucket/run 1", "--dry-run",
        "--", "--config.batch_size=32768",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines()]
    assert all(line.startswith("+ ") for line in result.stdout.splitlines())
    where = ["--worker=all", "--zone", "us-central2-b", "--project", "proj"]
    assert commands[0][:4] == ["git", "-C", str(ROOT), "archive"]
    assert commands[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert commands[1][-5:] == where
    install, train = commands[2], commands[4]
    assert install[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-256"]
    assert install[6:11] == where and "pip install" in install[11]
    assert train[:11] == install[:11]
    remote = train[11].removeprefix("--command=")
    assert shlex.split(remote) == [
        "cd", "~/jaxbatch", "&&", ".venv/bin/jaxbatch", "train", "--config", CONFIG,
        "--workdir", "gs://bucket/run 1", "--config.batch_size=32768",
    ]  # fmt: skip
    skip = _run(TPU, "--tpu", "t", "--zone", "z", "--config", CONFIG, "--skip-install", "--dry-run")
    assert len(skip.stdout.splitlines()) == 1 and "jaxbatch train" in skip.stdout


@pytest.mark.parametrize("mode, tasks_per_node", [("per-gpu", 4), ("per-node", 1)])
def test_slurm_dry_run(tmp_path, mode, tasks_per_node):
    result = _run(
        SLURM, "--nodes", "2", "--gpus-per-node", "4", "--mode", mode, "--config", CONFIG,
        "--workdir", str(tmp_path), "--partition", "gpu", "--port", "7001", "--dry-run",
        "--", "--config.batch_size=4096",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    header = {line for line in lines if line.startswith("#SBATCH")}
    assert {
        "#SBATCH --nodes=2",
        f"#SBATCH --ntasks-per-node={tasks_per_node}",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        f"#SBATCH --output={tmp_path}/slurm-%j.out",
    } <= header
    assert "export JAXBATCH_COORDINATOR_PORT=7001" in lines
    srun = shlex.split(next(line for line in lines if line.startswith("srun ")))
    assert srun[srun.index(str(ROOT / ".venv/bin/jaxbatch")) :] == [
        str(ROOT / ".venv/bin/jaxbatch"), "train", "--config", CONFIG,
        "--workdir", str(tmp_path), "--config.batch_size=4096",
    ]  # fmt: skip
    # The environment srun gives each task makes initialize() start the right cluster.
    env = {
        "SLURM_JOB_ID": "99",
        "SLURM_NTASKS": str(2 * tasks_per_node),
        "SLURM_PROCID": str(2 * tasks_per_node - 1),
        "SLURM_LOCALID": str(tasks_per_node - 1),
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_STEP_NODELIST": "gpu[01-02]",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3",
        "JAXBATCH_COORDINATOR_PORT": "7001",
    }
    info = parallel.detect_cluster(env)
    assert info.coordinator_address == "gpu01:7001"
    assert info.num_processes == 2 * tasks_per_node
    assert info.local_device_ids == ((3,) if mode == "per-gpu" else None)
