"""Checks of a run's data before training: values, dtypes and shapes the model can take.

``validate_splits(cfg, {'train': ..., 'test': ...})`` raises :class:`DataError` naming the file
(or dataset and split), the field and the first bad example index for:

- a value that is not finite (NaN, ±inf) in a floating-point field;
- a label outside ``[0, model.num_classes)`` (classification) or a token id outside the model's
  vocabulary (``[-1, vocab_size)`` for 'lm', -1 being padding; ``[0, vocab_size)`` for a
  contrastive tower with a ``vocab_size``); a sequence longer than the model's ``max_len``;
- a dtype the task cannot use (non-integer labels or tokens, non-numeric arrays);
- a per-example shape that differs between splits, or an image that is not [height, width,
  channels].

``config.dataset.validate`` picks the extent: 'sample' (default: in-memory arrays up to
``FULL_SCAN_BYTES`` are scanned whole, larger arrays and record files on ``SAMPLE_SIZE`` evenly
spaced examples), 'full' (every example: reads every record of record files) or 'off'.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

FULL_SCAN_BYTES = 1 << 30  # in-memory fields up to this size are scanned whole in 'sample' mode
SAMPLE_SIZE = 256  # examples looked at in 'sample' mode when a field is not scanned whole


class DataError(ValueError):
    """Data a run cannot train on; the message names the file, field and first bad index."""


@dataclasses.dataclass(frozen=True)
class FieldRule:
    """What the model expects of one field.

    Attributes:
      kind: 'int' (integer dtype required) or 'number' (any numeric dtype; floats must be finite).
      low, high: integer values must lie in [low, high) (None: unchecked).
      what: the config key that sets the range, for the message.
      max_length: largest size of the first per-example axis (None: unchecked).
      ndim: required per-example rank (None: any).
    """

    kind: str = "number"
    low: int | None = None
    high: int | None = None
    what: str = ""
    max_length: int | None = None
    ndim: int | None = None


def _model_value(spec: Mapping[str, Any], key: str) -> Any:
    """``spec[key]``, else the default of the model constructor's field, else None."""
    if key in spec:
        return spec[key]
    from jaxbatch.train import models

    ctor = models.MODELS.get(spec.get("name"))
    fields = getattr(ctor, "__dataclass_fields__", None)
    if fields is None and ctor is not None:  # a builder function such as resnet_cifar
        from jaxbatch import nn as jnn

        fields = jnn.ResNet.__dataclass_fields__
    field = (fields or {}).get(key)
    if field is None or field.default is dataclasses.MISSING:
        return None
    return field.default


def field_rules(cfg) -> dict[str, FieldRule]:
    """The rules of the fields ``cfg.task`` reads, from ``cfg.model``."""
    model = cfg.model.to_dict()
    if cfg.task == "classification":
        classes = _model_value(model, "num_classes")
        return {
            "image": FieldRule("number", ndim=3),
            "label": FieldRule("int", 0, classes, "model.num_classes"),
        }
    if cfg.task == "lm":
        vocab = _model_value(model, "vocab_size")
        max_len = _model_value(model, "max_len")
        return {
            "tokens": FieldRule(
                "int", -1, vocab, "model.vocab_size", None if max_len is None else max_len + 1
            ),
            "segment_ids": FieldRule("int", 0, None),
        }
    if cfg.task == "contrastive":
        rules = {}
        for field, tower in zip(cfg.dataset.pair_fields, ("x_encoder", "y_encoder"), strict=True):
            spec = model.get(tower) or model.get("x_encoder") or {}
            vocab = _model_value(spec, "vocab_size") if isinstance(spec, Mapping) else None
            rules[field] = FieldRule("number", 0, vocab, f"model.{tower}.vocab_size")
        return rules
    if cfg.task == "mlm":
        vocab = _model_value(model, "vocab_size")
        return {
            "input_ids": FieldRule("int", 0, vocab, "model.vocab_size"),
            "masked_lm_positions": FieldRule("int", 0, None),
            "masked_lm_ids": FieldRule("int", 0, vocab, "model.vocab_size"),
            "masked_lm_weights": FieldRule("number"),
        }
    return {}


def describe_source(cfg, split: str) -> str:
    """Where a split comes from, for messages: the file for 'npz', else dataset/split."""
    options = cfg.dataset.options
    if cfg.dataset.name == "npz" and "path" in options:
        return f"file {os.fspath(options.path).replace('{split}', split)!r}"
    if "data_dir" in options:
        return f"dataset {cfg.dataset.name!r} split {split!r} in {options.data_dir!r}"
    return f"dataset {cfg.dataset.name!r} split {split!r}"


