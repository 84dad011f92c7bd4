r"""Overhead of the in-step fault guard: train-step time with the guard vs without, as a ratio.

The guard (``jaxbatch.train.step``, ``config.faults``) adds to every step the finiteness test of
the loss, gradient norm and update norm (already computed), an optional spike test, a
``jnp.where`` that keeps the old params / optimizer state / EMA when the step is bad, and the
``lr_scale`` factor on the update. Both programs are built from the same run (``loop.build``) and
timed alternately in one process on the same state and batch; each repeat times ``--steps``
steps of each after a warm-up, and the table reports the median over ``--repeats`` of the
per-step times and of their ratio. Goal: ratio <= 1.02.

  nice -n 19 python scripts/bench_guard.py       # digits runlocal -> bench_results/bench_guard.json
  nice -n 19 python scripts/bench_guard.py --config configs/stdlib_lm.py:runlocal --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# A one-device process: an inherited simulated device count would split the host's threads.
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=1"]
)

GOAL = 1.02


def _steps(config: str, overrides: list[str]):
    import jax

    from jaxbatch import data as jdata
    from jaxbatch import parallel
    from jaxbatch.train import config as config_lib
    from jaxbatch.train import loop
    from jaxbatch.train import step as step_lib

    cfg = config_lib.load_config(config, overrides)
    train = jdata.load_split(cfg.dataset.name, "train", **cfg.dataset.options)
    run = loop.build(cfg, train_data=train, devices=jax.devices()[:1])
    replicated = parallel.replicated(run.mesh)
    bare = jax.jit(
        loop.traced_under_mesh(
            step_lib.make_train_step(
                run.task, run.tx, run.ema, micro_batches=run.cfg.micro_batches, guard=None
            ),
            run.mesh,
            run.rules,
        ),
        in_shardings=(run.state_shardings, run.batch_sharding),
        out_shardings=(run.state_shardings, replicated),
        donate_argnums=0,
    )
    it = train.select(run.task.fields).train_iterator(batch_size=cfg.batch_size, seed=cfg.seed)
    batch = parallel.make_global_batch(next(it), run.mesh)
    return run, {"guarded": run.train_step, "bare": bare}, batch


def _time(fn, state, batch, steps: int):
    import jax

    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = fn(state, batch)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits_resnet_lars.py:runlocal")
    parser.add_argument("--override", action="append", default=[], help="key=value")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=str(ROOT / "bench_results" / "bench_guard.json"))
    args = parser.parse_args(argv)

    from jaxbatch.train import loop

    run, fns, batch = _steps(args.config, args.override)
    state, _ = loop.init_or_restore(run, None)
    for fn in fns.values():  # compile and warm up both
        state, _ = _time(fn, state, batch, 3)
    times = {name: [] for name in fns}
    ratios = []
    for r in range(args.repeats):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        got = {}
        for name in order:
            state, got[name] = _time(fns[name], state, batch, args.steps)
            times[name].append(got[name])
        ratios.append(got["guarded"] / got["bare"])
    result = {
        "config": args.config,
        "overrides": args.override,
        "batch_size": run.cfg.batch_size,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "median_step_s": {k: statistics.median(v) for k, v in times.items()},
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "goal": GOAL,
    }
    result["pass"] = result["ratio_median"] <= GOAL
    print(f"fault guard overhead, {args.config}, batch {run.cfg.batch_size}, 1 device")
    print("| step | median time per step (ms) |")
    print("|---|---|")
    for name in ("bare", "guarded"):
        print(f"| {name} | {1e3 * result['median_step_s'][name]:.3f} |")
    print(
        f"ratio guarded / bare: median {result['ratio_median']:.4f} over {args.repeats} repeats "
        f"(min {min(ratios):.4f}, max {max(ratios):.4f}); goal <= {GOAL}: "
        f"{'PASS' if result['pass'] else 'FAIL'}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
