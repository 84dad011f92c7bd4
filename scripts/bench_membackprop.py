"""Benchmark of memory-efficient backprop: the longest sequence per device, and the time per token.

(a) Longest sequence (compile only). For a 12-layer D = 768 decoder (12 heads, MLP 3,072) and a
    24-layer D = 2,048 decoder (16 heads, MLP 8,192), vocabulary 32,768, the trainer's whole train
    step (LAMB, chunked linear cross-entropy) is compiled from ShapeDtypeStructs on a mesh of
    fsdp = 8 simulated devices with ONE sequence per device, and ``jaxbatch.train.plan_sequence``
    bisects the longest length (multiples of ``--multiple``) whose peak bytes per device
    (arguments + outputs − aliased + temporaries) fit ``--budget`` (16 GiB), for each mode:

      full            ordinary autodiff, the chunked attention (no T×T scores)
      remat           every block recomputed in the backward pass (jax.checkpoint), the chunked
                      attention: the strongest baseline
      streambp        exact sequence-chunked backprop (jaxbatch.nn.streambp)
      streambp+int8   streambp with the saved activations stored as int8
                      (jaxbatch.nn.compressed_activations)

      streambp+groups streambp with the layers in G checkpointed groups
                      (``stream_layer_groups``, G + L/G states held instead of L), when the
                      checkout's DecoderLM has that field (skipped otherwise)

    Goals: streambp ≥ 2.5× the remat length at 12L/768 and ≥ 3× at 24L/2048. Each (model, mode)
    search runs in its own subprocess with 8 simulated host devices (XLA reads the device count
    once, at start), ``--jobs`` at a time, compiled with XLA:CPU's cheap LLVM pipeline (the same
    HLO and buffer assignment, so the same memory analysis; see tests/conftest.py). The search
    starts from the line through the peaks at ``--fit`` multiples and confirms the answer by
    compiling it and the next multiple (``plan_sequence.longest_fitting_sequence(affine_from=)``).
(b) Time per token on this CPU (one device, in this process): a small decoder (4 layers, D = 256)
    at a length every mode holds, value and gradient of the train step's loss, median of
    ``--repeats`` runs, each repetition running every mode back to back; the ratio to remat is the
    median of the per-repetition ratios. Goal: streambp ≤ 1.2× remat.
(c) The Pallas cross-entropy kernels (pallas_kernels/cross_entropy) run on TPU and GPU only: they
    are not timed on this CPU machine.

    nice -n 19 python scripts/bench_membackprop.py [--quick] [--jobs 2]
        [--out bench_results/bench_membackprop.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

_DEVICES = 8
_WORKER = "--length-worker"
_CHEAP_LLVM = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if _WORKER in sys.argv:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_DEVICES} {_CHEAP_LLVM}"
    ).strip()

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "stdlib_lm.py")
MODELS = {
    "12L/768": dict(width=768, depth=12, heads=12, mlp_dim=3072),
    "24L/2048": dict(width=2048, depth=24, heads=16, mlp_dim=8192),
}
VOCAB = 32768
MODES = {
    "full": dict(backprop="full"),
    "remat": dict(backprop="remat"),
    "streambp": dict(backprop="streambp"),
    "streambp+int8": dict(backprop="streambp", compress_activations=("layer_input",)),
    "streambp+groups": dict(backprop="streambp", stream_layer_groups="auto"),
    "streambp+groups+int8": dict(
        backprop="streambp", stream_layer_groups="auto", compress_activations=("layer_input",)
    ),
}
GOALS_LENGTH = {"12L/768": 2.5, "24L/2048": 3.0}
GOAL_TIME = 1.2
GIB = 2**30


def lm_config(model: dict, mode: dict, *, seq_len: int, batch: int, mesh: dict, chunk: int):
    """The stdlib LM config with ``model`` sizes, backprop ``mode`` and the given batch/mesh."""
    from jaxbatch.train import config as config_lib

    cfg = config_lib.load_config(CONFIG, [])
    mode = dict(mode)
    if mode.get("stream_layer_groups") == "auto":
        mode["stream_layer_groups"] = best_groups(model["depth"])
    cfg.model.update(
        dict(vocab_size=VOCAB, max_len=seq_len, scan_layers=True, attention="chunked")
        | model
        | mode
    )
    cfg.model.attention_chunk_size = min(512, chunk)
    cfg.model.stream_chunk_size = chunk
    cfg.dataset.options.seq_len = seq_len
    cfg.batch_size = cfg.reference_batch_size = batch
    cfg.eval_batch_size = batch
    cfg.total_samples = 100 * batch
    cfg.schedule.warmup_samples = batch
    cfg.mesh.update(mesh)
    return ml_collections.ConfigDict(cfg.to_dict())


def best_groups(depth: int) -> int:
    """The divisor G of the depth with the fewest states held, G + depth / G (smallest G on tie)."""
    return min((g for g in range(1, depth + 1) if depth % g == 0), key=lambda g: g + depth // g)


def supported_modes() -> dict:
    """The modes this checkout's DecoderLM accepts (a mode whose field is missing is skipped)."""
    from jaxbatch.nn import DecoderLM

    fields = DecoderLM.__dataclass_fields__
    return {name: m for name, m in MODES.items() if all(k in fields for k in m)}


