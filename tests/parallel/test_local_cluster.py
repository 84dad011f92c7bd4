"""run_local_cluster: environment of each process, failure reporting."""

import sys

import pytest

from jaxbatch.parallel import local_cluster

_PRINT_ENV = (
    "import os; print(os.environ['JAXBATCH_PROCESS_ID'], os.environ['JAXBATCH_NUM_PROCESSES'], "
    "os.environ['XLA_FLAGS'], os.environ['JAXBATCH_COORDINATOR'].split(':')[0])"
)


def test_each_process_gets_its_id_and_the_shared_coordinator():
    logs = local_cluster.run_local_cluster(
        lambda pid: [sys.executable, "-c", _PRINT_ENV], num_processes=3, devices_per_process=4
    )
    for pid, log in enumerate(logs):
        assert log.split() == [
            str(pid),
            "3",
            "--xla_force_host_platform_device_count=4",
            "127.0.0.1",
        ]


def test_a_failing_process_is_reported_with_its_output():
    with pytest.raises(RuntimeError, match=r"process 1 exited with 3:\nboom"):
        local_cluster.run_local_cluster(
            lambda pid: [sys.executable, "-c", f"import sys; print('boom'); sys.exit({pid} * 3)"]
        )


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_processes=0"):
        local_cluster.run_local_cluster(lambda pid: ["true"], num_processes=0)
