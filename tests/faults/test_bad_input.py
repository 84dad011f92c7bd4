"""Bad input: every malformed config, config file, workdir and dataset ends in one line on stderr
naming the bad file, key or value, exit code 2, and no run directory.

Each case goes through ``jaxbatch.train.cli.main`` in this process; all fail before anything is
compiled (the data checks of ``jaxbatch.data.validate`` run before the model is built).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxbatch.data import digits
from jaxbatch.train import cli

DIGITS = "configs/digits_resnet_lars.py:runlocal"
LM_FILE = """from jaxbatch.train.config import default_config
def get_config(arg=None):
    c = default_config()
    c.task = 'lm'; c.dataset.name = 'npz'; c.model.name = 'decoder_lm'
    c.model.vocab_size = 258; c.model.max_len = 32
    c.batch_size = c.reference_batch_size = 8; c.total_samples = 16
    return c
"""
GOOD_FILE = """from jaxbatch.train.config import default_config
def get_config(arg=None):
    c = default_config()
    c.task = 'classification'; c.dataset.name = 'digits'; c.model.name = 'resnet_cifar'
    c.total_samples = 1024
    return c
"""

# (case id, config overrides, expected text in the message)
OVERRIDE_CASES = [
    ("batch_zero", ["batch_size=0"], "config.batch_size=0; expected a positive integer"),
    ("unknown_task", ["task=regression"], "config.task='regression'"),
    ("unknown_optimizer", ["optimizer.name=adagrad"], "config.optimizer.name='adagrad'"),
    ("ema_decay_one", ["ema.decay=1.0"], "config.ema.decay=1.0; expected 0 <= decay < 1"),
    ("negative_lr", ["optimizer.learning_rate=-0.1"], "learning_rate=-0.1; expected > 0"),
    ("less_than_a_batch", ["total_samples=10"], "config.total_samples=10 is less than one batch"),
    ("warmup_too_long", ["schedule.warmup_samples=999999"], "warmup_samples=999999"),
    ("micro_batches", ["micro_batches=3"], "is not divisible by config.micro_batches=3"),
    (
        "typo_key",
        ["optimizer.lerning_rate=1"],
        'Did you mean "learning_rate" instead of "lerning_rate"?; known keys',
    ),
    ("renamed_key", ["ema.warmup_steps=10"], "config.ema.warmup_steps is no longer a key"),
    ("spike_factor", ["faults.spike_factor=0.5"], "config.faults.spike_factor=0.5"),
    ("lr_factor_zero", ["faults.lr_factor=0.0"], "config.faults.lr_factor=0.0"),
    ("lr_factor_big", ["faults.lr_factor=1.5"], "config.faults.lr_factor=1.5"),
    ("max_rollbacks", ["faults.max_rollbacks=-1"], "config.faults.max_rollbacks=-1"),
    ("inject_position", ["faults.inject_nan_at=(0,)"], "config.faults.inject_nan_at=(0,)"),
    ("loss_ema_decay", ["faults.loss_ema_decay=1.0"], "config.faults.loss_ema_decay=1.0"),
    ("validate_mode", ["dataset.validate=maybe"], "config.dataset.validate='maybe'"),
    ("schedule_name", ["schedule.name=step"], "config.schedule.name='step'"),
    ("mask", ["optimizer.mask=all"], "config.optimizer.mask='all'"),
    ("threads", ["dataset.transform_threads=0"], "config.dataset.transform_threads=0"),
    ("wrong_type", ["batch_size=abc"], "cannot apply overrides ['batch_size']"),
    ("no_equals", ["batch_size"], "config override 'batch_size'; expected key=value"),
    ("pair_fields", ["dataset.pair_fields=('a','a')"], "config.dataset.pair_fields"),
    ("unknown_dataset", ["dataset.name=nope"], "unknown dataset 'nope'"),
    ("dataset_option", ["dataset.options.colour=1"], "unknown option(s) ['colour']"),
    ("model_name", ["model.name=nonet"], "config.model.name='nonet'"),
    ("model_key", ["model.widht=3"], "unknown key(s) ['widht'] in config.model"),
    ("mesh_vs_devices", ["mesh.data=3"], "mesh"),
    ("batch_vs_mesh", ["batch_size=260", "reference_batch_size=260"], "260"),
]


def _main(args, capsys):
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def _check(code, err, expected, workdir):
    assert code == 2, err
    assert expected in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("jaxbatch: error: ")
    assert not os.path.exists(workdir), "a run directory was left behind"


@pytest.mark.parametrize(
    "case, overrides, expected", OVERRIDE_CASES, ids=[c[0] for c in OVERRIDE_CASES]
)
def test_bad_config_value(case, overrides, expected, tmp_path, capsys):
    del case
    workdir = tmp_path / "run"
    args = ["train", "--config", DIGITS, "--workdir", str(workdir), "--no-progress"]
    code, err = _main(args + [f"--config.{o}" for o in overrides], capsys)
    _check(code, err, expected, workdir)


FILE_CASES = [
    ("syntax", "def get_config(arg=None):\n    c = (\n    return c\n", "line 2"),
    ("name_error", "def get_config(arg=None):\n    return undefined_name\n", "NameError"),
    ("no_get_config", "X = 1\n", "get_config"),
    ("not_a_configdict", "def get_config(arg=None):\n    return {'task': 'lm'}\n", "returned dict"),
    (
        "unknown_key_in_file",
        GOOD_FILE.replace("    return c", "    c.optimizer.warmup = 3\n    return c"),
        "optimizer.warmup",
    ),
    (
        "bad_value_in_file",
        GOOD_FILE.replace("    return c", "    c.ema.decay = 2.0\n    return c"),
        "config.ema.decay=2.0",
    ),
]


@pytest.mark.parametrize("case, text, expected", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_config_file(case, text, expected, tmp_path, capsys):
    path = tmp_path / f"{case}.py"
    path.write_text(text)
    workdir = tmp_path / "run"
    code, err = _main(["train", "--config", str(path), "--workdir", str(workdir)], capsys)
    _check(code, err, expected, workdir)
    if case not in ("unknown_key_in_file", "bad_value_in_file"):
        assert str(path) in err


def test_missing_config_file(tmp_path, capsys):
    workdir = tmp_path / "run"
    code, err = _main(
        ["train", "--config", str(tmp_path / "nope.py"), "--workdir", str(workdir)], capsys
    )
    _check(code, err, "nope.py' does not exist", workdir)


def test_workdir_is_a_file(tmp_path, capsys):
    workdir = tmp_path / "file"
    workdir.write_text("x")
    code, err = _main(["train", "--config", DIGITS, "--workdir", str(workdir)], capsys)
    assert code == 2 and "is a file; expected a directory" in err and workdir.read_text() == "x"
    assert len(err.splitlines()) == 1 and err.startswith("jaxbatch: error: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], "something was created"


def test_workdir_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    workdir = tmp_path / "file" / "run"
    code, err = _main(["train", "--config", DIGITS, "--workdir", str(workdir)], capsys)
    _check(code, err, "is a file, not a directory", workdir)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_workdir_not_writable(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    workdir = locked / "run"
    code, err = _main(["train", "--config", DIGITS, "--workdir", str(workdir)], capsys)
    _check(code, err, "is not writable", workdir)


def _digits_npz(root, name="good", train=None, test=None):
    """Digits (first 128 / 64 examples) as npz files, each split changed by its function."""
    pattern = root / f"{name}_{{split}}.npz"
    for split, n, change in (("train", 128, train), ("test", 64, test)):
        arrays = {k: v[:n].copy() for k, v in digits.digits_arrays(split).items()}
        if change is not None:
            arrays = change(arrays)
        if arrays is not None:
            np.savez(str(pattern).replace("{split}", split), **arrays)
    return str(pattern)


def _nan(a):
    a["image"][5, 2, 3, 0] = np.nan
    return a


def _inf(a):
    a["image"][7, 0, 0, 0] = np.inf
    return a


def _labels_5_to_14(a):
    a["label"] = a["label"] + 5
    return a


def _negative_label(a):
    a["label"][9] = -1
    return a


def _float_labels(a):
    a["label"] = a["label"].astype(np.float32)
    return a


def _nine_by_eight(a):
    a["image"] = np.concatenate([a["image"], a["image"][:, :1]], axis=1)
    return a


def _no_channels(a):
    a["image"] = a["image"][..., 0]
    return a


def _no_label(a):
    del a["label"]
    return a


def _objects(a):
    a["label"] = np.array([object()] * len(a["label"]), dtype=object)
    return a


def _short_label(a):
    a["label"] = a["label"][:-1]
    return a


DATA_CASES = [
    ("nan_in_images", dict(train=_nan), "field 'image' example 5 holds nan"),
    ("inf_in_test_images", dict(test=_inf), "_test.npz': field 'image' example 7 holds inf"),
    ("labels_out_of_range", dict(train=_labels_5_to_14), "outside [0, 10) (model.num_classes=10)"),
    ("negative_label", dict(test=_negative_label), "field 'label' example 9 holds -1"),
    ("float_labels", dict(train=_float_labels), "field 'label' has dtype float32; expected int"),
    ("shapes_differ", dict(train=_nine_by_eight), "every split must have the same shape"),
    ("image_rank", dict(train=_no_channels, test=_no_channels), "expected 3 axes"),
    ("missing_field", dict(train=_no_label, test=_no_label), "lacks the field(s) ['label']"),
    ("object_arrays", dict(train=_objects), "cannot be read without pickle"),
    ("leading_dims", dict(train=_short_label), "must share the leading (example) dimension"),
    ("missing_test_file", dict(test=lambda a: None), "no .npz file at"),
]


@pytest.mark.parametrize("case, changes, expected", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_dataset(case, changes, expected, tmp_path, capsys):
    pattern = _digits_npz(tmp_path, case, **changes)
    workdir = tmp_path / "run"
    args = ["train", "--config", DIGITS, "--workdir", str(workdir), "--no-progress"]
    args += ["--config.dataset.name=npz", f"--config.dataset.options.path={pattern}"]
    code, err = _main(args, capsys)
    _check(code, err, expected, workdir)
    if case not in ("missing_field",):
        assert pattern.split("{split}")[0] in err, "the message does not name the file"


def test_not_an_npz_archive(tmp_path, capsys):
    for split in ("train", "test"):
        (tmp_path / f"junk_{split}.npz").write_bytes(b"not a zip file")
    workdir = tmp_path / "run"
    args = ["train", "--config", DIGITS, "--workdir", str(workdir)]
    args += [
        "--config.dataset.name=npz",
        f"--config.dataset.options.path={tmp_path}/junk_{{split}}.npz",
    ]
    code, err = _main(args, capsys)
    _check(code, err, "is not a readable .npz archive", workdir)


def test_npz_path_without_split(tmp_path, capsys):
    workdir = tmp_path / "run"
    args = ["train", "--config", DIGITS, "--workdir", str(workdir)]
    args += ["--config.dataset.name=npz", f"--config.dataset.options.path={tmp_path}/x.npz"]
    code, err = _main(args, capsys)
    _check(code, err, "must contain '{split}'", workdir)


def _lm_npz(root, tokens_train):
    pattern = root / "lm_{split}.npz"
    np.savez(str(pattern).replace("{split}", "train"), tokens=tokens_train)
    np.savez(str(pattern).replace("{split}", "test"), tokens=np.zeros((8, 33), np.int32))
    return str(pattern)


@pytest.mark.parametrize(
    "case, tokens, expected",
    [
        ("token_beyond_vocab", np.full((16, 33), 300, np.int32), "(model.vocab_size=258)"),
        ("sequence_too_long", np.zeros((16, 65), np.int32), "the model takes at most 33"),
    ],
)
def test_bad_lm_tokens(case, tokens, expected, tmp_path, capsys):
    del case
    workdir = tmp_path / "run"
    config = tmp_path / "lm.py"
    config.write_text(LM_FILE)
    args = ["train", "--config", str(config), "--workdir", str(workdir)]
    args += [f"--config.dataset.options.path={_lm_npz(tmp_path, tokens)}"]
    code, err = _main(args, capsys)
    _check(code, err, expected, workdir)
