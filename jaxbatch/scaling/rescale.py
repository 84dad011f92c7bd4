"""Rescale a whole optimizer config from a reference batch size to a new one, and log it."""

import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

from jaxbatch import _validate
from jaxbatch.scaling.adam import sde_hparam
from jaxbatch.scaling.ema import ema_decay
from jaxbatch.scaling.learning_rates import learning_rate
from jaxbatch.scaling.schedules import regime_adaptation
from jaxbatch.scaling.weight_decay import adamw_timescale, weight_decay_for_timescale

_LR_NAMES = ("learning_rate", "lr", "peak_lr", "base_lr")
_BETA_NAMES = ("b1", "b2", "beta1", "beta2")
_EPS_NAMES = ("eps", "epsilon")

RESCALE_RULES = ("none", "linear", "sqrt", "ema", "adam_sde", "timescale", "steps", "regime")


class Change(NamedTuple):
    """One rescaled hyper-parameter: dotted ``key``, ``old`` and ``new`` value, ``rule`` name."""

    key: str
    old: Any
    new: Any
    rule: str


def _as_dicts(tree):
    """A copy of ``tree`` in which every Mapping (ConfigDict, FrozenDict, ...) is a plain dict."""
    if isinstance(tree, Mapping):
        return {k: _as_dicts(v) for k, v in tree.items()}
    return tree


