"""Trainer configuration: the schema, loading from a file with overrides, and validation.

A config file is a Python file with ``get_config(arg=None)`` returning an
``ml_collections.ConfigDict`` built on :func:`default_config` (big_vision style). Every key a
config may set is declared here with its default; a key that is not declared is a typo and fails
loudly, naming the key and the keys that exist. Free-form sections (``model``, ``dataset.options``)
are passed as keyword arguments to a constructor and are checked against its signature when the run
is built.
"""

from __future__ import annotations

import ast
import os
import traceback
from collections.abc import Sequence

import ml_collections

TASKS = ("classification", "contrastive", "lm", "mlm")
OPTIMIZERS = ("sgd", "adamw", "lamb", "lars")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "warmup_rsqrt")
VALIDATE_MODES = ("full", "sample", "off")

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
    # Checks of the data before training (jaxbatch.data.validate): 'sample' (in-memory data
    # fully, record files on a sample), 'full' (every example) or 'off'.
    c.dataset.validate = "sample"

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
    # Update rescaling around the optimizer (jaxbatch.optim): 'none', 'vrgd' (GSNR-scaled
    # gradients from the step's small gradients, Jiang et al. 2023) or 'agvm' (a learning-rate
    # scale per module group from two half-batch gradients, Xue et al. 2022). See GRADIENT_SCALINGS.
    c.optimizer.gradient_scaling = "none"
    c.optimizer.vrgd_gamma = 0.1  # normalised GSNR bounded to [1 - gamma, 1 + gamma]
    c.optimizer.vrgd_scope = "layer"  # 'layer' (per leaf / layer slice) or 'global'
    # agvm groups: ((name, regex over parameter paths), ...); () = one group per top-level
    # module of the parameters, in tree order. The reference group ('' = the first) has mu = 1.
    c.optimizer.agvm_groups = ()
    c.optimizer.agvm_reference = ""
    c.optimizer.agvm_momentum = 0.97
    c.optimizer.agvm_interval = 10  # measure every this many steps
    c.optimizer.agvm_start_samples = -1  # first measured sample; -1 = after schedule warm-up

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

    # In-step gradient-noise statistics (jaxbatch.train.noise): |G|^2, tr(Sigma) and B_simple
    # logged every log step as 'noise_g2', 'noise_trace', 'b_simple'.
    c.noise = ml_collections.ConfigDict()
    c.noise.enabled = True
    # Small gradients per micro-batch, side by side on the batch axes: 0 = automatic (data x fsdp
    # replicas; 2 on one batch shard without micro-batches), 1 = micro-batches only, or G > 1.
    c.noise.groups = 0
    # Horizon of the EMAs of |G|^2 and tr(Sigma), in samples: per-step decay exp(-B/ema_samples).
    c.noise.ema_samples = 5120

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
    # Context (sequence) parallelism: the sequence of every activation is split over this axis
    # (model.context_parallel picks how attention exchanges keys/values over it).
    c.mesh.context = 1
    # Overrides of jaxbatch.parallel.DEFAULT_RULES: logical axis -> mesh axis name, tuple of
    # names, or None (replicated), e.g. c.sharding_rules.conv_out = "tensor".
    c.sharding_rules = ml_collections.ConfigDict()

    # Faults (jaxbatch.train.faults): what the run does about non-finite steps and loss spikes.
    c.faults = ml_collections.ConfigDict()
    # Skip (inside the jitted step) an update whose loss or gradient is not finite: params,
    # optimizer state and EMA stay as they were; counted as metrics 'skipped_steps'.
    c.faults.skip_nonfinite = True
    # After this many skipped steps in a row, roll back to the last checkpoint; 0 = never.
    c.faults.max_consecutive_skips = 3
    # A step whose loss exceeds spike_factor × the running mean of the loss is a spike: it is
    # skipped and the run rolls back to the last checkpoint (PaLM-style); 0 = off.
    c.faults.spike_factor = 0.0
    c.faults.spike_warmup_steps = 10  # applied steps before spikes are looked for
    c.faults.loss_ema_decay = 0.9  # decay of the running mean of the loss
    # Each rollback multiplies the learning rate by this factor and skips the batches seen since
    # the checkpoint it returns to.
    c.faults.lr_factor = 0.5
    # A fault after this many rollbacks stops the run with a report (exit code 3).
    c.faults.max_rollbacks = 2
    # Fault injection, for tests and drills: batch positions (1-based, in data order) whose
    # gradients and loss are multiplied by NaN, or by inject_spike_scale (a loss spike).
    c.faults.inject_nan_at = ()
    c.faults.inject_spike_at = ()
    c.faults.inject_spike_scale = 1000.0
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
    _require(
        cfg.dataset.validate in VALIDATE_MODES,
        f"config.dataset.validate={cfg.dataset.validate!r}; expected one of {VALIDATE_MODES}",
    )
    _validate_faults(cfg.faults)
    _validate_noise(cfg)
    _validate_gradient_scaling(cfg)


