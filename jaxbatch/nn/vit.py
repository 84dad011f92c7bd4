"""Vision Transformer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from jaxbatch.nn.axes import BATCH, CONV_IN, EMBED, LENGTH, VOCAB, constrain, partitioned
from jaxbatch.nn.layers import layer_norm
from jaxbatch.nn.remat import get_policy
from jaxbatch.nn.text_encoder import remat_encoder_block

POOLS = ("gap", "cls")


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Eq. 1-4).

    z_0 = [x_class;] x_p E + E_pos (x_p: non-overlapping patch_size × patch_size patches);
    z_l = pre-LN transformer block(z_{l-1}), l = 1..depth; y = LN(z_L) pooled by 'gap' (mean over
    patches, as in big_vision) or 'cls' (the prepended class token); logits = y W_head.

    Attributes:
      patch_size: side of the square patches (must divide the image height and width).
      hidden: token width D.
      depth: number of transformer blocks.
      heads: attention heads (must divide ``hidden``).
      mlp_dim: hidden width of the MLPs.
      num_classes: classifier outputs; None returns the pooled representation [B, D].
      pool: 'gap' or 'cls'.
      dropout: dropout rate after the embeddings and inside the blocks (needs a 'dropout' rng
        when ``train=True`` and the rate is > 0).
      remat_policy: a name from ``jaxbatch.nn.remat.POLICY_NAMES``; every block is wrapped in
        ``nn.remat`` with it (parameters unchanged).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    patch_size: int
    hidden: int
    depth: int
    heads: int
    mlp_dim: int
    num_classes: int | None = None
    pool: str = "gap"
    dropout: float = 0.0
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        get_policy(self.remat_policy)  # fails early on an unknown name
        if self.pool not in POOLS:
            raise ValueError(f"ViT: unknown pool {self.pool!r}; expected one of {POOLS}")
        if self.hidden % self.heads:
            raise ValueError(f"ViT: hidden={self.hidden} is not divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ViT: dropout must be in [0, 1), got {self.dropout}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Classifies (or embeds) images ``x`` [B, H, W, C].

        Args:
          x: images, channels last; H and W divisible by ``patch_size``.
          train: enables dropout.

        Returns:
          Logits [B, num_classes], or the pooled representation [B, hidden].
        """
        b, h, w, _ = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"ViT: image size {h}x{w} is not divisible by patch_size={p}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Conv(
            self.hidden,
            (p, p),
            strides=(p, p),
            padding="VALID",
            **kw,
            kernel_init=partitioned(nn.initializers.lecun_normal(), (None, None, CONV_IN, EMBED)),
            bias_init=partitioned(nn.initializers.zeros, (EMBED,)),
            name="embedding",
        )(jnp.asarray(x, self.dtype))
        x = x.reshape(b, -1, self.hidden)
        if self.pool == "cls":
            cls = self.param(
                "cls",
                partitioned(nn.initializers.zeros, (None, None, EMBED)),
                (1, 1, self.hidden),
                self.param_dtype,
            )
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.hidden)).astype(x.dtype), x], 1)
        pos = self.param(
            "pos_embedding",
            partitioned(nn.initializers.normal(0.02), (None, None, EMBED)),
            (1, x.shape[1], self.hidden),
            self.param_dtype,
        )
        x = x + pos.astype(x.dtype)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = constrain(x, (BATCH, LENGTH, EMBED))
        block_cls = remat_encoder_block(self.remat_policy)
        for i in range(self.depth):
            x = block_cls(self.heads, self.mlp_dim, self.dropout, **kw, name=f"block{i}")(
                x, None, not train
            )
        x = layer_norm(**kw, name="encoder_norm")(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
        x = constrain(x, (BATCH, EMBED))
        if self.num_classes is None:
            return x
        return nn.Dense(
            self.num_classes,
            **kw,
            kernel_init=partitioned(nn.initializers.lecun_normal(), (EMBED, VOCAB)),
            bias_init=partitioned(nn.initializers.zeros, (VOCAB,)),
            name="head",
        )(x)