def length_worker(args) -> dict:
    """(a), in an 8-device process: the search for one model and mode."""
    from jaxbatch.train import plan_sequence

    assert jax.device_count() == _DEVICES, jax.device_count()
    name, mode_name = args.model, args.mode
    cfg = lm_config(
        MODELS[name],
        MODES[mode_name],
        seq_len=args.multiple,
        batch=_DEVICES,
        mesh=dict(data=1, fsdp=_DEVICES, tensor=1),
        chunk=args.multiple,
    )
    start = time.perf_counter()
    affine = None if args.bisect else tuple(int(u) for u in args.fit.split(","))
    search = plan_sequence.longest_fitting_sequence(
        cfg, args.budget, multiple=args.multiple, limit=args.limit, affine_from=affine
    )
    seconds = time.perf_counter() - start
    print(f"  {name} {mode_name}: {search.longest} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    model = {k: cfg.model[k] for k in ("backprop", "stream_chunk_size", "attention")}
    for key in ("compress_activations", "stream_layer_groups"):
        if key in cfg.model:
            model[key] = cfg.model[key]
    return plan_sequence.search_to_dict(search) | {"seconds": seconds, "model": model}


def run_length_searches(args) -> dict:
    """(a): one worker subprocess per (model, mode), ``args.jobs`` at a time."""
    models = ["12L/768"] if args.quick else list(MODELS)
    specs = [(m, mode) for m in models for mode in supported_modes()]
    skipped = [mode for mode in MODES if mode not in supported_modes()]
    if skipped:
        print(f"modes this DecoderLM lacks a field for (skipped): {skipped}", file=sys.stderr)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    pending, running, out = list(specs), [], {m: {} for m in models}
    while pending or running:
        while pending and len(running) < args.jobs:
            model, mode = pending.pop(0)
            cmd = [sys.executable, __file__, _WORKER, "--model", model, "--mode", mode]
            cmd += ["--budget", str(args.budget), "--multiple", str(args.multiple)]
            cmd += ["--limit", str(args.limit), "--fit", args.fit]
            cmd += ["--bisect"] if args.bisect else []
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
            running.append((model, mode, proc))
        model, mode, proc = running.pop(0)
        stdout, _ = proc.communicate()
        if proc.returncode:  # recorded, and the other searches go on
            out[model][mode] = {"error": f"worker exited with {proc.returncode}", "probes": []}
            continue
        out[model][mode] = json.loads(stdout)
        # Kept as each search ends, so a cut run's (a) can be reused with --skip-lengths.
        partial = pathlib.Path(args.out + ".lengths.json")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"lengths": out}, indent=2))
    return {m: {mode: out[m][mode] for mode in supported_modes()} for m in models}


def bytes_per_token(result: dict) -> float:
    """The slope of the peak bytes in the sequence length, from the two smallest probes."""
    probes = sorted(result["probes"], key=lambda p: p["seq_len"])
    (a, b) = probes[0], probes[1]
    return (b["peak_bytes"] - a["peak_bytes"]) / (b["seq_len"] - a["seq_len"])


