r"""The README's fault table: faults tried on real ``jaxbatch train`` processes and the outcome.

Every row starts real subprocesses of ``jaxbatch train`` on the tiny digits config of
``tests/faults/_harness.py`` (24 steps, a checkpoint every 2, a model EMA, NaN gradients injected
at batch position 3 and a loss spike at 7) and compares the final checkpoint's train state
(params, optimizer state, EMA, model state, guard, rng, step) with that of the same command run
without interruption (a subprocess on the same devices), bit for bit.

  nice -n 19 python scripts/fault_table.py          # all rows -> bench_results/fault_table.json
  nice -n 19 python scripts/fault_table.py --rows sigterm,bad_inputs --json /tmp/some.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "faults"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The runs compile the same programs again and again (a run and each of its resumptions): they
# share the test suite's persistent compilation cache and its cheap LLVM flags (tests/conftest.py:
# same HLO and IEEE semantics, a third off the compile time), so a restart loads what the first
# launch compiled (a hit is the executable a fresh compile would give; the key holds the HLO, the
# flags and the devices), and what tests/faults compiled is reused. No timing is reported here.
for _flag in ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"jaxbatch-tests-xla-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import _harness as h  # noqa: E402

h.TIMEOUT_S = 3600  # a shared machine: a launch may wait long for its first checkpoint


def _bitwise(a: Path, b: Path) -> bool:
    """The newest checkpoints of run directories ``a`` and ``b`` hold the same train state, bit
    for bit (params, optimizer state, EMA, model state, guard, noise statistics, rng, step)."""
    return not h.bitwise_differences(h.final_state(a), h.final_state(b))


class Table:
    def __init__(self, root: Path):
        self.root = root
        self.rows: list[dict] = []
        self._refs: dict = {}
        self.reference_logs: dict = {}
        self.last_log = ""

    def reference(self, *extra: str, devices: int = 1) -> Path:
        """The run directory of the same command run without interruption (a subprocess)."""
        key = (extra, devices)
        if key not in self._refs:
            workdir = self.root / f"reference_{len(self._refs)}"
            rc = self.finish(workdir, *extra, devices=devices)
            if rc != 0:
                raise RuntimeError(f"the uninterrupted reference run {extra} exited {rc}")
            self._refs[key] = workdir
            self.reference_logs[key] = self.last_log
        return self._refs[key]

    def finish(self, workdir: Path, *extra: str, devices: int = 1) -> int:
        """Runs (or resumes) ``jaxbatch train`` in ``workdir`` to its end; its exit code."""
        launch = h.Launch(workdir, *extra, devices=devices)
        rc = launch.finish()
        self.last_log = launch.log
        if rc != 0:
            print(launch.log[-3000:], file=sys.stderr)
        return rc

    def add(self, fault: str, outcome: str, ok: bool, **details) -> None:
        self.rows.append({"fault": fault, "outcome": outcome, "ok": bool(ok), **details})
        print(f"{'ok  ' if ok else 'FAIL'} {fault}: {outcome}", flush=True)


def row_sigterm(t: Table, devices: int = 1, extra: tuple = ()) -> None:
    workdir = t.root / f"sigterm_{devices}"
    launch = h.Launch(workdir, *extra, devices=devices)
    launch.wait_until(lambda: max(h.committed(launch.checkpoints), default=0) >= 10, "ckpt")
    launch.signal(signal.SIGTERM)
    rc = launch.finish()
    saved = h.committed(launch.checkpoints)[-1]
    said = f"saved the checkpoint of step {saved}" in launch.log
    resumed_rc = t.finish(workdir, *extra, devices=devices)
    same = resumed_rc == 0 and _bitwise(workdir, t.reference(*extra, devices=devices))
    mesh = "x".join(e.split("=")[1] for e in extra) if extra else f"{devices}"
    t.add(
        f"SIGTERM mid-run ({devices} device(s), mesh {mesh})",
        f"exit {rc}, checkpoint of the interrupted step {saved} saved and said so: {said}; "
        f"the same command resumed (exit {resumed_rc}), final state bitwise "
        f"{'equal' if same else 'DIFFERENT'} to an uninterrupted run",
        rc == 0 and said and same,
        saved_step=saved,
    )


def row_sigkill(t: Table, points: int = 10, seed: int = 0) -> None:
    rng = random.Random(seed)
    workdir = t.root / "sigkill"
    outcomes = []
    for i in range(points):
        stale = set(h.in_flight(workdir / "checkpoints"))  # left by the last kill
        start = max(h.committed(workdir / "checkpoints"), default=0)
        launch = h.Launch(workdir)
        during = i % 2 == 0  # alternate: while a save is in flight / at a random moment
        if during:
            launch.wait_until(
                lambda launch=launch, stale=stale: bool(
                    set(h.in_flight(launch.checkpoints)) - stale
                ),
                "save",
            )
        else:
            launch.wait_until(
                lambda launch=launch, start=start: (
                    max(h.committed(launch.checkpoints), default=0) > start
                ),
                "commit",
            )
            time.sleep(rng.uniform(0, 0.3))
        launch.kill()
        rc = launch.finish()
        tmp = bool(set(h.in_flight(launch.checkpoints)) - stale)  # a write was interrupted
        # resumed from the newest committed checkpoint (a fresh start when there was none)
        resumed = (
            f"resumed from checkpoint at step {start}" in launch.log
            if start
            else ("resumed from checkpoint" not in launch.log)
        )
        outcomes.append(
            dict(
                rc=rc,
                mode="save" if during else "random",
                tmp_left=tmp,
                resumed=resumed,
                newest=max(h.committed(launch.checkpoints), default=0),
            )
        )
        if max(h.committed(launch.checkpoints), default=0) >= h.STEPS:
            break
    final_rc = t.finish(workdir)
    clean = not h.in_flight(workdir / "checkpoints")
    same = final_rc == 0 and _bitwise(workdir, t.reference())
    during = sum(o["tmp_left"] for o in outcomes)
    killed = all(o["rc"] == -signal.SIGKILL for o in outcomes)
    t.add(
        f"SIGKILL at {len(outcomes)} points (seed {seed}), {during} of them during a "
        "checkpoint write",
        f"every restart resumed from the newest committed checkpoint (or started afresh when "
        f"none was committed yet): "
        f"{all(o['resumed'] for o in outcomes)}; tmp dirs of killed saves cleaned up: {clean}; "
        f"final state bitwise {'equal' if same else 'DIFFERENT'} to an uninterrupted run",
        killed and same and clean and all(o["resumed"] for o in outcomes),
        kills=outcomes,
    )


def row_truncated(t: Table) -> None:
    workdir = t.root / "truncated"
    launch = h.Launch(workdir)  # stopped by SIGTERM after step 12 (checkpoints ..., 10, 12, 13?)
    launch.wait_until(lambda: max(h.committed(launch.checkpoints), default=0) >= 12, "ckpt")
    launch.signal(signal.SIGTERM)
    launch.finish()
    step = h.truncate_newest(workdir / "checkpoints")
    launch = h.Launch(workdir)
    rc = launch.finish()
    lines = [line for line in launch.log.splitlines() if "is damaged" in line]
    aside = (workdir / "checkpoints.damaged" / str(step)).is_dir()
    older = "resuming from the newest intact checkpoint" in launch.log
    same = rc == 0 and _bitwise(workdir, t.reference())
    t.add(
        "newest checkpoint's array files truncated",
        f"exit {rc}; one line: {_short(lines[0]) if lines else '(none)'!r}; step {step} kept "
        f"in checkpoints.damaged: {aside}; older checkpoint used: {older}; a traceback printed: "
        f"{'Traceback' in launch.log}; final state bitwise "
        f"{'equal' if same else 'DIFFERENT'} to an uninterrupted run",
        rc == 0 and len(lines) == 1 and aside and older and same and "Traceback" not in launch.log,
    )


def _short(line: str, limit: int = 200) -> str:
    line = line.strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def row_nan_and_spike(t: Table) -> None:
    import numpy as np

    workdir = t.reference()  # the uninterrupted run: it has both faults injected
    log = t.reference_logs[((), 1)]
    summary = json.loads((workdir / "summary.json").read_text())
    line = next((x for x in log.splitlines() if "rolled back" in x), "")
    final = h.final_state(workdir)
    finite = all(np.isfinite(v).all() for v in final.values() if v.dtype.kind == "f")
    t.add(
        f"NaN gradients at batch {h.NAN_AT}, loss spike (x1000) at batch {h.SPIKE_AT}",
        f"run completed; {summary.get('skipped_steps')} steps skipped inside the step (NaN, "
        f"spike), {summary.get('rollbacks')} rollback: {_short(line, 300)!r}; every float of the "
        f"final state finite: {finite}",
        summary.get("step") == h.STEPS
        and summary.get("rollbacks") == 1
        and finite
        and summary.get("skipped_steps", 0) >= 2,
    )


def row_recurring(t: Table) -> None:
    workdir = t.root / "recurring"
    launch = h.Launch(workdir, "faults.inject_spike_at=(7,11)", "faults.max_rollbacks=1")
    rc = launch.finish()
    report = next((x for x in launch.log.splitlines() if "stopped at step" in x), "")
    t.add(
        "loss spike again after the allowed rollbacks (max_rollbacks=1)",
        f"exit {rc}; report: {report.strip()[:160]!r}...",
        rc == 3 and bool(report),
    )


def row_bad_inputs(t: Table) -> None:
    import subprocess

    import numpy as np

    from jaxbatch.data import digits

    root = t.root / "bad"
    root.mkdir()
    run = root / "run"

    def taller(a):
        a["image"] = np.concatenate([a["image"], a["image"][:, :1]], axis=1)

    cases = {}
    for name, change in (
        ("NaN in .npz train images", lambda a: a["image"].__setitem__((5, 2, 3, 0), np.nan)),
        ("labels 5..14 in .npz data, 10 classes", lambda a: a.__setitem__("label", a["label"] + 5)),
        ("train images 9x8, test images 8x8 (.npz)", taller),
    ):
        pattern = root / f"{len(cases)}_{{split}}.npz"
        for split in ("train", "test"):
            arrays = {k: v[:128].copy() for k, v in digits.digits_arrays(split).items()}
            if split == "train":
                change(arrays)
            np.savez(str(pattern).replace("{split}", split), **arrays)
        # a bundled config pointed at the user's files from the command line
        cases[name] = [
            "--workdir",
            str(run),
            "--config",
            h.CONFIG,
            "--config.dataset.name=npz",
            f"--config.dataset.options.path={pattern}",
        ]
    syntax = root / "syntax.py"
    syntax.write_text("def get_config(arg=None):\n    c = (\n")
    cases["config file with a syntax error"] = ["--workdir", str(run), "--config", str(syntax)]
    a_file = root / "a_file"
    a_file.write_text("x")
    cases["--workdir naming an existing file"] = ["--workdir", str(a_file), "--config", h.CONFIG]
    cases["unknown config key (--config.optimizer.lerning_rate=1)"] = [
        "--workdir",
        str(run),
        "--config",
        h.CONFIG,
        "--config.optimizer.lerning_rate=1",
    ]
    for name, args in cases.items():
        proc = subprocess.run(
            [sys.executable, "-m", "jaxbatch.train.cli", "train", "--no-progress", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=h.env(1),
        )
        err = proc.stderr.strip().splitlines()
        one_line = len(err) == 1 and err[0].startswith("jaxbatch: error: ")
        left = run.exists()
        t.add(
            name,
            f"exit {proc.returncode}: {_short(err[-1] if err else '', 240)!r}; "
            f"{'one line' if one_line else f'{len(err)} lines'}, run directory left: {left}",
            proc.returncode == 2 and one_line and not left,
        )


ROWS = {
    "sigterm": row_sigterm,
    "sigterm_8": lambda t: row_sigterm(
        t, devices=8, extra=("mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1")
    ),
    "sigkill": row_sigkill,
    "truncated": row_truncated,
    "nan_spike": row_nan_and_spike,
    "recurring": row_recurring,
    "bad_inputs": row_bad_inputs,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"some of {list(ROWS)}")
    parser.add_argument("--json", default=str(ROOT / "bench_results" / "fault_table.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fault_table_") as tmp:
        table = Table(Path(tmp))
        for name in args.rows.split(","):
            ROWS[name](table)
    print("\n| fault | outcome |\n|---|---|")
    for row in table.rows:
        print(f"| {row['fault']} | {row['outcome']} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(table.rows, indent=2, default=str))
    return 0 if all(r["ok"] for r in table.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
