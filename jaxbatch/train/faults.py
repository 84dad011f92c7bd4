"""What a run does about preemption notices, non-finite steps and loss spikes (host side).

Preemption: SIGTERM (what TPU VMs and SLURM send before they take the machine) and SIGINT make the
loop finish its current step, save a checkpoint of it, wait for the commit and return. On a
multi-host run every process must save the *same* step: JAX's preemption sync manager (started by
``jax.distributed.initialize``) catches SIGTERM, tells the other processes, and
``multihost_utils.reached_preemption_sync_point(step)`` turns True on all of them at one agreed
step; SIGINT is forwarded to it as SIGTERM. A single process (no ``jax.distributed``, where the
sync point is always False) uses its own handler.

Numerical faults: the jitted step skips a step whose loss or gradient is not finite, or whose loss
spikes (``step.GuardState``); the loop reads the guard's counters at log and checkpoint steps only
(no host sync per step) and, after ``max_consecutive_skips`` skips in a row or a new spike, rolls
back to the last checkpoint, skips the batches seen since, and multiplies the learning rate by
``lr_factor`` — the recipe of Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with
Pathways", Sec. 5.1 (restart ~100 steps before the spike, skip ~200-500 batches). A fault after
``max_rollbacks`` rollbacks stops the run with a report (:class:`TrainingFault`).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
from jax.experimental import multihost_utils

# Exit code of `jaxbatch train` when a fault recurs after the allowed rollbacks.
FAULT_EXIT_CODE = 3


class TrainingFault(RuntimeError):
    """A numerical fault that rollbacks did not cure; the message is the report."""


class Preemption:
    """A context that turns SIGTERM / SIGINT into a request to checkpoint and stop.

    ``requested(step)`` is called after every step with the number of steps done; it is True
    at the step to save (the same step on every process of a multi-host run). A second signal
    while a request is pending restores the default handler and re-sends the signal (a second
    Ctrl-C kills the process).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._distributed = jax.process_count() > 1

    def __enter__(self) -> Preemption:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        for sig in self.SIGNALS:
            if self._distributed and sig == signal.SIGTERM:
                continue  # JAX's preemption notifier owns SIGTERM on a multi-host run
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signal_name is not None:  # second signal: behave as if we had no handler
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.signal_name = signal.Signals(signum).name
        if self._distributed:  # let the preemption sync manager agree on the step
            os.kill(os.getpid(), signal.SIGTERM)

    def requested(self, step: int) -> bool:
        if self._distributed:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        return self.signal_name is not None


def fault_scale(faults_cfg, position: int) -> float | None:
    """The injected factor on the gradients and loss of batch ``position`` (1-based), if any."""
    nan_at = _positions(faults_cfg.inject_nan_at)
    spike_at = _positions(faults_cfg.inject_spike_at)
    if position in nan_at:
        return float("nan")
    if position in spike_at:
        return float(faults_cfg.inject_spike_scale)
    return None


def _positions(value) -> frozenset[int]:
    return frozenset((value,) if isinstance(value, int) else tuple(value))


def injects(faults_cfg) -> bool:
    return bool(_positions(faults_cfg.inject_nan_at) | _positions(faults_cfg.inject_spike_at))


def seen(values: dict[str, float]) -> tuple[int, int]:
    """(skip streaks, loss spikes) counted so far, from fetched metrics."""
    return int(values.get("skip_streaks", 0)), int(values.get("loss_spikes", 0))


def diagnose(values: dict[str, float], faults_cfg, seen_before: tuple[int, int]) -> str | None:
    """Why the run must roll back, from the guard's counters in the fetched metrics; or None.

    ``seen_before`` is :func:`seen` of the last check: only new streaks and spikes count.
    """
    streaks, spikes = seen(values)
    if streaks > seen_before[0]:
        return (
            f"{faults_cfg.max_consecutive_skips} consecutive steps skipped (non-finite loss or "
            "gradient; faults.max_consecutive_skips)"
        )
    if spikes > seen_before[1]:
        return (
            f"loss spike (a loss above faults.spike_factor={faults_cfg.spike_factor:g} x its "
            "running mean)"
        )
    return None


def replicated_scalar(value, dtype, like: jax.Array) -> jax.Array:
    """A scalar with ``like``'s (replicated) sharding, built the same on every process."""
    import numpy as np

    return jax.make_array_from_callback((), like.sharding, lambda _: np.asarray(value, dtype))