def time_per_token(args) -> dict:
    """(b), in this one-device process: the trainer's train step per mode, timed."""
    from jaxbatch.train import loop

    seq_len, batch = (256, 2) if args.quick else (1024, 4)
    model = dict(width=256, depth=4, heads=4, mlp_dim=1024)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 257, (4 * batch, seq_len + 1), dtype=np.int32)
    runs = {}
    for mode_name, mode in supported_modes().items():
        cfg = lm_config(
            model, mode, seq_len=seq_len, batch=batch, mesh=dict(data=1), chunk=seq_len // 4
        )
        run = loop.build(cfg, train_data={"tokens": tokens}, devices=jax.devices()[:1])
        state, _ = loop.init_or_restore(run, None)
        batch_in = {"tokens": tokens[:batch]}
        state, metrics = run.train_step(state, batch_in)  # compile
        jax.block_until_ready(metrics)
        runs[mode_name] = [run, state, batch_in]
    times = {m: [] for m in runs}
    for _ in range(args.repeats):
        for mode_name, entry in runs.items():
            run, state, batch_in = entry
            start = time.perf_counter()
            state, metrics = run.train_step(state, batch_in)
            jax.block_until_ready(metrics)
            times[mode_name].append(time.perf_counter() - start)
            entry[1] = state
    n_tokens = seq_len * batch
    ratios = {
        m: statistics.median(t / r for t, r in zip(times[m], times["remat"], strict=True))
        for m in times
    }
    return {
        "seq_len": seq_len,
        "batch": batch,
        "model": model,
        "repeats": args.repeats,
        "us_per_token": {m: 1e6 * statistics.median(t) / n_tokens for m, t in times.items()},
        "ratio_to_remat": ratios,
        "times": times,
    }


def print_tables(lengths: dict, timing: dict, budget: int) -> list[str]:
    verdicts = []
    print(f"\n(a) longest sequence per device within {budget / GIB:.0f} GiB (compile only):")
    print(
        f"{'model':<10} {'mode':<21} {'longest':>9} {'× remat':>8} {'peak GiB':>9} "
        f"{'KiB/token':>10}"
    )
    for name, modes in lengths.items():
        remat = modes.get("remat", {}).get("longest")
        for mode_name, r in modes.items():
            if "error" in r:
                print(f"{name:<10} {mode_name:<21} {r['error']}")
                continue
            longest = r["longest"]
            ratio = longest / remat if longest and remat else float("nan")
            peak = next((p["peak_bytes"] for p in r["probes"] if p["seq_len"] == longest), 0)
            mark = "+" if r["reached_limit"] else ""
            print(
                f"{name:<10} {mode_name:<21} {str(longest) + mark:>9} {ratio:>8.2f} "
                f"{peak / GIB:>9.2f} {bytes_per_token(r) / 1024:>10.1f}"
            )
        for mode_name in ("streambp", "streambp+groups"):
            stream = modes.get(mode_name, {}).get("longest")
            if stream and remat:
                ok = stream / remat >= GOALS_LENGTH[name]
                verdicts.append(
                    f"{'PASS' if ok else 'FAIL'}: {name} {mode_name} {stream / remat:.2f}× remat "
                    f"(goal ≥ {GOALS_LENGTH[name]}×)"
                )
    print(
        f"\n(b) time per token, {timing['model']} decoder, T = {timing['seq_len']}, batch "
        f"{timing['batch']}, median of {timing['repeats']}:"
    )
    print(f"{'mode':<15} {'µs/token':>9} {'× remat':>8}")
    for m, us in timing["us_per_token"].items():
        print(f"{m:<15} {us:>9.1f} {timing['ratio_to_remat'][m]:>8.2f}")
    if "streambp" in timing["ratio_to_remat"]:
        r = timing["ratio_to_remat"]["streambp"]
        verdicts.append(
            f"{'PASS' if r <= GOAL_TIME else 'FAIL'}: streambp {r:.2f}× remat time "
            f"(goal ≤ {GOAL_TIME}×)"
        )
    print("\n(c) Pallas cross-entropy kernels: TPU/GPU only, not timed on this CPU machine.")
    print("\n" + "\n".join(verdicts))
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12L/768 only, short timing run")
    parser.add_argument("--budget", type=int, default=16 * GIB, help="bytes per device")
    parser.add_argument("--multiple", type=int, default=1024, help="length granularity")
    parser.add_argument("--limit", type=int, default=1 << 20, help="longest length tried")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2, help="length searches at a time")
    parser.add_argument("--fit", default="4,8", help="multiples of the affine first guess")
    parser.add_argument("--bisect", action="store_true", help="doubling + bisection instead")
    parser.add_argument(
        "--skip-lengths", help="reuse (a) from an earlier JSON output (or its .lengths.json)"
    )
    parser.add_argument("--out", default="bench_results/bench_membackprop.json")
    parser.add_argument(_WORKER, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.length_worker:
        json.dump(length_worker(args), sys.stdout)
        return
    if args.skip_lengths:
        lengths = json.loads(pathlib.Path(args.skip_lengths).read_text())["lengths"]
    else:
        lengths = run_length_searches(args)
    timing = time_per_token(args)
    verdicts = print_tables(lengths, timing, args.budget)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"budget_bytes": args.budget, "lengths": lengths, "timing": timing}
    out.write_text(json.dumps(result | {"verdicts": verdicts}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
