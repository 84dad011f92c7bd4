"""rescale_hparams: every rule against its NumPy transcription, the contract, and errors."""

import copy

import ml_collections
import numpy as np
import pytest

from jaxbatch import scaling

BASE = {
    "learning_rate": 1e-3,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "weight_decay": 0.1,
    "warmup_steps": 1000,
    "total_samples": 1_000_000,
    "ema": {"decay": 0.999, "name": "params_ema"},
    "schedule": "cosine",
}


def test_every_rule_matches_its_formula():
    kappa = 4.0
    rules = {
        "learning_rate": "adam_sde",
        "b1": "adam_sde",
        "b2": "adam_sde",
        "eps": "adam_sde",
        "weight_decay": "timescale",
        "warmup_steps": "steps",
        "total_samples": "regime",
        "ema.decay": "ema",
    }
    new, changes = scaling.rescale_hparams(BASE, reference_batch=256, batch=1024, rules=rules)
    lr_new = 1e-3 * np.sqrt(kappa)
    want = {
        "learning_rate": lr_new,
        "b1": 1 - kappa * 0.1,
        "b2": 1 - kappa * 0.001,
        "eps": 1e-8 / np.sqrt(kappa),
        # tau = B / (lr * wd * D) held fixed: wd' = B' / (lr' * tau * D).
        "weight_decay": 1024 / (lr_new * (256 / (1e-3 * 0.1))),
        "warmup_steps": 250,
        "total_samples": 4_000_000,
    }
    for key, value in want.items():
        np.testing.assert_allclose(new[key], value, rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(new["ema"]["decay"], 0.999**kappa, rtol=1e-12)
    assert isinstance(new["warmup_steps"], int) and isinstance(new["total_samples"], int)
    # Untouched entries pass through.
    assert new["schedule"] == "cosine" and new["ema"]["name"] == "params_ema"
    # One Change per changed value, in rules order with 'timescale' last.
    assert [c.key for c in changes] == [
        "learning_rate", "b1", "b2", "eps", "warmup_steps", "total_samples", "ema.decay",
        "weight_decay",
    ]  # fmt: skip
    by_key = {c.key: c for c in changes}
    assert by_key["ema.decay"] == scaling.Change("ema.decay", 0.999, new["ema"]["decay"], "ema")


def test_linear_sqrt_none_and_kappa_one():
    rules = {"learning_rate": "linear", "eps": "sqrt", "b1": "none"}
    new, changes = scaling.rescale_hparams(BASE, reference_batch=100, batch=300, rules=rules)
    assert new["learning_rate"] == pytest.approx(3e-3)
    assert new["eps"] == pytest.approx(1e-8 * np.sqrt(3))
    assert new["b1"] == 0.9 and "b1" not in [c.key for c in changes]
    same, changes = scaling.rescale_hparams(BASE, reference_batch=512, batch=512, rules=rules)
    assert same == BASE and changes == []


def test_input_is_not_modified_and_output_is_plain_dicts():
    frozen = copy.deepcopy(BASE)
    new, _ = scaling.rescale_hparams(
        BASE, reference_batch=1, batch=2, rules={"ema.decay": "ema", "learning_rate": "linear"}
    )
    assert BASE == frozen
    assert type(new["ema"]) is dict and new["ema"] is not BASE["ema"]


def test_timescale_with_explicit_learning_rate_key_and_zero_decay():
    hp = {"opt": {"lr": 2e-3, "wd": 0.05}, "other": {"wd": 0.0}}
    new, _ = scaling.rescale_hparams(
        hp,
        reference_batch=128,
        batch=512,
        rules={"opt.lr": "sqrt", "opt.wd": "timescale", "other.wd": "timescale"},
        learning_rate_key="opt.lr",
    )
    tau = 128 / (2e-3 * 0.05)
    np.testing.assert_allclose(new["opt"]["wd"], 512 / (new["opt"]["lr"] * tau), rtol=1e-12)
    assert new["other"]["wd"] == 0.0


def test_configdict_round_trip():
    cfg = ml_collections.ConfigDict(
        {"batch_size": 2048, "optimizer": {"learning_rate": 0.1, "momentum_ema": 0.99}}
    )
    new, changes = scaling.rescale_hparams(
        cfg.optimizer.to_dict(),
        reference_batch=256,
        batch=cfg.batch_size,
        rules={"learning_rate": "linear", "momentum_ema": "ema"},
    )
    cfg.optimizer.update(new)
    assert cfg.optimizer.learning_rate == pytest.approx(0.8)
    assert cfg.optimizer.momentum_ema == pytest.approx(0.99**8)
    assert len(changes) == 2
    # A ConfigDict is accepted as is, for both hparams and rules.
    again, _ = scaling.rescale_hparams(
        ml_collections.ConfigDict({"opt": {"learning_rate": 0.1}}),
        reference_batch=256,
        batch=512,
        rules=ml_collections.ConfigDict({"opt": {"learning_rate": "sqrt"}}),
    )
    assert again == {"opt": {"learning_rate": pytest.approx(0.1 * 2**0.5)}}


@pytest.mark.parametrize(
    "rules, kwargs, match",
    [
        ({"learning_rat": "linear"}, {}, "'learning_rat' is not in hparams"),
        ({"ema.decy": "ema"}, {}, "'ema.decy' is not in hparams"),
        ({"schedule.x": "linear"}, {}, "'schedule' is not a mapping"),
        ({"learning_rate": "cubic"}, {}, "must be one of .*got 'cubic'"),
        ({"schedule": "linear"}, {}, "must be a number to rescale, got 'cosine'"),
        ({"weight_decay": "adam_sde"}, {}, "rule 'adam_sde' applies to keys named"),
        ({"b1": "adam_sde"}, {"batch": 256 * 20}, "b1 .* <= 0"),
        ({"ema.decay": "timescale"}, {}, "needs the learning rate at 'ema.learning_rate'"),
        ({"learning_rate": "linear"}, {"batch": 0}, "batch must be > 0, got 0"),
    ],
)
def test_errors_name_the_bad_value(rules, kwargs, match):
    kwargs = {"reference_batch": 256, "batch": 1024, **kwargs}
    with pytest.raises(ValueError, match=match):
        scaling.rescale_hparams(BASE, rules=rules, **kwargs)


def test_bad_decay_value_is_reported():
    with pytest.raises(ValueError, match=r"hparams\['decay'\] .*must be in \[0, 1\), got 1.5"):
        scaling.rescale_hparams({"decay": 1.5}, reference_batch=1, batch=2, rules={"decay": "ema"})
