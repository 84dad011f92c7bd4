"""Multi-host start: one call, ``initialize()``, before anything touches a device.

Where the settings come from, first match wins:

1. ``explicit``: arguments passed to ``initialize(...)``.
2. ``env``: ``JAXBATCH_COORDINATOR`` (``host:port`` of process 0), ``JAXBATCH_NUM_PROCESSES``,
   ``JAXBATCH_PROCESS_ID``, and optionally ``JAXBATCH_LOCAL_DEVICE_IDS`` (``"0,1"``). Any launcher
   can set these; the localhost tests do. ``JAXBATCH_NUM_PROCESSES=1`` forces a single process.
3. ``slurm``: inside ``srun``: ``SLURM_NTASKS`` (or ``SLURM_STEP_NUM_TASKS``), ``SLURM_PROCID``,
   and the first host of ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``) as coordinator, on
   port ``JAXBATCH_COORDINATOR_PORT`` or 12000 + SLURM_JOB_ID mod 20000 (below the Linux ephemeral
   range, and different for jobs sharing a node). With several tasks per node each process gets
   the GPU ``SLURM_LOCALID``, unless ``CUDA_VISIBLE_DEVICES`` already shows it a single GPU.
4. ``tpu``: on a Cloud TPU VM, ``jax.distributed.initialize()`` without arguments: JAX reads the
   worker list from the TPU metadata.
5. ``single``: nothing to start; one process.

Everything except the call itself lives in the pure function ``detect_cluster`` so it can be tested
without a cluster.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
from collections.abc import Mapping, Sequence

import jax

_SLURM_BASE_PORT = 12000
_SLURM_PORT_RANGE = 20000


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """What ``initialize`` found (``detect_cluster``) or did (``initialize``).

    Attributes:
      source: 'explicit' | 'env' | 'slurm' | 'tpu' | 'single', or 'existing' when
        ``jax.distributed`` was already running before the call.
      process_id: this process's index, or None where JAX detects it (TPU, before starting).
      num_processes: the number of processes, or None where JAX detects it (TPU, before starting).
      coordinator_address: ``host:port`` of process 0, or None (single process, TPU).
      local_device_ids: the local devices this process may use, or None for all of them.
    """

    source: str
    process_id: int | None
    num_processes: int | None
    coordinator_address: str | None = None
    local_device_ids: tuple[int, ...] | None = None

    def initialize_kwargs(self) -> dict:
        """The keyword arguments for ``jax.distributed.initialize``."""
        if self.source == "tpu":
            return {}
        return {
            "coordinator_address": self.coordinator_address,
            "num_processes": self.num_processes,
            "process_id": self.process_id,
            "local_device_ids": (
                None if self.local_device_ids is None else list(self.local_device_ids)
            ),
            # Everything was resolved here: stop JAX from filling the gaps from its own guesses.
            "cluster_detection_method": "deactivate",
        }


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int = 300,
) -> DistributedInfo:
    """Starts ``jax.distributed`` when this is one of several processes; a no-op otherwise.

    Call it first, before any other JAX call: JAX cannot join a cluster once its backend has
    started. Calling it again after a successful start returns ``source='existing'``.

    Args:
      coordinator_address: ``host:port`` of process 0 (explicit mode).
      num_processes: total number of processes (explicit mode).
      process_id: this process's index in [0, num_processes) (explicit mode).
      local_device_ids: restrict this process to these local devices.
      initialization_timeout: seconds to wait for all processes to connect.

    Returns:
      A ``DistributedInfo`` with the source used and this process's id and the process count.

    Raises:
      ValueError: incomplete or inconsistent settings (see ``detect_cluster``).
    """
    if jax.distributed.is_initialized():
        return DistributedInfo("existing", jax.process_index(), jax.process_count())
    info = detect_cluster(
        os.environ,
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        tpu_vm=_tpu_vm(),
    )
    if info.source == "single":
        return info
    if info.source != "tpu" and jax.config.jax_cpu_collectives_implementation in (None, "none"):
        # Cross-process collectives on the CPU backend need an implementation; gloo ships with
        # jaxlib (it is the default in jax 0.10.2, but older releases had none).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        **info.initialize_kwargs(), initialization_timeout=initialization_timeout
    )
    if info.source == "tpu":
        info = dataclasses.replace(
            info, process_id=jax.process_index(), num_processes=jax.process_count()
        )
    return info


def detect_cluster(
    env: Mapping[str, str],
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    tpu_vm: bool = False,
) -> DistributedInfo:
    """Decides how ``initialize`` would start, from arguments and environment; starts nothing.

    Args:
      env: environment variables (``os.environ``).
      coordinator_address: explicit ``host:port``; with the next two, overrides the environment.
      num_processes: explicit process count.
      process_id: explicit process index.
      local_device_ids: explicit local devices.
      tpu_vm: whether this machine is a Cloud TPU VM.

    Returns:
      A ``DistributedInfo``; ``source='single'`` means "do not start jax.distributed".

    Raises:
      ValueError: explicit arguments or ``JAXBATCH_*`` variables given only in part, values that
        are not integers, or a process id outside [0, num_processes).
    """
    explicit = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if any(v is not None for v in explicit.values()):
        return _resolved("explicit", explicit, local_device_ids, "initialize() arguments")

    names = {
        "coordinator_address": "JAXBATCH_COORDINATOR",
        "num_processes": "JAXBATCH_NUM_PROCESSES",
        "process_id": "JAXBATCH_PROCESS_ID",
    }
    if any(var in env for var in names.values()):
        values = {key: env.get(var) for key, var in names.items()}
        ids = env.get("JAXBATCH_LOCAL_DEVICE_IDS")
        local = _int_list(ids, "JAXBATCH_LOCAL_DEVICE_IDS") if ids else local_device_ids
        return _resolved("env", values, local, "environment variables", names)

    if "SLURM_PROCID" in env and ("SLURM_NTASKS" in env or "SLURM_STEP_NUM_TASKS" in env):
        return _slurm(env, local_device_ids)

    if tpu_vm:
        return DistributedInfo("tpu", None, None)
    return DistributedInfo("single", 0, 1)


def parse_slurm_nodelist(nodelist: str) -> list[str]:
    """Expands a SLURM host list, e.g. ``"node[01-03,07],gpu5"`` → node01 node02 node03 node07 gpu5.

    Supports several bracket groups per name (``"r[1-2]n[1-2]"``) and keeps zero padding; no
    ``scontrol`` needed.

    Args:
      nodelist: the value of ``SLURM_JOB_NODELIST`` / ``SLURM_STEP_NODELIST``.

    Returns:
      The host names, in order.

    Raises:
      ValueError: unbalanced brackets, an empty entry, or a range that runs backwards.
    """
    hosts: list[str] = []
    for entry in _split_top_level(nodelist):
        hosts.extend(_expand_host(entry, nodelist))
    return hosts


def _resolved(source, values, local_device_ids, what, names=None) -> DistributedInfo:
    names = names or {k: k for k in values}
    missing = [names[k] for k, v in values.items() if v in (None, "")]
    if missing:
        given = ", ".join(f"{names[k]}={v!r}" for k, v in values.items() if v not in (None, ""))
        raise ValueError(
            f"{what} are incomplete: missing {', '.join(missing)} (given: {given}); "
            f"set all of {', '.join(names.values())}"
        )
    count = _int(values["num_processes"], names["num_processes"])
    pid = _int(values["process_id"], names["process_id"])
    return _checked(source, values["coordinator_address"], count, pid, local_device_ids)


def _slurm(env: Mapping[str, str], local_device_ids) -> DistributedInfo:
    count_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    count = _int(env[count_var], count_var)
    pid = _int(env["SLURM_PROCID"], "SLURM_PROCID")
    if count == 1:
        return _checked("single", None, 1, pid, None)
    node_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if v in env), None)
    if node_var is None:
        raise ValueError(
            f"SLURM run with {count} tasks but neither SLURM_STEP_NODELIST nor "
            "SLURM_JOB_NODELIST is set; start the processes with srun"
        )
    hosts = parse_slurm_nodelist(env[node_var])
    if "JAXBATCH_COORDINATOR_PORT" in env:
        port = _int(env["JAXBATCH_COORDINATOR_PORT"], "JAXBATCH_COORDINATOR_PORT")
    else:
        job = _int(env.get("SLURM_JOB_ID", "0"), "SLURM_JOB_ID")
        port = _SLURM_BASE_PORT + job % _SLURM_PORT_RANGE
    if local_device_ids is None and "JAXBATCH_LOCAL_DEVICE_IDS" in env:
        local_device_ids = _int_list(env["JAXBATCH_LOCAL_DEVICE_IDS"], "JAXBATCH_LOCAL_DEVICE_IDS")
    if local_device_ids is None:
        node_count_var = "SLURM_STEP_NUM_NODES" if "SLURM_STEP_NUM_NODES" in env else None
        nodes = _int(env[node_count_var], node_count_var) if node_count_var else len(hosts)
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if count > nodes and len(visible) != 1 and "SLURM_LOCALID" in env:
            local_device_ids = (_int(env["SLURM_LOCALID"], "SLURM_LOCALID"),)
    return _checked("slurm", f"{hosts[0]}:{port}", count, pid, local_device_ids)


def _checked(source, address, count, pid, local_device_ids) -> DistributedInfo:
    if count < 1:
        raise ValueError(f"number of processes must be ≥ 1, got {count}")
    if not 0 <= pid < count:
        raise ValueError(f"process id {pid} is outside [0, {count}) for {count} processes")
    if count == 1:
        return DistributedInfo("single", 0, 1)
    if address is not None and not re.fullmatch(r".+:\d+", address):
        raise ValueError(f"coordinator address {address!r} must look like 'host:port'")
    local = None if local_device_ids is None else tuple(int(i) for i in local_device_ids)
    return DistributedInfo(source, pid, count, address, local)


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be an integer") from None


def _int_list(value: str, name: str) -> tuple[int, ...]:
    return tuple(_int(v.strip(), name) for v in value.split(",") if v.strip())


def _split_top_level(nodelist: str) -> list[str]:
    entries, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM node list {nodelist!r}")
        elif ch == "," and depth == 0:
            entries.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in SLURM node list {nodelist!r}")
    entries.append(nodelist[start:])
    entries = [e.strip() for e in entries]
    if any(not e for e in entries):
        raise ValueError(f"empty host entry in SLURM node list {nodelist!r}")
    return entries


def _expand_host(entry: str, nodelist: str) -> list[str]:
    open_at = entry.find("[")
    if open_at < 0:
        return [entry]
    close_at = entry.index("]", open_at)
    prefix, body, rest = entry[:open_at], entry[open_at + 1 : close_at], entry[close_at + 1 :]
    suffixes = _expand_host(rest, nodelist) if rest else [""]
    out = []
    for part in body.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {part!r} in SLURM node list {nodelist!r}")
        if not sep:
            numbers = [lo]
        else:
            if int(hi) < int(lo):
                raise ValueError(f"range {part!r} runs backwards in SLURM node list {nodelist!r}")
            numbers = [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
        out.extend(prefix + n + s for n in numbers for s in suffixes)
    return out


def _tpu_vm() -> bool:
    """True on a Cloud TPU VM: libtpu installed and TPU chips visible (/dev/accel*, /dev/vfio)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
