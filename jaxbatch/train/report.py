"""``jaxbatch report WORKDIR [WORKDIR ...]``: plots and a Markdown summary of finished runs.

Reads each run directory's ``metrics.jsonl`` (``train.metrics.MetricsWriter``) and
``config.json``, and writes into ``--out``:

- ``loss.png``: train loss against samples and against steps;
- ``eval.png``: every eval metric against samples and against steps;
- ``schedules.png``: learning rate and batch size over training;
- ``noise.png``: |G|^2, tr(Sigma) and B_simple over training (whichever the runs logged);
- ``trust_ratios.png``: per-layer trust ratios over steps as a heatmap, one per run (records
  with ``trust_ratio/<layer>`` keys);
- ``summary.md``: a table of each run's final metrics, the plots, and what was skipped and why.

Several workdirs are overlaid in each plot, one colour per run.
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

from jaxbatch.train import metrics as metrics_lib

#: The metric names of each noise quantity, first present wins (the trainer's name first).
NOISE_KEYS = {
    "|G|^2": ("g2", "grad_sq_norm", "noise_g2"),
    "tr(Sigma)": ("trace_sigma", "tr_sigma", "noise_trace"),
    "B_simple": ("b_simple",),
}
#: Prefix of the per-layer trust-ratio metrics: ``trust_ratio/<layer name>``.
TRUST_RATIO_PREFIX = "trust_ratio/"
_NOT_METRICS = frozenset({"step", "kind", "samples"})


class Run:
    """One run directory: its records split by kind, its config and a label."""

    def __init__(self, workdir: str, label: str):
        self.workdir = workdir
        self.label = label
        path = os.path.join(workdir, "metrics.jsonl")
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f"run directory {workdir!r} does not exist")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{workdir!r} has no metrics.jsonl (expected {path})")
        try:
            records = metrics_lib.read_metrics(path)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON lines: {e}") from e
        if not records:
            raise ValueError(f"{path} holds no records")
        self.train = [r for r in records if r.get("kind") == "train"]
        self.evals: dict[str, list[dict]] = {}
        for r in records:
            kind = str(r.get("kind", ""))
            if kind.startswith("eval"):
                self.evals.setdefault(kind, []).append(r)
        config_path = os.path.join(workdir, "config.json")
        self.config: dict[str, Any] = {}
        if os.path.isfile(config_path):
            with open(config_path) as f:
                self.config = json.load(f)

    def batch_size(self) -> int | None:
        value = self.config.get("batch_size")
        return int(value) if isinstance(value, int | float) else None


def _labels(workdirs: Sequence[str]) -> list[str]:
    """Short distinct names: the base names, with the parent added where two coincide."""
    norm = [os.path.normpath(os.path.abspath(w)) for w in workdirs]
    labels = [os.path.basename(n) for n in norm]
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = os.path.join(os.path.basename(os.path.dirname(norm[i])), label)
    return [
        f"{label} ({i})" if labels.count(label) > 1 else label for i, label in enumerate(labels)
    ]


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        v = float(value)  # the writer stores non-finite floats as strings ('nan', 'inf')
    except ValueError:
        return None
    return v


def _series(records: list[dict], key: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(_number(r.get(x)), _number(r.get(key))) for r in records if key in r]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    xs, ys = zip(*pairs, strict=True)
    return np.asarray(xs, np.float64), np.asarray(ys, np.float64)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    png = io.BytesIO()
    fig.tight_layout()
    fig.savefig(png, format="png", dpi=110)
    with open(path, "wb") as f:
        f.write(png.getvalue())
    _pyplot().close(fig)
    return path


def _colors(n: int) -> list:
    return [_pyplot().get_cmap("tab10")(i % 10) for i in range(n)]


def _positive(ys: np.ndarray) -> bool:
    return ys.size > 0 and bool(np.all(ys[np.isfinite(ys)] > 0))


def plot_loss(runs: list[Run], path: str) -> str | None:
    """Train loss against samples (left) and steps (right)."""
    if not any(_series(r.train, "loss", "step")[0].size for r in runs):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    log = True
    for run, color in zip(runs, _colors(len(runs)), strict=True):
        for ax, x in zip(axes, ("samples", "step"), strict=True):
            xs, ys = _series(run.train, "loss", x)
            log &= _positive(ys) or not ys.size
            ax.plot(xs, ys, lw=1.2, color=color, label=run.label)
    for ax, x in zip(axes, ("samples", "steps"), strict=True):
        ax.set(xlabel=x, ylabel="train loss", yscale="log" if log else "linear")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def _eval_keys(runs: list[Run]) -> list[str]:
    keys = set()
    for run in runs:
        for records in run.evals.values():
            for r in records:
                keys.update(
                    k for k, v in r.items() if k not in _NOT_METRICS and _number(v) is not None
                )
    return sorted(keys)


def plot_eval(runs: list[Run], path: str) -> str | None:
    """One row per eval metric: against samples (left) and steps (right), per run and eval kind."""
    keys = _eval_keys(runs)
    if not keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(keys), 2, figsize=(10, 3.0 * len(keys)), squeeze=False)
    for run, color in zip(runs, _colors(len(runs)), strict=True):
        for kind, records in sorted(run.evals.items()):
            style = "o-" if kind == "eval" else "s--"
            for row, key in enumerate(keys):
                for col, x in enumerate(("samples", "step")):
                    xs, ys = _series(records, key, x)
                    if xs.size:
                        axes[row, col].plot(
                            xs, ys, style, ms=3, color=color, label=f"{run.label} {kind}"
                        )
    for row, key in enumerate(keys):
        for col, x in enumerate(("samples", "steps")):
            axes[row, col].set(xlabel=x, ylabel=key)
        axes[row, 0].legend(fontsize=7)
    return _save(fig, path)


def _batch_series(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Batch size per logged step: a logged 'batch_size', else samples/step differences."""
    xs, ys = _series(run.train, "batch_size", "step")
    if xs.size:
        return xs, ys
    steps, samples = _series(run.train, "samples", "step")
    if steps.size == 0:
        return steps, samples
    prev_steps = np.concatenate([[0.0], steps[:-1]])
    prev_samples = np.concatenate([[0.0], samples[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        batch = (samples - prev_samples) / (steps - prev_steps)
    ok = np.isfinite(batch)
    return steps[ok], batch[ok]


def plot_schedules(runs: list[Run], path: str) -> str | None:
    """Learning rate (left) and batch size (right) against steps."""
    if not any(r.train for r in runs):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for run, color in zip(runs, _colors(len(runs)), strict=True):
        xs, ys = _series(run.train, "learning_rate", "step")
        axes[0].plot(xs, ys, lw=1.2, color=color, label=run.label)
        xs, ys = _batch_series(run)
        axes[1].step(xs, ys, where="post", lw=1.2, color=color, label=run.label)
    axes[0].set(xlabel="steps", ylabel="learning rate")
    axes[1].set(xlabel="steps", ylabel="batch size")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def _noise_key(run: Run, names: Sequence[str]) -> str | None:
    return next((k for k in names if any(k in r for r in run.train)), None)


def plot_noise(runs: list[Run], path: str) -> tuple[str | None, list[str]]:
    """|G|^2, tr(Sigma), B_simple against samples, one panel each that some run logged."""
    present = {
        title: [(run, _noise_key(run, names)) for run in runs]
        for title, names in NOISE_KEYS.items()
    }
    present = {t: [(r, k) for r, k in pairs if k] for t, pairs in present.items()}
    missing = [t for t, pairs in present.items() if not pairs]
    shown = [t for t, pairs in present.items() if pairs]
    if not shown:
        return None, missing
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(4.6 * len(shown), 3.4), squeeze=False)
    colors = dict(zip([r.label for r in runs], _colors(len(runs)), strict=True))
    for ax, title in zip(axes[0], shown, strict=True):
        log = True
        for run, key in present[title]:
            xs, ys = _series(run.train, key, "samples")
            log &= _positive(ys)
            ax.plot(xs, ys, lw=1.2, color=colors[run.label], label=run.label)
        ax.set(xlabel="samples", ylabel=title, yscale="log" if log else "linear")
        ax.legend(fontsize=7)
    return _save(fig, path), missing


def plot_trust_ratios(runs: list[Run], path: str) -> str | None:
    """Heatmap of log10 trust ratio, layers × logged steps, one panel per run that logged them."""
    tables = []
    for run in runs:
        layers = sorted({k for r in run.train for k in r if k.startswith(TRUST_RATIO_PREFIX)})
        rows = [r for r in run.train if any(k in r for k in layers)]
        if layers and rows:
            grid = np.array(
                [
                    [_number(r.get(k)) if _number(r.get(k)) is not None else np.nan for r in rows]
                    for k in layers
                ],
                np.float64,
            )
            tables.append((run, layers, [r["step"] for r in rows], grid))
    if not tables:
        return None
    plt = _pyplot()
    height = max(3.0, 0.25 * max(len(t[1]) for t in tables) + 1.5)
    fig, axes = plt.subplots(len(tables), 1, figsize=(10, height * len(tables)), squeeze=False)
    for ax, (run, layers, steps, grid) in zip(axes[:, 0], tables, strict=True):
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.log10(np.where(grid > 0, grid, np.nan))
        image = ax.imshow(
            values,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5),
        )
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([k[len(TRUST_RATIO_PREFIX) :] for k in layers], fontsize=6)
        ax.set(xlabel="steps", title=f"{run.label}: log10 trust ratio per layer")
        fig.colorbar(image, ax=ax)
    return _save(fig, path)


def _format(value) -> str:
    v = _number(value)
    if v is None:
        return "" if value is None else str(value)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"


def summary_table(runs: list[Run]) -> str:
    """Markdown table: steps, samples, batch, optimizer, final train loss, final eval metrics."""
    keys = _eval_keys(runs)
    noise = [k for k in ("b_simple",) if any(k in r for run in runs for r in run.train)]
    head = ["run", "steps", "samples", "batch", "optimizer", "train loss", *noise]
    head += [f"eval {k}" for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        last = run.train[-1] if run.train else {}
        final_eval = run.evals.get("eval", [{}])[-1] if run.evals.get("eval") else {}
        optimizer = run.config.get("optimizer", {})
        opt = optimizer.get("name", "") if isinstance(optimizer, dict) else ""
        if isinstance(optimizer, dict) and "learning_rate" in optimizer:
            opt = f"{opt} lr {_format(optimizer['learning_rate'])}"
        all_records = run.train + [r for rs in run.evals.values() for r in rs]
        row = [
            run.label,
            _format(max((r.get("step", 0) for r in all_records), default=None)),
            _format(max((r.get("samples", 0) for r in all_records), default=None)),
            _format(run.batch_size()),
            opt,
            _format(last.get("loss")),
            *[_format(last.get(k)) for k in noise],
            *[_format(final_eval.get(k)) for k in keys],
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def build_report(workdirs: Sequence[str], out_dir: str) -> dict[str, Any]:
    """Writes the plots and ``summary.md`` of ``workdirs`` into ``out_dir``.

    Args:
      workdirs: run directories, each with a ``metrics.jsonl`` (``config.json`` optional).
      out_dir: where to write (created).

    Returns:
      {'plots': {name: path}, 'summary': path of summary.md, 'notes': [what was skipped]}.

    Raises:
      FileNotFoundError: a workdir does not exist or has no metrics.jsonl (the path is named).
      ValueError: no workdirs, or a metrics file that is empty or not JSON lines.
    """
    if not workdirs:
        raise ValueError("build_report needs at least one run directory")
    runs = [Run(w, label) for w, label in zip(workdirs, _labels(workdirs), strict=True)]
    os.makedirs(out_dir, exist_ok=True)
    plots: dict[str, str] = {}
    notes: list[str] = []

    def add(name: str, result: str | None, why: str) -> None:
        if result is None:
            notes.append(f"{name}.png skipped: {why}")
        else:
            plots[name] = result

    target = lambda name: os.path.join(out_dir, f"{name}.png")
    add("loss", plot_loss(runs, target("loss")), "no train loss in the metrics")
    add("eval", plot_eval(runs, target("eval")), "no eval records in the metrics")
    add("schedules", plot_schedules(runs, target("schedules")), "no train records")
    noise_png, missing = plot_noise(runs, target("noise"))
    add("noise", noise_png, "no |G|^2, tr(Sigma) or B_simple in the metrics")
    if noise_png is not None and missing:
        notes.append(f"noise.png has no panel for {', '.join(missing)}: not in the metrics")
    add(
        "trust_ratios",
        plot_trust_ratios(runs, target("trust_ratios")),
        f"no per-layer trust ratios ('{TRUST_RATIO_PREFIX}<layer>' keys) in the metrics",
    )

    lines = ["# jaxbatch report", ""]
    lines += [f"- `{run.label}`: {run.workdir}" for run in runs]
    lines += ["", "## Final metrics", "", summary_table(runs), ""]
    for name, path in plots.items():
        lines += [f"## {name}", "", f"![{name}]({os.path.basename(path)})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    summary = os.path.join(out_dir, "summary.md")
    with open(summary, "w") as f:
        f.write("\n".join(lines))
    return {"plots": plots, "summary": summary, "notes": notes}


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxbatch report WORKDIR [WORKDIR ...] [--out DIR]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="jaxbatch report", description="plots and a Markdown summary of run directories"
    )
    parser.add_argument("workdirs", nargs="+", help="run directories (with metrics.jsonl)")
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default WORKDIR/report for one run, else report)",
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    out = args.out or (
        os.path.join(args.workdirs[0], "report") if len(args.workdirs) == 1 else "report"
    )
    try:
        result = build_report(args.workdirs, out)
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxbatch report: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result['summary']} and {len(result['plots'])} plots to {out}")
    for note in result["notes"]:
        print(f"  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
