"""Throughput of the ImageNet input pipeline: JPEG decode + crop + normalise, per thread count.

Writes synthetic ImageNet-sized JPEGs (500×375, smooth colour fields with noise, ~60 KB each, close
to ILSVRC's mean size) as 'imagenet2012' ArrayRecord shards in a temporary directory, then times
batches of the training pipeline (Inception crop + flip) and the evaluation pipeline (central
crop) at 224×224 for several ``transform_threads``, one batch at a time (in training grain also
prepares batches ahead in its reader threads). Speed is reported as images/s and as the ratio to
one thread in the same run:

  python scripts/bench_image_pipeline.py [--images 512] [--threads 1 2 4] \\
      [--out bench_results/bench_image_pipeline.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import grain
import numpy as np

from jaxbatch.data import files, imagenet, images


def synthetic_jpegs(count: int, *, width=500, height=375, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        phase = rng.uniform(0, 2 * np.pi, size=3)
        freq = rng.uniform(0.005, 0.03, size=(3, 2))
        channels = [
            127 + 100 * np.sin(freq[c, 0] * xx + freq[c, 1] * yy + phase[c]) for c in range(3)
        ]
        pixels = np.stack(channels, -1) + rng.normal(0, 12, size=(height, width, 3))
        jpeg = images.encode_jpeg(np.clip(pixels, 0, 255).astype(np.uint8), quality=90)
        yield {"image": np.frombuffer(jpeg, np.uint8), "label": np.int32(i % 1000)}


# One batch at a time (grain would otherwise prepare several batches in parallel and hide how
# the work on one batch scales with its threads).
SERIAL = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)


def _time(iterate, batches: int) -> float:
    next(iterate)  # first batch: file opening, thread start-up
    start = time.perf_counter()
    for _ in range(batches):
        next(iterate)
    return time.perf_counter() - start


def bench(data_dir: str, *, threads: list[int], batch_size: int, batches: int) -> list[dict]:
    rows = []
    for mode in ("train", "eval"):
        for t in threads:
            split = imagenet.imagenet_split("train", data_dir=data_dir, format="array_record")
            if mode == "train":
                it = split.train_iterator(
                    batch_size=batch_size, seed=0, transform_threads=t, read_options=SERIAL
                )
            else:
                batches_ = split.eval_batches(batch_size=batch_size, transform_threads=t)
                it = iter(batches_.to_iter_dataset(SERIAL))
            seconds = _time(it, batches)
            rows.append(
                {"mode": mode, "threads": t, "images_per_sec": batches * batch_size / seconds}
            )
            print(rows[-1], flush=True)
    for row in rows:
        base = next(r for r in rows if r["mode"] == row["mode"] and r["threads"] == threads[0])
        row["speedup"] = row["images_per_sec"] / base["images_per_sec"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per setting")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", default="bench_results/bench_image_pipeline.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as data_dir:
        _, count = files.write_example_shards(
            synthetic_jpegs(args.images),
            out_dir=data_dir,
            name="imagenet2012",
            split="train",
            num_shards=4,
        )
        mean_kb = (
            sum(os.path.getsize(os.path.join(data_dir, f)) for f in os.listdir(data_dir))
            / count
            / 1024
        )
        rows = bench(
            data_dir, threads=args.threads, batch_size=args.batch_size, batches=args.batches
        )
    print(
        f"\n{count} synthetic 500×375 JPEGs, {mean_kb:.0f} KB each; output 224×224; "
        f"{os.cpu_count()} CPU cores"
    )
    print("| pipeline | transform_threads | images/s | × one thread |")
    print("|---|---|---|---|")
    for r in rows:
        name = "train (Inception crop + flip)" if r["mode"] == "train" else "eval (central crop)"
        print(f"| {name} | {r['threads']} | {r['images_per_sec']:.0f} | {r['speedup']:.2f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"images": count, "kb_per_image": mean_kb, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
