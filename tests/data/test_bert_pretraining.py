"""'bert_pretraining': pre-masked shards read back as the 'mlm' task's fields, checked early."""

import numpy as np
import pytest

from jaxbatch.data import bert_pretraining, files, registry
from jaxbatch.train.tasks_mlm import MLM_FIELDS


def test_examples_are_the_written_records_with_task_dtypes(bert_pretraining_dir):
    split = registry.load_split(
        "bert_pretraining",
        "train",
        data_dir=str(bert_pretraining_dir),
        seq_len=32,
        max_predictions=5,
    )
    raw = files.ArrayRecordExamples(
        files.shard_paths(bert_pretraining_dir, "bert_pretraining", "train")
    )
    assert len(split) == len(raw) > 100
    got = split.examples([0, len(raw) - 1])
    assert tuple(got) == MLM_FIELDS
    for row, index in enumerate([0, len(raw) - 1]):
        for field in MLM_FIELDS:
            np.testing.assert_array_equal(got[field][row], raw[index][field])
    ids, pos = got["input_ids"], got["masked_lm_positions"]
    weights = got["masked_lm_weights"]
    assert ids.dtype == pos.dtype == np.int32 and weights.dtype == np.float32
    assert set(np.unique(weights)) <= {0.0, 1.0} and weights.sum() > 0


def test_other_lengths_than_the_config_are_refused_before_training(bert_pretraining_dir):
    with pytest.raises(ValueError, match=r"input_ids of shape \(32,\), but the config expects"):
        bert_pretraining.bert_pretraining_split(
            "train", data_dir=str(bert_pretraining_dir), seq_len=128, max_predictions=5
        )
    with pytest.raises(ValueError, match=r"masked_lm_positions of shape \(5,\)"):
        bert_pretraining.bert_pretraining_split(
            "train", data_dir=str(bert_pretraining_dir), seq_len=32, max_predictions=20
        )


def test_records_without_a_field_are_refused(tmp_path):
    files.write_example_shards(
        [{"input_ids": np.zeros(8, np.int32)}],
        out_dir=tmp_path,
        name="bert_pretraining",
        split="test",
    )
    with pytest.raises(ValueError, match="lack 'masked_lm_positions'"):
        bert_pretraining.bert_pretraining_split("test", data_dir=str(tmp_path), seq_len=8)
