"""Benchmark of jaxbatch.losses.contrastive_loss: the tiled 'xla' path against the N×N reference.

One run measures, for kind in (softmax, sigmoid) and D = 256, float32:

- forward+backward time (jit of value_and_grad wrt x, y, logit_scale, logit_bias) and compiled
  temp memory of 'reference' vs 'xla' at N = 2,048 … 16,384, in this process with ONE device;
  the two run back to back in each repetition; the table shows the median time of each over the
  repetitions and the median of the per-repetition ratios xla / reference (robust to the load of
  a shared machine changing between repetitions);
- 'xla' alone at N = 65,536 (one run: ~100 s on 2 cores), with the reference's temp memory from
  compiling it (not running it);
- per-device compiled memory of the ring (8 simulated devices) at global N = 1M and 4M (compile
  only, from ShapeDtypeStructs), in a subprocess: XLA's simulated host devices
  (--xla_force_host_platform_device_count) change how single-device programs run, so they are
  never set in the timing process;
- the floor: the tile sweeps' matmuls alone (same shapes and loops, no exp), timed in turn with
  the reference at the goals' sizes: the lowest xla / reference ratio any tiling reaches on this
  machine with XLA's dot, and the matmuls' FLOP rate;
- the goals, each printed PASS/FAIL: xla time ≤ 0.75× reference at N = 8,192 and ≤ 0.5× at
  16,384; xla temp memory at N = 65,536 ≤ inputs + their gradients + 64 MiB; time growing as N²
  or slower (the exponent of a least-squares fit of log time on log N over the xla sizes, ≤ 2.15).

    python scripts/bench_contrastive.py [--quick] [--out bench_results/bench_contrastive.json]
      [--block-size B] [--reps R] [--sweep-blocks]

``--sweep-blocks`` also times 'xla' at N = 8,192 for block sizes 256 … 2,048 against the reference
(how the CPU entry of ``DEFAULT_BLOCK_SIZE`` was chosen).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

_RING_DEVICES = 8
_RING_WORKER = "--ring-worker"
if _RING_WORKER in sys.argv:
    # XLA reads this flag once, before jax starts: only the ring's own process sets it.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_RING_DEVICES}"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxbatch.losses import contrastive_loss  # noqa: E402
from jaxbatch.losses._contrastive_specs import (  # noqa: E402
    BENCH_DIM,
    BENCH_KINDS,
    BENCH_RING_GLOBAL,
    BENCH_SIZES,
    BENCH_XLA_ONLY,
    default_spec,
)
from jaxbatch.losses.contrastive import DEFAULT_BLOCK_SIZE  # noqa: E402

MIB = 2**20
# Issue goals: xla time / reference time at the two largest timed sizes.
RATIO_GOALS = {8192: 0.75, 16384: 0.5}
QUICK_RATIO_GOALS = {512: 0.75, 1024: 0.5}
EXPONENT_GOAL = 2.15
MEMORY_SLACK = 64 * MIB
SWEEP_BLOCKS = (256, 512, 1024, 2048)


def _loss_fn(kind, implementation, block_size, axis_name=None):
    def loss(x, y, s, b):
        return contrastive_loss(
            x, y, s, b, kind=kind, implementation=implementation,
            block_size=block_size, axis_name=axis_name,
        )  # fmt: skip

    return loss


def _compiled(kind, implementation, block_size, args):
    fn = jax.jit(
        jax.value_and_grad(_loss_fn(kind, implementation, block_size), argnums=(0, 1, 2, 3))
    )
    return fn.lower(*args).compile()


def _args(kind, n):
    x, y, s, b = default_spec(kind, n, BENCH_DIM).make_args()
    return x, y, s, jnp.float32(0.0) if b is None else b


def _time_alternating(fns, args, reps, warmup=True):
    """Wall times [reps, len(fns)] of compiled fns run in turn (order reversed every other
    repetition), so that neighbouring measurements see the same machine load."""
    for fn in fns if warmup else ():
        jax.block_until_ready(fn(*args))
    times = np.zeros((reps, len(fns)))
    for r in range(reps):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for k in order:
            start = time.perf_counter()
            jax.block_until_ready(fns[k](*args))
            times[r, k] = time.perf_counter() - start
    return times


def _temp(compiled) -> int:
    return int(compiled.memory_analysis().temp_size_in_bytes)


def bench_pairs(kind, sizes, reps, block_size):
    rows = []
    for n in sizes:
        args = _args(kind, n)
        ref = _compiled(kind, "reference", None, args)
        xla = _compiled(kind, "xla", block_size, args)
        times = _time_alternating([ref, xla], args, reps)
        # The ratio is the median over repetitions of xla / reference measured back to back: on a
        # shared machine the load changes between repetitions but little within a pair.
        rows.append(
            dict(kind=kind, n=n, ref_s=float(np.median(times[:, 0])),
                 xla_s=float(np.median(times[:, 1])),
                 ratio=float(np.median(times[:, 1] / times[:, 0])),
                 ref_temp_mib=_temp(ref) / MIB, xla_temp_mib=_temp(xla) / MIB)
        )  # fmt: skip
        _print_row(rows[-1])
    return rows


# The [B, B]-sized matmuls per tile pair of each kind's value+gradient (see _contrastive_tiled):
# softmax 1 (LSE sweep) + 3 (logits, dx, dy); sigmoid 3 in one sweep.
_SWEEP_DOTS = {"softmax": (1, 3), "sigmoid": (3,)}
_ROWS_BY_COLS = (((1,), (1,)), ((), ()))
_MATMUL = (((1,), (0,)), ((), ()))
_COLS_T = (((0,), (0,)), ((), ()))


def _matmuls_only(kind, n, block):
    """A jitted fn(xb, yb) running only the tile sweeps' matmuls, shapes and loops as in
    _contrastive_tiled (each tile's logits feed the gradient matmuls directly, no exp): the
    time a tiled sweep cannot go below with XLA's dot on this machine."""
    nb = -(-n // block)

    def sweep(xb, yb, dots):
        def row_block(dy_acc, xi):
            def col_block(dx_i, col_in):
                yj, dy_j = col_in
                s = lax.dot_general(xi, yj, _ROWS_BY_COLS)
                if dots == 1:
                    return dx_i + s[:, :1], dy_j
                dx_i = dx_i + lax.dot_general(s, yj, _MATMUL)
                return dx_i, dy_j + lax.dot_general(xi, s, _COLS_T)

            width = 1 if dots == 1 else xb.shape[-1]
            dx_i, dy_acc = lax.scan(col_block, jnp.zeros((block, width)), (yb, dy_acc))
            return dy_acc, dx_i

        init = jnp.zeros((nb, xb.shape[-1], block))
        return lax.scan(row_block, init, xb)

    @jax.jit
    def fn(x, y, s, b):
        del s, b
        pad = nb * block - n
        xb = jnp.pad(x, ((0, pad), (0, 0))).reshape(nb, block, -1)
        yb = jnp.pad(y, ((0, pad), (0, 0))).reshape(nb, block, -1)
        return [sweep(xb, yb, dots) for dots in _SWEEP_DOTS[kind]]

    return fn


def bench_floor(kind, n, reps, block_size):
    """The reference against the tiles' matmuls alone, timed in turn: the lowest xla / reference
    ratio tiling can reach here, and the matmuls' FLOP rate."""
    block = block_size or DEFAULT_BLOCK_SIZE.get(jax.default_backend(), 512)
    args = _args(kind, n)
    ref = _compiled(kind, "reference", None, args)
    floor = _matmuls_only(kind, n, block)
    times = _time_alternating([ref, floor], args, reps)
    flops = 2 * n * n * BENCH_DIM * sum(_SWEEP_DOTS[kind])
    row = dict(
        kind=kind, n=n, block=block, ref_s=float(np.median(times[:, 0])),
        matmul_s=float(np.median(times[:, 1])),
        floor_ratio=float(np.median(times[:, 1] / times[:, 0])),
        matmul_gflops=flops / float(np.median(times[:, 1])) / 1e9,
    )  # fmt: skip
    print(
        f"  {kind:8s} N={n:>7,d} B={block}: reference {row['ref_s']:.3f}s, the tiles' "
        f"{sum(_SWEEP_DOTS[kind])} matmuls per tile pair alone {row['matmul_s']:.3f}s "
        f"({row['matmul_gflops']:.0f} GFLOP/s): floor ratio {row['floor_ratio']:.2f}",
        flush=True,
    )
    return row


def bench_xla_only(kind, n, reps, block_size):
    args = _args(kind, n)
    xla = _compiled(kind, "xla", block_size, args)
    # Compiled ahead of time, so no warm-up run: one call is ~100 s at N = 65,536 on 2 cores.
    t_xla = float(np.median(_time_alternating([xla], args, reps, warmup=False)))
    abstract = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)
    try:
        ref_temp = _temp(_compiled(kind, "reference", None, abstract)) / MIB
    except Exception as e:  # noqa: BLE001 - reported, not hidden: the reference may not compile
        ref_temp = f"does not compile: {type(e).__name__}"
    inputs_and_grads = 2 * 2 * n * BENCH_DIM * 4
    row = dict(
        kind=kind, n=n, ref_s=None, xla_s=t_xla, ratio=None, ref_temp_mib=ref_temp,
        xla_temp_mib=_temp(xla) / MIB, budget_mib=(inputs_and_grads + MEMORY_SLACK) / MIB,
    )  # fmt: skip
    _print_row(row)
    return row


def bench_ring(kind, n_global, block_size):
    mesh = jax.make_mesh((_RING_DEVICES,), ("data",))
    rows_sharding = NamedSharding(mesh, P("data"))
    emb = jax.ShapeDtypeStruct((n_global, BENCH_DIM), jnp.float32, sharding=rows_sharding)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    sharded = jax.shard_map(
        _loss_fn(kind, "xla", block_size, axis_name="data"), mesh=mesh,
        in_specs=(P("data"), P("data"), P(), P()), out_specs=P(),
    )  # fmt: skip
    fn = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))
    mem = fn.lower(emb, emb, scalar, scalar).compile().memory_analysis()
    n_local = n_global // _RING_DEVICES
    row = dict(
        kind=kind, n_global=n_global, n_local=n_local,
        temp_mib=mem.temp_size_in_bytes / MIB,
        argument_mib=mem.argument_size_in_bytes / MIB,
        output_mib=mem.output_size_in_bytes / MIB,
        logits_slice_mib=n_local * n_global * 4 / MIB,
    )  # fmt: skip
    return row


