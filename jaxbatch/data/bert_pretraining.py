"""Pre-masked BERT examples for ``configs/bert_lamb.py``: dataset 'bert_pretraining'.

ArrayRecord shards ``bert_pretraining-{train,test}.array_record-*`` (written by
``scripts/prepare_bert_data.py`` / :mod:`jaxbatch.data.masked_lm`), one record per sequence with
the fields the 'mlm' task reads (:mod:`jaxbatch.train.tasks_mlm`): ``input_ids`` int32 [seq_len],
``masked_lm_positions`` / ``masked_lm_ids`` int32 [max_predictions], ``masked_lm_weights``
float32 [max_predictions]. Masks are drawn when the data is written (``dupe_factor`` copies with
different masks), as in BERT's ``create_pretraining_data.py``, so every host reads the same
examples and a resumed run sees the same masks.
"""

from __future__ import annotations

import os

import numpy as np

from jaxbatch.data import files
from jaxbatch.data.split import DataSplit

NAME = "bert_pretraining"
SPLITS = ("train", "test")
_DTYPES = {
    "input_ids": np.int32,
    "masked_lm_positions": np.int32,
    "masked_lm_ids": np.int32,
    "masked_lm_weights": np.float32,
}


def bert_pretraining_split(
    split: str, *, data_dir: str | os.PathLike, seq_len: int = 128, max_predictions: int = 20
) -> DataSplit:
    """One split of pre-masked examples, checked against ``seq_len`` and ``max_predictions``.

    Args:
      split: 'train' or 'test'.
      data_dir: directory of the ``bert_pretraining-{split}`` ArrayRecord shards.
      seq_len: tokens per example the config expects (phase 1: 128, phase 2: 512).
      max_predictions: prediction slots per example (phase 1: 20, phase 2: 80).

    Raises:
      ValueError: the stored examples miss a field or have another length than the config says
        (checked on the first example, before training starts).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown {NAME} split {split!r}; expected one of {SPLITS}")
    expected = {
        "input_ids": (seq_len,),
        "masked_lm_positions": (max_predictions,),
        "masked_lm_ids": (max_predictions,),
        "masked_lm_weights": (max_predictions,),
    }
    source = files.ArrayRecordExamples(files.shard_paths(data_dir, NAME, split))
    first = source[0]
    for field, shape in expected.items():
        if field not in first:
            raise ValueError(
                f"{NAME} examples in {os.fspath(data_dir)!r} lack {field!r}; they have "
                f"{sorted(first)}"
            )
        if np.shape(first[field]) != shape:
            raise ValueError(
                f"{NAME} examples in {os.fspath(data_dir)!r} have {field} of shape "
                f"{np.shape(first[field])}, but the config expects {shape} (seq_len={seq_len}, "
                f"max_predictions={max_predictions}); prepare the data with these values or "
                "change config.dataset.options"
            )

    def cast(record) -> dict[str, np.ndarray]:
        return {k: np.asarray(record[k], dtype) for k, dtype in _DTYPES.items()}

    return DataSplit(source, transform=cast)
