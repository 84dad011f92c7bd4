"""Trainer configuration: the schema, loading from a file with overrides, and validation.

A config file is a Python file with ``get_config(arg=None)`` returning an
``ml_collections.ConfigDict`` built on :func:`default_config` (big_vision style). Every key a
config may set is declared here with its default; a key that is not declared is a typo and fails
loudly, naming the key and the keys that exist. Free-form sections (``model``, ``dataset.options``)
are passed as keyword arguments to a constructor and are checked against its signature when the run
is built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections

TASKS = ("classification", "contrastive", "lm", "mlm")
OPTIMIZERS = ("sgd", "adamw", "lamb", "lars")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "warmup_rsqrt")

# Sections whose keys are keyword arguments of a constructor, validated there, not here.
_FREE_FORM = ("model", "dataset.options", "sharding_rules")


class ConfigError(ValueError):
    """A config that cannot describe a run: unknown key, bad value or inconsistent values."""


def default_config() -> ml_collections.ConfigDict:
    """Every key a training config may set, with its default."""
    c = ml_collections.ConfigDict()
    c.task = ""  # one of TASKS
    c.seed = 0

    # Batch. Hyper-parameters below are stated for `reference_batch_size`; setting `batch_size`
    # rescales them by the rules in `scaling` (logged at start).
    c.batch_size = 256
    c.reference_batch_size = 256
    c.micro_batches = 1  # gradient accumulation inside one step (optim.accumulate)
    c.total_samples = 0  # training length in samples; steps = total_samples // batch_size

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = ""
    c.dataset.options = ml_collections.ConfigDict()
    # contrastive task: the (x, y) fields of a pair, e.g. ('image', 'text') for image_text
    c.dataset.pair_fields = ("doc", "code")
    # Threads per process that decode / crop the examples of one batch (Pillow releases the
    # GIL, so JPEG datasets scale with them); in-memory datasets have nothing to decode.
    c.dataset.transform_threads = 1

    c.model = ml_collections.ConfigDict()
    c.model.name = ""

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # one of OPTIMIZERS
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.trust_coefficient = 0.001  # lars
    c.optimizer.min_ratio = 0.0  # lamb trust-ratio clip, 0 = off
    c.optimizer.max_ratio = 0.0  # lamb trust-ratio clip, 0 = off
    c.optimizer.mask = "exclude_bias_and_norm"  # or "none": which leaves get decay / trust ratio
    c.optimizer.grad_clip_norm = 0.0  # 0 = off

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "warmup_cosine"  # one of SCHEDULES
    c.schedule.warmup_samples = 0
    c.schedule.end_lr_fraction = 0.0

    # How each hyper-parameter moves with the batch (jaxbatch.scaling rules).
    c.scaling = ml_collections.ConfigDict()
    c.scaling.learning_rate = "linear"
    c.scaling.ema_decay = "ema"
    c.scaling.weight_decay = "none"

    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.0  # per-step decay at reference_batch_size; 0 = no EMA
    # Linear ramp of the decay from 0 over this many samples (optim.model_ema's warm-up), stated
    # in samples like the schedule so it ends at the same point of training at every batch size.
    c.ema.warmup_samples = 0

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "softmax"  # contrastive: softmax | sigmoid | decoupled
    c.loss.implementation = "auto"
    c.loss.block_size = 0  # 0 = the implementation's default
    c.loss.label_smoothing = 0.0

    c.log_every_steps = 10
    c.eval_every_steps = 0  # 0 = only at the end
    c.eval_batch_size = 512
    # Precise BN (jaxbatch.train.precise_bn): before every evaluation, replace the running
    # batch-norm statistics by their average over this many training batches; 0 = off.
    c.precise_bn_batches = 0
    c.checkpoint_every_steps = 0  # 0 = only at the end
    # Start from the weights (params, batch statistics) of an earlier run: its workdir. Used only
    # when this run has no checkpoint of its own; optimizer state and step start fresh.
    c.init_from = ""
    c.max_checkpoints = 2

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Overrides of jaxbatch.parallel.DEFAULT_RULES: logical axis -> mesh axis name, tuple of
    # names, or None (replicated), e.g. c.sharding_rules.conv_out = "tensor".
    c.sharding_rules = ml_collections.ConfigDict()
    return c


def _flatten(cfg, prefix=""):
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and path not in _FREE_FORM:
            yield from _flatten(value, path + ".")
        else:
            yield path, value


# Keys that were renamed: the error says what replaced them.
_RENAMED = {
    "ema.warmup_steps": "ema.warmup_samples (in samples: the ramp then ends at the same point of "
    "training whatever the batch size)",
}


def check_known_keys(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for every key that the schema does not declare."""
    known = dict(_flatten(default_config()))
    unknown = [path for path, _ in _flatten(cfg) if path not in known]
    renamed = [path for path in unknown if path in _RENAMED]
    if renamed:
        raise ConfigError(
            f"config.{renamed[0]} is no longer a key; use config.{_RENAMED[renamed[0]]}"
        )
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {unknown}; known keys are: {sorted(known)} "
            f"(free-form sections: {list(_FREE_FORM)})"
        )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks that `cfg` describes a run, before any work is done."""
    check_known_keys(cfg)
    _require(cfg.task in TASKS, f"config.task={cfg.task!r}; expected one of {TASKS}")
    _require(cfg.dataset.name != "", "config.dataset.name is empty; name a bundled dataset")
    _require(cfg.model.name != "", "config.model.name is empty; name a model of jaxbatch.nn")
    pair = tuple(cfg.dataset.pair_fields)
    _require(
        len(pair) == 2 and all(isinstance(f, str) and f for f in pair) and pair[0] != pair[1],
        f"config.dataset.pair_fields={pair!r}; expected two different field names (x, y)",
    )
    for key in ("batch_size", "reference_batch_size", "micro_batches", "eval_batch_size"):
        _require(
            isinstance(cfg[key], int) and cfg[key] > 0,
            f"config.{key}={cfg[key]!r}; expected a positive integer",
        )
    _require(
        cfg.batch_size % cfg.micro_batches == 0,
        f"config.batch_size={cfg.batch_size} is not divisible by "
        f"config.micro_batches={cfg.micro_batches}; each micro-batch must have the same size",
    )
    _require(
        cfg.total_samples >= cfg.batch_size,
        f"config.total_samples={cfg.total_samples} is less than one batch "
        f"(batch_size={cfg.batch_size}); expected at least one step of training",
    )
    _require(
        cfg.optimizer.name in OPTIMIZERS,
        f"config.optimizer.name={cfg.optimizer.name!r}; expected one of {OPTIMIZERS}",
    )
    _require(
        cfg.optimizer.learning_rate > 0,
        f"config.optimizer.learning_rate={cfg.optimizer.learning_rate}; expected > 0",
    )
    _require(
        cfg.optimizer.mask in ("exclude_bias_and_norm", "none"),
        f"config.optimizer.mask={cfg.optimizer.mask!r}; expected 'exclude_bias_and_norm' or 'none'",
    )
    _require(
        cfg.schedule.name in SCHEDULES,
        f"config.schedule.name={cfg.schedule.name!r}; expected one of {SCHEDULES}",
    )
    _require(
        0 <= cfg.schedule.warmup_samples < cfg.total_samples,
        f"config.schedule.warmup_samples={cfg.schedule.warmup_samples}; expected "
        f"0 <= warmup_samples < total_samples={cfg.total_samples}",
    )
    _require(
        0.0 <= cfg.ema.decay < 1.0, f"config.ema.decay={cfg.ema.decay}; expected 0 <= decay < 1"
    )
    _require(
        isinstance(cfg.ema.warmup_samples, int) and cfg.ema.warmup_samples >= 0,
        f"config.ema.warmup_samples={cfg.ema.warmup_samples!r}; expected an integer >= 0",
    )
    for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        _require(cfg[key] >= 0, f"config.{key}={cfg[key]}; expected >= 0")
    _require(
        isinstance(cfg.dataset.transform_threads, int) and cfg.dataset.transform_threads >= 1,
        f"config.dataset.transform_threads={cfg.dataset.transform_threads!r}; expected an "
        "integer >= 1",
    )
    _require(
        isinstance(cfg.precise_bn_batches, int) and cfg.precise_bn_batches >= 0,
        f"config.precise_bn_batches={cfg.precise_bn_batches!r}; expected an integer >= 0",
    )


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``path[:arg]`` with ``--config.key=value`` style overrides, then validates it.

    Args:
      path: a config file, optionally followed by ``:arg`` passed to its ``get_config``.
      overrides: strings ``key=value`` (or ``--config.key=value``), parsed by ml_collections
        config_flags with the type of the existing field.

    Returns:
      The validated, unlocked ConfigDict.
    """
    from absl import flags
    from ml_collections import config_flags

    file_path = path.split(":", 1)[0]
    if not os.path.isfile(file_path):
        raise FileNotFoundError(f"config file {file_path!r} does not exist")
    flag_args = []
    for item in overrides:
        item = item.removeprefix("--").removeprefix("config.")
        if "=" not in item:
            raise ConfigError(f"config override {item!r}; expected key=value")
        flag_args.append(f"--config.{item}")
    argv = ["jaxbatch", f"--config={path}", *flag_args]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config", flag_values=flag_values, sys_argv=argv, lock_config=False
    )
    try:
        flag_values(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        keys = [a.split("=", 1)[0].removeprefix("--config.") for a in flag_args]
        known = sorted(dict(_flatten(default_config())))
        raise ConfigError(
            f"cannot apply overrides {keys} to {path}: {e}; known keys are: {known}"
        ) from e
    cfg = holder.value
    validate(cfg)
    return cfg


def rescale_for_batch(cfg: ml_collections.ConfigDict):
    """Moves the hyper-parameters from ``reference_batch_size`` to ``batch_size``.

    ``config.scaling`` names the rule of each hyper-parameter
    (``jaxbatch.scaling.rescale_hparams``): ``learning_rate`` ('linear', 'sqrt', 'none', or
    'adam_sde', which also moves b1, b2 and eps), ``ema_decay`` ('ema' = ρ^κ, or 'none') and
    ``weight_decay`` ('none', 'linear', 'timescale', ...). Warm-up and decay are stated in samples,
    so they need no rule.

    Returns:
      ``(new_config, changes)``: a rescaled copy and the list of ``scaling.Change`` records.
    """
    from jaxbatch import scaling

    rules = {
        "optimizer.learning_rate": cfg.scaling.learning_rate,
        "optimizer.weight_decay": cfg.scaling.weight_decay,
        "ema.decay": cfg.scaling.ema_decay,
    }
    if cfg.scaling.learning_rate == "adam_sde":
        rules.update(
            {"optimizer.b1": "adam_sde", "optimizer.b2": "adam_sde", "optimizer.eps": "adam_sde"}
        )
    hparams = {"optimizer": cfg.optimizer.to_dict(), "ema": cfg.ema.to_dict()}
    try:
        new, changes = scaling.rescale_hparams(
            hparams,
            reference_batch=cfg.reference_batch_size,
            batch=cfg.batch_size,
            rules=rules,
            learning_rate_key="optimizer.learning_rate",
        )
    except ValueError as e:
        raise ConfigError(
            f"cannot rescale config.optimizer/ema to batch {cfg.batch_size}: {e}"
        ) from e
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.optimizer.update(new["optimizer"])
    out.ema.update(new["ema"])
    return out, changes
