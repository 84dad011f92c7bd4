"""Registry: dispatch to the dataset loaders, npz patterns, metadata and clear errors."""

import inspect

import numpy as np
import pytest

from jaxbatch.data import digits, registry, stdlib_text


def test_names():
    assert registry.ARRAY_DATASETS == ("digits", "codesearch", "stdlib_text", "npz")
    assert registry.DATASETS == (
        *registry.ARRAY_DATASETS,
        "imagenet2012",
        "image_text",
        "bert_pretraining",
    )


def test_load_split_of_arrays_equals_load_arrays():
    split = registry.load_split("digits", "test")
    assert split.is_arrays and split.transform is None and len(split) == 360
    np.testing.assert_array_equal(
        split.data["label"], registry.load_arrays("digits", "test")["label"]
    )


def test_record_datasets_need_load_split_and_data_dir(tmp_path):
    with pytest.raises(ValueError, match="load_split"):
        registry.load_arrays("imagenet2012", "train", data_dir=str(tmp_path))
    with pytest.raises(TypeError, match=r"needs the option\(s\) \['data_dir'\]"):
        registry.load_split("image_text", "train")
    with pytest.raises(FileNotFoundError, match="bert_pretraining-train.array_record"):
        registry.load_split("bert_pretraining", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        registry.load_split("imagenet2012", "validation", data_dir=str(tmp_path))


def test_dispatch_equals_loader():
    got = registry.load_arrays("digits", "test")
    want = digits.digits_arrays("test")
    np.testing.assert_array_equal(got["image"], want["image"])
    got = registry.load_arrays("stdlib_text", "test", seq_len=32, max_bytes=4_000)
    want = stdlib_text.stdlib_text_arrays("test", seq_len=32, max_bytes=4_000)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])


def test_codesearch_options(stdlib_pairs):
    arrays = registry.load_arrays("codesearch", "test", doc_len=16, code_len=32, max_test=8)
    assert arrays["doc"].shape == (8, 16) and arrays["code"].shape == (8, 32)


def test_npz_pattern(tmp_path):
    for split, n in (("train", 6), ("test", 2)):
        np.savez(tmp_path / f"mine_{split}.npz", x=np.arange(n), y=np.ones((n, 3)))
    pattern = str(tmp_path / "mine_{split}.npz")
    assert registry.load_arrays("npz", "train", path=pattern)["x"].tolist() == list(range(6))
    assert registry.load_arrays("npz", "test", path=pattern)["y"].shape == (2, 3)
    with pytest.raises(ValueError, match="must contain '\\{split\\}'"):
        registry.load_arrays("npz", "train", path=str(tmp_path / "mine_train.npz"))


def test_info_records_interpreter():
    info = registry.dataset_info("stdlib_text")
    assert info["python_version"].split("-")[-1].count(".") == 2
    assert info["options"]["seq_len"] == 256 and info["stdlib_files"] > 300
    assert registry.dataset_options("npz") == {"path": inspect.Parameter.empty}


def test_errors():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        registry.dataset_info("cifar")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*'digits', 'codesearch'"):
        registry.load_arrays("mnist", "train")
    with pytest.raises(ValueError, match="unknown split 'val' for dataset 'digits'.*'train'"):
        registry.load_arrays("digits", "val")
    with pytest.raises(TypeError, match="unknown option\\(s\\) \\['seqlen'\\].*'seq_len'"):
        registry.load_arrays("stdlib_text", "train", seqlen=8)
