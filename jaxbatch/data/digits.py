"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

The images ship inside scikit-learn (no download). The train/test split is stratified and seeded:
class k contributes ``test_size * n_k / n`` images (rounded by largest remainders),
chosen by a NumPy permutation from ``seed``; both splits keep the original order. The default gives
1,437 train / 360 test images, identical on every call and every machine.

References:
  Alpaydin, Kaynak, 1998, "Optical Recognition of Handwritten Digits" (UCI dataset 80).
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "test")
NUM_CLASSES = 10
NUM_EXAMPLES = 1797


def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # sklearn is used only for its bundled data

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[..., None]
    return images, bunch.target.astype(np.int32)


def _apportion(counts: np.ndarray, total: int) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``counts`` (largest-remainder method)."""
    exact = counts * total / counts.sum()
    shares = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[: total - shares.sum()]] += 1
    return shares


def stratified_test_indices(
    labels: np.ndarray, *, test_size: int = 360, seed: int = 0
) -> np.ndarray:
    """Sorted indices of the stratified test split.

    Args:
      labels: int [n] class labels.
      test_size: number of test examples, 1 <= test_size < n.
      seed: NumPy seed of the per-class permutations.

    Returns:
      int64 [test_size] sorted indices.
    """
    n = labels.shape[0]
    if not 1 <= test_size < n:
        raise ValueError(f"test_size must be in [1, {n}), got {test_size!r}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    picked = []
    for cls, share in zip(classes, _apportion(counts, test_size), strict=True):
        members = np.flatnonzero(labels == cls)
        picked.append(members[rng.permutation(members.size)[:share]])
    return np.sort(np.concatenate(picked))


def digits_arrays(split: str, *, test_size: int = 360, seed: int = 0) -> dict[str, np.ndarray]:
    """One split of the digits data.

    Args:
      split: 'train', 'test' or 'all'.
      test_size: number of test images (stratified by class).
      seed: seed of the split.

    Returns:
      {'image': float32 [n, 8, 8, 1] in [0, 1] (pixel / 16), 'label': int32 [n]}.
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"unknown digits split {split!r}; expected one of {(*SPLITS, 'all')}")
    images, labels = _raw()
    if split == "all":
        return {"image": images, "label": labels}
    in_test = np.zeros(labels.shape[0], dtype=bool)
    in_test[stratified_test_indices(labels, test_size=test_size, seed=seed)] = True
    keep = in_test if split == "test" else ~in_test
    return {"image": images[keep], "label": labels[keep]}
