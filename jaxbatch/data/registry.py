"""Dataset registry: ``load_arrays(name, split, **options)`` -> dict of NumPy arrays.

Bundled datasets need nothing beyond the installed packages and the interpreter's own standard
library; ``npz`` reads user files. Every loader is deterministic: the same call returns the same
arrays on every run and (for the stdlib datasets) on every machine with the same Python.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxbatch.data import codesearch, digits, files, stdlib_files, stdlib_text


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
DATASETS: tuple[str, ...] = tuple(_LOADERS)
SPLITS: dict[str, tuple[str, ...] | None] = {
    "digits": ("train", "test", "all"),
    "codesearch": codesearch.SPLITS,
    "stdlib_text": stdlib_text.SPLITS,
    "npz": None,  # any name the user's files use
}
_DESCRIPTIONS = {
    "digits": "scikit-learn 8x8 digits: image float32 [n,8,8,1] in [0,1], label int32 [n]",
    "codesearch": "stdlib docstring -> function source pairs: doc, code int32 byte tokens",
    "stdlib_text": "stdlib source as a byte LM stream: tokens int32 [n, seq_len + 1]",
    "npz": "user .npz files, one per split (path pattern with '{split}')",
}


def _loader(name: str) -> Callable[..., dict[str, np.ndarray]]:
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return _LOADERS[name]


def dataset_options(name: str) -> dict[str, Any]:
    """Keyword options of a dataset and their defaults (``inspect.Parameter.empty`` if required)."""
    params = inspect.signature(_loader(name)).parameters
    return {p.name: p.default for p in params.values() if p.kind is p.KEYWORD_ONLY}


def load_arrays(name: str, split: str, **options: Any) -> dict[str, np.ndarray]:
    """Loads one split of a registered dataset as a dict of arrays with a common leading axis.

    Args:
      name: one of :data:`DATASETS`.
      split: one of ``SPLITS[name]``.
      **options: dataset options, see :func:`dataset_options` (e.g. ``doc_len`` for codesearch,
        ``seq_len`` and ``max_bytes`` for stdlib_text, ``path`` for npz).

    Returns:
      {feature: array [n, ...]}.
    """
    loader = _loader(name)
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