def _flatten(rules: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'opt': {'lr': 'sqrt'}, 'ema.decay': 'ema'} -> {'opt.lr': 'sqrt', 'ema.decay': 'ema'}."""
    flat = {}
    for key, value in rules.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _parent(tree: dict, key: str) -> tuple[dict, str]:
    """The dict that holds dotted ``key`` and the last path component; raises if absent."""
    *path, leaf = key.split(".")
    node = tree
    for i, part in enumerate(path):
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise ValueError(f"rules key {key!r}: {'.'.join(path[: i + 1])!r} is not a mapping")
    if leaf not in node:
        raise ValueError(f"rules key {key!r} is not in hparams (keys there: {sorted(node)})")
    return node, leaf


def _number(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"hparams[{key!r}] must be a number to rescale, got {value!r}")
    return value


def _count(old, scaled: float):
    """Rounds a rescaled count back to int when it was one; a positive count stays >= 1."""
    if isinstance(old, numbers.Integral):
        return max(1, round(scaled)) if old > 0 else 0
    return scaled


def _adam_sde(key: str, leaf: str, old: float, kappa: float) -> float:
    for field, names in (("lr", _LR_NAMES), ("b1", _BETA_NAMES), ("eps", _EPS_NAMES)):
        if leaf in names:
            return sde_hparam(field, old, kappa, name=key)
    raise ValueError(
        f"rule 'adam_sde' applies to keys named {_LR_NAMES + _BETA_NAMES + _EPS_NAMES}, got {key!r}"
    )


def rescale_hparams(
    hparams: Mapping[str, Any],
    *,
    reference_batch: float,
    batch: float,
    rules: Mapping[str, str],
    learning_rate_key: str | None = None,
) -> tuple[dict[str, Any], list[Change]]:
    """Rescales the hyper-parameters named in ``rules`` from ``reference_batch`` to ``batch``.

    With kappa = batch / reference_batch, each rule maps the old value x to::

      'none':      x                                  (kept; listed so the choice is explicit)
      'linear':    x * kappa                          (Goyal et al. 2017, SGD learning rate)
      'sqrt':      x * sqrt(kappa)                    (Krizhevsky 2014, Adam learning rate)
      'ema':       x ** kappa                         (Busbridge et al. 2023, EMA decay)
      'adam_sde':  by key name (Malladi et al. 2022): learning_rate/lr/peak_lr/base_lr ->
                   x * sqrt(kappa); b1/b2/beta1/beta2 -> 1 - kappa * (1 - x);
                   eps/epsilon -> x / sqrt(kappa)
      'timescale': weight decay holding the AdamW timescale tau = B / (lr * x * D) fixed:
                   x * kappa * lr_old / lr_new, with lr the learning rate after its own rule
                   (Bergsma et al. 2025); D cancels
      'steps':     round(x / kappa), for counts in optimizer steps (warmup_steps, total_steps):
                   keeps the number of samples, i.e. the epochs
      'regime':    x * kappa, for counts in samples or epochs: keeps the number of steps
                   (Hoffer et al. 2017 regime adaptation)

    Contract (the trainer relies on it):

    * ``hparams`` is any nested Mapping (dict, FrozenDict, ``ConfigDict.to_dict()``) or an
      ``ml_collections.ConfigDict`` itself (read through its ``to_dict()``; ``rules`` likewise).
      It is not modified; the result is a deep copy in which every Mapping is a plain ``dict``
      and every other value is the same object unless a rule changed it.
    * A ``rules`` key is a dotted path from the root of ``hparams`` ('learning_rate',
      'optimizer.b2', 'ema.decay'); ``rules`` may also nest like ``hparams``
      ({'optimizer': {'b2': 'adam_sde'}}), which is the form a ConfigDict can hold. Every key
      must exist and hold a real number (not bool); every rule must be one of
      ``RESCALE_RULES``; anything else raises ``ValueError``.
    * 'timescale' reads the learning rate at ``learning_rate_key`` (a dotted path from the
      root); by default the key 'learning_rate' in the same mapping as the weight decay. It is
      applied after all other rules, so it sees the rescaled learning rate.
    * 'steps' and 'regime' return ints for int inputs (a positive count stays >= 1); every other
      rule returns a float.
    * ``changes`` lists, in ``rules`` order (timescale rules last), one ``Change`` per value
      that actually changed (so kappa = 1 or 'none' gives none).
    * Values are range-checked as in the single rules: learning rates and eps >= 0, decays and
      betas in [0, 1), a beta pushed to <= 0 by 'adam_sde' raises.

    With an ``ml_collections.ConfigDict``::

      new, changes = rescale_hparams(cfg.optimizer, reference_batch=256,
                                     batch=cfg.batch_size, rules=cfg.scaling_rules)
      cfg.optimizer.update(new)
      for c in changes:
        logging.info('%s: %s -> %s (%s)', *c)

    References:
      See ``learning_rate``, ``adam_sde``, ``ema_decay``, ``weight_decay_for_timescale`` and
      ``regime_adaptation`` for each rule's paper and equation.

    Args:
      hparams: nested mapping of hyper-parameters tuned at ``reference_batch``.
      reference_batch: batch size the values were tuned at (> 0).
      batch: the new batch size (> 0).
      rules: dotted key -> rule name.
      learning_rate_key: dotted path of the learning rate used by 'timescale' rules.

    Returns:
      ``(new_hparams, changes)``: the rescaled copy and the list of ``Change`` records.

    Examples:
      >>> new, changes = rescale_hparams({'learning_rate': 1e-3, 'b2': 0.999},
      ...     reference_batch=256, batch=1024, rules={'learning_rate': 'sqrt', 'b2': 'adam_sde'})
      >>> new
      {'learning_rate': 0.002, 'b2': 0.996}
    """
    # ml_collections.ConfigDict is not a Mapping; take its plain-dict form.
    hparams = hparams.to_dict() if callable(getattr(hparams, "to_dict", None)) else hparams
    rules = rules.to_dict() if callable(getattr(rules, "to_dict", None)) else rules
    if not isinstance(hparams, Mapping):
        raise ValueError(f"hparams must be a Mapping, got {type(hparams).__name__}")
    if not isinstance(rules, Mapping):
        raise ValueError(f"rules must be a Mapping of key -> rule, got {type(rules).__name__}")
    rules = _flatten(rules)
    kappa = _validate.kappa(reference_batch, batch)
    for key, rule in rules.items():
        if rule not in RESCALE_RULES:
            raise ValueError(f"rules[{key!r}] must be one of {RESCALE_RULES}, got {rule!r}")

    old_tree = _as_dicts(hparams)
    new_tree = _as_dicts(hparams)
    changes = []

    def record(key, node, leaf, new, rule):
        old = node[leaf]
        node[leaf] = new
        if new != old:
            changes.append(Change(key, old, new, rule))

    ordered = [k for k, r in rules.items() if r != "timescale"]
    ordered += [k for k, r in rules.items() if r == "timescale"]
    for key in ordered:
        rule = rules[key]
        node, leaf = _parent(new_tree, key)
        old = _number(key, node[leaf])
        if rule == "none":
            continue
        try:
            if rule in ("linear", "sqrt"):
                new = learning_rate(old, reference_batch, batch, rule)
            elif rule == "ema":
                new = ema_decay(old, reference_batch, batch)
            elif rule == "adam_sde":
                new = _adam_sde(key, leaf, old, kappa)
            elif rule == "steps":
                new = _count(old, _validate.non_negative(key, old) / kappa)
            elif rule == "regime":
                new = _count(old, regime_adaptation(old, reference_batch, batch))
            else:  # timescale
                new = _timescale(
                    key, old, old_tree, new_tree, learning_rate_key, reference_batch, batch
                )
        except ValueError as err:
            raise ValueError(f"hparams[{key!r}] with rule {rule!r}: {err}") from None
        record(key, node, leaf, new, rule)
    return new_tree, changes


def _timescale(key, old, old_tree, new_tree, learning_rate_key, reference_batch, batch) -> float:
    if learning_rate_key is None:
        lr_key = key.rpartition(".")[0] + ("." if "." in key else "") + "learning_rate"
    else:
        lr_key = learning_rate_key
    try:
        old_parent, lr_leaf = _parent(old_tree, lr_key)
        new_parent, _ = _parent(new_tree, lr_key)
    except ValueError as err:
        raise ValueError(
            f"rule 'timescale' for {key!r} needs the learning rate at {lr_key!r}; pass "
            f"learning_rate_key= to name it ({err})"
        ) from None
    decay = _validate.non_negative(key, old)
    if decay == 0.0:
        return 0.0  # no decay is an infinite timescale at any batch size
    lr_old = _number(lr_key, old_parent[lr_leaf])
    lr_new = _number(lr_key, new_parent[lr_leaf])
    # D cancels between the two timescale equations; 1.0 keeps tau in units of D.
    tau = adamw_timescale(decay, lr_old, reference_batch, 1.0)
    return weight_decay_for_timescale(tau, lr_new, batch, 1.0)