def ring_rows(ring_sizes, block_size) -> list[dict]:
    """The ring's compiled memory, from a subprocess with 8 simulated host devices."""
    cmd = [sys.executable, __file__, _RING_WORKER, "--ring-sizes", *map(str, ring_sizes)]
    if block_size is not None:
        cmd += ["--block-size", str(block_size)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ring worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines]


def _ring_worker(ring_sizes, block_size) -> None:
    if jax.device_count() != _RING_DEVICES:
        raise RuntimeError(f"the ring worker needs {_RING_DEVICES} devices, has {jax.devices()}")
    for kind in BENCH_KINDS:
        for n in ring_sizes:
            print(json.dumps(bench_ring(kind, n, block_size)), flush=True)


def _print_ring(row) -> None:
    print(
        f"  ring {row['kind']:8s} N={row['n_global']:>9,d} (N_local={row['n_local']:,d}): temp "
        f"{row['temp_mib']:8.1f} MiB, arguments {row['argument_mib']:7.1f} MiB, outputs "
        f"{row['output_mib']:7.1f} MiB per device (an N_local×N slice of the logits would be "
        f"{row['logits_slice_mib']:,.0f} MiB)"
    )


def _print_row(r):
    ref_s = "-" if r["ref_s"] is None else f"{r['ref_s']:8.3f}"
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:6.2f}"
    ref_temp = r["ref_temp_mib"]
    ref_temp = f"{ref_temp:10.1f}" if isinstance(ref_temp, float) else ref_temp
    print(
        f"  {r['kind']:8s} {r['n']:>7,d} {ref_s:>9s} {r['xla_s']:9.3f} {ratio:>7s} "
        f"{ref_temp:>12s} {r['xla_temp_mib']:10.1f}",
        flush=True,
    )


