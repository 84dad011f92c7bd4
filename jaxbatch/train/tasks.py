"""What is being learned: the loss of one batch and the evaluation of a model, per task.

A :class:`Task` couples a model with its data fields:

- 'classification': ``{'image', 'label'}``, softmax cross-entropy, accuracy.
- 'contrastive':    ``{'doc', 'code'}`` (x, y), ``jaxbatch.losses.contrastive_loss`` over a dual
  encoder, retrieval recall@1/@10 on the held-out pairs (and the lexical TF-IDF baseline).
- 'lm':             ``{'tokens'}`` [B, L+1], next-token cross-entropy, bits per byte.

``loss_fn(params, model_state, batch, rng) -> (loss, (metrics, new_model_state))`` is what the train
step differentiates; ``eval_fn(variables, batch) -> per-example outputs`` is jitted over
fixed-shape eval batches, and ``summarize(outputs) -> metrics`` reduces the outputs of the real
(unmasked) examples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxbatch import data as jdata
from jaxbatch import losses, parallel
from jaxbatch.train.models import build_model
from jaxbatch.train.tasks_mlm import mlm_task

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
    """A model with its loss, evaluation and data fields."""

    name: str
    model: nn.Module
    fields: tuple[str, ...]
    init_fn: Callable[[jax.Array, Batch], Any]
    loss_fn: Callable[..., tuple[jax.Array, tuple[dict, Any]]]
    eval_fn: Callable[[Any, Batch], dict[str, jax.Array]]
    summarize: Callable[[dict[str, np.ndarray]], dict[str, float]]
    primary_metric: str
    baseline: Callable[[], dict[str, float]] | None = None
    # Losses over the whole batch of embeddings (contrastive) also give these two, so that
    # gradient accumulation can cache embedding gradients (jaxbatch.train.grad_cache):
    # embed_fn(params, model_state, batch, rng) -> ((per_example, shared), new_model_state) and
    # pair_loss_fn(per_example, shared) -> (loss, metrics), with loss_fn their composition.
    embed_fn: Callable[..., tuple[Any, Any]] | None = None
    pair_loss_fn: Callable[[Any, Any], tuple[jax.Array, dict]] | None = None


def _classification(cfg: ml_collections.ConfigDict, model: nn.Module, mesh=None) -> Task:
    del mesh
    smoothing = cfg.loss.label_smoothing

    def init_fn(rng, batch):
        return model.init(rng, batch["image"], train=False)

    def loss_fn(params, model_state, batch, rng):
        del rng
        logits, new_state = model.apply(
            {"params": params, **model_state},
            batch["image"],
            train=True,
            mutable=list(model_state),
        )
        labels = jax.nn.one_hot(batch["label"], logits.shape[-1])
        if smoothing:
            labels = optax.smooth_labels(labels, smoothing)
        loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, ({"accuracy": accuracy}, dict(new_state))

    def eval_fn(variables, batch):
        logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return {"correct": jnp.argmax(logits, -1) == batch["label"], "loss": loss}

    def summarize(out):
        return {"accuracy": float(out["correct"].mean()), "loss": float(out["loss"].mean())}

    return Task(
        "classification",
        model,
        ("image", "label"),
        init_fn,
        loss_fn,
        eval_fn,
        summarize,
        "accuracy",
    )


def retrieval_recall(zx: np.ndarray, zy: np.ndarray, ks=(1, 10)) -> dict[str, float]:
    """Recall@k of retrieving y_i for query x_i among all y by cosine/dot similarity.

    Ties count against the model (the true item must beat every other to rank first).
    """
    sim = zx.astype(np.float64) @ zy.astype(np.float64).T
    true = np.diagonal(sim)[:, None]
    rank = (sim >= true).sum(axis=1) - 1
    return {f"recall@{k}": float(np.mean(rank < k)) for k in ks}


def contrastive_loss_fn(loss_cfg, mesh=None):
    """``(zx, zy, scale, bias) -> loss`` over the global batch.

    When the batch is sharded over the mesh's batch axes (data × fsdp > 1), the loss runs inside
    ``jax.shard_map`` with ``axis_name`` set to those axes: each device keeps its rows of zx and
    the zy blocks travel around the device ring (``jaxbatch.losses``), so no device ever holds
    more than its own N_local rows of the similarity matrix.
    """
    options = dict(
        kind=loss_cfg.kind,
        block_size=loss_cfg.block_size or None,
        implementation=loss_cfg.implementation,
    )
    if mesh is None or parallel.batch_axis_size(mesh) == 1:
        return lambda zx, zy, scale, bias: losses.contrastive_loss(zx, zy, scale, bias, **options)
    rows = P(parallel.BATCH_AXES)
    if options["implementation"] in ("auto", "pallas"):
        options["implementation"] = "xla"  # the ring runs the XLA tiles (kernels are per device)

    def ring(zx, zy, scale, bias):
        def local(zx, zy, scale, *bias):
            return losses.contrastive_loss(
                zx, zy, scale, *bias, axis_name=parallel.BATCH_AXES, **options
            )

        args = (zx, zy, scale) if bias is None else (zx, zy, scale, bias)
        specs = (rows, rows, P()) if bias is None else (rows, rows, P(), P())
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*args)

    return ring


def _contrastive(cfg: ml_collections.ConfigDict, model: nn.Module, mesh=None) -> Task:
    loss_cfg = cfg.loss
    loss_of = contrastive_loss_fn(loss_cfg, mesh)
    x_field, y_field = cfg.dataset.pair_fields

    def init_fn(rng, batch):
        return model.init(rng, batch[x_field], batch[y_field], train=False)

    def embed_fn(params, model_state, batch, rng):
        zx, zy, scale, bias = model.apply(
            {"params": params, **model_state},
            batch[x_field],
            batch[y_field],
            train=True,
            rngs={"dropout": rng},
        )
        return ((zx, zy), (scale, bias)), model_state

    def pair_loss_fn(embeddings, shared):
        (zx, zy), (scale, bias) = embeddings, shared
        return loss_of(zx, zy, scale, bias), {"logit_scale": scale}

    def loss_fn(params, model_state, batch, rng):
        (embeddings, shared), model_state = embed_fn(params, model_state, batch, rng)
        loss, metrics = pair_loss_fn(embeddings, shared)
        return loss, (metrics, model_state)

    def eval_fn(variables, batch):
        zx, zy, _, _ = model.apply(variables, batch[x_field], batch[y_field], train=False)
        return {"zx": zx, "zy": zy}

    def summarize(out):
        return retrieval_recall(out["zx"], out["zy"])

    def baseline():
        options = {
            k: v
            for k, v in cfg.dataset.options.to_dict().items()
            if k in ("test_fraction", "max_test")
        }
        pairs = jdata.load_codesearch_pairs("test", **options)
        recall = jdata.tfidf_retrieval_recall([p.doc for p in pairs], [p.code for p in pairs])
        return {f"recall@{k}": v for k, v in recall.items()}

    return Task(
        "contrastive",
        model,
        (x_field, y_field),
        init_fn,
        loss_fn,
        eval_fn,
        summarize,
        "recall@1",
        baseline if cfg.dataset.name == "codesearch" else None,
        embed_fn=embed_fn,
        pair_loss_fn=pair_loss_fn,
    )


def _lm(cfg: ml_collections.ConfigDict, model: nn.Module, mesh=None) -> Task:
    """Next-token cross-entropy. ``config.loss.implementation``: 'reference' forms the [B, L, V]
    logits; 'xla' / 'auto' use ``losses.linear_cross_entropy`` on the final hidden states and the
    output kernel (token chunks of ``config.loss.block_size``, 0 = its default), so the training
    step never holds the logits of the whole batch."""
    del mesh
    chunked = cfg.loss.implementation != "reference"
    chunk_size = cfg.loss.block_size or None

    def init_fn(rng, batch):
        return model.init(rng, batch["tokens"][:, :-1])

    def token_losses(params_or_vars, tokens):
        logits = model.apply(params_or_vars, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])

    def mean_loss(variables, tokens):
        if not chunked:
            return token_losses(variables, tokens).mean()
        h = model.apply(variables, tokens[:, :-1], method="hidden")
        w = model.apply(variables, method="output_kernel")
        h = h.reshape(-1, h.shape[-1]).astype(model.dtype)
        return losses.linear_cross_entropy(
            h,
            w.astype(model.dtype),
            tokens[:, 1:].reshape(-1),
            chunk_size=chunk_size,
            implementation=cfg.loss.implementation,
        )

    def loss_fn(params, model_state, batch, rng):
        del rng
        loss = mean_loss({"params": params, **model_state}, batch["tokens"])
        return loss, ({}, model_state)

    def eval_fn(variables, batch):
        return {"loss": token_losses(variables, batch["tokens"]).mean(axis=-1)}

    def summarize(out):
        loss = float(out["loss"].mean())
        return {"loss": loss, "bits_per_byte": loss / math.log(2)}

    return Task("lm", model, ("tokens",), init_fn, loss_fn, eval_fn, summarize, "bits_per_byte")


_TASKS = {
    "classification": _classification,
    "contrastive": _contrastive,
    "lm": _lm,
    "mlm": mlm_task,
}


def make_task(cfg: ml_collections.ConfigDict, mesh=None) -> Task:
    """The task of a validated config (its model built from ``config.model``) on ``mesh``."""
    model = build_model(cfg.model.to_dict())
    return _TASKS[cfg.task](cfg, model, mesh)


def split_variables(variables) -> tuple[Any, dict]:
    """(params, the other collections) of ``model.init``'s output."""
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables
