"""grain pipelines: sharded, shuffled, checkpointable train batches and padded eval batches.

Both pipelines run over example *indices* (``grain.MapDataset.range``) and gather a whole batch at
once, with one vectorised take per array for in-memory data, or one ``__getitems__`` call for a
grain ``RandomAccessDataSource`` (e.g. ``files.ArrayRecordExamples`` or a TFDS source).

Training order (the global view): every epoch e is a seeded permutation of all n examples (grain's
index shuffle, seed folded with e), cut to floor(n / G) global batches of G = batch_size *
shard_count examples. Process p reads, at every step, examples p * batch_size ... (p + 1) *
batch_size - 1 of that step's global batch, so the concatenation over processes of one step is
exactly the batch a single process sees with ``shard_count=1`` and ``batch_size=G``, and each
process only reads its own share.

Augmentation (``random_transform``): the example at position j of epoch e's permutation is
transformed with ``np.random.default_rng((hash(seed), e, j))``, so its random crop does not depend
on the batch size, the number of processes or where a run was resumed.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np

from jaxbatch.data import files

Example = dict[str, np.ndarray]
Data = Mapping[str, np.ndarray] | Any  # dict of arrays, or a grain RandomAccessDataSource
Transform = Callable[[Example], Example]
RandomTransform = Callable[[Example, np.random.Generator], Example]

MASK_KEY = "mask"


def default_read_options() -> grain.ReadOptions:
    """Two reader threads and a short buffer: batches are gathered whole, so little is gained
    from more threads, and grain's default 500-element buffer would hold 500 *batches*."""
    return grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def num_examples(data: Data) -> int:
    """Examples in a dict of arrays or a random-access source (checked non-empty)."""
    if isinstance(data, Mapping):
        return files.check_arrays(data)
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(
            "data must be a dict of arrays or a grain RandomAccessDataSource (__len__ and "
            f"__getitem__), got {type(data).__name__}"
        )
    n = len(data)
    if n == 0:
        raise ValueError(f"data source {data!r} is empty")
    return n


def _read(data: Data, indices: np.ndarray) -> list[Example]:
    if isinstance(data, Mapping):
        return [{k: v[i] for k, v in data.items()} for i in indices]
    if hasattr(data, "__getitems__"):
        return list(data.__getitems__([int(i) for i in indices]))
    return [data[int(i)] for i in indices]


class _Mapper:
    """``map(fn, *iterables)`` as a list: in this thread, or over a thread pool created on first
    use (decoding and resizing images in Pillow release the GIL, so threads run in parallel)."""

    def __init__(self, threads: int):
        if not isinstance(threads, int | np.integer) or threads < 1:
            raise ValueError(f"transform_threads must be a positive integer, got {threads!r}")
        self.threads = int(threads)
        self._pool = None

    def __call__(self, fn, *iterables) -> list:
        if self.threads == 1:
            return list(map(fn, *iterables))
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.threads, thread_name_prefix="jaxbatch-transform"
            )
        return list(self._pool.map(fn, *iterables))


def make_fetcher(
    data: Data, transform: Transform | None, threads: int = 1
) -> Callable[[np.ndarray], Example]:
    """fetch(indices) -> dict of stacked arrays [len(indices), ...], through ``transform`` (in
    ``threads`` threads) when given; one vectorised take per array for untransformed arrays."""
    if isinstance(data, Mapping) and transform is None:
        return lambda indices: {k: np.asarray(v)[indices] for k, v in data.items()}
    mapper = _Mapper(threads)

    def fetch(indices: np.ndarray) -> Example:
        examples = _read(data, indices)
        if transform is not None:
            examples = mapper(transform, examples)
        return _stack(examples)

    return fetch


