"""Per-leaf options of the optimizers: a mask of bools or a tree of layer axes, resolved to one
Python value per params leaf.

An option may be given as a pytree, a prefix of the params pytree, or a callable
``params -> pytree``; ``leaf_options`` expands it and fails with the mismatching paths when the
trees do not line up. Scalar hyper-parameter checks live in ``jaxbatch._validate``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def _path_str(path: Sequence[Any]) -> str:
    return jax.tree_util.keystr(tuple(path)) or "<root>"


def _mismatch_message(name: str, option: Any, params: Any, is_option_leaf: Callable) -> str:
    """Lists params leaves no option covers and option leaves that name no params subtree."""
    param_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    option_paths = [
        p for p, _ in jax.tree_util.tree_flatten_with_path(option, is_leaf=is_option_leaf)[0]
    ]

    def covers(prefix, path):
        return len(prefix) <= len(path) and tuple(path[: len(prefix)]) == tuple(prefix)

    uncovered = [p for p in param_paths if not any(covers(o, p) for o in option_paths)]
    unknown = [o for o in option_paths if not any(covers(o, p) for p in param_paths)]
    lines = [f"{name} does not match the params pytree."]
    if uncovered:
        lines.append("params leaves missing from " + name + ": " + _list_paths(uncovered))
    if unknown:
        lines.append(name + " entries that are not in params: " + _list_paths(unknown))
    if not uncovered and not unknown:
        lines.append(
            f"{name} structure: {jax.tree.structure(option, is_leaf=is_option_leaf)}; "
            f"params structure: {jax.tree.structure(params)}"
        )
    return "\n".join(lines)


def _list_paths(paths: list, limit: int = 10) -> str:
    shown = ", ".join(_path_str(p) for p in paths[:limit])
    more = f" (and {len(paths) - limit} more)" if len(paths) > limit else ""
    return shown + more


def leaf_options(
    name: str,
    option: Any,
    params: Any,
    *,
    default: Any,
    check_leaf: Callable[[str, Any, Any], None],
) -> list[Any]:
    """Resolves a per-leaf option to one Python value per leaf of ``params``.

    Args:
      name: the argument name, used in error messages.
      option: None (``default`` everywhere), a pytree with the structure of ``params`` or a
        prefix of it (a value at an inner node applies to every leaf below it), or a callable
        ``params -> such a pytree``. ``None`` inside the tree is a value, not an empty subtree.
      params: the params pytree (arrays or shape-dtype structs).
      default: the value used when ``option`` is None.
      check_leaf: ``check_leaf(path, value, param_leaf)`` raises ValueError for a bad value.

    Returns:
      A list aligned with ``jax.tree.leaves(params)``.
    """
    param_leaves = jax.tree.leaves(params)
    if option is None:
        return [default] * len(param_leaves)
    if callable(option):
        option = option(params)
    is_leaf = lambda x: x is None
    try:
        expanded = jax.tree.map(
            lambda o, sub: jax.tree.map(lambda _: _Box(o), sub), option, params, is_leaf=is_leaf
        )
    except (ValueError, TypeError) as e:
        raise ValueError(_mismatch_message(name, option, params, is_leaf)) from e
    flat = jax.tree_util.tree_flatten_with_path(expanded, is_leaf=lambda x: isinstance(x, _Box))[0]
    if len(flat) != len(param_leaves):
        raise ValueError(_mismatch_message(name, option, params, is_leaf))
    values = []
    for (path, box), leaf in zip(flat, param_leaves, strict=True):
        check_leaf(_path_str(path), box.value, leaf)
        values.append(box.value)
    return values


class _Box:
    """Holds one option value so that None and containers survive tree flattening as leaves."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


def check_mask_leaf(name: str) -> Callable[[str, Any, Any], None]:
    """A ``check_leaf`` for boolean masks: Python or NumPy bools only (never traced arrays)."""

    def check(path: str, value: Any, leaf: Any) -> None:
        del leaf
        if not isinstance(value, bool | np.bool_):
            raise ValueError(
                f"{name} must hold Python bools (static, so no array values are branched on); "
                f"got {value!r} of type {type(value).__name__} at {path}"
            )

    return check


def check_layer_axis_leaf(path: str, value: Any, leaf: Any) -> None:
    """A ``check_leaf`` for ``layer_axes``: None or an int axis valid for that leaf."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"layer_axes must hold ints or None, got {value!r} at {path}")
    ndim = np.ndim(leaf) if not hasattr(leaf, "ndim") else leaf.ndim
    if not -ndim <= value < ndim:
        raise ValueError(
            f"layer_axes[{path}] = {value} is out of range for a leaf of shape "
            f"{tuple(np.shape(leaf))} (ndim {ndim})"
        )


def mask_tree(name: str, mask: Any, params: Any) -> Any:
    """Resolves ``mask`` (tree, prefix tree or callable) to a full bool tree shaped like params."""
    values = leaf_options(name, mask, params, default=True, check_leaf=check_mask_leaf(name))
    return jax.tree.unflatten(jax.tree.structure(params), values)
