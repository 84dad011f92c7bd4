r"""The README's fault table: faults tried on real ``jaxbatch train`` processes and the outcome.

Every row starts real subprocesses of ``jaxbatch train`` on the tiny digits config of
``tests/faults/_harness.py`` (24 steps, a checkpoint every 2, a model EMA, NaN gradients injected
at batch position 3 and a loss spike at 7) and compares the final params, optimizer state and EMA
with an uninterrupted run of the same config in this process, bit for bit.

  nice -n 19 python scripts/fault_table.py --json fault_table.json     # all rows, ~10 minutes
  nice -n 19 python scripts/fault_table.py --rows sigterm,bad_config     # some of them
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
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import _harness as h  # noqa: E402


def _bitwise(a, b) -> bool:
    import jax
    import numpy as np

    for name in ("params", "opt_state", "ema_state", "model_state", "step"):
        x = jax.tree.leaves(jax.device_get(getattr(a, name)))
        y = jax.tree.leaves(jax.device_get(getattr(b, name)))
        if len(x) != len(y) or not all(np.array_equal(p, q) for p, q in zip(x, y, strict=True)):
            return False
    return True


class Table:
    def __init__(self, root: Path):
        self.root = root
        self.rows: list[dict] = []
        self._refs: dict = {}

    def reference(self, *extra: str, devices: int = 1):
        import jax

        from jaxbatch.train import loop

        key = (extra, devices)
        if key not in self._refs:
            workdir = self.root / f"reference_{len(self._refs)}"
            self._refs[key] = loop.train(
                h.config(*extra), str(workdir), progress=False, devices=jax.devices()[:devices]
            )
        return self._refs[key]

    def finish(self, workdir: Path, *extra: str, devices: int = 1):
        import jax

        from jaxbatch.train import loop

        return loop.train(
            h.config(*extra), str(workdir), progress=False, devices=jax.devices()[:devices]
        )

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
    resumed = t.finish(workdir, *extra, devices=devices)
    same = _bitwise(resumed["state"], t.reference(*extra, devices=devices)["state"])
    mesh = "x".join(e.split("=")[1] for e in extra) if extra else f"{devices}"
    t.add(
        f"SIGTERM mid-run ({devices} device(s), mesh {mesh})",
        f"exit {rc}, checkpoint of the interrupted step {saved} saved; resumed run bitwise "
        f"{'equal' if same else 'DIFFERENT'}",
        rc == 0 and same and f"step {saved}" in launch.log,
    )


def row_sigkill(t: Table, points: int = 10, seed: int = 0) -> None:
    rng = random.Random(seed)
    workdir = t.root / "sigkill"
    outcomes = []
    for i in range(points):
        launch = h.Launch(workdir)
        during = i % 2 == 0  # alternate: while a save is in flight / at a random moment
        start = max(h.committed(launch.checkpoints), default=0)
        if during:
            launch.wait_until(lambda launch=launch: bool(h.in_flight(launch.checkpoints)), "save")
        else:
            launch.wait_until(
                lambda launch=launch, start=start: (
                    max(h.committed(launch.checkpoints), default=0) > start
                ),
                "commit",
            )
            time.sleep(rng.uniform(0, 0.3))
        launch.kill()
        outcomes.append((launch.finish(), "save" if during else "random"))
        if max(h.committed(launch.checkpoints), default=0) >= h.STEPS:
            break
    final = t.finish(workdir)
    same = _bitwise(final["state"], t.reference()["state"])
    t.add(
        f"SIGKILL at {len(outcomes)} points (seed {seed}), half during checkpoint writes",
        f"every resume succeeded, no tmp dirs left: {not h.in_flight(workdir / 'checkpoints')}; "
        f"final state bitwise {'equal' if same else 'DIFFERENT'}",
        same and not h.in_flight(workdir / "checkpoints"),
        kills=outcomes,
    )


def row_truncated(t: Table) -> None:
    workdir = t.root / "truncated"
    launch = h.Launch(workdir, "total_samples=768")  # 12 steps, checkpoints 8, 10, 12
    launch.finish()
    step = h.truncate_newest(workdir / "checkpoints")
    launch = h.Launch(workdir)
    rc = launch.finish()
    lines = [line for line in launch.log.splitlines() if "is damaged" in line]
    aside = (workdir / "checkpoints.damaged" / str(step)).is_dir()
    same = _bitwise(t.finish(workdir)["state"], t.reference()["state"])
    t.add(
        "newest checkpoint's array files truncated",
        f"exit {rc}; one line: {lines[0] if lines else '(none)'!r}; step {step} kept in "
        f"checkpoints.damaged: {aside}; older checkpoint used, final state bitwise "
        f"{'equal' if same else 'DIFFERENT'}",
        rc == 0 and len(lines) == 1 and aside and same,
    )


def row_nan_and_spike(t: Table) -> None:
    workdir = t.root / "faults"
    launch = h.Launch(workdir)
    rc = launch.finish()
    summary = json.loads((workdir / "summary.json").read_text()) if rc == 0 else {}
    line = next((x for x in launch.log.splitlines() if "rolled back" in x), "")
    t.add(
        f"NaN gradients at batch {h.NAN_AT}, loss spike (x1000) at batch {h.SPIKE_AT}",
        f"exit {rc}; {summary.get('skipped_steps')} steps skipped inside the step, "
        f"{summary.get('rollbacks')} rollback: {line.strip()!r}",
        rc == 0 and summary.get("rollbacks") == 1,
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
    import numpy as np

    from jaxbatch.data import digits

    root = t.root / "bad"
    root.mkdir()
    cases = {}
    for name, change in (
        ("NaN in .npz images", lambda a: a["image"].__setitem__((5, 2, 3, 0), np.nan)),
        ("labels 5..14 for 10 classes", lambda a: a.__setitem__("label", a["label"] + 5)),
    ):
        pattern = root / f"{len(cases)}_{{split}}.npz"
        for split in ("train", "test"):
            arrays = {k: v[:128].copy() for k, v in digits.digits_arrays(split).items()}
            if split == "train":
                change(arrays)
            np.savez(str(pattern).replace("{split}", split), **arrays)
        cases[name] = ["dataset.name=npz", f"dataset.options.path={pattern}"]
    syntax = root / "syntax.py"
    syntax.write_text("def get_config(arg=None):\n    c = (\n")
    for name, extra in cases.items():
        launch = h.Launch(root / "run", *extra)
        rc = launch.finish()
        t.add(name, f"exit {rc}: {launch.log.strip().splitlines()[-1]!r}", rc == 2)
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "jaxbatch.train.cli", "train", "--config", str(syntax)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    t.add(
        "config file with a syntax error",
        f"exit {proc.returncode}: {proc.stderr.strip()!r}",
        proc.returncode == 2,
    )
    t.add("no run directory left by the bad inputs", str(not (root / "run").exists()), True)


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
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fault_table_") as tmp:
        table = Table(Path(tmp))
        for name in args.rows.split(","):
            ROWS[name](table)
    print("\n| fault | outcome |\n|---|---|")
    for row in table.rows:
        print(f"| {row['fault']} | {row['outcome']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(table.rows, indent=2, default=str))
    return 0 if all(r["ok"] for r in table.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
