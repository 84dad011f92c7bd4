r"""Critical-batch sweep: train a config at several batch sizes, fit S(B) = S_min (1 + B_crit/B).

For each batch size B (at least three) the config is trained through the trainer's public entry
(``jaxbatch.train.loop.train``, what ``jaxbatch train`` calls), with the learning rate the
config's scaling rule gives at B (``scaling.learning_rate`` from ``reference_batch_size``), or,
with ``--lr-multipliers``, a small search around it: one trial per multiplier of the base
learning rate. As in Shallue et al. 2018, the steps to the target of a batch size are the first
evaluation at which any of its trials reaches the target; diverged trials (non-finite loss or
metrics, or a training fault) are excluded. The runs evaluate every ``--eval-every-samples``
samples (rounded to steps), which sets the resolution of the step counts.

The batch sizes that reached the target are fitted with ``jaxbatch.stats.fit_critical_batch``
(S_min, E_min, B_crit with standard errors). When the runs log ``b_simple`` (the trainer does with
``micro_batches > 1``) its median over the second half of each best trial is reported next to the
fit, with the ratio B_crit / B_simple (McCandlish et al. 2018 predict B_crit ~ B_noise; B_simple
overestimates B_noise when the Hessian is ill-conditioned). B_simple grows during training (the
gradient shrinks faster than its noise), so the last value logged at or before each batch's
steps to target (``b_simple_at_target``, median over the batch sizes) is reported too, with its
ratio (B_crit of a target against the noise scale at matched progress). A batch size whose
trials never reach the target is reported as such, not an error.

Writes ``OUT/sweep.json`` and ``OUT/sweep.png`` (steps against examples to the target, the fitted
hyperbola, B_simple marked on it); each trial's run directory is ``OUT/b<B>_lr<m>`` and a finished
trial (its ``summary.json`` present) is not trained again.

Run (digits; the target is the test accuracy):

  python scripts/batch_sweep.py --config configs/digits_resnet_lars.py \
      --batch-sizes 64,128,256,512,1024 --target-metric accuracy --target 0.9 \
      --lr-multipliers 0.5,1,2 --eval-every-samples 2874 --out runs/sweep_digits \
      --config.micro_batches=2

  python scripts/batch_sweep.py --config configs/stdlib_lm.py --batch-sizes 32,64,128,256,512 \
      --target-metric bits_per_byte --target 3.5 --eval-every-samples 2560 \
      --out runs/sweep_stdlib_lm --config.micro_batches=2 --config.total_samples=102400

References:
  McCandlish, Kaplan, Amodei et al., 2018, "An Empirical Model of Large-Batch Training", Eq. 2.11
  and Sec. 2.2; Shallue, Lee, Antognini et al., 2018, "Measuring the Effects of Data Parallelism
  on Neural Network Training", Sec. 3 (steps to result, per-batch learning-rate tuning).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Metrics that improve downwards; any other target metric is maximised.
_LOWER_IS_BETTER = ("loss", "bits", "perplexity", "error", "ppl")


def metric_mode(metric: str) -> str:
    """'min' for loss-like metric names, else 'max'."""
    return "min" if any(word in metric.lower() for word in _LOWER_IS_BETTER) else "max"


def _finite(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def first_reach(records: list[dict], metric: str, target: float, mode: str) -> dict | None:
    """The first 'eval' record whose ``metric`` reaches ``target``: {'step', 'samples', 'value'}."""
    for r in records:
        if r.get("kind") != "eval" or metric not in r:
            continue
        value = _finite(r[metric])
        if value is None:
            continue
        if (value <= target) if mode == "min" else (value >= target):
            return {"step": int(r["step"]), "samples": int(r["samples"]), "value": value}
    return None


def _read_records(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _b_simple(records: list[dict]) -> float | None:
    """Median of the logged B_simple over the second half of training (after the EMA settles)."""
    values = [_finite(r.get("b_simple")) for r in records if r.get("kind") == "train"]
    values = [v for v in values if v is not None]
    if not values:
        return None
    return float(np.median(values[len(values) // 2 :]))


def _b_simple_at(records: list[dict], step: int | None) -> float | None:
    """The last B_simple logged at or before ``step`` (the noise scale when the target is hit)."""
    if step is None:
        return None
    values = [
        _finite(r.get("b_simple"))
        for r in records
        if r.get("kind") == "train" and int(r["step"]) <= step
    ]
    values = [v for v in values if v is not None]
    return values[-1] if values else None


def run_trial(cfg, workdir: str, *, metric: str, target: float, mode: str) -> dict[str, Any]:
    """Trains ``cfg`` in ``workdir`` (unless finished before) and reads what it reached."""
    from jaxbatch.train import faults, loop

    error = None
    if not os.path.exists(os.path.join(workdir, "summary.json")):
        try:
            loop.train(cfg, workdir, progress=False)
        except (faults.TrainingFault, FloatingPointError) as e:
            error = f"{type(e).__name__}: {e}"
    records = _read_records(workdir)
    evals = [r for r in records if r.get("kind") == "eval" and metric in r]
    train = [r for r in records if r.get("kind") == "train"]
    if records and not evals and error is None:
        raise ValueError(
            f"the runs log no eval metric {metric!r}; the eval records of {workdir} have "
            f"{sorted({k for r in records if r.get('kind') == 'eval' for k in r})}"
        )
    final_loss = _finite(train[-1].get("loss")) if train else None
    final_metric = _finite(evals[-1][metric]) if evals else None
    diverged = error is not None or final_loss is None or final_metric is None
    reach = None if diverged else first_reach(records, metric, target, mode)
    from jaxbatch.train import config as config_lib

    scaled, _ = config_lib.rescale_for_batch(cfg)  # what the trainer trains with at this batch
    return {
        "workdir": workdir,
        "learning_rate": float(cfg.optimizer.learning_rate),
        "learning_rate_at_batch": float(scaled.optimizer.learning_rate),
        "diverged": diverged,
        "error": error,
        "final_train_loss": final_loss,
        f"final_{metric}": final_metric,
        "steps_to_target": None if reach is None else reach["step"],
        "examples_to_target": None if reach is None else reach["samples"],
        "b_simple": _b_simple(records),
        "b_simple_at_target": _b_simple_at(records, None if reach is None else reach["step"]),
        "steps_run": max((int(r["step"]) for r in records), default=0),
    }


def sweep(
    config: str,
    batch_sizes: Sequence[int],
    *,
    target_metric: str,
    target: float,
    out_dir: str,
    mode: str | None = None,
    lr_multipliers: Sequence[float] = (1.0,),
    eval_every_samples: int | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Runs the sweep, fits S(B), writes ``sweep.json`` and ``sweep.png``; returns the result.

    Raises:
      ValueError: fewer than three distinct batch sizes, a non-positive batch size or
        multiplier, or an unknown mode (before any training).
    """
    sizes = sorted({int(b) for b in batch_sizes})
    if len(sizes) < 3 or len(sizes) != len(list(batch_sizes)):
        raise ValueError(
            f"a sweep needs at least 3 distinct batch sizes to fit S_min and B_crit with an "
            f"error, got {list(batch_sizes)}"
        )
    if sizes[0] < 1:
        raise ValueError(f"batch sizes must be positive, got {list(batch_sizes)}")
    if not lr_multipliers or any(not (m > 0 and math.isfinite(m)) for m in lr_multipliers):
        raise ValueError(f"lr multipliers must be finite and > 0, got {list(lr_multipliers)}")
    mode = mode or metric_mode(target_metric)
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if eval_every_samples is not None and eval_every_samples < 1:
        raise ValueError(f"eval_every_samples must be >= 1, got {eval_every_samples}")

    from jaxbatch import stats
    from jaxbatch.train import config as config_lib

    base = config_lib.load_config(config, list(overrides))  # once: absl flags are global
    os.makedirs(out_dir, exist_ok=True)
    per_batch = []
    for batch in sizes:
        trials = []
        for mult in lr_multipliers:
            cfg = base.copy_and_resolve_references()
            cfg.batch_size = batch
            cfg.optimizer.learning_rate = base.optimizer.learning_rate * mult
            every = eval_every_samples or batch
            cfg.eval_every_steps = max(1, round(every / batch))
            cfg.log_every_steps = min(cfg.log_every_steps, cfg.eval_every_steps)
            workdir = os.path.join(out_dir, f"b{batch}_lr{mult:g}")
            trial = run_trial(cfg, workdir, metric=target_metric, target=target, mode=mode)
            trials.append({"lr_multiplier": float(mult), **trial})
        reached = [t for t in trials if t["steps_to_target"] is not None]
        best = min(reached, key=lambda t: t["steps_to_target"]) if reached else None
        entry = {
            "batch_size": batch,
            "reached": best is not None,
            "steps_to_target": None if best is None else best["steps_to_target"],
            "examples_to_target": None if best is None else best["examples_to_target"],
            "best_lr_multiplier": None if best is None else best["lr_multiplier"],
            "learning_rate": None if best is None else best["learning_rate_at_batch"],
            "b_simple": None if best is None else best["b_simple"],
            "b_simple_at_target": None if best is None else best["b_simple_at_target"],
            "trials": trials,
        }
        if best is None:
            diverged = sum(t["diverged"] for t in trials)
            steps = max(t["steps_run"] for t in trials)
            entry["note"] = (
                f"target {target_metric} {'<=' if mode == 'min' else '>='} {target} not reached "
                f"in {steps} steps ({diverged} of {len(trials)} trials diverged)"
            )
        per_batch.append(entry)

    result: dict[str, Any] = {
        "config": config,
        "overrides": list(overrides),
        "target_metric": target_metric,
        "target": target,
        "mode": mode,
        "lr_multipliers": [float(m) for m in lr_multipliers],
        "batches": per_batch,
        "fit": None,
    }
    done = [e for e in per_batch if e["reached"]]
    if len(done) >= 3:
        try:
            fit = stats.fit_critical_batch(
                [e["batch_size"] for e in done],
                [e["steps_to_target"] for e in done],
                [e["examples_to_target"] for e in done],
            )
            result["fit"] = fit._asdict()
        except ValueError as e:
            result["fit_error"] = str(e)
    else:
        result["fit_error"] = (
            f"only {len(done)} batch sizes reached the target ({[e['batch_size'] for e in done]});"
            " the fit needs 3"
        )
    b_simple = [e["b_simple"] for e in per_batch if e["b_simple"] is not None]
    if not b_simple:
        b_simple = [t["b_simple"] for e in per_batch for t in e["trials"] if t["b_simple"]]
    result["b_simple"] = float(np.median(b_simple)) if b_simple else None
    if result["fit"] and result["b_simple"]:
        result["b_crit_over_b_simple"] = result["fit"]["b_crit"] / result["b_simple"]
    at_target = [e["b_simple_at_target"] for e in per_batch if e["b_simple_at_target"]]
    result["b_simple_at_target"] = float(np.median(at_target)) if at_target else None
    if result["fit"] and result["b_simple_at_target"]:
        result["b_crit_over_b_simple_at_target"] = (
            result["fit"]["b_crit"] / result["b_simple_at_target"]
        )
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(result, f, indent=2)
    result["plot"] = plot_sweep(result, os.path.join(out_dir, "sweep.png"))
    return result


