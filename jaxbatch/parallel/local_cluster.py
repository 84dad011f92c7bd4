"""Several JAX processes on this machine: a local stand-in for a multi-host job.

Each process is started with ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (D CPU devices)
and the ``JAXBATCH_*`` variables that :func:`jaxbatch.parallel.initialize` reads, with the
coordinator on 127.0.0.1, so ``jax.distributed`` (gloo CPU collectives) joins them into one
program exactly as on a pod. Used by the multi-process tests; also handy to try a multi-host
config on a laptop.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Sequence


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_cluster(
    argv_of: Callable[[int], Sequence[str]],
    *,
    num_processes: int = 2,
    devices_per_process: int = 2,
    timeout_s: float = 300,
) -> list[str]:
    """Runs ``argv_of(process_id)`` for every process id and waits for all of them.

    Args:
      argv_of: the command line of process ``i`` (e.g. ``[sys.executable, script, out_i]``).
      num_processes: how many processes.
      devices_per_process: simulated CPU devices of each.
      timeout_s: seconds to wait for all processes; on timeout or failure every process that is
        still running is killed.

    Returns:
      The combined stdout/stderr of each process.

    Raises:
      RuntimeError: a process exited with a non-zero code (its output tail is in the message).
      subprocess.TimeoutExpired: the processes did not finish within ``timeout_s``.
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(
            f"num_processes={num_processes} and devices_per_process={devices_per_process} must "
            "be >= 1"
        )
    port = free_port()
    procs = []
    try:
        for pid in range(num_processes):
            env = {
                **os.environ,
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
                "JAX_PLATFORMS": "cpu",
                "JAXBATCH_COORDINATOR": f"127.0.0.1:{port}",
                "JAXBATCH_NUM_PROCESSES": str(num_processes),
                "JAXBATCH_PROCESS_ID": str(pid),
            }
            procs.append(
                subprocess.Popen(
                    list(argv_of(pid)),
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        logs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for pid, (p, log) in enumerate(zip(procs, logs, strict=True)):
        if p.returncode != 0:
            raise RuntimeError(f"process {pid} exited with {p.returncode}:\n{log[-4000:]}")
    return logs