def _fit_exponent(rows):
    n = np.array([r["n"] for r in rows], float)
    t = np.array([r["xla_s"] for r in rows], float)
    return float(np.polyfit(np.log(n), np.log(t), 1)[0])


def _block_sweep(n, reps) -> dict:
    """xla at N = n for each block of SWEEP_BLOCKS, timed in turn with the reference."""
    print(f"\nblock sweep at N={n:,d}: median xla s (median ratio xla / reference)")
    sweep = {}
    for kind in BENCH_KINDS:
        args = _args(kind, n)
        fns = [_compiled(kind, "reference", None, args)]
        fns += [_compiled(kind, "xla", b, args) for b in SWEEP_BLOCKS]
        times = _time_alternating(fns, args, reps)
        ratios = np.median(times[:, 1:] / times[:, :1], axis=0)
        sweep[kind] = {
            str(b): dict(xla_s=float(t), ratio=float(r))
            for b, t, r in zip(SWEEP_BLOCKS, np.median(times[:, 1:], axis=0), ratios, strict=True)
        }
        print(
            f"  {kind:8s} ref {np.median(times[:, 0]):.3f}s  "
            + "  ".join(
                f"B={b}: {v['xla_s']:.3f}s ({v['ratio']:.2f})" for b, v in sweep[kind].items()
            )
        )
    return sweep


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition")
    parser.add_argument("--out", default="bench_results/bench_contrastive.json")
    parser.add_argument("--block-size", type=int, default=None, help="xla tile size")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per size")
    parser.add_argument("--sweep-blocks", action="store_true", help="time xla block sizes")
    parser.add_argument(_RING_WORKER, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ring-sizes", type=int, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ring_worker:
        _ring_worker(args.ring_sizes, args.block_size)
        return
    if jax.device_count() != 1:
        raise SystemExit(
            f"the timings need a one-device process, got {jax.device_count()} devices "
            f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}): unset "
            "--xla_force_host_platform_device_count"
        )

    sizes = (512, 1024) if args.quick else BENCH_SIZES
    big = 4096 if args.quick else BENCH_XLA_ONLY
    ring_sizes = (1 << 14,) if args.quick else BENCH_RING_GLOBAL
    ratio_goals = QUICK_RATIO_GOALS if args.quick else RATIO_GOALS
    reps = args.reps or (1 if args.quick else 5)
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, one device, D={BENCH_DIM}, "
        f"float32, reps={reps}"
    )
    print(
        "times: median over the repetitions (N >= 65,536: one run); ratio: median over the "
        "repetitions of xla / reference timed back to back"
    )

    results = dict(config=dict(quick=args.quick, reps=reps, block_size=args.block_size,
                               dim=BENCH_DIM, backend=jax.default_backend()))  # fmt: skip
    goals = []
    for kind in BENCH_KINDS:
        print(f"\n{kind}: forward+backward (value_and_grad wrt x, y, scale, bias)")
        print(f"  {'kind':8s} {'N':>7s} {'ref s':>9s} {'xla s':>9s} {'ratio':>7s} "
              f"{'ref tmp MiB':>12s} {'xla tmp MiB':>10s}")  # fmt: skip
        rows = bench_pairs(kind, sizes, reps, args.block_size)
        big_row = bench_xla_only(kind, big, 1, args.block_size)
        exponent = _fit_exponent(rows + [big_row])
        results[kind] = dict(pairs=rows, xla_only=big_row, exponent=exponent)
        for r in rows:
            if r["n"] in ratio_goals:
                goal = ratio_goals[r["n"]]
                goals.append((f"{kind}: xla time <= {goal}x reference at N={r['n']:,d}",
                              r["ratio"] <= goal, f"ratio {r['ratio']:.2f}"))  # fmt: skip
        goals.append((
            f"{kind}: xla temp at N={big:,d} <= inputs + grads + 64 MiB",
            big_row["xla_temp_mib"] <= big_row["budget_mib"],
            f"{big_row['xla_temp_mib']:.1f} MiB <= {big_row['budget_mib']:.1f} MiB",
        ))  # fmt: skip
        goals.append((f"{kind}: xla time grows as N^2 or slower", exponent <= EXPONENT_GOAL,
                       f"fitted exponent {exponent:.2f}"))  # fmt: skip

    print("\nfloor: the tiles' matmuls alone (no exp, no statistics) against the reference")
    results["floor"] = [
        bench_floor(kind, n, reps, args.block_size) for kind in BENCH_KINDS for n in ratio_goals
    ]

    if args.sweep_blocks:
        results["block_sweep"] = _block_sweep(2048 if args.quick else 8192, reps)

    print(f"\nring: compiled per device, {_RING_DEVICES} simulated devices (own process)")
    rings = ring_rows(ring_sizes, args.block_size)
    for row in rings:
        _print_ring(row)
    results["ring"] = rings

    print(
        "\ngoals"
        + (" (--quick: small sizes, a smoke run, not the goals' sizes)" if args.quick else "")
    )
    for name, ok, detail in goals:
        print(f"  {'PASS' if ok else 'FAIL'}  {name} ({detail})")
    results["goals"] = [dict(goal=g, passed=bool(ok), detail=d) for g, ok, d in goals]

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
