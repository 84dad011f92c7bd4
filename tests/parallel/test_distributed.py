"""Cluster detection (pure, no cluster needed) and the single-process no-op."""

import jax
import pytest

from jaxbatch import parallel
from jaxbatch.parallel import DistributedInfo


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("gpu[008-011],login", ["gpu008", "gpu009", "gpu010", "gpu011", "login"]),
        ("n[9-11]", ["n9", "n10", "n11"]),
        ("a,b[2,5]", ["a", "b2", "b5"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("rack[1]-node[3-4].local", ["rack1-node3.local", "rack1-node4.local"]),
    ],
)
def test_parse_slurm_nodelist(nodelist, hosts):
    assert parallel.parse_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist, message",
    [
        ("node[01-04", "unbalanced '\\['"),
        ("node01]", "unbalanced '\\]'"),
        ("a,,b", "empty host entry"),
        ("n[4-2]", "range '4-2' runs backwards"),
        ("n[a-c]", "bad range 'a-c'"),
    ],
)
def test_parse_slurm_nodelist_errors(nodelist, message):
    with pytest.raises(ValueError, match=message):
        parallel.parse_slurm_nodelist(nodelist)


SLURM_PER_NODE = {  # 2 nodes × 1 task, the task sees all GPUs of its node
    "SLURM_JOB_ID": "123456",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NODELIST": "gpu[017-018]",
    "SLURM_JOB_NODELIST": "gpu[017-018],gpu020",
    "CUDA_VISIBLE_DEVICES": "0,1,2,3",
}


def test_detect_single_process():
    assert parallel.detect_cluster({}) == DistributedInfo("single", 0, 1)


def test_detect_env():
    env = {
        "JAXBATCH_COORDINATOR": "10.0.0.1:1234",
        "JAXBATCH_NUM_PROCESSES": "4",
        "JAXBATCH_PROCESS_ID": "3",
    }
    info = parallel.detect_cluster(env)
    assert info == DistributedInfo("env", 3, 4, "10.0.0.1:1234", None)
    assert info.initialize_kwargs() == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
        "local_device_ids": None,
        "cluster_detection_method": "deactivate",
    }
    info = parallel.detect_cluster({**env, "JAXBATCH_LOCAL_DEVICE_IDS": "0, 1"})
    assert info.local_device_ids == (0, 1)
    # The JAXBATCH_* variables win over SLURM's and over a TPU.
    assert parallel.detect_cluster({**SLURM_PER_NODE, **env}, tpu_vm=True).source == "env"
    # A single process requested explicitly: nothing to start, even on a TPU VM.
    single = {
        "JAXBATCH_NUM_PROCESSES": "1",
        "JAXBATCH_PROCESS_ID": "0",
        "JAXBATCH_COORDINATOR": "x:1",
    }
    assert parallel.detect_cluster(single, tpu_vm=True) == DistributedInfo("single", 0, 1)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"JAXBATCH_NUM_PROCESSES": "2"}, "missing JAXBATCH_COORDINATOR, JAXBATCH_PROCESS_ID"),
        (
            {
                "JAXBATCH_COORDINATOR": "h:1",
                "JAXBATCH_NUM_PROCESSES": "two",
                "JAXBATCH_PROCESS_ID": "0",
            },
            "JAXBATCH_NUM_PROCESSES='two' must be an integer",
        ),
        (
            {
                "JAXBATCH_COORDINATOR": "h:1",
                "JAXBATCH_NUM_PROCESSES": "2",
                "JAXBATCH_PROCESS_ID": "2",
            },
            r"process id 2 is outside \[0, 2\)",
        ),
        (
            {
                "JAXBATCH_COORDINATOR": "h",
                "JAXBATCH_NUM_PROCESSES": "2",
                "JAXBATCH_PROCESS_ID": "0",
            },
            "coordinator address 'h' must look like 'host:port'",
        ),
    ],
)
def test_detect_env_errors(env, message):
    with pytest.raises(ValueError, match=message):
        parallel.detect_cluster(env)


def test_detect_explicit_beats_environment():
    info = parallel.detect_cluster(
        SLURM_PER_NODE, coordinator_address="127.0.0.1:999", num_processes=2, process_id=0
    )
    assert info == DistributedInfo("explicit", 0, 2, "127.0.0.1:999", None)
    with pytest.raises(
        ValueError, match="initialize\\(\\) arguments are incomplete: missing process_id"
    ):
        parallel.detect_cluster({}, coordinator_address="h:1", num_processes=2)


def test_detect_slurm_one_task_per_node():
    info = parallel.detect_cluster(SLURM_PER_NODE)
    # First host of the *step* node list; port 12000 + 123456 mod 20000.
    assert info == DistributedInfo("slurm", 1, 2, "gpu017:15456", None)
    env = {**SLURM_PER_NODE, "JAXBATCH_COORDINATOR_PORT": "6000"}
    env.pop("SLURM_STEP_NODELIST")
    assert parallel.detect_cluster(env).coordinator_address == "gpu017:6000"


def test_detect_slurm_one_task_per_gpu():
    env = {
        **SLURM_PER_NODE,
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "6",
        "SLURM_LOCALID": "2",
    }
    # Four tasks per node that all see the node's 4 GPUs: each takes GPU SLURM_LOCALID.
    assert parallel.detect_cluster(env) == DistributedInfo("slurm", 6, 8, "gpu017:15456", (2,))
    # SLURM already bound one GPU per task (--gpus-per-task=1): it is device 0, leave it alone.
    bound = {**env, "CUDA_VISIBLE_DEVICES": "2"}
    assert parallel.detect_cluster(bound).local_device_ids is None
    # SLURM_STEP_NUM_TASKS (the srun step) wins over the allocation's SLURM_NTASKS.
    assert parallel.detect_cluster({**env, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}) == (
        DistributedInfo("single", 0, 1)
    )


def test_detect_tpu():
    info = parallel.detect_cluster({}, tpu_vm=True)
    assert info == DistributedInfo("tpu", None, None)
    assert info.initialize_kwargs() == {}  # jax.distributed.initialize() finds the pod itself


def test_initialize_is_a_no_op_on_one_process(monkeypatch):
    for var in ("JAXBATCH_COORDINATOR", "JAXBATCH_NUM_PROCESSES", "JAXBATCH_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    for var in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize() == DistributedInfo("single", 0, 1)
    assert parallel.initialize() == DistributedInfo("single", 0, 1)  # and again
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1
