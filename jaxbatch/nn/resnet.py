"""ResNets (ImageNet and CIFAR style) with BatchNorm or GhostBatchNorm."""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from jaxbatch.nn.axes import BATCH, CONV_IN, CONV_OUT, EMBED, NORM, VOCAB, constrain, partitioned
from jaxbatch.nn.ghost_batch_norm import GhostBatchNorm
from jaxbatch.nn.remat import check_policies, remat_module

NORMS = ("batch", "ghost")
BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "cifar")

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_CONV_NAMES = (None, None, CONV_IN, CONV_OUT)
_ACT_NAMES = (BATCH, None, None, CONV_OUT)

NormFactory = Callable[..., nn.Module]


def _conv(features: int, kernel: int, strides: int, *, dtype, param_dtype, name=None) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding="SAME",
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(_conv_init, _CONV_NAMES),
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (He et al. 2016, Fig. 2 left)."""

    filters: int
    norm: NormFactory
    strides: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = _conv(self.filters, 3, self.strides, **kw, name="conv1")(x)
        y = nn.relu(self.norm(name="norm1")(y))
        y = _conv(self.filters, 3, 1, **kw, name="conv2")(y)
        y = self.norm(last=True, name="norm2")(y)
        if x.shape != y.shape:
            x = _conv(self.filters, 1, self.strides, **kw, name="conv_proj")(x)
            x = self.norm(name="norm_proj")(x)
        return constrain(nn.relu(x + y), _ACT_NAMES)


class BottleneckBlock(nn.Module):
    """1×1 → 3×3 → 1×1 (×4 filters) bottleneck block (He et al. 2016, Fig. 5 right)."""

    filters: int
    norm: NormFactory
    strides: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = _conv(self.filters, 1, 1, **kw, name="conv1")(x)
        y = nn.relu(self.norm(name="norm1")(y))
        y = _conv(self.filters, 3, self.strides, **kw, name="conv2")(y)
        y = nn.relu(self.norm(name="norm2")(y))
        y = _conv(4 * self.filters, 1, 1, **kw, name="conv3")(y)
        y = self.norm(last=True, name="norm3")(y)
        if x.shape != y.shape:
            x = _conv(4 * self.filters, 1, self.strides, **kw, name="conv_proj")(x)
            x = self.norm(name="norm_proj")(x)
        return constrain(nn.relu(x + y), _ACT_NAMES)


class ResNet(nn.Module):
    """Residual network (He, Zhang, Ren, Sun 2016, "Deep Residual Learning for Image Recognition").

    Stage i (i = 0, 1, ...) has ``stage_sizes[i]`` blocks of ``num_filters·2^i`` filters, the first
    block of every stage but the first with stride 2. Stem 'imagenet': 7×7/2 conv + 3×3/2 max-pool;
    stem 'cifar': one 3×3/1 conv, no pooling (works on 8×8 and 32×32 inputs). Then global average
    pooling and, unless ``num_classes`` is None, a linear classifier.

    With ``zero_init_residual`` the last norm of every residual branch starts with scale 0, so each
    block starts as the identity (Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training
    ImageNet in 1 Hour", Section 5.1).

    ``norm='batch'`` uses ``flax.linen.BatchNorm``; ``norm='ghost'`` uses :class:`GhostBatchNorm`
    with ``virtual_batch_size`` (Hoffer et al. 2017). Both keep running statistics in the
    'batch_stats' collection (pass ``mutable=['batch_stats']`` when ``train=True``) and the two
    variable trees are identical. ``axis_name`` is forwarded to the norm layers.

    ``remat_policy`` wraps every residual block in ``nn.remat`` with the named ``jax.checkpoint``
    policy (``jaxbatch.nn.remat``): one name for all stages, or one per stage (e.g.
    ``('full', 'full', 'none', 'none')`` recomputes the early, high-resolution stages, whose
    activations dominate the memory). Parameters and batch statistics are unchanged. Of the named
    policies 'none', 'full' and 'dots' (which keeps the convolution outputs: ``checkpoint_dots``
    selects convolutions as well as matmuls) are the meaningful ones for a ResNet; the policies
    that select tagged transformer activations save nothing here (they act as 'full').

    Attributes:
      stage_sizes: number of blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      block: 'basic' or 'bottleneck'.
      num_classes: classifier outputs; None returns the pooled features [B, C].
      num_filters: filters of the first stage.
      norm: 'batch' or 'ghost'.
      virtual_batch_size: ghost batch size (only with norm='ghost').
      stem: 'imagenet' or 'cifar'.
      zero_init_residual: zero-init the last norm scale of each residual branch.
      bn_momentum: running-statistics momentum of the norm layers.
      bn_epsilon: norm epsilon.
      axis_name: device axis for synchronised/averaged statistics (see GhostBatchNorm).
      remat_policy: a name from ``jaxbatch.nn.remat.POLICY_NAMES``, or one per stage.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    num_classes: int | None = 1000
    num_filters: int = 64
    norm: str = "batch"
    virtual_batch_size: int | None = None
    stem: str = "imagenet"
    zero_init_residual: bool = True
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None
    remat_policy: str | Sequence[str] = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        if isinstance(self.remat_policy, list):  # configs give lists; module fields must hash
            object.__setattr__(self, "remat_policy", tuple(self.remat_policy))
        if self.norm not in NORMS:
            raise ValueError(f"ResNet: unknown norm {self.norm!r}; expected one of {NORMS}")
        if self.block not in BLOCKS:
            raise ValueError(f"ResNet: unknown block {self.block!r}; expected one of {BLOCKS}")
        if self.stem not in STEMS:
            raise ValueError(f"ResNet: unknown stem {self.stem!r}; expected one of {STEMS}")
        if not self.stage_sizes or any(int(s) < 1 for s in self.stage_sizes):
            raise ValueError(
                f"ResNet: stage_sizes must be a non-empty sequence of positive ints, "
                f"got {self.stage_sizes!r}"
            )
        if self.norm == "batch" and self.virtual_batch_size is not None:
            raise ValueError(
                f"ResNet: virtual_batch_size={self.virtual_batch_size} needs norm='ghost', "
                "got norm='batch'"
            )
        check_policies(self.remat_policy, where="ResNet", count=len(self.stage_sizes))
        super().__post_init__()

    def _norm_factory(self, train: bool) -> NormFactory:
        def make(*, last: bool = False, name: str | None = None) -> nn.Module:
            zero = last and self.zero_init_residual
            scale_init = nn.initializers.zeros if zero else nn.initializers.ones
            common: dict[str, Any] = dict(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                axis_name=self.axis_name,
                name=name,
            )
            if self.norm == "batch":
                return nn.BatchNorm(
                    scale_init=partitioned(scale_init, (NORM,)),
                    bias_init=partitioned(nn.initializers.zeros, (NORM,)),
                    **common,
                )
            return GhostBatchNorm(
                virtual_batch_size=self.virtual_batch_size, scale_init=scale_init, **common
            )

        return make

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Runs the network on images ``x`` [B, H, W, C].

        Args:
          x: images, channels last.
          train: use batch statistics and update 'batch_stats' (True) or use the running ones.

        Returns:
          Logits [B, num_classes], or pooled features [B, C] when ``num_classes`` is None.
        """
        norm = self._norm_factory(train)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = _conv(self.num_filters, 7, 2, **kw, name="conv_init")(x)
            x = nn.relu(norm(name="norm_init")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        else:
            x = _conv(self.num_filters, 3, 1, **kw, name="conv_init")(x)
            x = nn.relu(norm(name="norm_init")(x))
        x = constrain(x, _ACT_NAMES)
        block_cls = BasicBlock if self.block == "basic" else BottleneckBlock
        policies = check_policies(self.remat_policy, where="ResNet", count=len(self.stage_sizes))
        for i, size in enumerate(self.stage_sizes):
            stage_cls = remat_module(block_cls, policies[i % len(policies)])
            for j in range(size):
                strides = 2 if i > 0 and j == 0 else 1
                x = stage_cls(
                    self.num_filters * 2**i, norm, strides, **kw, name=f"stage{i + 1}_block{j + 1}"
                )(x)
        x = constrain(jnp.mean(x, axis=(1, 2)), (BATCH, EMBED))
        if self.num_classes is None:
            return x
        return nn.Dense(
            self.num_classes,
            **kw,
            kernel_init=partitioned(nn.initializers.lecun_normal(), (EMBED, VOCAB)),
            bias_init=partitioned(nn.initializers.zeros, (VOCAB,)),
            name="head",
        )(x)


def resnet18(num_classes: int | None = 1000, **kwargs: Any) -> ResNet:
    """ResNet-18: basic blocks, stages (2, 2, 2, 2), ImageNet stem."""
    return ResNet(stage_sizes=(2, 2, 2, 2), block="basic", num_classes=num_classes, **kwargs)


def resnet50(num_classes: int | None = 1000, **kwargs: Any) -> ResNet:
    """ResNet-50: bottleneck blocks, stages (3, 4, 6, 3), ImageNet stem."""
    return ResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck", num_classes=num_classes, **kwargs)


def resnet_cifar(
    depth: int | None = None,
    *,
    stage_sizes: Sequence[int] | None = None,
    num_classes: int | None = 10,
    num_filters: int = 16,
    **kwargs: Any,
) -> ResNet:
    """CIFAR-style ResNet (He et al. 2016, Section 4.2): 3×3 stem, no max-pool, 3 stages.

    depth = 6n + 2 gives stages (n, n, n) of basic blocks with 16, 32, 64 filters (ResNet-20:
    n = 3). Works on 8×8 inputs (feature maps 8 → 4 → 2) as well as 32×32.

    Args:
      depth: 6n + 2 (20, 32, 44, 56, 110, ...); None means 20 unless ``stage_sizes`` is given.
      stage_sizes: explicit blocks per stage instead of ``depth``.
      num_classes: classifier outputs (None: pooled features).
      num_filters: filters of the first stage.
      **kwargs: other :class:`ResNet` attributes (norm, virtual_batch_size, dtype, ...).

    Returns:
      The :class:`ResNet` module.
    """
    if stage_sizes is None:
        depth = 20 if depth is None else depth
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"resnet_cifar: depth must be 6n + 2 with n >= 1, got {depth!r}")
        n = (depth - 2) // 6
        stage_sizes = (n, n, n)
    elif depth is not None:
        raise ValueError(
            f"resnet_cifar: give depth or stage_sizes, not both (depth={depth}, "
            f"stage_sizes={stage_sizes})"
        )
    return ResNet(
        stage_sizes=tuple(stage_sizes),
        num_classes=num_classes,
        num_filters=num_filters,
        stem="cifar",
        **kwargs,
    )
