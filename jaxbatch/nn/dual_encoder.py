"""Two-tower (CLIP / SigLIP style) dual encoder with a learnable logit scale and bias."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from jaxbatch.nn.axes import BATCH, EMBED, MLP, constrain, partitioned

CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0


def l2_normalize(z: jax.Array, eps: float = 1e-12) -> jax.Array:
    """z / max(||z||_2, eps) along the last axis, computed in float32."""
    z = z.astype(jnp.float32)
    return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), eps * eps))


class DualEncoder(nn.Module):
    """Two towers, linear projections to a shared space, L2-normalised embeddings.

    zx = normalize(f_x(x) W_x),  zy = normalize(f_y(y) W_y)  (W: no bias),
    logit_scale = exp(t)  (t learnable, initialised to ``logit_scale_init``; clipped to
    ``max_logit_scale`` when set, as CLIP clips at 100),  logit_bias = b (learnable) or None,
    so that logits_ij = logit_scale · zx_i · zy_j + logit_bias, which is what
    ``jaxbatch.losses.contrastive_loss(zx, zy, logit_scale, logit_bias)`` takes.

    Initialisation: CLIP uses t = log(1/0.07) and no bias (the defaults); SigLIP uses
    t = log(10) and b = -10 (``SIGLIP_LOGIT_SCALE_INIT``, ``SIGLIP_LOGIT_BIAS_INIT``).

    A tower is any linen module called as ``tower(inputs, train=train)`` that returns [B, width]
    (``TextEncoder``, ``ViT``/``ResNet`` with ``num_classes=None``). Towers with BatchNorm need
    ``mutable=['batch_stats']`` when ``train=True``.

    Rematerialisation is the towers' own field (``remat_policy`` of ``ViT``, ``TextEncoder``,
    ``ResNet``); the projections and the normalisation here keep only [B, embed_dim] tensors.

    References:
      Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"
      (CLIP), Fig. 3; Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training" (SigLIP),
      Algorithm 1 (t' = log 10, b = -10).

    Attributes:
      x_encoder: tower for the x inputs (params under 'x_encoder').
      y_encoder: tower for the y inputs (params under 'y_encoder'); None with ``share_towers``.
      share_towers: encode y with the x tower and the x projection (a Siamese dual encoder, for
        two inputs of the same modality such as text and code, where shared weights make equal
        inputs map to equal embeddings from the start).
      embed_dim: dimension of the shared embedding space.
      logit_scale_init: initial value of the log logit scale t.
      logit_bias_init: initial logit bias; None means no bias parameter (logit_bias is None).
      normalize: L2-normalise the embeddings.
      max_logit_scale: optional upper clip of exp(t).
      dtype: compute dtype of the projections (the embeddings are returned in float32).
      param_dtype: parameter dtype.
    """

    x_encoder: nn.Module
    y_encoder: nn.Module | None
    embed_dim: int
    logit_scale_init: float = CLIP_LOGIT_SCALE_INIT
    logit_bias_init: float | None = None
    normalize: bool = True
    share_towers: bool = False
    max_logit_scale: float | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.share_towers != (self.y_encoder is None):
            raise ValueError(
                "DualEncoder: give y_encoder=None exactly when share_towers=True, got "
                f"share_towers={self.share_towers} and y_encoder={type(self.y_encoder).__name__}"
            )
        if self.embed_dim < 1:
            raise ValueError(f"DualEncoder: embed_dim must be >= 1, got {self.embed_dim}")
        if self.max_logit_scale is not None and self.max_logit_scale <= 0:
            raise ValueError(
                f"DualEncoder: max_logit_scale must be > 0 or None, got {self.max_logit_scale}"
            )
        super().__post_init__()

    def setup(self):
        def proj() -> nn.Dense:
            return nn.Dense(
                self.embed_dim,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=partitioned(nn.initializers.lecun_normal(), (EMBED, MLP)),
            )

        self.x_proj = proj()
        if not self.share_towers:
            self.y_proj = proj()
        self.log_logit_scale = self.param(
            "log_logit_scale",
            partitioned(nn.initializers.constant(self.logit_scale_init), ()),
            (),
            self.param_dtype,
        )
        if self.logit_bias_init is not None:
            self.logit_bias = self.param(
                "logit_bias",
                partitioned(nn.initializers.constant(self.logit_bias_init), ()),
                (),
                self.param_dtype,
            )

    def _embed(self, tower: nn.Module, proj: nn.Dense, inputs: Any, train: bool) -> jax.Array:
        z = proj(constrain(tower(inputs, train=train), (BATCH, EMBED)))
        z = l2_normalize(z) if self.normalize else z.astype(jnp.float32)
        return constrain(z, (BATCH, None))

    def encode_x(self, x_inputs: Any, train: bool = False) -> jax.Array:
        """Embeddings zx float32 [B, embed_dim] of the x inputs (unit norm when ``normalize``)."""
        return self._embed(self.x_encoder, self.x_proj, x_inputs, train)

    def encode_y(self, y_inputs: Any, train: bool = False) -> jax.Array:
        """Embeddings zy float32 [B, embed_dim] of the y inputs (unit norm when ``normalize``)."""
        if self.share_towers:
            return self._embed(self.x_encoder, self.x_proj, y_inputs, train)
        return self._embed(self.y_encoder, self.y_proj, y_inputs, train)

    def scales(self) -> tuple[jax.Array, jax.Array | None]:
        """(logit_scale = exp(t) (clipped if set), logit_bias or None), both float32 scalars."""
        t = jnp.asarray(self.log_logit_scale, jnp.float32)
        if self.max_logit_scale is not None:
            t = jnp.minimum(t, math.log(self.max_logit_scale))
        bias = None
        if self.logit_bias_init is not None:
            bias = jnp.asarray(self.logit_bias, jnp.float32)
        return jnp.exp(t), bias

    def __call__(
        self, x_inputs: Any, y_inputs: Any, train: bool = False
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """Returns (zx [B, embed_dim], zy [B, embed_dim], logit_scale, logit_bias or None)."""
        zx = self.encode_x(x_inputs, train=train)
        zy = self.encode_y(y_inputs, train=train)
        logit_scale, logit_bias = self.scales()
        return zx, zy, logit_scale, logit_bias
