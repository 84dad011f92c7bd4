"""The longest sequence whose train step fits a per-device memory budget, by bisection.

For a sequence model (task 'lm' or 'mlm') the planner answers "how long a sequence fits on my
chip": it compiles the config's train step from ``jax.ShapeDtypeStruct`` inputs at a sequence
length L (``config.dataset.options.seq_len`` and ``config.model.max_len``), reads the peak bytes
per device from the compiled program's memory analysis (arguments + outputs − aliased +
temporaries, as :attr:`jaxbatch.train.plan.Plan.peak_bytes`), and searches L:

  1. L = multiple, 2·multiple, 4·multiple, ... until a length does not fit or ``limit`` is passed;
  2. bisection between the last length that fits and the first that does not, on multiples of
     ``multiple``, so the answer is the largest fitting multiple (peak bytes grow with L).

With ``affine_from=(u1, u2)`` step 1 is replaced by a guess: the peaks at u1·multiple and
u2·multiple are fitted by a line (the compiled peak of an O(T)-memory step is affine in T), the
largest fitting multiple under that line is compiled, and the search gallops from it (±1, ±2,
±4, ... multiples) to a fitting and a failing length before the bisection. The answer is the
same (it is confirmed by compiling it and the next multiple); only the number of compiles
drops, typically to 4, when each compile takes minutes.

Each probe is one compile (nothing runs and nothing is allocated), so budgets far above this
machine's memory can be planned. The per-device batch is the config's (set it with
``batch_size``); the memory of every backprop mode (``config.model.backprop``) can be compared by
planning each mode in turn (``longest_sequences``).

    jaxbatch plan --config configs/stdlib_lm.py --devices 1 --memory-budget 16GiB --max-seq-len
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import ml_collections

from jaxbatch.train import plan as plan_lib

SEQUENCE_TASKS = ("lm", "mlm")


@dataclasses.dataclass(frozen=True)
class SequenceProbe:
    """One compiled length: its sequence length and peak bytes per device."""

    seq_len: int
    peak_bytes: int
    temp_bytes: int

    def fits(self, budget_bytes: int) -> bool:
        return self.peak_bytes <= budget_bytes


@dataclasses.dataclass(frozen=True)
class SequenceSearch:
    """The result of :func:`longest_fitting_sequence`.

    Attributes:
      longest: the largest multiple of ``multiple`` whose step fits (None if even ``multiple``
        does not).
      probes: every compiled length, in the order compiled.
      budget_bytes: the budget searched against.
      reached_limit: the search stopped at ``limit`` with the step still fitting.
    """

    longest: int | None
    probes: tuple[SequenceProbe, ...]
    budget_bytes: int
    reached_limit: bool

    def probe(self, seq_len: int) -> SequenceProbe | None:
        return next((p for p in self.probes if p.seq_len == seq_len), None)


def with_sequence_length(cfg: ml_collections.ConfigDict, seq_len: int) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` whose examples are ``seq_len`` tokens long (model.max_len follows)."""
    if cfg.task not in SEQUENCE_TASKS:
        raise ValueError(
            f"--max-seq-len plans sequence models; config.task={cfg.task!r} is not one of "
            f"{SEQUENCE_TASKS}"
        )
    if "seq_len" not in cfg.dataset.options:
        raise ValueError(
            f"config.dataset.options has no 'seq_len' for dataset {cfg.dataset.name!r}: the "
            "sequence length cannot be varied"
        )
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"sequence length must be a positive integer, got {seq_len!r}")
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.dataset.options.seq_len = seq_len
    if "max_len" in out.model:
        out.model.max_len = seq_len
    return out


def peak_bytes_at(
    cfg: ml_collections.ConfigDict, seq_len: int, *, devices: Sequence[jax.Device] | None = None
) -> SequenceProbe:
    """Compiles the train step of ``cfg`` at ``seq_len`` and returns its peak bytes per device."""
    p = plan_lib.plan(with_sequence_length(cfg, seq_len), devices=devices, with_flops=False)
    return SequenceProbe(seq_len, p.peak_bytes, p.temp_bytes)


