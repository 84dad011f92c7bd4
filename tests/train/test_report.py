"""jaxbatch report on a real run directory (a tiny digits run of the trainer) and on metrics
written by the real MetricsWriter with noise-scale and trust-ratio keys; several runs overlay."""

import json
import os

import numpy as np
import pytest

from jaxbatch.train import config as config_lib
from jaxbatch.train import loop, report
from jaxbatch.train.metrics import MetricsWriter

TINY = [
    "total_samples=512",
    "batch_size=128",
    "reference_batch_size=128",
    "schedule.warmup_samples=128",
    "model.stage_sizes=(1,)",
    "model.num_filters=4",
    "micro_batches=2",
    "log_every_steps=1",
    "eval_every_steps=2",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_runs")
    real = str(root / "digits_tiny")
    cfg = config_lib.load_config("configs/digits_resnet_lars.py:runlocal", TINY)
    loop.train(cfg, real, progress=False)
    # A second run as the in-step noise statistics and per-layer trust ratios would log it.
    written = str(root / "written")
    writer = MetricsWriter(written)
    rng = np.random.default_rng(0)
    for step in range(1, 9):
        batch = 64 if step <= 4 else 128
        writer.write(
            step,
            {
                "loss": 2.3 / step,
                "samples": 64 * min(step, 4) + 128 * max(step - 4, 0),
                "learning_rate": 0.1 * step,
                "batch_size": batch,
                "g2": 1.0 / step,
                "trace_sigma": 50.0,
                "b_simple": 50.0 * step,
                "trust_ratio/conv1/kernel": float(rng.uniform(0.01, 1)),
                "trust_ratio/dense/kernel": float(rng.uniform(0.01, 1)),
            },
        )
        if step % 4 == 0:
            writer.write(step, {"accuracy": 0.1 * step, "samples": 64 * step}, prefix="eval")
    writer.close()
    with open(os.path.join(written, "config.json"), "w") as f:
        json.dump({"batch_size": 64, "optimizer": {"name": "lamb", "learning_rate": 0.1}}, f)
    return real, written


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 2000


def test_report_of_a_real_run(runs, tmp_path):
    real, _ = runs
    out = str(tmp_path / "one")
    result = report.build_report([real], out)
    assert {"loss", "eval", "schedules", "noise"} <= set(result["plots"])  # b_simple: k = 2
    assert all(_is_png(p) for p in result["plots"].values())
    assert any("trust_ratios.png skipped" in n for n in result["notes"])
    # The trainer logs |G|^2, tr(Sigma) and B_simple every step: noise.png has all three panels.
    assert not any("no panel for" in n for n in result["notes"]), result["notes"]
    text = open(result["summary"]).read()
    records = [json.loads(line) for line in open(os.path.join(real, "metrics.jsonl"))]
    final = [r for r in records if r["kind"] == "eval"][-1]
    assert f"{final['accuracy']:.4g}" in text  # the final eval accuracy is in the table
    assert "| digits_tiny | 4 | 512 | 128 | lars lr" in text
    assert "![loss](loss.png)" in text


def test_several_runs_overlay_and_optional_plots(runs, tmp_path):
    out = str(tmp_path / "two")
    assert report.main([*runs, "--out", out]) == 0
    for name in ("loss", "eval", "schedules", "noise", "trust_ratios", "summary"):
        path = os.path.join(out, f"{name}.md" if name == "summary" else f"{name}.png")
        assert os.path.exists(path), name
        assert name == "summary" or _is_png(path)
    text = open(os.path.join(out, "summary.md")).read()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and "digits_tiny" in table[1] and "written" in table[2]
    assert "## Notes" not in text  # every plot had data


def test_missing_workdir_and_metrics_are_named(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"run directory '{missing}' does not exist"):
        report.build_report([missing], str(tmp_path / "out"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
        report.build_report([str(empty)], str(tmp_path / "out"))
    assert report.main([str(empty)]) == 2
    assert f"{empty}" in capsys.readouterr().err
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no records"):
        report.build_report([str(empty)], str(tmp_path / "out"))


def test_jaxbatch_cli_dispatches_report(tmp_path, capsys):
    from jaxbatch.train import cli

    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "run directory" in capsys.readouterr().err
