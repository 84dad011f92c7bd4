"""Rematerialisation (``jax.checkpoint``) policies chosen by name, as in MaxText configs.

A policy decides which intermediate values of a layer are kept for the backward pass; the rest are
recomputed. Memory falls as fewer values are kept, compute rises by at most one extra forward pass.

| name                              | saved for the backward pass                          |
|-----------------------------------|------------------------------------------------------|
| 'none'                            | everything (no remat: the layer is not wrapped)      |
| 'full'                            | nothing but the layer inputs (recompute the layer)   |
| 'dots'                            | outputs of every matmul (``checkpoint_dots``)        |
| 'dots_with_no_batch_dims'         | matmul outputs without batch dims: the weight        |
|                                   | matmuls, not the attention score/value products      |
| 'save_qkv_proj'                   | the tagged query/key/value projections               |
| 'save_out_proj'                   | the tagged attention output projection               |
| 'save_qkv_and_out_proj'           | both of the above                                    |
| 'offload_dots_with_no_batch_dims' | the weight-matmul outputs, in pinned host memory     |
| 'offload_qkv_proj'                | the tagged q/k/v projections, in host memory         |
| 'offload_qkv_and_out_proj'        | the tagged q/k/v and output projections, in host     |
| 'offload_mlp_hidden'              | the tagged MLP hidden activation (gelu output), host |
| 'save_qkv_offload_mlp_hidden'     | q/k/v on device and the MLP hidden activation, host  |

The transformer layers tag their activations with ``jax.ad_checkpoint.checkpoint_name`` using the
names in :data:`CHECKPOINT_NAMES`, which is what the ``save_*`` and ``offload_*`` policies select.

Host offload (:data:`OFFLOAD_POLICY_NAMES`, ``jax.checkpoint_policies.
save_and_offload_only_these_names`` / ``offload_dot_with_no_batch_dims`` with source 'device'
and destination 'pinned_host'): the forward pass copies the selected residuals to host memory
and the backward pass copies them back, so device memory holds neither them nor their
recomputation (XLA can overlap the copies with compute on TPU and GPU). The lowered program
marks each copy as a ``custom_call @annotate_device_placement`` with
``mhlo.frontend_attributes = {_xla_buffer_placement = "pinned_host"}``. On the CPU backend host
and device memory are the same: jax lowers the policies without the annotation and they compile
and run as the matching save policy (same values, no memory saving), so configs that name them
stay runnable in CPU tests.

References:
  Chen, Xu, Zhang, Guestrin 2016, "Training Deep Nets with Sublinear Memory Cost".
"""

from collections.abc import Callable, Sequence
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
DEVICE, HOST = "device", "pinned_host"


def _offload(saved: tuple[str, ...], offloaded: tuple[str, ...]) -> Callable[..., Any]:
    return _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=list(saved),
        names_which_can_be_offloaded=list(offloaded),
        offload_src=DEVICE,
        offload_dst=HOST,
    )


_OFFLOAD_POLICIES: dict[str, Callable[..., Any]] = {
    "offload_dots_with_no_batch_dims": _cp.offload_dot_with_no_batch_dims(DEVICE, HOST),
    "offload_qkv_proj": _offload((), (QUERY_PROJ, KEY_PROJ, VALUE_PROJ)),
    "offload_qkv_and_out_proj": _offload((), (QUERY_PROJ, KEY_PROJ, VALUE_PROJ, OUT_PROJ)),
    "offload_mlp_hidden": _offload((), (MLP_HIDDEN,)),
    "save_qkv_offload_mlp_hidden": _offload((QUERY_PROJ, KEY_PROJ, VALUE_PROJ), (MLP_HIDDEN,)),
}
_POLICIES.update(_OFFLOAD_POLICIES)
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)
OFFLOAD_POLICY_NAMES: tuple[str, ...] = tuple(_OFFLOAD_POLICIES)


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
    module_cls: type[nn.Module],
    policy: str,
    *,
    prevent_cse: bool = True,
    static_argnums: tuple[int, ...] = (),
) -> type[nn.Module]:
    """Wraps a linen module class in ``nn.remat`` with the named policy ('none': unchanged).

    Args:
      module_cls: the layer class to rematerialise.
      policy: a name from :data:`POLICY_NAMES`.
      prevent_cse: passed to ``nn.remat``; use False inside ``nn.scan`` (scan already prevents
        the common-subexpression elimination that would undo the remat).
      static_argnums: positional arguments of ``__call__`` that are Python values (flags such as
        ``deterministic``), counted with ``self`` as 0, as ``nn.remat`` counts them.

    Returns:
      The (possibly wrapped) module class.
    """
    policy_fn = get_policy(policy)
    if policy == "none":
        return module_cls
    return nn.remat(
        module_cls, policy=policy_fn, prevent_cse=prevent_cse, static_argnums=static_argnums
    )


def check_policies(policy: str | Sequence[str], *, where: str, count: int | None = None) -> tuple:
    """Validates one policy name, or one per group (e.g. per ResNet stage); returns a tuple.

    Raises:
      ValueError: an unknown name, or ``count`` names expected and a different number given.
    """
    names = (policy,) if isinstance(policy, str) else tuple(policy)
    for name in names:
        if name not in _POLICIES:
            raise ValueError(
                f"{where}: unknown remat policy {name!r}; expected one of {POLICY_NAMES}"
            )
    if count is not None and len(names) not in (1, count):
        raise ValueError(
            f"{where}: remat_policy {policy!r} names {len(names)} policies; expected one, or "
            f"one per stage ({count})"
        )
    return names
