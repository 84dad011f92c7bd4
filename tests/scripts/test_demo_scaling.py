"""scripts/demo_scaling.py (with its parts _demo_scaling_train.py and _demo_scaling_report.py):
its building blocks against NumPy, and the claims of its quick mode."""

import importlib
import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch import optim

_PATH = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "demo_scaling.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("demo_scaling", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


demo = _load_script()
# Loading the entry point puts scripts/ on sys.path, where its parts live.
report = importlib.import_module("_demo_scaling_report")


def _numpy_ema(snapshots: np.ndarray, start: np.ndarray, rho: float, every: int) -> np.ndarray:
    """e <- rho·e + (1 - rho)·x on snapshots every-1, 2·every-1, ... (Busbridge et al. Alg. 1)."""
    e = start.astype(np.float64)
    for t, x in enumerate(snapshots):
        if (t + 1) % every == 0:
            e = rho * e + (1.0 - rho) * x
    return e


def test_sample_stream_is_a_sequence_of_permutations():
    stream = demo.sample_stream(10, 35, seed=3)
    assert stream.shape == (35,)
    for start in (0, 10, 20):
        np.testing.assert_array_equal(np.sort(stream[start : start + 10]), np.arange(10))
    # Epochs are shuffled independently, and a longer stream extends a shorter one.
    assert not np.array_equal(stream[:10], stream[10:20])
    np.testing.assert_array_equal(demo.sample_stream(10, 50, seed=3)[:35], stream)


@pytest.mark.parametrize("kappa", [2, 8, 32])
def test_constant_segment_kappa_steps_equal_one_scaled_step(kappa):
    rho, base = 0.99, 32
    start = {"w": jnp.linspace(-1.0, 1.0, 6), "b": jnp.full((2,), 3.0)}
    value = {"w": jnp.linspace(2.0, -2.0, 6), "b": jnp.full((2,), -1.0)}
    snapshots = jax.tree.map(lambda x: jnp.broadcast_to(x, (kappa, *x.shape)), value)
    every_step = demo.ema_of_trajectory(
        snapshots, optim.model_ema(rho, batch_size=base), every=1, init=start
    )
    scaled = optim.model_ema(rho, batch_size=kappa * base, reference_batch_size=base)
    once = demo.ema_of_trajectory(snapshots, scaled, every=kappa, init=start)
    for name in ("w", "b"):
        want = rho**kappa * np.asarray(start[name], np.float64) + (1 - rho**kappa) * np.asarray(
            value[name], np.float64
        )
        np.testing.assert_allclose(every_step[name], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(once[name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("every", [1, 3, 4])
def test_ema_of_trajectory_matches_numpy(every):
    rng = np.random.default_rng(0)
    snapshots = rng.normal(size=(12, 5)).astype(np.float32)
    start = rng.normal(size=5).astype(np.float32)
    rho = 0.9**every
    got = demo.ema_of_trajectory(
        {"x": jnp.asarray(snapshots)},
        optim.model_ema(rho, batch_size=1),
        every=every,
        init={"x": jnp.asarray(start)},
    )
    np.testing.assert_allclose(
        got["x"], _numpy_ema(snapshots, start, rho, every), rtol=1e-5, atol=1e-6
    )


def test_ema_of_trajectory_rejects_bad_every():
    with pytest.raises(ValueError, match="every must be >= 1, got 0"):
        demo.ema_of_trajectory(
            {"x": jnp.zeros((2, 1))},
            optim.model_ema(0.9, batch_size=1),
            every=0,
            init={"x": jnp.zeros(1)},
        )


def test_relative_distance_matches_numpy():
    a = {"u": np.array([1.0, 2.0]), "v": np.array([[3.0]])}
    b = {"u": np.array([1.0, 0.0]), "v": np.array([[4.0]])}
    want = np.linalg.norm([0.0, 2.0, -1.0]) / np.linalg.norm([1.0, 0.0, 4.0])
    np.testing.assert_allclose(report.relative_distance(a, b), want, rtol=1e-12)


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="ema_decay must be in"):
        demo.Settings(ema_decay=1.0)
    with pytest.raises(ValueError, match="kappas"):
        demo.Settings(kappas=(1,))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo_scaling.json"
    demo.main(["--quick", "--out", str(out)])
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("kind", ["sgd", "lars"])
def test_quick_scaled_ema_tracks_the_reference_and_unscaled_drifts(quick, kind):
    (kappa,) = demo.QUICK.kappas
    m = quick["summary"]["ema"][f"{kind}/k{kappa}"]
    mean = lambda key: m[key]["mean"]
    # In training: closer to the batch-B EMA at equal samples, and trailing its own trajectory
    # about as much as the batch-B EMA does, where the unscaled decay trails much further.
    assert mean("dist_scaled_early") < mean("dist_unscaled_early")
    assert mean("lag_ratio_scaled") < 0.75 * mean("lag_ratio_unscaled")
    # On the fixed batch-B trajectory: one-in-kappa at rho^kappa stays on the every-step EMA.
    assert mean("traj_scaled_max") < 0.1 * mean("traj_unscaled_max")


def test_quick_constant_segment_is_exact(quick):
    for kappa, diff in quick["constant_segment_max_abs_diff"].items():
        assert diff < 1e-6, (kappa, diff)


def test_quick_lars_beats_sgd_at_the_large_batch(quick):
    (kappa,) = demo.QUICK.kappas
    big = kappa * demo.QUICK.base_batch
    acc = quick["summary"]["accuracy"]
    assert acc[f"lars/B{big}"]["mean"] > acc[f"sgd/B{big}"]["mean"] + 0.05
    # The scaled EMA of the LARS run is a usable model, the unscaled one lags behind it.
    m = quick["summary"]["ema"][f"lars/k{kappa}"]
    assert m["acc_ema_scaled_end"]["mean"] > m["acc_ema_unscaled_end"]["mean"]
    assert "| lars |" in quick["table"]
