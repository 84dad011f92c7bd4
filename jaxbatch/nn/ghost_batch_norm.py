"""Ghost Batch Normalization: batch statistics over virtual sub-batches of the batch."""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer

from jaxbatch.nn.axes import NORM, partitioned


def _canonical_axes(ndim: int, axis: int | Sequence[int]) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted({a % ndim for a in axes}))


class GhostBatchNorm(nn.Module):
    """Batch normalization whose statistics come from virtual ("ghost") sub-batches.

    The leading axis of ``x`` (size B) is split into G = B / V consecutive ghost batches of V =
    ``virtual_batch_size`` examples. For ghost batch g, with the mean taken over its V examples and
    every other non-feature axis (as in BatchNorm)::

      mu_g     = mean(x)
      var_g    = mean((x - mu_g)^2)
      y        = scale * (x - mu_g) / sqrt(var_g + epsilon) + bias

    Running statistics (used when ``use_running_average=True``) take one EMA step per call, with
    the same ``momentum`` convention as ``flax.linen.BatchNorm``, from the *uniform mean over ghost
    batches* of the ghost statistics::

      mean <- momentum * mean + (1 - momentum) * (1/G) sum_g mu_g
      var  <- momentum * var  + (1 - momentum) * (1/G) sum_g var_g

    (1/G) sum_g mu_g equals the full-batch mean; (1/G) sum_g var_g is the average within-ghost
    (biased, 1/V) variance, i.e. the variance the layer actually normalised with during training.
    Hoffer et al.'s Alg. 1 also builds the running statistics from the ghost-batch statistics;
    taking one EMA step per call with their uniform mean keeps ``momentum`` meaning what it means
    in flax BatchNorm (one step per training step, whatever G is) and makes G = 1 reduce exactly
    to it. No running statistics are updated during ``init``.

    With ``virtual_batch_size=None`` (or equal to the local batch) this computes exactly what
    ``flax.linen.BatchNorm`` computes, and the variables have the same names and shapes: params
    'scale' and 'bias', collection 'batch_stats' with 'mean' and 'var' (float32), so the two are
    interchangeable in a checkpoint. 'scale' and 'bias' carry the logical axis name 'norm'.

    Across devices (``axis_name``, inside ``shard_map``/``pmap``): ghost batches are per device.
    With ``virtual_batch_size`` set, normalisation statistics are *never* averaged across devices
    (each device splits its own local batch); only the running-statistic update is averaged over
    ``axis_name`` so that every replica keeps identical ``batch_stats``. With
    ``virtual_batch_size=None`` and ``axis_name`` given, the layer is synchronised BatchNorm: the
    statistics are averaged over ``axis_name`` exactly as in flax BatchNorm.

    References:
      Hoffer, Hubara, Soudry 2017, "Train longer, generalize better: closing the generalization
      gap in large batch training of neural networks", Section 4 and Algorithm 1.
      Ioffe, Szegedy 2015, "Batch Normalization", Algorithm 1 and 2.

    Attributes:
      virtual_batch_size: examples per ghost batch V (must divide the local batch); None means
        one ghost batch = the whole batch (plain BatchNorm).
      use_running_average: use the stored running statistics instead of batch statistics.
      axis: feature axis or axes (never 0, which is the batch axis being split).
      momentum: EMA decay of the running statistics.
      epsilon: added to the variance.
      dtype: output dtype (default: inferred from the input and parameters).
      param_dtype: dtype of 'scale' and 'bias'.
      use_bias: learn a bias.
      use_scale: learn a scale.
      bias_init: plain initializer of 'bias' (logical names are added here).
      scale_init: plain initializer of 'scale' (logical names are added here).
      axis_name: device axis name for synchronised statistics (see above).
      axis_index_groups: groups within ``axis_name``, as in ``lax.pmean``.
    """

    virtual_batch_size: int | None = None
    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None

    def __post_init__(self):
        vbs = self.virtual_batch_size
        if vbs is not None and (isinstance(vbs, bool) or not isinstance(vbs, int) or vbs < 1):
            raise ValueError(
                f"GhostBatchNorm: virtual_batch_size must be a positive int or None, got {vbs!r}"
            )
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"GhostBatchNorm: momentum must be in [0, 1], got {self.momentum}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """Normalises ``x`` [B, ...] with ghost-batch (or running) statistics.

        Args:
          x: input; axis 0 is the batch axis split into ghost batches.
          use_running_average: overrides the attribute of the same name.

        Returns:
          The normalised input, same shape as ``x``.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        feature_axes = _canonical_axes(x.ndim, self.axis)
        if 0 in feature_axes:
            raise ValueError(
                f"GhostBatchNorm: axis={self.axis} includes axis 0, the batch axis that is split "
                f"into ghost batches (input shape {x.shape})"
            )
        reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        feature_shape = tuple(x.shape[a] for a in feature_axes)
        param_names = (NORM,) + (None,) * (len(feature_axes) - 1)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, feature_shape, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, feature_shape, jnp.float32)

        stat_dtype = jnp.promote_types(jnp.result_type(x), jnp.float32)
        xs = x.astype(stat_dtype)
        bshape = [1] * x.ndim
        for a in feature_axes:
            bshape[a] = x.shape[a]

        if use_running_average:
            mean = ra_mean.value.reshape(bshape)
            var = ra_var.value.reshape(bshape)
            y = (xs - mean) * jax.lax.rsqrt(var + self.epsilon)
        else:
            batch = x.shape[0]
            vbs = batch if self.virtual_batch_size is None else self.virtual_batch_size
            if batch % vbs:
                raise ValueError(
                    f"GhostBatchNorm: batch size {batch} (axis 0 of input shape {x.shape}) is not "
                    f"divisible by virtual_batch_size={vbs}"
                )
            groups = batch // vbs
            xg = xs.reshape((groups, vbs) + x.shape[1:])  # [G, V, ...]
            group_axes = tuple(a + 1 for a in reduction_axes)
            sync = self.axis_name is not None and not self.is_initializing()
            pmean = functools.partial(
                jax.lax.pmean, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups
            )
            # Two-pass variance: ghost batches are small, where E[x^2] - E[x]^2 loses precision.
            mu = xg.mean(group_axes, keepdims=True)  # [G, 1, ..features..]
            if sync and self.virtual_batch_size is None:
                mu = pmean(mu)
            var = jnp.square(xg - mu).mean(group_axes, keepdims=True)
            if sync and self.virtual_batch_size is None:
                var = pmean(var)
            y = ((xg - mu) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
            if not self.is_initializing():
                new_mean = mu.mean(0).reshape(feature_shape)
                new_var = var.mean(0).reshape(feature_shape)
                if sync and self.virtual_batch_size is not None:
                    new_mean, new_var = pmean((new_mean, new_var))
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * new_mean
                ra_var.value = m * ra_var.value + (1.0 - m) * new_var

        args = [x]
        if self.use_scale:
            scale = self.param(
                "scale", partitioned(self.scale_init, param_names), feature_shape, self.param_dtype
            )
            y = y * scale.reshape(bshape)
            args.append(scale)
        if self.use_bias:
            bias = self.param(
                "bias", partitioned(self.bias_init, param_names), feature_shape, self.param_dtype
            )
            y = y + bias.reshape(bshape)
            args.append(bias)
        out_dtype = self.dtype if self.dtype is not None else jnp.result_type(*args)
        return y.astype(out_dtype)
