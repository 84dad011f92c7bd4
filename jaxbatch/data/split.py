"""``DataSplit``: one split of a dataset as the trainer consumes it.

A split is its examples (a dict of in-memory arrays, or a grain ``RandomAccessDataSource`` of
example dicts such as ArrayRecord shards or a TFDS source) plus how a stored example becomes a
model input: ``transform`` for evaluation (deterministic: decode, central crop, tokenize) and
``train_transform`` for training (``(example, rng) -> example``: decode, random crop, flip). The
bundled datasets are arrays with no transform; the pod-scale ones (ImageNet, image-text, BERT
pre-training) are sources whose examples are decoded on the fly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from jaxbatch.data import pipeline
from jaxbatch.data.pipeline import Data, Example, RandomTransform, Transform


@dataclasses.dataclass(frozen=True)
class DataSplit:
    """One split: stored examples and the transforms that make them model inputs.

    Attributes:
      data: dict of arrays [n, ...] or a random-access source of example dicts.
      transform: deterministic per-example function for evaluation (and model init).
      train_transform: per-example augmentation ``(example, rng) -> example`` for training;
        ``None`` trains on ``transform``'s output.
      fields: the fields the consumer keeps (all when ``None``); see :meth:`select`.
    """

    data: Data
    transform: Transform | None = None
    train_transform: RandomTransform | None = None
    fields: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return pipeline.num_examples(self.data)

    @property
    def is_arrays(self) -> bool:
        return isinstance(self.data, Mapping)

    def select(self, fields: Sequence[str]) -> DataSplit:
        """This split keeping only ``fields`` (the ones a task reads); checked on example 0.

        Raises:
          ValueError: a field the examples do not have (names the fields they do have).
        """
        fields = tuple(fields)
        if fields == self.fields:  # already selected (and checked): no example to decode again
            return self
        available = tuple(self.data) if self.is_arrays else tuple(self.examples([0]))
        missing = [f for f in fields if f not in available]
        if missing:
            raise ValueError(
                f"dataset lacks the field(s) {missing} that the task needs ({fields}); its "
                f"examples have {sorted(available)}"
            )
        if self.is_arrays and self.transform is None and self.train_transform is None:
            return DataSplit({f: self.data[f] for f in fields})
        return dataclasses.replace(self, fields=fields)

    def _keep(self, example: Example) -> Example:
        if self.fields is None:
            return example
        return {f: example[f] for f in self.fields}

    def _eval_transform(self) -> Transform | None:
        if self.transform is None and self.fields is None:
            return None
        transform = self.transform or (lambda e: e)
        return lambda e: self._keep(transform(e))

    def _random_transform(self) -> RandomTransform | None:
        if self.train_transform is None:
            return None
        return lambda e, rng: self._keep(self.train_transform(e, rng))

    def examples(self, indices: Sequence[int]) -> Example:
        """Examples ``indices`` through the evaluation transform, stacked: {field: [k, ...]}."""
        fetch = pipeline.make_fetcher(self.data, self._eval_transform())
        return fetch(np.asarray(indices, np.int64))

    def train_iterator(self, **kwargs) -> grain.DatasetIterator:
        """:func:`pipeline.make_train_iterator` over this split with its training transform."""
        random_transform = self._random_transform()
        transform = None if random_transform is not None else self._eval_transform()
        return pipeline.make_train_iterator(
            self.data, transform=transform, random_transform=random_transform, **kwargs
        )

    def eval_batches(self, **kwargs) -> grain.MapDataset:
        """:func:`pipeline.make_eval_batches` over this split with its evaluation transform."""
        return pipeline.make_eval_batches(self.data, transform=self._eval_transform(), **kwargs)


def as_split(data: DataSplit | Data) -> DataSplit:
    """``data`` itself if a :class:`DataSplit`, else the split of those arrays / that source."""
    return data if isinstance(data, DataSplit) else DataSplit(data)