def _stack(examples: list[Example]) -> Example:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _augmented_fetcher(
    data: Data,
    random_transform: RandomTransform,
    *,
    seed: int,
    local_steps: int,
    batch_size: int,
    shard_index: int,
    shard_count: int,
    threads: int = 1,
) -> Callable[[int, np.ndarray], Example]:
    """fetch(i, indices) for the i-th batch of this process: each example gets its own RNG keyed
    by (seed, epoch, position in the epoch's permutation), see the module docstring."""
    key = _hashed_seed("augment", seed)
    mapper = _Mapper(threads)

    def fetch(i: int, indices: np.ndarray) -> Example:
        epoch, step = divmod(int(i), local_steps)
        first = (step * shard_count + shard_index) * batch_size
        examples = _read(data, indices)
        rngs = [np.random.default_rng((key, epoch, first + j)) for j in range(len(examples))]
        return _stack(mapper(random_transform, examples, rngs))

    return fetch


def _check_example(fetch: Callable[[np.ndarray], Example]) -> Example:
    """Fetches example 0 once at construction, so bad records fail before training starts."""
    first = fetch(np.zeros((1,), np.int64))
    if not isinstance(first, Mapping) or not first:
        raise TypeError(f"examples must be dicts of arrays, got {type(first).__name__}")
    return first


def _check_sharding(batch_size: int, shard_index: int, shard_count: int) -> None:
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(shard_count, int | np.integer) or shard_count < 1:
        raise ValueError(f"shard_count must be a positive integer, got {shard_count!r}")
    if not isinstance(shard_index, int | np.integer) or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index!r}")


def _hashed_seed(purpose: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"jaxbatch.{purpose}:{seed}".encode()).digest()[:4], "big")


def _shuffle_seed(seed: int) -> int:
    # grain folds the epoch into the seed (seed + epoch), so seed s at epoch 1 would replay
    # seed s + 1 at epoch 0; hashing the user seed keeps runs with nearby seeds unrelated.
    return _hashed_seed("train", seed)


def steps_per_epoch(
    num_examples: int, *, batch_size: int, shard_count: int = 1, drop_remainder: bool = True
) -> int:
    """Training steps per epoch: floor (or ceil) of num_examples / (batch_size * shard_count)."""
    _check_sharding(batch_size, 0, shard_count)
    global_batch = batch_size * shard_count
    if drop_remainder:
        return num_examples // global_batch
    return math.ceil(num_examples / global_batch)


