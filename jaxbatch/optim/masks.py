"""Per-parameter masks and option trees: the BERT/ResNet decay mask and big_vision-style rules."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

#: Leaf names that hold biases or normalisation scales/offsets (flax, haiku and Keras spellings).
NO_DECAY_NAMES = frozenset({"bias", "scale", "offset", "beta", "gamma"})


def param_path(path: Sequence[Any]) -> str:
    """Joins the dict keys / attribute names / indices of a pytree path with '/'.

    Wrapper nodes such as flax's ``nn.Partitioned`` (whose array sits in the attribute
    ``value``) add no component, so a boxed and an unboxed tree give the same names, e.g.
    ``'params/encoder/layer_0/attention/query/kernel'``.
    """
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
    return "/".join(parts)


def _is_bias_or_norm(path: str, ndim: int) -> bool:
    names = path.split("/")
    if ndim <= 1 or (names and names[-1] in NO_DECAY_NAMES):
        return True
    return any("norm" in name.lower() for name in names[:-1])


def exclude_bias_and_norm(params: Any) -> Any:
    """The usual BERT/ResNet mask: False for biases, norm parameters and 0-D/1-D leaves.

    A leaf is False (no weight decay, no trust ratio) when any of these holds, else True:

    - it has ndim <= 1 (biases, norm scales/offsets, scalars such as a logit scale);
    - its name is one of ``NO_DECAY_NAMES`` ('bias', 'scale', 'offset', 'beta', 'gamma'), which
      also catches stacked [L, D] biases of scanned layers and 2-D ``DenseGeneral`` biases;
    - one of its enclosing module names contains 'norm' (``LayerNorm_0``, ``BatchNorm_3``,
      ``GroupNorm``, ``final_norm``...).

    Kernels and embeddings (ndim >= 2, other names) are True. Works on plain dicts and on trees
    boxed in flax ``nn.Partitioned`` (the result is boxed the same way, so it matches the params
    tree). Use it directly as ``weight_decay_mask=`` / ``trust_ratio_mask=``.

    Args:
      params: a params pytree (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      A pytree of Python bools with the structure of ``params``.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            not _is_bias_or_norm(param_path(path), np.ndim(x) if not hasattr(x, "ndim") else x.ndim)
        ),
        params,
    )


def from_rules(params: Any, rules: Sequence[tuple[str, Any]]) -> Any:
    """Per-leaf values from ``(regex, value)`` rules; every leaf must match a rule (big_vision).

    Each leaf's path (see :func:`param_path`, e.g. ``'params/Dense_0/kernel'``) is matched with
    ``re.fullmatch`` against the patterns in order; the first match gives its value. A leaf that
    no rule matches is an error, so a renamed module cannot silently escape a mask. Values can be
    anything: bools for masks, ints/None for ``layer_axes``.

    Example: ``from_rules(params, [(r'.*/bias', False), (r'.*norm.*', False), (r'.*', True)])``.

    Args:
      params: a params pytree.
      rules: ``(pattern, value)`` pairs, tried in order.

    Returns:
      A pytree with the structure of ``params`` holding the matched values.

    Raises:
      ValueError: a pattern does not compile, or some leaves match no rule (all are listed).
    """
    compiled = []
    for pattern, value in rules:
        try:
            compiled.append((re.compile(pattern), value))
        except re.error as e:
            raise ValueError(f"rule pattern {pattern!r} is not a valid regex: {e}") from e
    unmatched = []

    def pick(path, leaf):
        name = param_path(path)
        for regex, value in compiled:
            if regex.fullmatch(name):
                return value
        unmatched.append(name)
        return None

    result = jax.tree_util.tree_map_with_path(pick, params)
    if unmatched:
        shown = ", ".join(repr(n) for n in unmatched[:10])
        more = f" (and {len(unmatched) - 10} more)" if len(unmatched) > 10 else ""
        patterns = [p for p, _ in rules]
        raise ValueError(f"params {shown}{more} match none of the rule patterns {patterns}")
    return result
