"""Re-runs the main job (configs/codesearch_clip.py) with one change at a time; prints the table.

Each variant is the demo config plus the overrides listed in VARIANTS, trained from scratch by the
trainer (``loop.train``) in a temporary directory; the table holds held-out recall@1 / recall@10
of the model and of its EMA, the last training loss and the wall time of the run (compile
included). docs/main_job.md shows its output:

  python scripts/ablate_main_job.py [--seeds 0 1 2] [--only NAME ...] [--out results.json]

With several seeds every cell is the median over the seeds. A variant takes 1-3 minutes on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from jaxbatch.train import config as config_lib
from jaxbatch.train import loop

CONFIG = "configs/codesearch_clip.py"
# name -> (config arg or None, overrides). "demo" is `make demo`; each other row changes one thing.
VARIANTS: dict[str, tuple[str | None, list[str]]] = {
    "demo": (None, []),
    "byte n-gram tower, batch 512 (before)": ("ngram", ["batch_size=512"]),
    "sub-tokens without prefixes": (None, ["dataset.options.tokenizer=subtokens"]),
    "sub-tokens + bigrams": (None, ["dataset.options.tokenizer=subtokens+bigrams"]),
    "2^14 buckets": (None, ["model.x_encoder.buckets=16384"]),
    "token dropout 0.1": (None, ["model.x_encoder.token_dropout=0.1"]),
    "batch 512": (None, ["batch_size=512"]),
    "batch 4374 (the whole train set)": (None, ["batch_size=4374"]),
}


def run_variant(arg: str | None, overrides: list[str], seed: int) -> dict:
    path = CONFIG if arg is None else f"{CONFIG}:{arg}"
    cfg = config_lib.load_config(path, [*overrides, f"seed={seed}"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        summary = loop.train(cfg, workdir, progress=False)
    row = {"seconds": time.perf_counter() - start, "train_loss": summary["train_loss"]}
    for key, name in (("eval", "model"), ("eval_ema", "ema")):
        for metric, value in summary.get(key, {}).items():
            row[f"{name} {metric}"] = value
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--out")
    args = parser.parse_args()
    names = args.only or list(VARIANTS)
    cols = ["model recall@1", "model recall@10", "ema recall@1", "ema recall@10", "train_loss"]
    print(f"seeds {args.seeds} (median over seeds)")
    print("| variant | " + " | ".join(cols) + " | wall (s) |")
    print("|---|" + "---|" * (len(cols) + 1), flush=True)
    table = {}
    for name in names:  # one row as soon as its runs are done
        runs = [run_variant(*VARIANTS[name], seed) for seed in args.seeds]
        row = {k: statistics.median(r[k] for r in runs) for k in [*cols, "seconds"]}
        table[name] = row
        cells = [f"{row[k]:.4f}" if k != "train_loss" else f"{row[k]:.3f}" for k in cols]
        print(f"| {name} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"seeds": args.seeds, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