def make_train_iterator(
    data: Data,
    *,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    transform: Transform | None = None,
    random_transform: RandomTransform | None = None,
    transform_threads: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Shuffled training batches of this process's shard, as a checkpointable grain iterator.

    Step s of process p holds positions s * G + p * batch_size + [0, batch_size) of the epoch's
    permutation (G = batch_size * shard_count); see the module docstring.

    Args:
      data: dict of arrays [n, ...], or a grain ``RandomAccessDataSource`` of example dicts.
      batch_size: examples per batch *on this process* (global batch / process count).
      seed: shuffle seed in [0, 2**32); epochs are reshuffled deterministically from it.
      shard_index: this process's index (``jax.process_index()``).
      shard_count: number of processes reading disjoint shares (``jax.process_count()``).
      num_epochs: stop after this many epochs; ``None`` repeats forever.
      drop_remainder: drop the last n mod G examples of each epoch's permutation, so every batch
        has exactly ``batch_size`` rows. With ``False`` the last batch of an epoch is smaller,
        which is only allowed on one process (or when G divides n).
      transform: per-example function applied before batching (e.g. decoding, cropping).
      random_transform: per-example augmentation ``(example, rng) -> example`` applied before
        batching instead of ``transform``; ``rng`` is a ``np.random.Generator`` keyed by (seed,
        epoch, position in the epoch), so resumed and re-sharded runs see the same crops.
      transform_threads: threads applying the transform to the examples of one batch (the
        result does not depend on it).
      read_options: grain reader threads / buffer; default :func:`default_read_options`.

    Returns:
      a ``grain.DatasetIterator`` of dicts of NumPy batches [batch_size, ...];
      ``it.get_state()`` is a JSON-serialisable dict (the step count) and ``it.set_state(state)``
      resumes exactly on an iterator built with the same data, seed and global batch. Because
      step s means the same global batch for every process count, a state saved by one process
      of a K-process run also resumes a run on a different number of processes.
    """
    _check_sharding(batch_size, shard_index, shard_count)
    if not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if num_epochs is not None and (not isinstance(num_epochs, int | np.integer) or num_epochs < 1):
        raise ValueError(f"num_epochs must be None or a positive integer, got {num_epochs!r}")
    n = num_examples(data)
    global_batch = batch_size * shard_count
    if global_batch > n:
        raise ValueError(
            f"global batch batch_size * shard_count = {batch_size} * {shard_count} = "
            f"{global_batch} exceeds the dataset size {n}"
        )
    if not drop_remainder and shard_count > 1 and n % global_batch:
        raise ValueError(
            f"drop_remainder=False with shard_count={shard_count} would give processes different "
            f"batch counts ({n} examples, global batch {global_batch}); use drop_remainder=True "
            "for training and make_eval_batches for exact coverage"
        )
    if transform is not None and random_transform is not None:
        raise ValueError("pass transform or random_transform, not both (compose them in one)")
    ds = grain.MapDataset.range(n).shuffle(seed=_shuffle_seed(int(seed)))
    if drop_remainder:
        ds = ds[: (n // global_batch) * global_batch]
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    local_steps = len(ds)
    ds = ds.repeat(num_epochs)
    if random_transform is None:
        fetch = make_fetcher(data, transform, transform_threads)
        _check_example(fetch)
        ds = ds.map(fetch)
    else:
        fetch_augmented = _augmented_fetcher(
            data,
            random_transform,
            seed=int(seed),
            local_steps=local_steps,
            batch_size=batch_size,
            shard_index=shard_index,
            shard_count=shard_count,
            threads=transform_threads,
        )
        _check_example(functools.partial(fetch_augmented, 0))
        ds = ds.map_with_index(fetch_augmented)
    return iter(ds.to_iter_dataset(read_options or default_read_options()))


def make_eval_batches(
    data: Data,
    *,
    batch_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
    transform: Transform | None = None,
    transform_threads: int = 1,
) -> grain.MapDataset:
    """Every example exactly once, in order, in fixed-shape batches with a boolean 'mask'.

    Step s of process p holds examples s * G + p * batch_size + [0, batch_size) (G = batch_size
    * shard_count); rows past the end are zeros with mask False. All processes get the same
    number of batches, ceil(n / G), so a jitted, sharded eval step sees static shapes.

    Args:
      data: dict of arrays [n, ...], or a grain ``RandomAccessDataSource`` of example dicts.
      batch_size: rows per batch on this process.
      shard_index: this process's index.
      shard_count: number of processes.
      transform: per-example function applied before batching.
      transform_threads: threads applying the transform to the examples of one batch.

    Returns:
      a ``grain.MapDataset`` (``len``, indexing, iteration) of dicts of arrays
      [batch_size, ...] plus ``'mask'``: bool [batch_size], True for real examples.
    """
    _check_sharding(batch_size, shard_index, shard_count)
    n = num_examples(data)
    fetch = make_fetcher(data, transform, transform_threads)
    template = _check_example(fetch)
    if MASK_KEY in template:
        raise ValueError(f"examples already have a {MASK_KEY!r} key; eval batches add their own")
    global_batch = batch_size * shard_count

    def make_batch(step: int) -> Example:
        positions = step * global_batch + shard_index * batch_size + np.arange(batch_size)
        valid = positions < n
        batch = {
            k: np.zeros((batch_size, *v.shape[1:]), dtype=v.dtype) for k, v in template.items()
        }
        if valid.any():
            for k, v in fetch(positions[valid]).items():
                batch[k][: v.shape[0]] = v
        batch[MASK_KEY] = valid
        return batch

    return grain.MapDataset.range(math.ceil(n / global_batch)).map(make_batch)
