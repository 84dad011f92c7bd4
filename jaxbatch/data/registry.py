"""Dataset registry: ``load_split(name, split, **options)`` -> :class:`DataSplit`.

Two kinds of dataset:

- in memory (``load_arrays`` gives their dict of NumPy arrays): the bundled datasets, which need
  nothing beyond the installed packages and the interpreter's own standard library, and ``npz``
  user files. Every loader is deterministic: the same call returns the same arrays on every run
  and (for the stdlib datasets) on every machine with the same Python.
- stored as record files and decoded on the fly, for the pod-scale configs: 'imagenet2012'
  (TFDS or ArrayRecord), 'image_text' and 'bert_pretraining' (ArrayRecord); each needs a
  ``data_dir`` option.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxbatch.data import (
    bert_pretraining,
    codesearch,
    digits,
    files,
    image_text,
    imagenet,
    stdlib_files,
    stdlib_text,
)
from jaxbatch.data.split import DataSplit


def npz_arrays(split: str, *, path: str | os.PathLike) -> dict[str, np.ndarray]:
    """User data in ``.npz`` files, one per split: ``path`` must contain ``{split}``.

    Args:
      split: substituted into ``path`` (e.g. 'train', 'test').
      path: file pattern such as ``'/data/mine_{split}.npz'``.

    Returns:
      the arrays of :func:`files.load_npz`.
    """
    pattern = os.fspath(path)
    if "{split}" not in pattern:
        raise ValueError(
            f"npz path must contain '{{split}}' so train and test come from different files, "
            f"got {pattern!r}"
        )
    return files.load_npz(pattern.replace("{split}", split))


_LOADERS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "digits": digits.digits_arrays,
    "codesearch": codesearch.codesearch_arrays,
    "stdlib_text": stdlib_text.stdlib_text_arrays,
    "npz": npz_arrays,
}
_SPLIT_LOADERS: dict[str, Callable[..., DataSplit]] = {
    imagenet.NAME: imagenet.imagenet_split,
    image_text.NAME: image_text.image_text_split,
    bert_pretraining.NAME: bert_pretraining.bert_pretraining_split,
}
ARRAY_DATASETS: tuple[str, ...] = tuple(_LOADERS)
DATASETS: tuple[str, ...] = (*_LOADERS, *_SPLIT_LOADERS)
SPLITS: dict[str, tuple[str, ...] | None] = {
    "digits": ("train", "test", "all"),
    "codesearch": codesearch.SPLITS,
    "stdlib_text": stdlib_text.SPLITS,
    "npz": None,  # any name the user's files use
    imagenet.NAME: imagenet.SPLITS,
    image_text.NAME: image_text.SPLITS,
    bert_pretraining.NAME: bert_pretraining.SPLITS,
}
_DESCRIPTIONS = {
    "digits": "scikit-learn 8x8 digits: image float32 [n,8,8,1] in [0,1], label int32 [n]",
    "codesearch": "stdlib docstring -> function source pairs: doc, code int32 byte tokens",
    "stdlib_text": "stdlib source as a byte LM stream: tokens int32 [n, seq_len + 1]",
    "npz": "user .npz files, one per split (path pattern with '{split}')",
    imagenet.NAME: "ILSVRC-2012 from TFDS or ArrayRecord: image float32 [S,S,3], label int32",
    image_text.NAME: "image-caption ArrayRecord pairs: image float32 [S,S,3], text int32 [T]",
    bert_pretraining.NAME: "pre-masked BERT ArrayRecord examples (the 'mlm' task's fields)",
}


def _loader(name: str) -> Callable[..., Any]:
    if name in _LOADERS:
        return _LOADERS[name]
    if name in _SPLIT_LOADERS:
        return _SPLIT_LOADERS[name]
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")


def dataset_options(name: str) -> dict[str, Any]:
    """Keyword options of a dataset and their defaults (``inspect.Parameter.empty`` if required)."""
    params = inspect.signature(_loader(name)).parameters
    return {p.name: p.default for p in params.values() if p.kind is p.KEYWORD_ONLY}


def load_split(name: str, split: str, **options: Any) -> DataSplit:
    """Loads one split of any registered dataset, ready for the pipelines.

    Args:
      name: one of :data:`DATASETS`.
      split: one of ``SPLITS[name]``.
      **options: dataset options, see :func:`dataset_options`.

    Returns:
      a :class:`DataSplit`: in-memory arrays for the bundled datasets, a record source with its
      decoding / augmentation transforms for the file-backed ones.
    """
    if name in _LOADERS:
        return DataSplit(load_arrays(name, split, **options))
    loader = _loader(name)
    _check_split_and_options(name, split, options)
    return loader(split, **options)


def _check_split_and_options(name: str, split: str, options: dict[str, Any]) -> None:
    valid_splits = SPLITS[name]
    if valid_splits is not None and split not in valid_splits:
        raise ValueError(
            f"unknown split {split!r} for dataset {name!r}; expected one of {valid_splits}"
        )
    accepted = dataset_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for dataset {name!r}; accepted: {sorted(accepted)}"
        )
    missing = sorted(
        k for k, v in accepted.items() if v is inspect.Parameter.empty and k not in options
    )
    if missing:
        raise TypeError(
            f"dataset {name!r} needs the option(s) {missing} (config.dataset.options.{missing[0]})"
        )
    if "data_dir" in accepted and not options.get("data_dir", True):
        raise ValueError(
            f"dataset {name!r} needs a data_dir (the directory of its files); set "
            "--config.dataset.options.data_dir=DIR"
        )


def load_arrays(name: str, split: str, **options: Any) -> dict[str, np.ndarray]:
    """Loads one split of an in-memory dataset as a dict of arrays with a common leading axis.

    Args:
      name: one of :data:`ARRAY_DATASETS`.
      split: one of ``SPLITS[name]``.
      **options: dataset options, see :func:`dataset_options` (e.g. ``doc_len`` for codesearch,
        ``seq_len`` and ``max_bytes`` for stdlib_text, ``path`` for npz).

    Returns:
      {feature: array [n, ...]}.
    """
    loader = _loader(name)
    if name not in _LOADERS:
        raise ValueError(
            f"dataset {name!r} is stored as record files and decoded on the fly; load it with "
            f"load_split (in-memory datasets: {ARRAY_DATASETS})"
        )
    _check_split_and_options(name, split, options)
    arrays = loader(split, **options)
    files.check_arrays(arrays, what=f"{name}/{split}")
    return arrays


def dataset_info(name: str) -> dict[str, Any]:
    """Metadata to log with a run: description, splits, options, interpreter and stdlib path."""
    _loader(name)
    info = {
        "name": name,
        "description": _DESCRIPTIONS[name],
        "splits": SPLITS.get(name),
        "options": {
            k: (None if v is inspect.Parameter.empty else v)
            for k, v in dataset_options(name).items()
        },
        "python_version": stdlib_files.python_version(),
    }
    if name in ("codesearch", "stdlib_text"):
        files_ = stdlib_files.list_stdlib_files()
        info["stdlib"] = str(stdlib_files.stdlib_root())
        info["stdlib_files"] = len(files_)
        info["stdlib_fingerprint"] = stdlib_files.fingerprint(files_)
    if name == "codesearch":
        info["extractor_version"] = codesearch.EXTRACTOR_VERSION
    return info