GRADIENT_SCALINGS = ("none", "vrgd", "agvm")
VRGD_SCOPES = ("layer", "global")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate_noise(cfg: ml_collections.ConfigDict) -> None:
    n = cfg.noise
    _require(
        isinstance(n.enabled, bool), f"config.noise.enabled={n.enabled!r}; expected True or False"
    )
    _require(
        _is_int(n.groups) and n.groups >= 0,
        f"config.noise.groups={n.groups!r}; expected an integer >= 0 (0 = automatic, 1 = "
        "micro-batches only, G > 1 = G groups per micro-batch)",
    )
    if n.groups > 1:
        micro = cfg.batch_size // cfg.micro_batches
        _require(
            micro % n.groups == 0,
            f"config.noise.groups={n.groups} does not divide the micro-batch of {micro} examples "
            f"(batch_size {cfg.batch_size} / micro_batches {cfg.micro_batches})",
        )
    _require(
        isinstance(n.ema_samples, int | float)
        and not isinstance(n.ema_samples, bool)
        and n.ema_samples > 0,
        f"config.noise.ema_samples={n.ema_samples!r}; expected a number of samples > 0",
    )


def _validate_gradient_scaling(cfg: ml_collections.ConfigDict) -> None:
    o = cfg.optimizer
    _require(
        o.gradient_scaling in GRADIENT_SCALINGS,
        f"config.optimizer.gradient_scaling={o.gradient_scaling!r}; expected one of "
        f"{GRADIENT_SCALINGS}",
    )
    _require(
        isinstance(o.vrgd_gamma, int | float) and 0 <= o.vrgd_gamma <= 1,
        f"config.optimizer.vrgd_gamma={o.vrgd_gamma!r}; expected 0 <= gamma <= 1 (bounds "
        "[1 - gamma, 1 + gamma])",
    )
    _require(
        o.vrgd_scope in VRGD_SCOPES,
        f"config.optimizer.vrgd_scope={o.vrgd_scope!r}; expected one of {VRGD_SCOPES}",
    )
    groups = tuple(o.agvm_groups)
    _require(
        all(
            isinstance(g, tuple | list) and len(g) == 2 and all(isinstance(x, str) for x in g)
            for g in groups
        ),
        f"config.optimizer.agvm_groups={o.agvm_groups!r}; expected ((name, regex), ...) or () "
        "for one group per top-level module",
    )
    names = [g[0] for g in groups]
    _require(
        o.agvm_reference == "" or o.agvm_reference in names or not groups,
        f"config.optimizer.agvm_reference={o.agvm_reference!r}; expected '' or one of {names}",
    )
    _require(
        isinstance(o.agvm_momentum, int | float) and 0 <= o.agvm_momentum < 1,
        f"config.optimizer.agvm_momentum={o.agvm_momentum!r}; expected 0 <= momentum < 1",
    )
    _require(
        _is_int(o.agvm_interval) and o.agvm_interval >= 1,
        f"config.optimizer.agvm_interval={o.agvm_interval!r}; expected an integer >= 1",
    )
    _require(
        _is_int(o.agvm_start_samples) and o.agvm_start_samples >= -1,
        f"config.optimizer.agvm_start_samples={o.agvm_start_samples!r}; expected an integer "
        ">= 0, or -1 (after the schedule's warm-up)",
    )
    if o.gradient_scaling == "agvm":
        _require(
            cfg.micro_batches == 1 or cfg.micro_batches % 2 == 0,
            f"config.optimizer.gradient_scaling='agvm' needs two halves of the micro-batches: "
            f"micro_batches must be 1 or even, got {cfg.micro_batches}",
        )
    if o.gradient_scaling == "vrgd":
        _require(
            cfg.micro_batches > 1 or cfg.noise.groups != 1,
            "config.optimizer.gradient_scaling='vrgd' needs at least two small gradients per "
            "step: micro_batches > 1, or config.noise.groups = 0 (automatic) or > 1; got "
            f"micro_batches={cfg.micro_batches}, noise.groups={cfg.noise.groups}",
        )


def _validate_faults(f: ml_collections.ConfigDict) -> None:
    for key in ("max_consecutive_skips", "spike_warmup_steps", "max_rollbacks"):
        _require(
            isinstance(f[key], int) and not isinstance(f[key], bool) and f[key] >= 0,
            f"config.faults.{key}={f[key]!r}; expected an integer >= 0",
        )
    _require(
        f.spike_factor == 0 or f.spike_factor > 1,
        f"config.faults.spike_factor={f.spike_factor}; expected 0 (off) or a factor > 1",
    )
    _require(
        0 < f.loss_ema_decay < 1,
        f"config.faults.loss_ema_decay={f.loss_ema_decay}; expected 0 < decay < 1",
    )
    _require(
        0 < f.lr_factor <= 1, f"config.faults.lr_factor={f.lr_factor}; expected 0 < factor <= 1"
    )
    _require(
        f.inject_spike_scale > 1,
        f"config.faults.inject_spike_scale={f.inject_spike_scale}; expected > 1",
    )
    for key in ("inject_nan_at", "inject_spike_at"):
        value = f[key]
        positions = (value,) if isinstance(value, int) else tuple(value)
        _require(
            all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in positions),
            f"config.faults.{key}={value!r}; expected batch positions (integers >= 1)",
        )


