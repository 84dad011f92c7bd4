"""Per-device memory accounting: how many bytes of a sharded tree live on one device.

bytes_per_device = Σ_leaves prod(sharding.shard_shape(shape)) · itemsize

With the even shardings ``param_shardings`` enforces, every device holds the same number of
bytes, so this is also the peak over devices. It needs only shapes, dtypes and shardings, so the
planner can account for a pod-sized model without allocating it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

from jaxbatch.parallel.sharding import _unbox


def bytes_per_device(tree: Any, shardings: Any = None) -> int:
    """Bytes of ``tree`` held by one device.

    Args:
      tree: arrays or ``jax.ShapeDtypeStruct``s (flax boxes are unboxed).
      shardings: optional ``Sharding`` tree, a prefix of ``tree``; without it every leaf must
        carry its own ``.sharding`` (a ``jax.Array``, or a ``ShapeDtypeStruct(..., sharding=...)``).

    Returns:
      Σ over leaves of the bytes of one shard: prod(sharding.shard_shape(shape)) · itemsize.

    Raises:
      ValueError: a leaf without a sharding when ``shardings`` is not given.
    """
    tree = _unbox(tree)
    if shardings is None:
        total = 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            sharding = getattr(leaf, "sharding", None)
            if not isinstance(sharding, Sharding):
                raise ValueError(
                    f"leaf {jax.tree_util.keystr(path)} ({type(leaf).__name__}) has no sharding; "
                    "pass shardings= or use jax.ShapeDtypeStruct(shape, dtype, sharding=...)"
                )
            total += _shard_bytes(leaf, sharding)
        return total
    per_subtree = jax.tree.map(
        lambda s, sub: sum(_shard_bytes(x, s) for x in jax.tree.leaves(sub)), shardings, tree
    )
    return int(sum(jax.tree.leaves(per_subtree)))


def global_bytes(tree: Any) -> int:
    """Bytes of ``tree`` counted once, unsharded: Σ prod(shape) · itemsize."""
    leaves = jax.tree.leaves(_unbox(tree))
    return int(sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in leaves))


def _shard_bytes(leaf: Any, sharding: Sharding) -> int:
    shape = tuple(np.shape(leaf))
    return math.prod(sharding.shard_shape(shape)) * np.dtype(leaf.dtype).itemsize
