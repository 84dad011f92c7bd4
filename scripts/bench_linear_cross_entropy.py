"""Benchmark of jaxbatch.losses.linear_cross_entropy against the naive [T, V] form and peers.

Value and gradients (wrt h and w) of the mean cross-entropy of h @ w, float32, T = 8,192 tokens,
V = 32,768 classes, D = 512 and 1,024, in this one-device process on the default backend:

- jaxbatch 'xla' (token chunks; gradients formed in the forward sweep) and the naive form
  ('reference': the [T, V] logits materialised);
- peers, when installed (optional, benchmark only; see BUILD.md): jax-cce 0.1.0
  (``jax_cce.linear_cross_entropy``, vocabulary chunks, w as [V, D]) and tokamax's XLA path
  (``tokamax.linear_softmax_cross_entropy_loss(implementation='xla')``). A missing peer is
  skipped with a note.

Each repetition runs every implementation once, back to back; the table shows the median time
and the median of the per-repetition ratios to the naive time. Temp memory is the compiled
program's ``memory_analysis().temp_size_in_bytes``; the last row, T = 65,536 × V = 131,072, is
compiled only (from ShapeDtypeStructs): the naive form would need 32 GiB of logits. Every
implementation's value is checked against the naive one before timing.

    python scripts/bench_linear_cross_entropy.py [--repeats 3] [--chunk-size N]
      [--out bench_results/bench_linear_cross_entropy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxbatch.losses import linear_cross_entropy

MIB = 2**20
TIMED = [(8192, 512, 32768), (8192, 1024, 32768)]  # (T, D, V)
COMPILE_ONLY = [(65536, 512, 131072)]
GOAL_TIME, GOAL_MEMORY = 1.10, 10.0  # jaxbatch/naive time at most, naive/jaxbatch temp at least


def _jaxbatch(implementation, chunk_size):
    def loss(h, w, labels):
        return linear_cross_entropy(
            h, w, labels, chunk_size=chunk_size, implementation=implementation
        )

    return loss, lambda w: w


def _jax_cce():
    import jax_cce

    return (lambda h, w_vd, labels: jax_cce.linear_cross_entropy(h, w_vd, labels)), (
        lambda w: w.T  # its layout, [V, D], prepared outside the timed call
    )


def _tokamax_xla():
    import tokamax
    from absl import flags

    if not flags.FLAGS.is_parsed():  # tokamax reads absl flags; this script's are not theirs
        flags.FLAGS(sys.argv[:1])

    def loss(h, w, labels):
        return tokamax.linear_softmax_cross_entropy_loss(
            h, labels, w, reduction="mean", implementation="xla"
        )

    return loss, lambda w: w


def implementations(chunk_size: int) -> dict:
    """name -> (loss(h, w_in_its_layout, labels), layout(w)); peers only when importable."""
    out = {
        "naive": _jaxbatch("reference", chunk_size),
        "jaxbatch": _jaxbatch("xla", chunk_size),
    }
    for name, make in (("jax-cce 0.1.0", _jax_cce), ("tokamax xla", _tokamax_xla)):
        try:
            out[name] = make()
        except ImportError as err:
            print(f"note: peer {name!r} skipped, not installed ({err}); see BUILD.md", flush=True)
    return out


def _grad(loss):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _temp_mib(fn, layout, t, d, v) -> float:
    w = jax.eval_shape(layout, jax.ShapeDtypeStruct((d, v), jnp.float32))
    h, labels = jax.ShapeDtypeStruct((t, d), jnp.float32), jax.ShapeDtypeStruct((t,), jnp.int32)
    return fn.lower(h, w, labels).compile().memory_analysis().temp_size_in_bytes / MIB


def _seconds(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def _timed_rows(impls, repeats):
    rows = []
    for t, d, v in TIMED:
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        h = jax.random.normal(keys[0], (t, d))
        w = jax.random.normal(keys[1], (d, v)) / d**0.5
        labels = jax.random.randint(keys[2], (t,), 0, v)
        fns, args = {}, {}
        for name, (loss, layout) in impls.items():
            fns[name], args[name] = _grad(loss), (h, jax.block_until_ready(layout(w)), labels)
        want = float(fns["naive"](*args["naive"])[0])
        for name, fn in fns.items():  # compiles, and checks the value
            got = float(fn(*args[name])[0])
            if not np.isclose(got, want, rtol=1e-4):
                raise RuntimeError(f"{name}: loss {got} differs from the naive {want}")
        times = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(_seconds(fn, args[name]))
        for name, (_, layout) in impls.items():
            ratios = [x / r for x, r in zip(times[name], times["naive"], strict=True)]
            rows.append(
                {
                    "T": t,
                    "D": d,
                    "V": v,
                    "implementation": name,
                    "median_s": statistics.median(times[name]),
                    "time_ratio": statistics.median(ratios),
                    "temp_mib": _temp_mib(fns[name], layout, t, d, v),
                }
            )
            print(rows[-1], flush=True)
    return rows


def _compile_rows(impls):
    rows = []
    for t, d, v in COMPILE_ONLY:
        for name, (loss, layout) in impls.items():
            rows.append(
                {"T": t, "D": d, "V": v, "implementation": name,
                 "temp_mib": _temp_mib(_grad(loss), layout, t, d, v)}
            )  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def _table(rows) -> str:
    naive = {
        (r["T"], r["D"], r["V"]): r["temp_mib"] for r in rows if r["implementation"] == "naive"
    }
    lines = [
        "| T | D | V | implementation | median s | time / naive | temp (MiB) | naive temp / temp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        timed = (
            f"{r['median_s']:.2f} | {r['time_ratio']:.2f}"
            if "median_s" in r
            else "(compile only) |"
        )
        saved = naive[(r["T"], r["D"], r["V"])] / max(r["temp_mib"], 1e-9)
        lines.append(
            f"| {r['T']:,} | {r['D']:,} | {r['V']:,} | {r['implementation']} | {timed} | "
            f"{r['temp_mib']:,.0f} | {saved:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="tokens per chunk (default: the library's)"
    )
    parser.add_argument("--out", default="bench_results/bench_linear_cross_entropy.json")
    args = parser.parse_args(argv)
    impls = implementations(args.chunk_size)
    rows = _timed_rows(impls, args.repeats) + _compile_rows(impls)
    print(
        f"\nfloat32, jaxbatch chunks of {args.chunk_size or 'default'} tokens, backend "
        f"{jax.default_backend()}, {len(jax.devices())} device(s), median of {args.repeats}"
    )
    print(_table(rows))
    ours = [r for r in rows if r["implementation"] == "jaxbatch" and "median_s" in r]
    naive = {(r["T"], r["D"]): r["temp_mib"] for r in rows if r["implementation"] == "naive"}
    for r in ours:
        saved = naive[(r["T"], r["D"])] / r["temp_mib"]
        ok = r["time_ratio"] <= GOAL_TIME and saved >= GOAL_MEMORY
        print(
            f"goal D = {r['D']}: time {r['time_ratio']:.2f} <= {GOAL_TIME} and memory "
            f"{saved:.1f}x >= {GOAL_MEMORY}x: {'PASS' if ok else 'FAIL'}"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"chunk_size": args.chunk_size, "repeats": args.repeats, "rows": rows}, f, indent=2
        )


if __name__ == "__main__":
    main()