def _file_error(file_path: str, error: BaseException) -> ConfigError:
    """One line naming the config file, the line and what went wrong in it."""
    if isinstance(error, SyntaxError) and error.lineno is not None:
        return ConfigError(
            f"config file {file_path!r} line {error.lineno}: syntax error: {error.msg}"
        )
    target = os.path.abspath(file_path)
    lines = [
        frame.lineno
        for frame in traceback.extract_tb(error.__traceback__)
        if os.path.abspath(frame.filename) == target
    ]
    where = f" line {lines[-1]}" if lines else ""
    text = str(error).splitlines()[0] if str(error) else ""
    return ConfigError(
        f"config file {file_path!r}{where}: {type(error).__name__}: {text}".rstrip(": ")
    )


def _parse_config_file(path: str, flag_args: Sequence[str]) -> ml_collections.ConfigDict:
    """The ConfigDict of ``path[:arg]`` with ``flag_args`` applied by ml_collections."""
    from absl import flags
    from ml_collections import config_flags

    file_path = path.split(":", 1)[0]
    argv = ["jaxbatch", f"--config={path}", *flag_args]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config", flag_values=flag_values, sys_argv=argv, lock_config=False
    )
    if not flag_args:
        try:
            flag_values(argv)
        except flags.IllegalFlagValueError as e:
            raise _file_error(file_path, e.__cause__ or e.__context__ or e) from None
        except Exception as e:  # the file is the user's Python: any error it raises
            raise _file_error(file_path, e) from None
        if not isinstance(holder.value, ml_collections.ConfigDict):
            raise ConfigError(
                f"config file {file_path!r}: get_config() returned "
                f"{type(holder.value).__name__}; expected an ml_collections.ConfigDict (build it "
                "on default_config())"
            )
        return holder.value
    try:
        flag_values(argv)
    except (AttributeError, KeyError, ValueError, TypeError, flags.Error) as e:
        keys = [a.split("=", 1)[0].removeprefix("--config.") for a in flag_args]
        known = sorted(dict(_flatten(default_config())))
        raise ConfigError(
            f"cannot apply overrides {keys} to {path}: {_one_line(e)}; known keys are: {known}"
        ) from None
    return holder.value


def _one_line(error: Exception) -> str:
    """The error's message on one line; a KeyError's own text (``str`` of a KeyError is a repr)."""
    cause = error.__cause__ or error.__context__
    if isinstance(cause, KeyError):  # flags wraps ml_collections' KeyError
        error = cause
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__


def _free_form_section(key: str) -> str | None:
    """The free-form section that ``key`` is inside (not the section itself), or None."""
    for section in _FREE_FORM:
        if key.startswith(section + "."):
            return section
    return None


def _has_key(cfg: ml_collections.ConfigDict, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def parse_value(text: str):
    """A command-line value for a new free-form key: a Python literal (``ast.literal_eval``:
    numbers, strings, tuples, booleans, None), else the text itself as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _set_key(cfg: ml_collections.ConfigDict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        if part not in node:
            node[part] = ml_collections.ConfigDict()
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"config override {key}: config.{part} is not a section")
    node[last] = value


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``path[:arg]`` with ``--config.key=value`` style overrides, then validates it.

    Keys declared by the schema (or already set by the file) are parsed by ml_collections
    config_flags with the type of the existing field. A key new to a free-form section
    (``model``, ``dataset.options``, ``sharding_rules``), e.g.
    ``--config.dataset.options.path=/data/mine_{split}.npz``, is added with :func:`parse_value`;
    it is checked against the constructor's signature when the run is built, like a key set in
    a file.

    Args:
      path: a config file, optionally followed by ``:arg`` passed to its ``get_config``.
      overrides: strings ``key=value`` (or ``--config.key=value``).

    Returns:
      The validated, unlocked ConfigDict.

    Raises:
      FileNotFoundError: no such config file.
      ConfigError: an error in the file (syntax, an exception, not a ConfigDict), an override
        that does not apply, or a value that does not validate; one line naming it.
    """
    file_path = path.split(":", 1)[0]
    if not os.path.isfile(file_path):
        raise FileNotFoundError(f"config file {file_path!r} does not exist")
    items = []
    for item in overrides:
        item = item.removeprefix("--").removeprefix("config.")
        if "=" not in item:
            raise ConfigError(f"config override {item!r}; expected key=value")
        key = item.split("=", 1)[0]
        if key in _RENAMED:
            raise ConfigError(f"config.{key} is no longer a key; use config.{_RENAMED[key]}")
        items.append(item.split("=", 1))
    base = _parse_config_file(path, ())
    typed = [
        f"--config.{k}={v}"
        for k, v in items
        if not (_free_form_section(k) and not _has_key(base, k))
    ]
    new = [(k, v) for k, v in items if _free_form_section(k) and not _has_key(base, k)]
    cfg = _parse_config_file(path, typed) if typed else base
    for key, value in new:
        _set_key(cfg, key, parse_value(value))
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
