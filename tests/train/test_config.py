"""Config loading and validation: every bad config fails before any work, naming the bad value."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.train import config as config_lib
from jaxbatch.train import optimizer as optimizer_lib

CONFIGS = ["configs/digits_resnet_lars.py", "configs/codesearch_clip.py", "configs/stdlib_lm.py"]


@pytest.mark.parametrize("path", CONFIGS)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_bundled_configs_validate(path, arg):
    cfg = config_lib.load_config(path if arg is None else f"{path}:{arg}")
    assert cfg.total_samples >= cfg.batch_size
    config_lib.check_known_keys(cfg)


def test_override_is_typed_and_applied():
    cfg = config_lib.load_config(
        "configs/digits_resnet_lars.py", ["--config.batch_size=512", "optimizer.momentum=0.8"]
    )
    assert cfg.batch_size == 512 and isinstance(cfg.batch_size, int)
    assert cfg.optimizer.momentum == 0.8


def test_unknown_override_key_names_it():
    with pytest.raises(config_lib.ConfigError, match="optimizer.lerning_rate"):
        config_lib.load_config("configs/digits_resnet_lars.py", ["optimizer.lerning_rate=1"])


def test_unknown_key_in_file_names_it(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "from jaxbatch.train.config import default_config\n"
        "def get_config(arg=None):\n"
        "    c = default_config()\n"
        "    c.task = 'lm'; c.dataset.name = 'stdlib_text'; c.model.name = 'decoder_lm'\n"
        "    c.total_samples = 1024\n"
        "    c.optimizer.warmup = 3\n"
        "    return c\n"
    )
    with pytest.raises(config_lib.ConfigError, match=r"optimizer\.warmup"):
        config_lib.load_config(str(path))


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="configs/nope.py"):
        config_lib.load_config("configs/nope.py")


def test_batch_not_divisible_by_micro_batches():
    with pytest.raises(config_lib.ConfigError, match=r"batch_size=1024 is not divisible by .*=3"):
        config_lib.load_config("configs/digits_resnet_lars.py", ["micro_batches=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=0", "batch_size=0"),
        ("task=regression", "task='regression'"),
        ("optimizer.name=adagrad", "adagrad"),
        ("ema.decay=1.0", "ema.decay=1.0"),
        ("optimizer.learning_rate=-0.1", "learning_rate=-0.1"),
        ("total_samples=10", "total_samples=10"),
        ("schedule.warmup_samples=999999", "warmup_samples=999999"),
        ("ema.warmup_samples=-5", "ema.warmup_samples=-5"),
        (
            "ema.warmup_steps=10",
            "ema.warmup_steps",
        ),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(
        config_lib.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")
    ):
        config_lib.load_config("configs/digits_resnet_lars.py", [override])


def test_rescale_for_batch_follows_the_rules():
    cfg = config_lib.load_config("configs/digits_resnet_lars.py", ["ema.decay=0.99"])  # ref 256
    new, changes = config_lib.rescale_for_batch(cfg)
    kappa = cfg.batch_size / cfg.reference_batch_size
    assert new.optimizer.learning_rate == pytest.approx(cfg.optimizer.learning_rate * kappa)
    assert new.ema.decay == pytest.approx(cfg.ema.decay**kappa)
    assert {c.key for c in changes} == {"optimizer.learning_rate", "ema.decay"}
    assert cfg.optimizer.learning_rate == 0.8 and cfg.ema.decay == 0.99  # input not modified


def test_rescale_adam_sde_moves_betas():
    cfg = config_lib.load_config(
        "configs/stdlib_lm.py", ["scaling.learning_rate=adam_sde", "batch_size=1024"]
    )
    new, _ = config_lib.rescale_for_batch(cfg)
    kappa = 1024 / 256
    assert new.optimizer.learning_rate == pytest.approx(cfg.optimizer.learning_rate * kappa**0.5)
    assert new.optimizer.b2 == pytest.approx(1 - kappa * (1 - cfg.optimizer.b2))
    assert new.optimizer.eps == pytest.approx(cfg.optimizer.eps / kappa**0.5)


def _ema_decays(cfg, steps):
    """The per-step decays the run's EMA applies: tracking x_t = t from 0, the EMA update is
    e_t = d_t·e_{t-1} + (1 - d_t)·t, so d_t = (t - e_t) / (t - e_{t-1})."""
    cfg, _ = config_lib.rescale_for_batch(cfg)
    ema = optimizer_lib.make_ema(cfg)
    state = ema.init({"x": jnp.zeros(())})
    decays, prev = [], 0.0
    for t in range(1, steps + 1):
        _, state = ema.update({"x": jnp.asarray(float(t))}, state)
        now = float(state.ema["x"])
        decays.append((t - now) / (t - prev))
        prev = now
    return cfg, np.array(decays)


def test_ema_warmup_is_in_samples_and_follows_the_batch():
    """At batch 64 the ramp over 512 samples takes 8 steps; at batch 128, 4 steps: both end at
    the same sample count, with the decay rescaled by the EMA rule (rho^kappa)."""
    common = ["ema.decay=0.9", "ema.warmup_samples=512", "reference_batch_size=64"]
    runs = {}
    for batch in (64, 128):
        cfg = config_lib.load_config("configs/stdlib_lm.py", [*common, f"batch_size={batch}"])
        runs[batch] = _ema_decays(cfg, 10)
    for batch, (cfg, decays) in runs.items():
        rho, ramp = 0.9 ** (batch / 64), 512 / batch
        # update t applies rho·min(1, (t - 1) / ramp): the first one copies the target
        want = [rho * min(1.0, (t - 1) / ramp) for t in range(1, 11)]
        np.testing.assert_allclose(decays, want, rtol=1e-4)
        assert cfg.ema.decay == pytest.approx(rho)
    # the full decay is first applied once 512 samples have been seen, in both runs
    assert np.argmax(runs[64][1] >= 0.9 - 1e-6) * 64 == 512
    assert np.argmax(runs[128][1] >= 0.81 - 1e-6) * 128 == 512


def test_free_form_sections_accept_new_keys_from_the_command_line():
    """A bundled config can be pointed at the user's files without writing a config file; new
    keys are Python literals where they parse as one, else strings."""
    cfg = config_lib.load_config(
        "configs/digits_resnet_lars.py",
        [
            "dataset.options.path=/data/mine_{split}.npz",
            "model.dropout_rate=0.1",
            "model.stage_sizes=(1,)",
            "sharding_rules.conv_out=tensor",
        ],
    )
    assert cfg.dataset.options.path == "/data/mine_{split}.npz"
    assert cfg.model.dropout_rate == 0.1 and cfg.model.stage_sizes == (1,)
    assert cfg.sharding_rules.conv_out == "tensor"
    assert config_lib.parse_value("None") is None and config_lib.parse_value("a b") == "a b"


def test_fault_keys_are_typed_and_validated():
    cfg = config_lib.load_config(
        "configs/digits_resnet_lars.py",
        ["faults.inject_nan_at=(3,5)", "faults.spike_factor=4.0", "faults.max_rollbacks=1"],
    )
    assert tuple(cfg.faults.inject_nan_at) == (3, 5) and cfg.faults.spike_factor == 4.0
    with pytest.raises(config_lib.ConfigError, match=r"faults\.max_consecutive_skips=-2"):
        config_lib.load_config("configs/digits_resnet_lars.py", ["faults.max_consecutive_skips=-2"])


def test_config_file_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def get_config(arg=None):\n    return [\n")
    with pytest.raises(config_lib.ConfigError, match=r"broken\.py' line 2: syntax error"):
        config_lib.load_config(str(path))
    path.write_text("def get_config(arg=None):\n    x = 1\n    return 1 / 0\n")
    with pytest.raises(config_lib.ConfigError, match=r"line 3: ZeroDivisionError"):
        config_lib.load_config(str(path))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["noise.groups=-1"], "config.noise.groups=-1; expected an integer >= 0"),
        (["noise.groups=7"], "config.noise.groups=7 does not divide the micro-batch of 128"),
        (["noise.ema_samples=0"], "config.noise.ema_samples=0; expected a number of samples > 0"),
        (["optimizer.gradient_scaling=lion"], "gradient_scaling='lion'; expected one of"),
        (["optimizer.vrgd_gamma=1.5"], "vrgd_gamma=1.5; expected 0 <= gamma <= 1"),
        (["optimizer.vrgd_scope=model"], "vrgd_scope='model'; expected one of"),
        (["optimizer.agvm_interval=0"], "agvm_interval=0; expected an integer >= 1"),
        (
            ["optimizer.gradient_scaling=agvm", "micro_batches=3", "batch_size=96"],
            "micro_batches must be 1 or even, got 3",
        ),
        (
            ["optimizer.gradient_scaling=vrgd", "noise.groups=1", "micro_batches=1"],
            "'vrgd' needs at least two small gradients",
        ),
    ],
)
def test_noise_and_gradient_scaling_values_are_named(overrides, message):
    """config.noise and the optimizer's gradient_scaling keys: each bad value named."""
    base = ["batch_size=256", "reference_batch_size=256", "micro_batches=2"]
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.load_config("configs/digits_resnet_lars.py", [*base, *overrides])


def test_noise_section_rejects_unknown_keys_and_has_its_defaults():
    cfg = config_lib.default_config()
    assert (cfg.noise.enabled, cfg.noise.groups, cfg.optimizer.gradient_scaling) == (
        True,
        0,
        "none",
    )
    with pytest.raises(config_lib.ConfigError, match=r"noise\.group_count"):
        config_lib.load_config("configs/digits_resnet_lars.py", ["noise.group_count=2"])
