"""scripts/batch_sweep.py: three tiny trainer runs, steps-to-target per batch, a target never
reached, the fit on run directories whose steps follow S = S_min (1 + B_crit / B), bad input."""

import importlib.util
import json
import os
import pathlib
import sys

import pytest

from jaxbatch.train.metrics import MetricsWriter

_PATH = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "batch_sweep.py"
CONFIG = "configs/digits_resnet_lars.py:runlocal"
TINY = [
    "--config.total_samples=256",
    "--config.reference_batch_size=64",
    "--config.schedule.warmup_samples=64",
    "--config.model.stage_sizes=(1,)",
    "--config.model.num_filters=4",
    "--config.micro_batches=2",
    "--config.log_every_steps=1",
]


def _load():
    spec = importlib.util.spec_from_file_location("batch_sweep", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


batch_sweep = _load()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One sweep through the real trainer: batch 32, 64, 128 on 256 samples, eval every 128."""
    out = str(tmp_path_factory.mktemp("sweep"))
    argv = [
        "--config",
        CONFIG,
        "--batch-sizes",
        "32,64,128",
        "--target-metric",
        "accuracy",
        "--target",
        "0.0",
        "--eval-every-samples",
        "128",
        "--out",
        out,
        *TINY,
    ]
    assert batch_sweep.main(argv) == 0
    return out


def test_steps_to_target_come_from_the_runs_evals(trained):
    result = json.load(open(os.path.join(trained, "sweep.json")))
    assert [e["batch_size"] for e in result["batches"]] == [32, 64, 128]
    for e in result["batches"]:
        records = [
            json.loads(line)
            for line in open(os.path.join(e["trials"][0]["workdir"], "metrics.jsonl"))
        ]
        first_eval = next(r for r in records if r["kind"] == "eval")
        # any accuracy >= 0: the first evaluation, after 128 samples at every batch size
        assert e["reached"] and e["steps_to_target"] == first_eval["step"] == 128 // e["batch_size"]
        assert e["examples_to_target"] == 128
        assert e["b_simple"] is not None and e["trials"][0]["diverged"] is False
        # the linear rule from reference batch 64 (TINY): the rate the trainer trains with
        base = e["trials"][0]["learning_rate"]
        assert e["learning_rate"] == pytest.approx(base * e["batch_size"] / 64)
        # the last B_simple logged at or before the step that reached the target
        logged = [r for r in records if r["kind"] == "train" and r["step"] <= e["steps_to_target"]]
        assert e["b_simple_at_target"] == pytest.approx(logged[-1]["b_simple"])
    # E = 128 at every batch is perfect scaling: E_min = 128, S_min ~ 0, B_crit unbounded
    fit = result["fit"]
    assert fit["e_min"] == pytest.approx(128) and fit["s_min"] < 1e-6
    assert fit["b_crit_stderr"] > 0.5 * fit["b_crit"]  # and the fit says it cannot pin it down
    assert os.path.getsize(os.path.join(trained, "sweep.png")) > 2000


def test_target_never_reached_is_reported_per_batch(trained, capsys):
    argv = [
        "--config",
        CONFIG,
        "--batch-sizes",
        "32,64,128",
        "--target-metric",
        "accuracy",
        "--target",
        "1.01",
        "--out",
        trained,
        *TINY,
    ]
    assert batch_sweep.main(argv) == 0  # the finished runs are read again, not retrained
    printed = capsys.readouterr().out
    result = json.load(open(os.path.join(trained, "sweep.json")))
    assert not any(e["reached"] for e in result["batches"])
    assert "not reached in 8 steps" in result["batches"][0]["note"]
    assert "accuracy >= 1.01 not reached" in printed and "no fit: only 0 batch sizes" in printed


def test_fit_recovers_the_model_from_run_directories(tmp_path):
    """Run directories (finished, written by the real MetricsWriter) whose first eval reaching
    the target follows S = S_min (1 + B_crit / B): the sweep reads them and recovers the model."""
    s_min, b_crit = 40, 64
    for batch in (16, 32, 64, 128, 256):
        steps = round(s_min * (1 + b_crit / batch))
        workdir = tmp_path / f"b{batch}_lr1"
        writer = MetricsWriter(str(workdir))
        for step in range(1, steps + 3):
            writer.write(step, {"loss": 1.0 / step, "samples": step * batch, "b_simple": 100.0})
            loss = 1.0 if step < steps else 0.4
            writer.write(step, {"loss": loss, "samples": step * batch}, prefix="eval")
        writer.close()
        (workdir / "summary.json").write_text("{}")
    result = batch_sweep.sweep(
        CONFIG, [16, 32, 64, 128, 256], target_metric="loss", target=0.5, out_dir=str(tmp_path)
    )
    assert result["mode"] == "min"
    fit = result["fit"]
    assert fit["b_crit"] == pytest.approx(b_crit, rel=0.05)
    assert fit["s_min"] == pytest.approx(s_min, rel=0.05)
    assert fit["b_crit_stderr"] < 0.1 * b_crit
    assert result["b_simple"] == 100.0
    assert result["b_crit_over_b_simple"] == pytest.approx(fit["b_crit"] / 100.0)
    assert result["b_simple_at_target"] == 100.0
    assert result["b_crit_over_b_simple_at_target"] == pytest.approx(fit["b_crit"] / 100.0)


@pytest.mark.parametrize(
    "sizes, kwargs, match",
    [
        ([64, 128], {}, "at least 3 distinct batch sizes"),
        ([64, 64, 128], {}, "at least 3 distinct batch sizes"),
        ([0, 64, 128], {}, "batch sizes must be positive"),
        ([32, 64, 128], {"lr_multipliers": [1.0, -2.0]}, "lr multipliers must be"),
        ([32, 64, 128], {"mode": "up"}, "mode must be 'min' or 'max'"),
    ],
)
def test_bad_input(tmp_path, sizes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        batch_sweep.sweep(
            CONFIG, sizes, target_metric="accuracy", target=0.9, out_dir=str(tmp_path), **kwargs
        )
    assert (
        batch_sweep.main(
            [
                "--config",
                CONFIG,
                "--batch-sizes",
                "64,128",
                "--target-metric",
                "accuracy",
                "--target",
                "0.9",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
