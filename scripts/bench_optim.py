"""Benchmark one optimizer step of jaxbatch LAMB/LARS against optax.lamb, optax.lars, optax.adamw.

One jitted step ``(params, state, grads) -> (params + updates, new_state)`` with params and state
donated, on two pytrees:

- ``bert``: ~40M parameters in ~170 leaves (embeddings, 10 BERT layers of kernels, biases and
  LayerNorms, pooler);
- ``stacked``: a 24-layer scanned transformer whose per-layer leaves carry a leading axis of 24.

jaxbatch runs with ``exclude_bias_and_norm`` decay and trust-ratio masks, ratio clipping to
[0, 10], and on ``stacked`` per-layer ratios (``layer_axes`` = 0 on the stacked leaves); the
optax optimizers run with their defaults plus weight decay. Times are medians of interleaved
repetitions after warm-up, reported as ratios to optax.lamb; temp memory is the compiled
program's ``memory_analysis().temp_size_in_bytes``.

Run: ``python scripts/bench_optim.py [--reps 15] [--out bench_results/bench_optim.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from jaxbatch import optim


def _layer(d: int, mlp: int, stack: tuple[int, ...] = ()) -> dict:
    """Shapes of one BERT encoder layer (flax naming), optionally with leading stack axes."""
    s = lambda *shape: jax.ShapeDtypeStruct(stack + shape, jnp.float32)
    dense = lambda i, o: {"kernel": s(i, o), "bias": s(o)}
    norm = lambda: {"scale": s(d), "bias": s(d)}
    return {
        "attention": {n: dense(d, d) for n in ("query", "key", "value", "out")},
        "attention_norm": norm(),
        "mlp": {"wi": dense(d, mlp), "wo": dense(mlp, d)},
        "output_norm": norm(),
    }


def _embeddings(vocab: int, d: int) -> dict:
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return {
        "word": {"embedding": s(vocab, d)},
        "position": {"embedding": s(512, d)},
        "token_type": {"embedding": s(2, d)},
        "embed_norm": {"scale": s(d), "bias": s(d)},
    }


def bert_shapes() -> dict:
    """~40M parameters in 167 leaves: d=512, mlp=2048, 10 layers, vocab 16384."""
    d, mlp = 512, 2048
    tree = {"embeddings": _embeddings(16384, d)}
    tree.update({f"layer_{i}": _layer(d, mlp) for i in range(10)})
    tree["pooler"] = {"kernel": jax.ShapeDtypeStruct((d, d), jnp.float32)}
    tree["pooler"]["bias"] = jax.ShapeDtypeStruct((d,), jnp.float32)
    return tree


def stacked_shapes() -> dict:
    """A scanned 24-layer encoder: d=384, mlp=1536, every layer leaf has a leading axis of 24."""
    d, mlp = 384, 1536
    return {"embeddings": _embeddings(8192, d), "layers": _layer(d, mlp, stack=(24,))}


def stacked_layer_axes(params):
    return optim.masks.from_rules(params, [(r"layers/.*", 0), (r".*", None)])


def candidates(stacked: bool) -> dict:
    lr, wd = 1e-3, 0.01
    mask = optim.masks.exclude_bias_and_norm
    axes = stacked_layer_axes if stacked else None
    common = dict(weight_decay_mask=mask, trust_ratio_mask=mask, min_ratio=0.0, max_ratio=10.0)
    return {
        "optax.lamb": optax.lamb(lr, weight_decay=wd),
        "jaxbatch.lamb": optim.lamb(lr, weight_decay=wd, layer_axes=axes, **common),
        "optax.lars": optax.lars(lr, weight_decay=wd),
        "jaxbatch.lars": optim.lars(lr, weight_decay=wd, layer_axes=axes, **common),
        "optax.adamw": optax.adamw(lr, weight_decay=wd),
    }


def _materialise(shapes, key):
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(key, len(leaves))
    arrays = [
        0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, arrays)


def _step_fn(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def bench_tree(name, shapes, stacked, reps, warmup):
    n_params = sum(s.size for s in jax.tree.leaves(shapes))
    n_leaves = len(jax.tree.leaves(shapes))
    txs = candidates(stacked)
    grads = _materialise(shapes, jax.random.key(1))
    runs = {}
    for cand, tx in txs.items():
        params = _materialise(shapes, jax.random.key(0))
        state = tx.init(params)
        step = _step_fn(tx)
        compiled = step.lower(params, state, grads).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        runs[cand] = {"step": compiled, "params": params, "state": state, "temp": temp, "t": []}
    for rep in range(warmup + reps):
        for run in runs.values():  # interleaved, so drifts in machine load hit all alike
            t0 = time.perf_counter()
            run["params"], run["state"] = run["step"](run["params"], run["state"], grads)
            jax.block_until_ready(run["params"])
            if rep >= warmup:
                run["t"].append(time.perf_counter() - t0)
    base = runs["optax.lamb"]
    base_t = statistics.median(base["t"])
    rows = []
    for cand, run in runs.items():
        t = statistics.median(run["t"])
        rows.append(
            {
                "tree": name,
                "params": n_params,
                "leaves": n_leaves,
                "optimizer": cand,
                "median_ms": 1e3 * t,
                "time_vs_optax_lamb": t / base_t,
                "temp_bytes": run["temp"],
                "temp_vs_optax_lamb": run["temp"] / max(base["temp"], 1),
            }
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="bench_results/bench_optim.json")
    args = parser.parse_args()
    rows = bench_tree("bert", bert_shapes(), False, args.reps, args.warmup)
    rows += bench_tree("stacked", stacked_shapes(), True, args.reps, args.warmup)
    header = f"{'tree':8} {'optimizer':14} {'ms':>9} {'time/optax.lamb':>16} {'temp MiB':>9}"
    header += f" {'temp/optax.lamb':>16}"
    print(f"backend: {jax.default_backend()}  device: {jax.devices()[0].device_kind}")
    print(header)
    for r in rows:
        print(
            f"{r['tree']:8} {r['optimizer']:14} {r['median_ms']:9.2f} "
            f"{r['time_vs_optax_lamb']:16.3f} {r['temp_bytes'] / 2**20:9.2f} "
            f"{r['temp_vs_optax_lamb']:16.3f}"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "args": vars(args), "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
