"""'imagenet2012' from ArrayRecord shards: decoding, crops, labels, shapes the planner assumes."""

import importlib.util

import numpy as np
import pytest

from jaxbatch.data import files, image_folder, imagenet, images, registry


def _split(data_dir, split="train", size=24):
    return registry.load_split(
        "imagenet2012", split, data_dir=str(data_dir), image_size=size, format="array_record"
    )


def test_eval_examples_are_normalised_center_crops_with_folder_labels(imagenet_like_dir):
    split = _split(imagenet_like_dir, "test")
    assert len(split) == 360
    raw = files.ArrayRecordExamples(files.shard_paths(imagenet_like_dir, "imagenet2012", "test"))
    classes = image_folder.load_classes(imagenet_like_dir, "imagenet2012")
    got = split.examples([0, 5, 359])
    for row, index in enumerate([0, 5, 359]):
        record = raw[index]
        want = images.normalize(images.center_crop(record["image"], 24))
        np.testing.assert_array_equal(got["image"][row], want)
        assert got["label"][row] == int(record["label"])
        assert classes[int(record["label"])] == f"n{int(record['label']):08d}"
    assert got["image"].dtype == np.float32 and got["label"].dtype == np.int32
    # Normalised: the digits' black background maps to -mean/std in every channel.
    background = (0 - np.asarray(images.IMAGENET_MEAN)) / np.asarray(images.IMAGENET_STD)
    np.testing.assert_allclose(got["image"][0, 0, 0], background, atol=0.05)


def test_training_examples_are_random_crops_that_change_every_epoch(imagenet_like_dir):
    split = _split(imagenet_like_dir).select(("image", "label"))
    it = split.train_iterator(batch_size=16, seed=0)
    steps = 1437 // 16
    batches = [next(it) for _ in range(steps + 1)]
    first, next_epoch = batches[0], batches[steps]
    assert first["image"].shape == (16, 24, 24, 3) and first["image"].dtype == np.float32
    # The same seed gives the same permutation in both runs but new crops in every epoch.
    again = next(split.train_iterator(batch_size=16, seed=0))
    np.testing.assert_array_equal(again["image"], first["image"])
    eval_view = split.examples(range(16))
    assert not np.array_equal(first["image"], eval_view["image"])
    by_label = {}
    for b in (first, next_epoch):
        assert set(np.unique(b["label"])) <= set(range(10))
    for i, label in enumerate(first["label"]):
        by_label.setdefault(int(label), []).append(first["image"][i])
    assert len(by_label) > 3


def test_errors(tmp_path, imagenet_like_dir):
    with pytest.raises(FileNotFoundError, match="imagenet2012-train.array_record"):
        _split(tmp_path)
    with pytest.raises(ValueError, match="unknown imagenet2012 format 'jpeg'"):
        imagenet.imagenet_split("train", data_dir=str(tmp_path), format="jpeg")
    with pytest.raises(ValueError, match="image_size must be a positive integer, got 0"):
        _split(imagenet_like_dir, size=0)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is not None,
    reason="tensorflow_datasets is installed",
)
def test_tfds_format_without_tfds_says_how_to_install(tmp_path):
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        registry.load_split("imagenet2012", "train", data_dir=str(tmp_path))
