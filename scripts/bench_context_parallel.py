r"""The longest sequence a 12-layer D = 768 decoder trains on within 16 GiB per device, per
context-parallel strategy (compile only; nothing runs).

For each (devices, strategy) the train step of ``configs/stdlib_lm.py`` grown to GPT-2-small
shape (12 layers, width 768, 12 heads, MLP 3072, byte vocabulary, LAMB, chunked attention and
linear cross-entropy, one sequence per batch row) is compiled from shapes at a sequence length
and its peak bytes per device read from the compiled program's memory analysis
(``jaxbatch.train.plan_sequence``: an affine guess from two lengths, then gallop + bisection on
multiples of ``--multiple``). Rows:

- 1 device, no context parallelism: the baseline;
- 8 devices, mesh context = 8: 'all_gather', 'ring', 'ulysses' (zig-zag layout);
- 64 devices, mesh fsdp = 8 × context = 8 (the parameters and optimizer state sharded 8 ways).

Each row also gives the ratio to the one-device longest sequence (goal for the ring at context
8: >= 8x). StreamBP (``model.backprop='streambp'``) does not compose with context parallelism in
this version (its chunks attend to a key prefix, not the sharded sequence; the trainer refuses
the pair), so its row reports that instead of a number.

  nice -n 19 python scripts/bench_context_parallel.py --devices 8
  nice -n 19 python scripts/bench_context_parallel.py --devices 64 --append

Writes bench_results/bench_context_parallel.json (rows are merged with ``--append``) and prints
a table. Simulated CPU devices: memory is what XLA's buffer assignment plans, not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench_results" / "bench_context_parallel.json"
BUDGET = 16 * 2**30


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8, choices=(8, 64))
    p.add_argument("--strategies", default="all_gather,ring,ulysses")
    p.add_argument("--multiple", type=int, default=2048)
    p.add_argument("--limit", type=int, default=1 << 20)
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--append", action="store_true")
    return p.parse_args()


def _config(mesh: dict, strategy: str):
    from jaxbatch.train import config as config_lib

    overrides = [
        "model.width=768",
        "model.depth=12",
        "model.heads=12",
        "model.mlp_dim=3072",
        "model.attention=chunked",
        "model.attention_chunk_size=512",
        "loss.implementation=xla",
        "noise.enabled=False",
        "micro_batches=1",
        *(f"mesh.{k}={v}" for k, v in mesh.items()),
    ]
    batch = mesh.get("data", 1) * mesh.get("fsdp", 1)
    overrides += [f"batch_size={batch}", f"reference_batch_size={batch}", "eval_batch_size=8"]
    overrides += [f"total_samples={batch * 100}", f"schedule.warmup_samples={batch * 10}"]
    if strategy != "none":
        overrides += [f"model.context_parallel={strategy}", "model.context_layout=zigzag"]
    return config_lib.load_config(str(ROOT / "configs" / "stdlib_lm.py"), overrides)


def _search(cfg, devices, multiple, limit):
    from jaxbatch.train import plan_sequence

    t0 = time.perf_counter()
    search = plan_sequence.longest_fitting_sequence(
        cfg, BUDGET, multiple=multiple, limit=limit, devices=devices, affine_from=(1, 2)
    )
    return search, time.perf_counter() - t0


def main() -> int:
    args = _parse()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    devices = jax.devices()
    rows = []
    if args.baseline:
        plans = [("none", dict(data=1), devices[:1])]
    else:
        plans = []
    mesh = dict(data=1, context=8) if args.devices == 8 else dict(data=1, fsdp=8, context=8)
    plans += [(s, mesh, devices) for s in args.strategies.split(",")]
    for strategy, mesh_sizes, devs in plans:
        cfg = _config(mesh_sizes, strategy)
        search, seconds = _search(cfg, devs, args.multiple, args.limit)
        probes = [
            {"seq_len": p.seq_len, "peak_bytes": p.peak_bytes, "temp_bytes": p.temp_bytes}
            for p in search.probes
        ]
        row = {
            "devices": len(devs),
            "mesh": mesh_sizes,
            "strategy": strategy,
            "layout": "zigzag" if strategy != "none" else "-",
            "backprop": "full",
            "longest_seq_len": search.longest,
            "reached_limit": search.reached_limit,
            "budget_bytes": BUDGET,
            "probes": probes,
            "search_seconds": round(seconds, 1),
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "probes"}), flush=True)
    rows.append(
        {
            "devices": args.devices,
            "mesh": mesh,
            "strategy": "ring",
            "layout": "zigzag",
            "backprop": "streambp",
            "longest_seq_len": None,
            "note": "not composed: StreamBP's sequence chunks attend to a key prefix, not the "
            "context-sharded sequence (the trainer refuses backprop='streambp' with context > 1)",
        }
    )
    old = []
    if args.append and OUT.exists():
        old = json.loads(OUT.read_text())["rows"]
        keys = {(r["devices"], r["strategy"], r["backprop"]) for r in rows}
        old = [r for r in old if (r["devices"], r["strategy"], r["backprop"]) not in keys]
    all_rows = old + rows
    base = next(
        (r["longest_seq_len"] for r in all_rows if r["strategy"] == "none" and r["devices"] == 1),
        None,
    )
    for r in all_rows:
        n = r.get("longest_seq_len")
        r["ratio_to_one_device"] = None if not (n and base) else round(n / base, 2)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "budget_bytes": BUDGET,
                "model": "decoder_lm 12 x 768, 12 heads, MLP 3072, vocab 258, LAMB, f32",
                "command": " ".join(["python", "scripts/bench_context_parallel.py", *sys.argv[1:]]),
                "rows": all_rows,
            },
            indent=1,
        )
    )
    print(f"\n{'devices':>7}  {'mesh':<28} {'strategy':<10} {'backprop':<9} "
          f"{'longest T':>10} {'x 1 device':>10}")  # fmt: skip
    for r in all_rows:
        mesh_text = " × ".join(f"{k}={v}" for k, v in r["mesh"].items())
        n = r.get("longest_seq_len")
        ratio = r.get("ratio_to_one_device")
        print(
            f"{r['devices']:>7}  {mesh_text:<28} {r['strategy']:<10} {r['backprop']:<9} "
            f"{'-' if n is None else n:>10} {'-' if ratio is None else ratio:>10}"
        )
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
