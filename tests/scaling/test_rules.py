"""Single-value scaling rules against NumPy transcriptions of each paper's formula."""

import math

import numpy as np
import pytest

from jaxbatch import scaling

BATCHES = [(256, 1024), (256, 64), (512, 8192), (1000, 1500)]


@pytest.mark.parametrize("base_batch,batch", BATCHES)
def test_learning_rate_rules(base_batch, batch):
    kappa = np.float64(batch) / np.float64(base_batch)
    np.testing.assert_allclose(scaling.learning_rate(0.1, base_batch, batch, "linear"), 0.1 * kappa)
    np.testing.assert_allclose(
        scaling.learning_rate(3e-4, base_batch, batch, "sqrt"), 3e-4 * np.sqrt(kappa)
    )
    assert scaling.learning_rate(0.1, base_batch, batch, "none") == 0.1


@pytest.mark.parametrize("base_batch,batch", [(256, 1024), (256, 64), (512, 4096), (1000, 1500)])
def test_adam_sde_matches_transcription(base_batch, batch):
    kappa = batch / base_batch
    base = scaling.AdamHParams(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8)
    got = scaling.adam_sde(base, base_batch, batch)
    want = (
        1e-3 * np.sqrt(kappa),
        1 - kappa * (1 - 0.9),
        1 - kappa * (1 - 0.999),
        1e-8 / np.sqrt(kappa),
    )
    assert isinstance(got, scaling.AdamHParams)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-12)


def test_adam_sde_round_trip_is_identity():
    base = scaling.AdamHParams(lr=2e-3, b1=0.8, b2=0.99, eps=1e-6)
    there = scaling.adam_sde(base, 128, 512)
    back = scaling.adam_sde(there, 512, 128)
    np.testing.assert_allclose(np.array(back), np.array(base), rtol=1e-12)


def test_adam_sde_rejects_non_positive_beta():
    # kappa = 16 makes b1 = 1 - 16 * 0.1 = -0.6.
    with pytest.raises(ValueError, match=r"b1 .*-0\.6.* <= 0"):
        scaling.adam_sde(scaling.AdamHParams(1e-3, 0.9, 0.999, 1e-8), 256, 4096)
    with pytest.raises(ValueError, match="AdamHParams"):
        scaling.adam_sde((1e-3, 0.9, 0.999, 1e-8), 256, 512)


@pytest.mark.parametrize("base_batch,batch", BATCHES)
def test_ema_decay_is_power_of_kappa(base_batch, batch):
    got = scaling.ema_decay(0.996, base_batch, batch)
    np.testing.assert_allclose(got, np.power(0.996, batch / base_batch), rtol=1e-12)
    # The rule's point: kappa steps at B and one step at kappa*B forget the same amount.
    if batch % base_batch == 0:
        steps = batch // base_batch
        np.testing.assert_allclose(got, np.prod(np.full(steps, 0.996)), rtol=1e-12)


def test_surge_lr_shape():
    b_noise = 2048.0
    batches = np.array([64.0, 512.0, 2048.0, 8192.0, 65536.0])
    got = np.array([scaling.surge_lr(1e-3, b, b_noise) for b in batches])
    want = 1e-3 / (0.5 * (np.sqrt(b_noise / batches) + np.sqrt(batches / b_noise)))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[2] == pytest.approx(1e-3)  # the peak sits at B = B_noise
    assert got.argmax() == 2
    # Symmetric in log B about B_noise.
    assert scaling.surge_lr(1e-3, 512, b_noise) == pytest.approx(
        scaling.surge_lr(1e-3, b_noise**2 / 512, b_noise)
    )


def test_weight_decay_for_timescale_inverts_timescale():
    lr, batch, data = 3e-4, 512, 2_000_000
    wd = scaling.weight_decay_for_timescale(0.25, lr, batch, data)
    np.testing.assert_allclose(wd, batch / (lr * 0.25 * data), rtol=1e-12)
    np.testing.assert_allclose(scaling.adamw_timescale(wd, lr, batch, data), 0.25, rtol=1e-12)
    # Holding tau and lr fixed, lambda grows linearly with the batch.
    np.testing.assert_allclose(
        scaling.weight_decay_for_timescale(0.25, lr, 4 * batch, data), 4 * wd, rtol=1e-12
    )


def test_timescale_is_an_ema_horizon_of_optax_adamw():
    """tau counts the steps over which optax.adamw's decay shrinks weights by 1/e, over D/B."""
    lr, wd, batch, data = 0.01, 0.5, 100, 100_000
    steps_per_run = data // batch
    # With zero gradient, optax.adamw multiplies w by (1 - lr * wd) each step.
    shrink = (1 - lr * wd) ** np.arange(steps_per_run + 1)
    e_fold_step = np.argmax(shrink <= math.exp(-1))
    np.testing.assert_allclose(
        scaling.adamw_timescale(wd, lr, batch, data), e_fold_step / steps_per_run, rtol=0.01
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: scaling.learning_rate(0.1, 256, 0, "linear"), "batch must be > 0, got 0"),
        (lambda: scaling.learning_rate(0.1, -8, 16, "sqrt"), "base_batch must be > 0, got -8"),
        (lambda: scaling.learning_rate(-0.1, 256, 512, "linear"), "base_lr must be >= 0"),
        (lambda: scaling.learning_rate(0.1, 256, 512, "cubic"), "rule must be one of .*'cubic'"),
        (lambda: scaling.learning_rate(0.1, True, 512, "linear"), "real number, got True"),
        (lambda: scaling.ema_decay(1.0, 256, 512), r"base_decay must be in \[0, 1\), got 1.0"),
        (lambda: scaling.ema_decay(-0.1, 256, 512), r"in \[0, 1\), got -0.1"),
        (lambda: scaling.surge_lr(1e-3, 128, 0), "noise_scale must be > 0, got 0"),
        (lambda: scaling.weight_decay_for_timescale(0.0, 1e-3, 8, 10), "tau must be > 0"),
        (lambda: scaling.weight_decay_for_timescale(1.0, 1e-3, 8, float("nan")), "finite"),
    ],
)
def test_bad_input_names_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("base_batch,batch", BATCHES)
def test_every_square_root_path_gives_the_same_number(base_batch, batch):
    """learning_rate('sqrt'), adam_sde and rescale_hparams('sqrt' / 'adam_sde') share one rule."""
    lr = scaling.learning_rate(3e-4, base_batch, batch, "sqrt")
    sde = scaling.adam_sde(scaling.AdamHParams(3e-4, b1=0.99, eps=1e-8), base_batch, batch)
    hp = {"lr": 3e-4, "peak_lr": 3e-4, "eps": 1e-8}
    rules = {"lr": "sqrt", "peak_lr": "adam_sde", "eps": "adam_sde"}
    new, _ = scaling.rescale_hparams(hp, reference_batch=base_batch, batch=batch, rules=rules)
    assert sde.lr == lr == new["lr"] == new["peak_lr"]
    assert new["eps"] == sde.eps
    np.testing.assert_allclose(sde.eps * lr, 1e-8 * 3e-4, rtol=1e-12)  # eps moves inversely
