"""Benchmark of jaxbatch.losses.linear_cross_entropy: token chunks against the naive [T, V] form.

Forward+backward (gradients wrt h and w) of 'xla' (chunked) and 'reference' (logits
materialised), D = 512, float32, on this machine's default backend:

- time at T × V = 4,096 × 32,768 and 8,192 × 32,768: both run back to back in each repetition;
  the table shows the fastest time of each and the median of the per-repetition ratios;
- compiled temp memory at those sizes and at a GPT-scale shape that no CPU here could run,
  T = 65,536 tokens × V = 131,072 (compile only, from ShapeDtypeStructs): the naive form needs
  the 32 GiB of logits, the chunked one O(chunk·V + D·V).

    python scripts/bench_linear_cross_entropy.py [--repeats 3] [--chunk-size 1024]
      [--out bench_results/bench_linear_cross_entropy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from jaxbatch.losses import linear_cross_entropy

MIB = 2**20
D = 512
TIMED = [(4096, 32768), (8192, 32768)]
COMPILE_ONLY = [(65536, 131072)]


def _grad_fn(implementation: str, chunk_size: int):
    def loss(h, w, labels):
        return linear_cross_entropy(
            h, w, labels, chunk_size=chunk_size, implementation=implementation
        )

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _shapes(t, v, dtype=jnp.float32):
    return (
        jax.ShapeDtypeStruct((t, D), dtype),
        jax.ShapeDtypeStruct((D, v), dtype),
        jax.ShapeDtypeStruct((t,), jnp.int32),
    )


def _temp_mib(fn, t, v) -> float:
    compiled = fn.lower(*_shapes(t, v)).compile()
    return compiled.memory_analysis().temp_size_in_bytes / MIB


def _seconds(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--out", default="bench_results/bench_linear_cross_entropy.json")
    args = parser.parse_args(argv)
    fns = {impl: _grad_fn(impl, args.chunk_size) for impl in ("reference", "xla")}
    rows = []
    for t, v in TIMED:
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        inputs = (
            jax.random.normal(keys[0], (t, D)),
            jax.random.normal(keys[1], (D, v)) / D**0.5,
            jax.random.randint(keys[2], (t,), 0, v),
        )
        for fn in fns.values():
            _seconds(fn, inputs)  # compile
        times = {impl: [] for impl in fns}
        for _ in range(args.repeats):
            for impl, fn in fns.items():
                times[impl].append(_seconds(fn, inputs))
        ratios = [x / r for x, r in zip(times["xla"], times["reference"], strict=True)]
        rows.append(
            {
                "T": t,
                "V": v,
                "reference_s": min(times["reference"]),
                "xla_s": min(times["xla"]),
                "time_ratio": statistics.median(ratios),
                "reference_temp_mib": _temp_mib(fns["reference"], t, v),
                "xla_temp_mib": _temp_mib(fns["xla"], t, v),
            }
        )
        print(rows[-1], flush=True)
    for t, v in COMPILE_ONLY:
        rows.append(
            {
                "T": t,
                "V": v,
                "reference_temp_mib": _temp_mib(fns["reference"], t, v),
                "xla_temp_mib": _temp_mib(fns["xla"], t, v),
            }
        )
        print(rows[-1], flush=True)

    print(f"\nD = {D}, float32, chunk {args.chunk_size} tokens, backend {jax.default_backend()}")
    print(
        "| T | V | logits (MiB) | reference temp (MiB) | xla temp (MiB) | reference s | xla s "
        "| xla / reference time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        timed = (
            f"{r['reference_s']:.2f} | {r['xla_s']:.2f} | {r['time_ratio']:.2f}"
            if "xla_s" in r
            else "(compile only) | | "
        )
        print(
            f"| {r['T']:,} | {r['V']:,} | {r['T'] * r['V'] * 4 / MIB:,.0f} | "
            f"{r['reference_temp_mib']:,.0f} | {r['xla_temp_mib']:,.0f} | {timed} |"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"D": D, "chunk_size": args.chunk_size, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
