"""'bert_pretraining': pre-masked shards read back as the 'mlm' task's fields, checked early."""

import numpy as np
import pytest

from jaxbatch.data import bert_pretraining, files, registry
from jaxbatch.train import config as config_lib
from jaxbatch.train import shapes
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


def test_loader_shapes_match_what_the_planner_assumes(bert_pretraining_dir):
    cfg = config_lib.load_config(
        "configs/bert_lamb.py:runlocal", [f"dataset.options.data_dir={bert_pretraining_dir}"]
    )
    planned = shapes.example_shapes(cfg)
    got = registry.load_split("bert_pretraining", "train", **cfg.dataset.options).examples([0])
    assert {k: (v.shape[1:], v.dtype) for k, v in got.items()} == {
        k: (s.shape, s.dtype) for k, s in planned.items()
    }


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