def _indices(n: int, mode: str) -> np.ndarray:
    if mode == "full" or n <= SAMPLE_SIZE:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, SAMPLE_SIZE).round().astype(np.int64))


def _field_arrays(split, fields, mode: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({field: [k, ...]}, the example indices they hold) of the examples to check."""
    data = split.data
    if isinstance(data, Mapping) and split.transform is None:
        n = len(next(iter(data.values())))
        whole = mode == "full" or all(data[f].nbytes <= FULL_SCAN_BYTES for f in fields)
        index = np.arange(n) if whole else _indices(n, "sample")
        return {f: np.asarray(data[f]) if whole else np.asarray(data[f])[index] for f in fields}, (
            index
        )
    index = _indices(len(split), mode)
    examples = split.examples(index)
    return {f: np.asarray(examples[f]) for f in fields if f in examples}, index


def _check_field(where: str, field: str, values: np.ndarray, index, rule: FieldRule) -> None:
    dtype = values.dtype
    if dtype.kind not in "biuf":
        raise DataError(f"{where}: field {field!r} has dtype {dtype}; expected a numeric array")
    if rule.kind == "int" and dtype.kind not in "iu":
        raise DataError(
            f"{where}: field {field!r} has dtype {dtype}; expected integers (class or token ids)"
        )
    per_example = values.shape[1:]
    if rule.ndim is not None and len(per_example) != rule.ndim:
        raise DataError(
            f"{where}: field {field!r} has examples of shape {per_example}; expected "
            f"{rule.ndim} axes ([height, width, channels])"
        )
    if rule.max_length is not None and per_example and per_example[0] > rule.max_length:
        raise DataError(
            f"{where}: field {field!r} has examples of length {per_example[0]}; the model takes "
            f"at most {rule.max_length} (model.max_len={rule.max_length - 1} + 1)"
        )
    flat = values.reshape(len(values), -1)
    if dtype.kind == "f":
        bad = ~np.isfinite(flat)
        if bad.any():
            row = int(np.argmax(bad.any(axis=1)))
            value = flat[row][bad[row]][0]
            raise DataError(
                f"{where}: field {field!r} example {int(index[row])} holds {value} "
                f"({int(bad.any(axis=1).sum())} example(s) with non-finite values); expected "
                "finite numbers"
            )
        if rule.low is None and rule.high is None:
            return
        if rule.kind != "int" and not np.array_equal(flat, np.round(flat)):
            return  # real-valued (e.g. image pixels): no id range
    if rule.low is None and rule.high is None:
        return
    low = -np.inf if rule.low is None else rule.low
    high = np.inf if rule.high is None else rule.high
    bad = (flat < low) | (flat >= high)
    if bad.any():
        row = int(np.argmax(bad.any(axis=1)))
        value = flat[row][bad[row]][0]
        expected = f"[{rule.low}, {rule.high})" if rule.high is not None else f">= {rule.low}"
        source = f" ({rule.what}={rule.high})" if rule.what and rule.high is not None else ""
        raise DataError(
            f"{where}: field {field!r} example {int(index[row])} holds {value}, outside "
            f"{expected}{source}"
        )


def validate_splits(cfg, splits: Mapping[str, Any]) -> None:
    """Raises :class:`DataError` for the first problem found in ``splits`` (name -> DataSplit).

    Only the fields ``cfg.task`` reads are checked; a missing field is left to
    ``DataSplit.select``, which names it.
    """
    mode = cfg.dataset.validate
    if mode == "off":
        return
    rules = field_rules(cfg)
    shapes: dict[str, tuple[str, dict[str, tuple]]] = {}
    for name, split in splits.items():
        where = describe_source(cfg, name)
        if isinstance(split.data, Mapping):
            available = set(split.data)
        else:
            available = set(split.examples([0]))
        fields = [f for f in rules if f in available]
        if not fields:
            continue
        arrays, index = _field_arrays(split, fields, mode)
        for field in fields:
            _check_field(where, field, arrays[field], index, rules[field])
        shapes[name] = (where, {f: arrays[f].shape[1:] for f in fields})
    names = list(shapes)
    for other in names[1:]:
        first_where, first = shapes[names[0]]
        where, these = shapes[other]
        for field in set(first) & set(these):
            if first[field] != these[field]:
                raise DataError(
                    f"{where}: field {field!r} has examples of shape {these[field]}, but "
                    f"{first_where} has {first[field]}; every split must have the same shape"
                )
