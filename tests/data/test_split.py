"""DataSplit: field selection, transforms for evaluation vs training, clear missing-field errors."""

import numpy as np
import pytest

from jaxbatch.data import DataSplit, as_split


class _Records:
    """A minimal random-access source of example dicts (as ArrayRecord or TFDS sources are)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"raw": np.int64(i), "extra": np.zeros(2)}


def _split():
    return DataSplit(
        _Records(12),
        transform=lambda e: {"x": np.float32(e["raw"]) * 2, "name": np.int32(e["raw"])},
        train_transform=lambda e, rng: {
            "x": np.float32(e["raw"]) * 2 + rng.random(),
            "name": np.int32(e["raw"]),
        },
    )


def test_examples_use_the_evaluation_transform_and_keep_selected_fields():
    split = _split().select(["x"])
    assert split.select(("x",)) is split  # selecting again decodes nothing
    got = split.examples([3, 5])
    assert set(got) == {"x"}
    np.testing.assert_array_equal(got["x"], [6.0, 10.0])
    batches = list(split.eval_batches(batch_size=5))
    assert len(batches) == 3 and set(batches[0]) == {"x", "mask"}
    np.testing.assert_array_equal(batches[2]["mask"], [True, True, False, False, False])


def test_training_uses_the_random_transform():
    batch = next(_split().select(["x", "name"]).train_iterator(batch_size=4, seed=1))
    offsets = batch["x"] - 2 * batch["name"]
    assert np.all((offsets > 0) & (offsets < 1))  # the draw was added to every example
    assert len(set(offsets.tolist())) == 4


def test_arrays_select_without_copying_transforms():
    arrays = {"a": np.arange(6), "b": np.ones((6, 2))}
    split = as_split(arrays).select(["b"])
    assert split.is_arrays and set(split.data) == {"b"} and len(split) == 6
    assert as_split(split) is split


def test_missing_field_names_what_exists():
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['label'\].*\['name', 'x'\]"):
        _split().select(["x", "label"])
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['c'\]"):
        as_split({"a": np.arange(3)}).select(["c"])
