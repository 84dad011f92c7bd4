"""The masked-language-model task ('mlm'): BERT pre-training on pre-masked examples.

Data fields (the format of BERT's ``create_pretraining_data.py``, one row per sequence):

- ``input_ids``           int32 [L]: tokens with the masked positions already replaced (80 %
  [MASK], 10 % random token, 10 % unchanged), padded with 0;
- ``masked_lm_positions`` int32 [P]: the positions whose original token is predicted;
- ``masked_lm_ids``       int32 [P]: the original tokens at those positions;
- ``masked_lm_weights``   float32 [P]: 1 for a real prediction, 0 for padding of the P slots.

Loss (Devlin et al. 2019, Section 3.1, as in the reference implementation):

  loss = Σ_{b,p} w_bp · CE(logits_bp, ids_bp) / (Σ_{b,p} w_bp + 1e-5)

With a mesh 'context' axis > 1 and ``config.model.context_layout='zigzag'`` the ids are put in
the zig-zag order once (``jaxbatch.nn.context_parallel.zigzag_permutation``), the masked
positions are mapped to their new indices and the original positions go to the position table;
the loss is a sum over the predictions, so nothing is un-permuted.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from jaxbatch.nn import context_parallel as cp
from jaxbatch.train.task_base import Task

MLM_FIELDS = ("input_ids", "masked_lm_positions", "masked_lm_ids", "masked_lm_weights")
_EPS = 1e-5


def masked_lm_loss(logits: jax.Array, ids: jax.Array, weights: jax.Array) -> jax.Array:
    """Σ w · CE(logits, ids) / (Σ w + 1e-5) over [B, P] predictions (logits [B, P, V])."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), ids)
    weights = weights.astype(jnp.float32)
    return jnp.sum(ce * weights) / (jnp.sum(weights) + _EPS)


def mlm_task(cfg: ml_collections.ConfigDict, model: nn.Module, mesh=None) -> Task:
    """The 'mlm' :class:`Task` of ``model`` (a ``jaxbatch.nn.BertMLM``)."""
    del mesh  # the trace's mesh decides (cp.context_axis_size)
    zigzag_layout = cfg.model.get("context_layout", "contiguous") == "zigzag"

    def model_args(batch):
        """(ids, masked positions, positions or None), in the zig-zag order when the layout is
        and the trace's mesh splits the sequence."""
        ids, masked = batch["input_ids"], batch["masked_lm_positions"]
        context = cp.context_axis_size()
        if not (zigzag_layout and context > 1):
            return ids, masked, None
        length = ids.shape[1]
        perm = cp.zigzag_permutation(length, context)
        inv = jnp.asarray(cp.zigzag_inverse_permutation(length, context))
        positions = jnp.broadcast_to(jnp.asarray(perm), ids.shape)
        return ids[:, perm], inv[masked.astype(jnp.int32)], positions

    def init_fn(rng, batch):
        return model.init(rng, batch["input_ids"], batch["masked_lm_positions"], train=False)

    def loss_fn(params, model_state, batch, rng):
        ids, masked, positions = model_args(batch)
        logits = model.apply(
            {"params": params, **model_state},
            ids,
            masked,
            train=True,
            positions=positions,
            rngs={"dropout": rng},
        )
        loss = masked_lm_loss(logits, batch["masked_lm_ids"], batch["masked_lm_weights"])
        w = batch["masked_lm_weights"].astype(jnp.float32)
        hits = (jnp.argmax(logits, -1) == batch["masked_lm_ids"]).astype(jnp.float32)
        accuracy = jnp.sum(hits * w) / (jnp.sum(w) + _EPS)
        return loss, ({"mlm_accuracy": accuracy}, model_state)

    def eval_fn(variables, batch):
        ids, masked, positions = model_args(batch)
        logits = model.apply(variables, ids, masked, positions=positions)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["masked_lm_ids"])
        w = batch["masked_lm_weights"].astype(jnp.float32)
        hits = (jnp.argmax(logits, -1) == batch["masked_lm_ids"]).astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(ce * w, -1),
            "hits": jnp.sum(hits * w, -1),
            "weight": jnp.sum(w, -1),
        }

    def summarize(out):
        weight = max(float(np.sum(out["weight"])), _EPS)
        loss = float(np.sum(out["loss_sum"])) / weight
        return {
            "loss": loss,
            "mlm_accuracy": float(np.sum(out["hits"])) / weight,
            "perplexity": math.exp(min(loss, 50.0)),
        }

    return Task("mlm", model, MLM_FIELDS, init_fn, loss_fn, eval_fn, summarize, "mlm_accuracy")
