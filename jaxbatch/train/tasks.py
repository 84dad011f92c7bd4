"""What is being learned: the loss of one batch and the evaluation of a model, per task.

A :class:`Task` couples a model with its data fields:

- 'classification': ``{'image', 'label'}``, softmax cross-entropy, accuracy.
- 'contrastive':    ``{'doc', 'code'}`` (x, y), ``jaxbatch.losses.contrastive_loss`` over a dual
  encoder, retrieval recall@1/@10 on the held-out pairs (and the lexical TF-IDF baseline).
- 'lm':             ``{'tokens'}`` [B, L+1], next-token cross-entropy, bits per byte.

``loss_fn(params, model_state, batch, rng) -> (loss, (metrics, new_model_state))`` is what the train
step differentiates; ``eval_fn(variables, batch) -> per-example outputs`` is jitted over
fixed-shape eval batches, and ``summarize(outputs) -> metrics`` reduces the outputs of the real
(unmasked) examples. ``Task.choices`` records what the builder resolved for the backend and
mesh (``config.loss.implementation`` 'auto' → 'pallas' or 'xla', and why), for the run to print
and store. ``Task`` and ``split_variables`` live in ``task_base`` (shared with ``tasks_mlm``).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxbatch import data as jdata
from jaxbatch import losses, parallel
from jaxbatch.losses.linear_cross_entropy import IMPLEMENTATIONS as _LCE_IMPLEMENTATIONS
from jaxbatch.nn import context_parallel as cp
from jaxbatch.nn.decoder_lm import segment_positions
from jaxbatch.train.models import build_model
from jaxbatch.train.task_base import Batch, Task, split_variables
from jaxbatch.train.tasks_mlm import mlm_task

__all__ = [
    "Batch",
    "Task",
    "choose_contrastive_implementation",
    "contrastive_loss_fn",
    "make_task",
    "retrieval_recall",
    "split_variables",
]

# Platforms whose Pallas kernels run compiled; on 'cpu' they only run in the interpreter.
_KERNEL_PLATFORMS = ("tpu", "gpu")


def _classification(cfg: ml_collections.ConfigDict, model: nn.Module, mesh=None) -> Task:
    del mesh
    smoothing = cfg.loss.label_smoothing

    def init_fn(rng, batch):
        return model.init(rng, batch["image"], train=False)

    def loss_fn(params, model_state, batch, rng):
        logits, new_state = model.apply(
            {"params": params, **model_state},
            batch["image"],
            train=True,
            mutable=list(model_state),
            rngs={"dropout": rng},  # ViT dropout; the micro-batch's own key (optim.accumulate)
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


def choose_contrastive_implementation(
    loss_cfg, n_local: int, d: int, dtype="float32", *, backend: str | None = None
) -> tuple[str, str]:
    """(implementation, reason) of the contrastive loss for [n_local, d] embeddings per device.

    'reference' and 'xla' are kept. 'auto' picks 'pallas' on TPU and GPU when the kernels accept
    the shapes and dtype, else 'xla' (CPU: the kernels would only run in the slow interpreter).
    An explicit 'pallas' is kept, or refused with the kernels' reason: never replaced.

    Args:
      loss_cfg: ``config.loss`` (kind, block_size, implementation).
      n_local: rows of x and y on one device (the global batch over data × fsdp).
      d: embedding width; dtype: embedding dtype.
      backend: the platform the step runs on; default ``jax.default_backend()``.

    Raises:
      ValueError: implementation 'pallas' with inputs the kernels do not handle here.
    """
    requested = loss_cfg.implementation
    backend = jax.default_backend() if backend is None else backend
    if requested not in ("auto", "pallas"):
        return requested, f"config.loss.implementation={requested!r}"
    if requested == "auto" and backend not in _KERNEL_PLATFORMS:
        return "xla", (
            f"auto on {backend}: the Pallas kernels run compiled on {list(_KERNEL_PLATFORMS)} "
            "only, so the XLA tiles"
        )
    from pallas_kernels.contrastive import tiles  # the kernels package is optional for the rest

    try:
        tiles.block_plan(loss_cfg.kind, n_local, d, dtype, loss_cfg.block_size or None)
    except NotImplementedError as err:
        if requested == "pallas":
            raise ValueError(
                f"config.loss.implementation='pallas' cannot run on backend {backend!r} for "
                f"[{n_local}, {d}] {jnp.dtype(dtype).name} embeddings per device: {err}; "
                "expected inputs the kernels handle, or implementation 'auto' or 'xla'"
            ) from err
        return "xla", f"auto on {backend}: the Pallas kernels refused the inputs ({err})"
    mode = "the Pallas interpreter" if backend == "cpu" else "compiled Pallas kernels"
    return "pallas", f"{requested} on {backend}: {mode}"


def contrastive_loss_fn(loss_cfg, mesh=None, *, implementation: str | None = None):
    """``(zx, zy, scale, bias) -> loss`` over the global batch.

    When the batch is sharded over the mesh's batch axes (data × fsdp > 1), the loss runs inside
    ``jax.shard_map`` with ``axis_name`` set to those axes: each device keeps its rows of zx and
    the zy blocks travel around the device ring (``jaxbatch.losses``), so no device ever holds
    more than its own N_local rows of the similarity matrix. Each ring step sweeps its block with
    the XLA tiles or the per-block Pallas kernels, as ``implementation`` says (default
    ``loss_cfg.implementation``; :func:`choose_contrastive_implementation` resolves 'auto').
    """
    options = dict(
        kind=loss_cfg.kind,
        block_size=loss_cfg.block_size or None,
        implementation=implementation or loss_cfg.implementation,
    )
    if mesh is None or parallel.batch_axis_size(mesh) == 1:
        return lambda zx, zy, scale, bias: losses.contrastive_loss(zx, zy, scale, bias, **options)
    rows = P(parallel.BATCH_AXES)

    def ring(zx, zy, scale, bias):
        def local(zx, zy, scale, *bias):
            return losses.contrastive_loss(
                zx, zy, scale, *bias, axis_name=parallel.BATCH_AXES, **options
            )

        args = (zx, zy, scale) if bias is None else (zx, zy, scale, bias)
        specs = (rows, rows, P()) if bias is None else (rows, rows, P(), P())
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*args)

    return ring


def _batch_shards(mesh) -> int:
    return 1 if mesh is None else parallel.batch_axis_size(mesh)


def _contrastive(cfg: ml_collections.ConfigDict, model: nn.Module, mesh=None) -> Task:
    loss_cfg = cfg.loss
    # The loss sees the whole batch (grad_cache embeds micro-batches, then one loss), split over
    # data × fsdp; the dual encoder returns float32 embeddings of width embed_dim.
    shards = _batch_shards(mesh)
    implementation, reason = choose_contrastive_implementation(
        loss_cfg, cfg.batch_size // shards, cfg.model.embed_dim, "float32"
    )
    if shards > 1:
        reason += f"; device ring over data × fsdp = {shards}"
    loss_of = contrastive_loss_fn(loss_cfg, mesh, implementation=implementation)
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
        choices={"loss.implementation": implementation, "loss.implementation.reason": reason},
    )


def _lm(cfg: ml_collections.ConfigDict, model: nn.Module, mesh=None) -> Task:
    """Next-token cross-entropy. ``config.loss.implementation``: 'reference' forms the [B, L, V]
    logits; 'xla' / 'auto' use ``losses.linear_cross_entropy`` on the final hidden states and the
    output kernel (token chunks of ``config.loss.block_size``, 0 = its default), so the training
    step never holds the logits of the whole batch.

    The batch: 'tokens' int [B, L+1] (inputs tokens[:, :-1], labels tokens[:, 1:]); a padding
    token is -1 (the loss's ``ignore_index``): it counts in no loss and enters the model as id 0.
    Optional 'segment_ids' int [B, L+1] pack several sequences in a row: a token attends only to
    its own segment, positions restart at each segment, and the last token of a segment predicts
    nothing.
    ``config.model.backprop`` ('full', 'remat', 'streambp') changes how the model's gradient is
    formed, not this loss: with 'streambp' the blocks' backward runs in sequence chunks inside the
    model (``jaxbatch.nn.streambp``) and the head's in token chunks here.

    With the batch sharded over data × fsdp, the chunked loss runs inside ``jax.shard_map``: each
    device chunks its own token rows against the whole output kernel (gathered like any FSDP
    parameter) and the loss is Σ losses / Σ tokens over the devices, so the hidden states are
    never gathered across the mesh (contiguous chunks of the flattened global batch would cut
    across the devices' rows).

    Context parallelism (a mesh 'context' axis > 1, ``config.model.context_parallel``): the
    model's activations are split along the sequence and its attention exchanges K/V over
    'context'. With ``config.model.context_layout='zigzag'`` the inputs, labels, segment ids and
    the original positions are put in the zig-zag order once, here, after the next-token shift
    (``context_parallel.zigzag_shard_batch``); the loss is a mean over tokens, so it needs no
    un-permuting."""
    implementation = cfg.loss.implementation
    if implementation not in _LCE_IMPLEMENTATIONS:
        raise ValueError(
            f"config.loss.implementation={implementation!r} for task 'lm'; expected one of "
            f"{_LCE_IMPLEMENTATIONS}"
        )
    chunked = implementation != "reference"
    chunk_size = cfg.loss.block_size or None
    shards = _batch_shards(mesh)
    ignore_index = -1  # the label of padding; not a vocabulary id
    if not chunked:
        choice = "reference", "config.loss.implementation='reference': the [B, L, V] logits"
    else:
        # 'auto' resolved once, here, for the tokens one device's loss sees per micro-batch; an
        # explicit 'pallas' the kernels cannot run raises (ValueError) instead of falling back.
        tokens = cfg.batch_size // shards // cfg.micro_batches
        tokens *= cfg.dataset.options.get("seq_len", model.max_len)
        tokens //= 1 if mesh is None else cp.context_axis_size(mesh)  # the sequence's share
        implementation, reason = losses.choose_linear_cross_entropy_implementation(
            implementation, tokens, model.width, model.vocab_size, model.dtype
        )
        if shards > 1:
            reason += f"; each device's token rows (shard_map over data × fsdp = {shards})"
        choice = implementation, reason

    zigzag_layout = cfg.model.get("context_layout", "contiguous") == "zigzag"

    def model_inputs(batch):
        """(model args, labels [B, L]) of a batch, in the zig-zag order when the layout is and
        the trace's mesh splits the sequence (the mesh of the trace decides, so a loss traced
        inside the noise groups' vmap reorders alike)."""
        args, labels = _shifted_inputs(batch)
        context = cp.context_axis_size()
        if not (zigzag_layout and context > 1):
            return args, labels
        inputs, seg, positions = (*args, None, None)[:3]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
        fields = {"inputs": inputs, "labels": labels, "positions": positions}
        if seg is not None:
            fields["segment_ids"] = seg
        z = cp.zigzag_shard_batch(fields, context)
        return (z["inputs"], z.get("segment_ids"), z["positions"]), z["labels"]

    def _shifted_inputs(batch):
        tokens = batch["tokens"]
        inputs = jnp.where(tokens[:, :-1] == ignore_index, 0, tokens[:, :-1])
        labels = tokens[:, 1:]
        segment_ids = batch.get("segment_ids")
        if segment_ids is None:
            return (inputs,), labels
        if segment_ids.shape != tokens.shape:
            raise ValueError(
                f"batch['segment_ids'] has shape {segment_ids.shape}; expected the tokens' shape "
                f"{tokens.shape} [B, L+1]"
            )
        same = segment_ids[:, 1:] == segment_ids[:, :-1]
        labels = jnp.where(same, labels, ignore_index)
        seg = segment_ids[:, :-1]
        return (inputs, seg, segment_positions(seg)), labels

    def init_fn(rng, batch):
        return model.init(rng, _shifted_inputs(batch)[0][0])

    def token_losses(params_or_vars, batch):
        """(per-token losses [B, L], valid [B, L]) from the [B, L, V] logits."""
        args, labels = model_inputs(batch)
        logits = model.apply(params_or_vars, *args)
        valid = labels != ignore_index
        safe = jnp.where(valid, labels, 0)
        losses_ = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
        return jnp.where(valid, losses_, 0.0), valid

    def chunked_loss(h, w, labels, axis_name=None):
        return losses.linear_cross_entropy(
            h.reshape(-1, h.shape[-1]),
            w,
            labels.reshape(-1),
            chunk_size=chunk_size,
            ignore_index=ignore_index,
            implementation=implementation,
            axis_name=axis_name,
        )

    def mean_loss(variables, batch):
        if not chunked:
            per_token, valid = token_losses(variables, batch)
            return per_token.sum() / jnp.maximum(valid.sum(), 1)
        args, labels = model_inputs(batch)
        h = model.apply(variables, *args, method="hidden").astype(model.dtype)
        w = model.apply(variables, method="output_kernel").astype(model.dtype)
        # The trace's mesh: with the sequence split over 'context' each device's loss takes its
        # own tokens of its own rows (no gather of h across 'context' either).
        context = cp.context_axis_size() if mesh is not None else 1
        if shards == 1 and context == 1:
            return chunked_loss(h, w, labels)
        axes = parallel.BATCH_AXES + ((cp.CONTEXT_AXIS,) if context > 1 else ())
        rows = P(parallel.BATCH_AXES, cp.CONTEXT_AXIS if context > 1 else None)
        local = functools.partial(chunked_loss, axis_name=axes)
        return jax.shard_map(local, mesh=mesh, in_specs=(rows, P(), rows), out_specs=P())(
            h, w, labels
        )

    def loss_fn(params, model_state, batch, rng):
        del rng
        loss = mean_loss({"params": params, **model_state}, batch)
        return loss, ({}, model_state)

    def eval_fn(variables, batch):
        per_token, valid = token_losses(variables, batch)
        return {"loss": per_token.sum(axis=-1) / jnp.maximum(valid.sum(axis=-1), 1)}

    def summarize(out):
        loss = float(out["loss"].mean())
        return {"loss": loss, "bits_per_byte": loss / math.log(2)}

    return Task(
        "lm",
        model,
        ("tokens",),
        init_fn,
        loss_fn,
        eval_fn,
        summarize,
        "bits_per_byte",
        choices={"loss.implementation": choice[0], "loss.implementation.reason": choice[1]},
    )


_TASKS = {
    "classification": _classification,
    "contrastive": _contrastive,
    "lm": _lm,
    "mlm": mlm_task,
}


CONTEXT_PARALLEL_MODELS = ("decoder_lm", "bert_mlm")
"""Models whose attention can split the sequence over the mesh's 'context' axis."""


def check_context_parallel(cfg: ml_collections.ConfigDict, mesh) -> None:
    """Refuses, before anything is traced, a 'context' axis the model cannot use.

    A mesh 'context' axis > 1 needs a model of :data:`CONTEXT_PARALLEL_MODELS` with
    ``model.context_parallel`` set, a sequence length divisible by context (2 × context for the
    zig-zag layout), heads divisible by tensor (and, for Ulysses, the per-device heads by
    context), and a backprop mode other than 'streambp'.

    Raises:
      ValueError: naming the sizes or keys.
    """
    context = 1 if mesh is None else cp.context_axis_size(mesh)
    if context == 1:
        return
    name = cfg.model.get("name")
    if name not in CONTEXT_PARALLEL_MODELS:
        raise ValueError(
            f"mesh.context={context} splits the sequence, but model {name!r} (task "
            f"{cfg.task!r}) has no context-parallel attention; expected a model of "
            f"{CONTEXT_PARALLEL_MODELS} or mesh.context=1"
        )
    strategy = cfg.model.get("context_parallel", "none")
    layout = cfg.model.get("context_layout", "contiguous")
    cp.check_model_options(strategy, layout, where="config.model")
    if strategy == "none":
        raise ValueError(
            f"mesh.context={context} splits the sequence, but config.model.context_parallel="
            f"'none'; expected one of {cp.STRATEGIES}"
        )
    if cfg.model.get("backprop", "full") == "streambp":
        raise ValueError(
            f"config.model.backprop='streambp' does not compose with mesh.context={context}: "
            "its sequence chunks attend to a key prefix, not the sharded sequence; use 'full' "
            "or 'remat'"
        )
    seq_len = cfg.dataset.options.get("seq_len", cfg.model.get("max_len"))
    heads = cfg.model.get("heads")
    if seq_len is not None and heads is not None:
        cp.check_model_sizes(
            seq_len=int(seq_len), heads=int(heads), strategy=strategy, layout=layout,
            mesh_shape=dict(mesh.shape), where="config (dataset.options.seq_len, model.heads)",
        )  # fmt: skip


def make_task(cfg: ml_collections.ConfigDict, mesh=None) -> Task:
    """The task of a validated config (its model built from ``config.model``) on ``mesh``."""
    check_context_parallel(cfg, mesh)
    model = build_model(cfg.model.to_dict())
    return _TASKS[cfg.task](cfg, model, mesh)
