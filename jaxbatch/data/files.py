"""User data from files: ``.npz`` archives and ArrayRecord files of per-example records.

A dataset in memory is a dict of arrays with a common leading dimension (the example axis);
``.npz`` files hold exactly that. For data too large for memory, ArrayRecord files hold one record
per example: the example's dict of arrays serialised as a small ``.npz`` (``np.save`` format, no
pickle), read with grain's ``ArrayRecordDataSource`` through :class:`ArrayRecordExamples`, which
is a grain ``RandomAccessDataSource`` returning dicts of arrays and plugs into ``pipeline``.
"""

from __future__ import annotations

import glob
import io
import os
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
    arrays = {}
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(
            f"file {os.fspath(path)!r} is not a readable .npz archive ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"file {os.fspath(path)!r} holds a single array, not a .npz archive of named "
            "arrays (write it with np.savez(path, image=..., label=...))"
        )
    with archive:
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as e:  # object arrays: np.load refuses to unpickle them
                raise ValueError(
                    f"file {os.fspath(path)!r}: field {key!r} cannot be read without pickle "
                    f"({e}); store numeric arrays"
                ) from None
            except (OSError, zipfile.BadZipFile, EOFError) as e:
                raise ValueError(
                    f"file {os.fspath(path)!r}: field {key!r} is damaged ({type(e).__name__}: {e})"
                ) from None
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


def shard_name(name: str, split: str, index: int, count: int) -> str:
    """File name of shard ``index`` of ``count`` of a split, in TFDS's naming scheme:
    ``{name}-{split}.array_record-{index:05d}-of-{count:05d}``."""
    return f"{name}-{split}.array_record-{index:05d}-of-{count:05d}"


def write_example_shards(
    examples: Iterable[Mapping[str, np.ndarray]],
    *,
    out_dir: str | os.PathLike,
    name: str,
    split: str,
    num_shards: int = 1,
    options: str = "group_size:1",
) -> tuple[list[str], int]:
    """Streams examples into ``num_shards`` ArrayRecord files (example i -> shard i mod count).

    Nothing is held in memory beyond one example, so a 150 GB image folder converts on a small
    machine. If ``examples`` raises, the shards written so far are removed before it propagates.
    Read the result back with :func:`shard_paths` and :class:`ArrayRecordExamples`.

    Args:
      examples: dicts of arrays (one per record), e.g. {'image': uint8 JPEG bytes, 'label': int}.
      out_dir: directory for the shards (created if missing).
      name: dataset name in the file names (e.g. 'imagenet2012').
      split: split name in the file names (e.g. 'train').
      num_shards: number of files; more shards let many hosts open their own readers.
      options: ArrayRecord writer options.

    Returns:
      (paths of the shards in order, number of examples written).
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}")
    for what, value in (("name", name), ("split", split)):
        if not re.fullmatch(r"[A-Za-z0-9_.\[\]:%]+", value):
            raise ValueError(f"{what} must be a plain identifier for file names, got {value!r}")
    os.makedirs(out_dir, exist_ok=True)
    stale = [
        p
        for p in glob.glob(os.path.join(os.fspath(out_dir), f"{name}-{split}.array_record-*"))
        if not p.endswith(f"-of-{num_shards:05d}")
    ]
    if stale:
        raise FileExistsError(
            f"{os.fspath(out_dir)!r} already holds {len(stale)} shard(s) of {name}-{split} with "
            f"another shard count (e.g. {os.path.basename(stale[0])!r}); remove them first"
        )
    paths = [
        os.path.join(os.fspath(out_dir), shard_name(name, split, i, num_shards))
        for i in range(num_shards)
    ]
    writers = [ArrayRecordWriter(p, options) for p in paths]
    count, complete = 0, False
    try:
        for example in examples:
            writers[count % num_shards].write(encode_example(example))
            count += 1
        complete = True
    finally:
        for writer in writers:
            writer.close()
        if not complete or count == 0:  # no partial or empty shard set is left behind
            for p in paths:
                if os.path.isfile(p):
                    os.remove(p)
    if count == 0:
        raise ValueError(f"no examples to write for {name}/{split}")
    return paths, count


def shard_paths(data_dir: str | os.PathLike, name: str, split: str) -> list[str]:
    """The ArrayRecord shards of ``{name}-{split}`` in ``data_dir``, checked to be complete.

    Raises:
      FileNotFoundError: no shard, or some of the ``-of-N`` shards missing (the message names the
        pattern searched and the missing indices).
    """
    pattern = os.path.join(os.fspath(data_dir), f"{name}-{split}.array_record-*-of-*")
    found = sorted(glob.glob(pattern))
    if not found:
        raise FileNotFoundError(
            f"no ArrayRecord shards for {name!r} split {split!r}: nothing matches {pattern!r}"
        )
    counts = {int(p.rsplit("-of-", 1)[1]) for p in found}
    if len(counts) != 1:
        raise FileNotFoundError(f"shards of {pattern!r} disagree on their count: {sorted(counts)}")
    (count,) = counts
    present = {int(p.rsplit("-of-", 1)[0].rsplit("-", 1)[1]) for p in found}
    missing = sorted(set(range(count)) - present)
    if missing:
        raise FileNotFoundError(
            f"{name}-{split} in {os.fspath(data_dir)!r} is incomplete: shards {missing} of "
            f"{count} are missing"
        )
    return found


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

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"ArrayRecordExamples({self._source!r})"
