"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard events, and a plot of the curves.

Only process 0 writes; every other process gets a writer that does nothing, so the loop needs no
branches.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Mapping

import numpy as np
from etils import epath


def _plain(value):
    value = np.asarray(value).item() if not isinstance(value, int | float | str) else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _is_url(path: str) -> bool:
    return "://" in path


class MetricsWriter:
    """Appends one JSON record per call to ``metrics.jsonl``; mirrors scalars to TensorBoard.

    ``workdir`` may be a URL (e.g. ``gs://bucket/run``): the records then go through
    ``etils.epath`` (rewriting the small file, since object stores cannot append) and the
    TensorBoard events, which tensorboardX writes to local files only, to
    ``$TMPDIR/jaxbatch_tensorboard/<run name>`` (the path is printed).
    """

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = str(epath.Path(workdir) / "metrics.jsonl")
        self._tb = None
        self._lines: list[str] | None = None
        if enabled:
            from tensorboardX import SummaryWriter

            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            tb_dir = os.path.join(workdir, "tensorboard")
            if _is_url(workdir):
                name = workdir.rstrip("/").rsplit("/", 1)[-1]
                tb_dir = os.path.join(tempfile.gettempdir(), "jaxbatch_tensorboard", name)
                print(f"TensorBoard events of {workdir} are written to {tb_dir}", flush=True)
                existing = epath.Path(self.path)
                self._lines = existing.read_text().splitlines(True) if existing.exists() else []
            self._tb = SummaryWriter(tb_dir)

    def write(self, step: int, metrics: Mapping[str, float], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": prefix}
        record.update({k: _plain(v) for k, v in metrics.items()})
        line = json.dumps(record) + "\n"
        if self._lines is None:
            with open(self.path, "a") as f:
                f.write(line)
        else:
            self._lines.append(line)
            epath.Path(self.path).write_text("".join(self._lines))
        for key, value in record.items():
            if key not in ("step", "kind") and isinstance(value, int | float):
                self._tb.add_scalar(f"{prefix}/{key}", value, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (a local path or a URL)."""
    text = epath.Path(path).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def plot_curves(metrics_path: str, out_path: str, *, title: str = "") -> str:
    """Plots train loss and every eval metric against samples seen; returns ``out_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"].startswith("eval")]
    eval_keys = sorted({k for r in evals for k in r if k not in ("step", "kind", "samples")})
    fig, axes = plt.subplots(1, 1 + bool(eval_keys), figsize=(5 + 5 * bool(eval_keys), 3.6))
    axes = np.atleast_1d(axes)
    axes[0].plot([r["samples"] for r in train], [r["loss"] for r in train], lw=1)
    axes[0].set(xlabel="samples", ylabel="train loss", yscale="log")
    if eval_keys:
        for kind in sorted({r["kind"] for r in evals}):
            rows = [r for r in evals if r["kind"] == kind]
            for key in eval_keys:
                if key in rows[0] and isinstance(rows[0][key], int | float):
                    axes[1].plot(
                        [r["samples"] for r in rows],
                        [r[key] for r in rows],
                        "o-",
                        label=f"{kind} {key}",
                    )
        axes[1].set(xlabel="samples", ylabel="eval")
        axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    epath.Path(out_path).write_bytes(png.getvalue())
    plt.close(fig)
    return out_path