def longest_fitting_sequence(
    cfg: ml_collections.ConfigDict,
    budget_bytes: int,
    *,
    multiple: int = 128,
    limit: int = 1 << 20,
    devices: Sequence[jax.Device] | None = None,
    measure: Callable[[ml_collections.ConfigDict, int], SequenceProbe] | None = None,
    affine_from: tuple[int, int] | None = None,
) -> SequenceSearch:
    """The longest multiple of ``multiple`` (≤ ``limit``) whose train step fits ``budget_bytes``.

    Args:
      cfg: a training config of a sequence task ('lm', 'mlm') with ``dataset.options.seq_len``.
      budget_bytes: memory of one device.
      multiple: the granularity of the answer (e.g. the StreamBP chunk or a tile size).
      limit: the longest length tried.
      devices: the devices of the mesh (default all).
      measure: ``(cfg, seq_len) -> SequenceProbe``; default compiles the step
        (:func:`peak_bytes_at`). Tests pass a cheaper model of memory.
      affine_from: two distinct unit counts (lengths in multiples of ``multiple``) whose peaks
        give the affine guess to start from (see the module docstring), or None for doubling.

    Returns:
      A :class:`SequenceSearch`.
    """
    if budget_bytes <= 0:
        raise ValueError(f"memory budget must be positive, got {budget_bytes} bytes")
    if multiple < 1 or limit < multiple:
        raise ValueError(f"need 1 <= multiple <= limit, got multiple={multiple}, limit={limit}")
    with_sequence_length(cfg, multiple)  # fails early on a config whose length cannot vary
    if measure is None:

        def measure(c, n):
            return peak_bytes_at(c, n, devices=devices)

    probes: list[SequenceProbe] = []
    by_units: dict[int, SequenceProbe] = {}

    def probe_at(units: int) -> SequenceProbe:
        if units not in by_units:
            by_units[units] = measure(cfg, units * multiple)
            probes.append(by_units[units])
        return by_units[units]

    def fits(units: int) -> bool:
        return probe_at(units).fits(budget_bytes)

    max_units = limit // multiple
    if affine_from is not None:
        u1, u2 = affine_from
        if not (isinstance(u1, int) and isinstance(u2, int) and 1 <= u1 < u2 <= max_units):
            raise ValueError(
                f"affine_from={affine_from!r}: expected two unit counts 1 <= u1 < u2 <= "
                f"limit // multiple = {max_units}"
            )
        p1, p2 = probe_at(u1).peak_bytes, probe_at(u2).peak_bytes
        slope = (p2 - p1) / (u2 - u1)
        guess = max_units if slope <= 0 else int(u1 + (budget_bytes - p1) / slope)
        start = min(max(guess, 1), max_units)
        return _gallop(fits, start, max_units, multiple, probes, budget_bytes)
    if not fits(1):
        return SequenceSearch(None, tuple(probes), budget_bytes, False)
    good, bad = 1, None
    while bad is None:
        if good == max_units:
            return SequenceSearch(good * multiple, tuple(probes), budget_bytes, True)
        trial = min(2 * good, max_units)
        if fits(trial):
            good = trial
        else:
            bad = trial
    good = _bisect(fits, good, bad)
    return SequenceSearch(good * multiple, tuple(probes), budget_bytes, False)


def _bisect(fits, good: int, bad: int) -> int:
    """The largest fitting unit count between a fitting ``good`` and a failing ``bad``."""
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def _gallop(fits, start, max_units, multiple, probes, budget_bytes) -> SequenceSearch:
    """From a guess ``start`` (units): steps of 1, 2, 4, ... up while fitting (down while not)
    until a fitting and a failing unit count bracket the answer, then bisection."""

    def result(good, reached=False):
        longest = None if good is None else good * multiple
        return SequenceSearch(longest, tuple(probes), budget_bytes, reached)

    step = 1
    if fits(start):
        good = start
        while True:
            if good == max_units:
                return result(good, True)
            trial = min(good + step, max_units)
            if not fits(trial):
                bad = trial
                break
            good, step = trial, 2 * step
    else:
        bad = start
        while True:
            if bad == 1:
                return result(None)
            trial = max(bad - step, 1)
            if fits(trial):
                good = trial
                break
            bad, step = trial, 2 * step
    return result(_bisect(fits, good, bad))


def longest_sequences(
    cfg: ml_collections.ConfigDict,
    budget_bytes: int,
    backprop_modes: Sequence[str],
    **kwargs,
) -> dict[str, SequenceSearch]:
    """:func:`longest_fitting_sequence` for each ``config.model.backprop`` mode."""
    out = {}
    for mode in backprop_modes:
        mode_cfg = ml_collections.ConfigDict(cfg.to_dict())
        mode_cfg.model.backprop = mode
        out[mode] = longest_fitting_sequence(mode_cfg, budget_bytes, **kwargs)
    return out


def format_sequence_table(results: dict[str, SequenceSearch]) -> str:
    """One row per backprop mode: the longest fitting length and its peak bytes per device."""
    rows = ["backprop      longest seq   peak at longest   probes"]
    for mode, search in results.items():
        if search.longest is None:
            rows.append(f"{mode:<13} {'none':>11}   {'-':>15}   {len(search.probes)}")
            continue
        peak = plan_lib.format_bytes(search.probe(search.longest).peak_bytes)
        longest = f"{search.longest}{'+' if search.reached_limit else ''}"
        rows.append(f"{mode:<13} {longest:>11}   {peak:>15}   {len(search.probes)}")
    budget = next(iter(results.values())).budget_bytes if results else 0
    rows.append(f"(budget {plan_lib.format_bytes(budget)} per device; '+': the search limit)")
    return "\n".join(rows)


def search_to_dict(search: SequenceSearch) -> dict:
    return {
        "longest": search.longest,
        "reached_limit": search.reached_limit,
        "budget_bytes": search.budget_bytes,
        "probes": [dataclasses.asdict(p) for p in search.probes],
    }
