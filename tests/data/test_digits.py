"""digits: exact counts, stratified deterministic split, pixel scaling against scikit-learn."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from jaxbatch.data import digits


@pytest.fixture(scope="module")
def splits():
    return {s: digits.digits_arrays(s) for s in ("train", "test", "all")}


def _row_keys(arrays):
    return sorted(
        arrays["image"][i].tobytes() + bytes([arrays["label"][i]])
        for i in range(arrays["label"].shape[0])
    )


def test_counts_shapes_dtypes(splits):
    assert splits["all"]["image"].shape == (1797, 8, 8, 1)
    assert splits["train"]["image"].shape == (1437, 8, 8, 1)
    assert splits["test"]["image"].shape == (360, 8, 8, 1)
    for arrays in splits.values():
        assert arrays["image"].dtype == np.float32 and arrays["label"].dtype == np.int32
        assert arrays["image"].min() >= 0.0 and arrays["image"].max() <= 1.0


def test_pixels_are_sklearn_over_16(splits):
    bunch = load_digits()
    np.testing.assert_array_equal(splits["all"]["image"][..., 0], bunch.images / 16.0)
    np.testing.assert_array_equal(splits["all"]["label"], bunch.target)


def test_split_partitions_the_data(splits):
    union = {"image": np.concatenate([splits["train"]["image"], splits["test"]["image"]])}
    union["label"] = np.concatenate([splits["train"]["label"], splits["test"]["label"]])
    assert _row_keys(union) == _row_keys(splits["all"])
    idx = digits.stratified_test_indices(splits["all"]["label"])
    np.testing.assert_array_equal(splits["all"]["label"][idx], splits["test"]["label"])


def test_split_is_stratified(splits):
    all_counts = np.bincount(splits["all"]["label"], minlength=10)
    test_counts = np.bincount(splits["test"]["label"], minlength=10)
    assert test_counts.sum() == 360
    # Largest-remainder apportionment: each class within one of its exact share.
    assert np.all(np.abs(test_counts - 360 * all_counts / 1797) < 1.0)


def test_split_is_deterministic_and_seeded(splits):
    again = digits.digits_arrays("test")
    np.testing.assert_array_equal(again["image"], splits["test"]["image"])
    other = digits.digits_arrays("test", seed=1)
    assert not np.array_equal(other["image"], splits["test"]["image"])


def test_errors():
    with pytest.raises(ValueError, match="unknown digits split 'valid'"):
        digits.digits_arrays("valid")
    with pytest.raises(ValueError, match="test_size must be in"):
        digits.digits_arrays("test", test_size=1797)