def plot_sweep(result: dict[str, Any], path: str) -> str:
    """Steps against examples to the target, per batch size, with the fitted S(B), E(B) curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [e for e in result["batches"] if e["reached"]]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for e in done:
        ax.plot(e["examples_to_target"], e["steps_to_target"], "o", color="C0")
        ax.annotate(
            f"B={e['batch_size']}",
            (e["examples_to_target"], e["steps_to_target"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    fit = result.get("fit")
    if fit:
        sizes = [e["batch_size"] for e in result["batches"]]
        b = np.geomspace(min(sizes) / 4, max(sizes) * 4, 200)
        s = fit["s_min"] * (1 + fit["b_crit"] / b)
        ax.plot(
            b * s,
            s,
            "-",
            color="C1",
            label=f"fit: B_crit = {fit['b_crit']:.3g} ± {fit['b_crit_stderr']:.2g}, "
            f"S_min = {fit['s_min']:.3g}",
        )
        for value, name, color in (
            (fit["b_crit"], "B_crit", "C1"),
            (result.get("b_simple"), "B_simple (2nd half of training)", "C2"),
            (result.get("b_simple_at_target"), "B_simple (at the target)", "C3"),
        ):
            if value:
                s_at = fit["s_min"] * (1 + fit["b_crit"] / value)
                ax.plot(value * s_at, s_at, "*", ms=12, color=color, label=f"{name} = {value:.3g}")
    elif result.get("b_simple"):
        ax.set_title(f"B_simple (measured) = {result['b_simple']:.3g}; no fit", fontsize=8)
    missing = [e["batch_size"] for e in result["batches"] if not e["reached"]]
    if missing:
        ax.text(
            0.02, 0.02, f"target not reached at B = {missing}", transform=ax.transAxes, fontsize=7
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="examples to target",
        ylabel="steps to target",
        title=f"{os.path.basename(result['config'])}: {result['target_metric']} "
        f"{'<=' if result['mode'] == 'min' else '>='} {result['target']}",
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    with open(path, "wb") as f:
        f.write(png.getvalue())
    return path


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config file, optionally path.py:arg")
    parser.add_argument("--batch-sizes", required=True, help="comma-separated, at least 3")
    parser.add_argument("--target-metric", required=True, help="an eval metric, e.g. accuracy")
    parser.add_argument("--target", type=float, required=True, help="the value to reach")
    parser.add_argument(
        "--mode",
        choices=("min", "max"),
        default=None,
        help="min: the metric must fall to the target (default for loss-like)",
    )
    parser.add_argument(
        "--lr-multipliers",
        default="1",
        help="per-batch learning-rate search, multipliers of the scaled rate",
    )
    parser.add_argument(
        "--eval-every-samples",
        type=int,
        default=None,
        help="evaluation interval in samples (default: every step)",
    )
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(rest)
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        result = sweep(
            args.config,
            sizes,
            target_metric=args.target_metric,
            target=args.target,
            mode=args.mode,
            lr_multipliers=_floats(args.lr_multipliers),
            eval_every_samples=args.eval_every_samples,
            out_dir=args.out,
            overrides=overrides,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"batch_sweep: error: {e}", file=sys.stderr)
        return 2
    for e in result["batches"]:
        status = (
            f"{e['steps_to_target']} steps, {e['examples_to_target']} examples "
            f"(lr {e['learning_rate']:.4g} = x{e['best_lr_multiplier']:g} of the rule)"
            if e["reached"]
            else e["note"]
        )
        print(f"B={e['batch_size']:>6}: {status}")
    fit = result["fit"]
    if fit:
        print(
            f"fit: B_crit = {fit['b_crit']:.4g} ± {fit['b_crit_stderr']:.2g}, "
            f"S_min = {fit['s_min']:.4g} ± {fit['s_min_stderr']:.2g}, "
            f"E_min = {fit['e_min']:.4g}"
        )
    else:
        print(f"no fit: {result.get('fit_error')}")
    if result["b_simple"] is not None:
        ratio = result.get("b_crit_over_b_simple")
        print(
            f"B_simple (measured, median) = {result['b_simple']:.4g}"
            + (f"; B_crit / B_simple = {ratio:.3g}" if ratio else "")
        )
    if result["b_simple_at_target"] is not None:
        ratio = result.get("b_crit_over_b_simple_at_target")
        print(
            f"B_simple at the target (median over batch sizes) = "
            f"{result['b_simple_at_target']:.4g}"
            + (f"; B_crit / B_simple = {ratio:.3g}" if ratio else "")
        )
    print(f"wrote {os.path.join(args.out, 'sweep.json')} and {result['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
