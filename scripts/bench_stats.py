r"""Overhead of the in-step gradient-noise statistics and of VRGD: train-step time as ratios.

Three programs of one config are built by the trainer (``loop.build``) and timed alternately in
one process on their own states and one batch:

- ``off``: ``noise.enabled=False`` (the baseline: one gradient of the whole batch);
- ``noise``: ``noise.enabled=True``, automatic groups (G = data × fsdp small gradients side by
  side, G = 2 on one device), |G|^2, tr(Sigma), B_simple in the step;
- ``vrgd``: ``optimizer.gradient_scaling='vrgd'`` (the GSNR multipliers from the same groups).

Each repeat times ``--steps`` steps of each program after a warm-up; the table reports the
median over ``--repeats`` of the per-step times and of the per-repeat ratios to ``off``. Goals:
noise <= 1.05x, vrgd <= 1.2x. The one-device and the 8-simulated-device measurements run in
separate processes (XLA reads the device count once). On a shared CPU the numbers are noisy: the
ratios within one run are what to quote, not the times.

  nice -n 19 python scripts/bench_stats.py                    # 1 and 8 devices, writes JSON
  nice -n 19 python scripts/bench_stats.py --devices 8 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOALS = {"noise": 1.05, "vrgd": 1.2}
VARIANTS = {
    "off": ["noise.enabled=False"],
    "noise": ["noise.enabled=True"],
    "vrgd": ["noise.enabled=True", "optimizer.gradient_scaling=vrgd"],
}
DEFAULT_OVERRIDES = [
    "batch_size=64",
    "reference_batch_size=64",
    "total_samples=6400",
    "schedule.warmup_samples=64",
    "model.width=128",
    "model.mlp_dim=512",
    "model.heads=4",
    "model.depth=2",
]


def _worker(args) -> dict:
    import jax
    import numpy as np

    from jaxbatch import parallel
    from jaxbatch.train import config as config_lib
    from jaxbatch.train import loop, shapes

    devices = jax.devices()
    mesh = [f"mesh.data={len(devices)}", "mesh.fsdp=1", "mesh.tensor=1"]
    runs, states = {}, {}
    for name, extra in VARIANTS.items():
        overrides = [*DEFAULT_OVERRIDES, *args.override, *mesh, *extra]
        cfg = config_lib.load_config(args.config, overrides)
        example = shapes.example_shapes(cfg)
        run = loop.build(cfg, train_data=shapes.zero_examples(example), devices=devices)
        runs[name] = run
        states[name] = loop.init_or_restore(run, None)[0]
    run = runs["off"]
    rng = np.random.default_rng(0)
    host = {}
    for field in run.task.fields:
        shape = (run.cfg.batch_size, *run.init_batch[field].shape[1:])
        dtype = run.init_batch[field].dtype
        if np.issubdtype(dtype, np.integer):
            host[field] = rng.integers(0, 256, shape).astype(dtype)
        else:
            host[field] = rng.standard_normal(shape).astype(dtype)
    batch = parallel.make_global_batch(host, run.mesh)

    def time_steps(name, steps):
        state = states[name]
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = runs[name].train_step(state, batch)
        jax.block_until_ready((state, metrics))
        states[name] = state
        return (time.perf_counter() - start) / steps, metrics

    compile_s = {}
    for name in VARIANTS:  # compile and warm up
        t0 = time.perf_counter()
        _, metrics = time_steps(name, 2)
        compile_s[name] = time.perf_counter() - t0
    b_simple = float(metrics["b_simple"]) if "b_simple" in metrics else None
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name in VARIANTS:
            times[name].append(time_steps(name, args.steps)[0])
    ratios = {
        name: statistics.median(t / b for t, b in zip(times[name], times["off"], strict=True))
        for name in VARIANTS
        if name != "off"
    }
    return {
        "devices": len(devices),
        "config": args.config,
        "overrides": [*DEFAULT_OVERRIDES, *args.override],
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "median_step_s": {name: statistics.median(t) for name, t in times.items()},
        "median_ratio_to_off": ratios,
        "goals": GOALS,
        "first_two_steps_s": compile_s,
        "b_simple_after_warmup_vrgd": b_simple,
    }


def _spawn(devices: int, args) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, __file__, "--worker", "--config", args.config]
    cmd += ["--repeats", str(args.repeats), "--steps", str(args.steps)]
    for o in args.override:
        cmd += ["--override", o]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{devices}-device worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(results: list[dict]) -> str:
    lines = [
        "| devices | off s/step | noise s/step | vrgd s/step | noise / off (goal 1.05) | "
        "vrgd / off (goal 1.2) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        t, q = r["median_step_s"], r["median_ratio_to_off"]
        lines.append(
            f"| {r['devices']} | {t['off']:.4f} | {t['noise']:.4f} | {t['vrgd']:.4f} | "
            f"{q['noise']:.3f} | {q['vrgd']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "stdlib_lm.py:runlocal"))
    p.add_argument("--override", action="append", default=[], help="key=value, repeatable")
    p.add_argument("--devices", type=int, action="append", help="default: 1 and 8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", default=str(ROOT / "bench_results" / "bench_stats.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        p.error(f"--repeats and --steps must be >= 1, got {args.repeats}, {args.steps}")
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    results = [_spawn(n, args) for n in (args.devices or [1, 8])]
    print(_table(results))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
