"""Evaluation with running vs recomputed ("precise") BatchNorm statistics, per BN momentum.

Trains a BatchNorm config once per momentum and evaluates the final parameters twice: with the
running statistics the training left behind, and after ``precise_bn`` recomputed them over n
training batches (Wu & Johnson 2021). Prints a Markdown table and writes JSON:

  python scripts/compare_precise_bn.py --config configs/digits_resnet_lars.py \\
      --momenta 0.5 0.9 0.99 --batches 4 --out bench_results/precise_bn.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from jaxbatch import data as jdata
from jaxbatch.train import config as config_lib
from jaxbatch.train import loop


def compare(config: str, momenta: list[float], batches: int, overrides: list[str]) -> list[dict]:
    rows = []
    for momentum in momenta:
        cfg = config_lib.load_config(config, [*overrides, f"model.bn_momentum={momentum}"])
        with tempfile.TemporaryDirectory() as workdir:
            summary = loop.train(cfg, workdir, progress=False)  # running statistics only
        with cfg.unlocked():
            cfg.precise_bn_batches = batches
        run = loop.build(cfg)
        train = jdata.load_split(cfg.dataset.name, "train", **cfg.dataset.options)
        test = jdata.load_split(cfg.dataset.name, "test", **cfg.dataset.options)
        state = loop.with_precise_bn(run, summary["state"], train)
        metric = run.task.primary_metric
        rows.append(
            {
                "bn_momentum": momentum,
                "steps": summary["step"],
                "running": summary["eval"][metric],
                "precise": loop.evaluate(run, state, test)[metric],
                "metric": metric,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits_resnet_lars.py")
    parser.add_argument("--momenta", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    parser.add_argument("--batches", type=int, default=4, help="batches for precise BN")
    parser.add_argument("--override", action="append", default=["ema.decay=0.0"])
    parser.add_argument("--out", default="bench_results/precise_bn.json")
    args = parser.parse_args(argv)
    rows = compare(args.config, args.momenta, args.batches, args.override)
    metric = rows[0]["metric"]
    print(f"\n| BN momentum | steps | {metric}, running stats | {metric}, precise BN |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['bn_momentum']} | {r['steps']} | {r['running']:.4f} | {r['precise']:.4f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": args.config, "batches": args.batches, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
