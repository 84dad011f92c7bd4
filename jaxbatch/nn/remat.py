"""Rematerialisation (``jax.checkpoint``) policies chosen by name, as in MaxText configs.

A policy decides which intermediate values of a layer are kept for the backward pass; the rest are
recomputed. Memory falls as fewer values are kept, compute rises by at most one extra forward pass.

| name                      | saved for the backward pass                                  |
|---------------------------|--------------------------------------------------------------|
| 'none'                    | everything (no remat: the layer is not wrapped at all)        |
| 'full'                    | nothing but the layer inputs (recompute the whole layer)      |
| 'dots'                    | outputs of every matmul (``checkpoint_dots``)                  |
| 'dots_with_no_batch_dims' | matmul outputs without batch dims: the weight matmuls, not the  |
|                           | attention score/value products                                |
| 'save_qkv_proj'           | the tagged query/key/value projections                        |
| 'save_out_proj'           | the tagged attention output projection                        |
| 'save_qkv_and_out_proj'   | both of the above                                             |

The transformer layers tag their activations with ``jax.ad_checkpoint.checkpoint_name`` using the
names in :data:`CHECKPOINT_NAMES`, which is what the ``save_*`` policies select.

References:
  Chen, Xu, Zhang, Guestrin 2016, "Training Deep Nets with Sublinear Memory Cost".
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

QUERY_PROJ = "query_proj"
KEY_PROJ = "key_proj"
VALUE_PROJ = "value_proj"
OUT_PROJ = "out_proj"
MLP_HIDDEN = "mlp_hidden"
CHECKPOINT_NAMES: tuple[str, ...] = (QUERY_PROJ, KEY_PROJ, VALUE_PROJ, OUT_PROJ, MLP_HIDDEN)

_cp = jax.checkpoint_policies
_POLICIES: dict[str, Callable[..., Any]] = {
    "none": _cp.everything_saveable,
    "full": _cp.nothing_saveable,
    "dots": _cp.checkpoint_dots,
    "dots_with_no_batch_dims": _cp.checkpoint_dots_with_no_batch_dims,
    "save_qkv_proj": _cp.save_only_these_names(QUERY_PROJ, KEY_PROJ, VALUE_PROJ),
    "save_out_proj": _cp.save_only_these_names(OUT_PROJ),
    "save_qkv_and_out_proj": _cp.save_only_these_names(QUERY_PROJ, KEY_PROJ, VALUE_PROJ, OUT_PROJ),
}
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


def get_policy(name: str) -> Callable[..., Any]:
    """Returns the ``jax.checkpoint`` policy called ``name``.

    Args:
      name: one of :data:`POLICY_NAMES`. 'none' returns ``everything_saveable`` (nothing is
        recomputed), 'full' returns ``nothing_saveable`` (the default of ``jax.checkpoint``).

    Returns:
      A policy callable for ``jax.checkpoint(..., policy=...)`` / ``nn.remat(..., policy=...)``.

    Raises:
      ValueError: if ``name`` is not a known policy.
    """
    if name not in _POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; expected one of {POLICY_NAMES}")
    return _POLICIES[name]


def remat_module(
    module_cls: type[nn.Module], policy: str, *, prevent_cse: bool = True
) -> type[nn.Module]:
    """Wraps a linen module class in ``nn.remat`` with the named policy ('none': unchanged).

    Args:
      module_cls: the layer class to rematerialise.
      policy: a name from :data:`POLICY_NAMES`.
      prevent_cse: passed to ``nn.remat``; use False inside ``nn.scan`` (scan already prevents
        the common-subexpression elimination that would undo the remat).

    Returns:
      The (possibly wrapped) module class.
    """
    policy_fn = get_policy(policy)
    if policy == "none":
        return module_cls
    return nn.remat(module_cls, policy=policy_fn, prevent_cse=prevent_cse)
