"""User data from files: ``.npz`` archives and ArrayRecord files of per-example records.

A dataset in memory is a dict of arrays with a common leading dimension (the example axis);
``.npz`` files hold exactly that. For data too large for memory, ArrayRecord files hold one record
per example: the example's dict of arrays serialised as a small ``.npz`` (``np.save`` format, no
pickle), read with grain's ``ArrayRecordDataSource`` through :class:`ArrayRecordExamples`, which
is a grain ``RandomAccessDataSource`` returning dicts of arrays and plugs into ``pipeline``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import SupportsIndex

import numpy as np


def check_arrays(arrays: Mapping[str, np.ndarray], *, what: str = "arrays") -> int:
    """Validates a dict of arrays with a common, non-zero leading dimension; returns it.

    Args:
      arrays: mapping from feature name to an array [n, ...].
      what: name used in error messages.

    Returns:
      n, the number of examples.
    """
    if not isinstance(arrays, Mapping) or not arrays:
        raise ValueError(f"{what} must be a non-empty dict of arrays, got {type(arrays).__name__}")
    sizes = {}
    for key, value in arrays.items():
        if not isinstance(key, str):
            raise TypeError(f"{what} keys must be strings, got {key!r}")
        shape = np.shape(value)
        if not shape:
            raise ValueError(
                f"{what}[{key!r}] is a scalar; every array needs a leading example axis"
            )
        sizes[key] = shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{what} must share the leading (example) dimension, got sizes {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"{what} holds no examples (leading dimension 0): {sizes}")
    return n


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a ``.npz`` file written by ``np.savez`` as a dict of arrays (``allow_pickle=False``).

    Args:
      path: the ``.npz`` file; every array must have the same leading dimension.

    Returns:
      {name: array [n, ...]} fully read into memory.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no .npz file at {os.fspath(path)!r}")
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    check_arrays(arrays, what=f"arrays in {os.fspath(path)!r}")
    return arrays


def encode_example(example: Mapping[str, np.ndarray]) -> bytes:
    """Serialises one example (dict of arrays) as ``.npz`` bytes; object arrays are refused."""
    for key, value in example.items():
        if np.asarray(value).dtype == object:
            raise TypeError(
                f"example[{key!r}] has dtype object; only numeric/str arrays are stored"
            )
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in example.items()})
    return buffer.getvalue()


def decode_example(record: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_example`."""
    with np.load(io.BytesIO(record), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def write_array_record(
    path: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    *,
    options: str = "group_size:1",
) -> int:
    """Writes one ArrayRecord record per example of ``arrays``.

    Args:
      path: output file.
      arrays: dict of arrays [n, ...]; record i holds {k: arrays[k][i]}.
      options: ArrayRecord writer options; ``group_size:1`` makes random access cheapest.

    Returns:
      n, the number of records written.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    n = check_arrays(arrays)
    writer = ArrayRecordWriter(os.fspath(path), options)
    try:
        for i in range(n):
            writer.write(encode_example({k: v[i] for k, v in arrays.items()}))
    finally:
        writer.close()
    return n


class ArrayRecordExamples:
    """Random-access source over ArrayRecord files written by :func:`write_array_record`.

    Implements grain's ``RandomAccessDataSource`` protocol (``__len__``, ``__getitem__``) and
    returns each record decoded into a dict of arrays.

    Args:
      paths: one file or a list of files; record keys run over the files in order.
      reader_options: ArrayRecord reader options (grain's ``ArrayRecordDataSource``).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        reader_options: dict[str, str] | None = None,
    ):
        from grain.sources import ArrayRecordDataSource

        paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
        missing = [os.fspath(p) for p in paths if not os.path.isfile(p)]
        if not paths or missing:
            raise FileNotFoundError(f"ArrayRecord files not found: {missing or paths}")
        self._source = ArrayRecordDataSource([os.fspath(p) for p in paths], reader_options)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: SupportsIndex) -> dict[str, np.ndarray]:
        return decode_example(self._source[index])

    def __getitems__(self, indices: Sequence[SupportsIndex]) -> list[dict[str, np.ndarray]]:
        return [decode_example(r) for r in self._source.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"ArrayRecordExamples({self._source!r})"
