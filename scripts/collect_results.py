"""Prints the README's "Results" table from the run directories of the bundled configs.

Run the three jobs first (each prints its own result too):

  for c in codesearch_clip digits_resnet_lars stdlib_lm; do
    jaxbatch train --config configs/$c.py --workdir runs/$c
  done
  python scripts/collect_results.py [--runs runs]

The numbers come from each run's ``summary.json`` and ``metrics.jsonl``; nothing is typed in.
"""

import argparse
import json
import os

ROWS = [
    ("codesearch_clip", "recall@1", "recall@10"),
    ("digits_resnet_lars", "accuracy", None),
    ("stdlib_lm", "bits_per_byte", None),
]


def _train_seconds(run_dir: str) -> float | None:
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    train = [r for r in records if r["kind"] == "train" and "examples_per_sec" in r]
    if not train:
        return None
    samples = [r["samples"] for r in train]
    # examples/s is measured per logging interval; time = Σ interval samples / rate.
    starts = [0, *samples[:-1]]
    intervals = zip(starts, samples, train, strict=True)
    return sum((end - start) / r["examples_per_sec"] for start, end, r in intervals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    args = parser.parse_args()
    print(
        "| config | batch | steps | metric | model | model EMA | lexical TF-IDF | train time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, *metrics in ROWS:
        run_dir = os.path.join(args.runs, name)
        path = os.path.join(run_dir, "summary.json")
        if not os.path.exists(path):
            print(f"| {name} | (no run in {run_dir}) | | | | | | |")
            continue
        summary = json.load(open(path))
        config = json.load(open(os.path.join(run_dir, "config.json")))
        seconds = _train_seconds(run_dir)
        for metric in filter(None, metrics):
            cells = [
                f"{summary[k][metric]:.4f}" if k in summary else "–"
                for k in ("eval", "eval_ema", "baseline")
            ]
            print(
                f"| {name} | {config['batch_size']} | {summary['step']} | {metric} | "
                + " | ".join(cells)
                + f" | {seconds:.0f} |"
            )


if __name__ == "__main__":
    main()
