"""The 'mlm' task and BertMLM: the weighted masked-LM loss against a NumPy transcription."""

import ast
import inspect

import jax
import numpy as np
import pytest
from flax import linen as nn

from jaxbatch.nn.bert import BertMLM
from jaxbatch.train import config as config_lib
from jaxbatch.train import tasks
from jaxbatch.train.tasks_mlm import MLM_FIELDS, masked_lm_loss


def _batch(rng, b=3, length=10, p=4, vocab=50):
    ids = rng.integers(1, vocab, size=(b, length)).astype(np.int32)
    ids[0, 7:] = 0  # padding
    return {
        "input_ids": ids,
        "masked_lm_positions": rng.integers(0, 7, size=(b, p)).astype(np.int32),
        "masked_lm_ids": rng.integers(1, vocab, size=(b, p)).astype(np.int32),
        "masked_lm_weights": np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.float32),
    }


def _numpy_loss(logits, ids, weights):
    """Σ w·CE / (Σ w + 1e-5), as in BERT's run_pretraining.py get_masked_lm_output."""
    logits = logits.astype(np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, ids[..., None], -1)[..., 0]
    return (ce * weights).sum() / (weights.sum() + 1e-5)


def test_mlm_task_loss_matches_numpy_on_bert_logits():
    cfg = config_lib.default_config()
    cfg.task = "mlm"
    cfg.model.update(
        name="bert_mlm",
        vocab_size=50,
        width=16,
        depth=2,
        heads=2,
        mlp_dim=32,
        max_len=16,
        dropout=0.0,
    )
    task = tasks.make_task(cfg)
    assert task.fields == MLM_FIELDS and isinstance(task.model, BertMLM)
    batch = _batch(np.random.default_rng(0))
    variables = nn.meta.unbox(task.init_fn(jax.random.PRNGKey(0), batch))
    params, state = tasks.split_variables(variables)
    loss, (metrics, _) = task.loss_fn(params, state, batch, jax.random.PRNGKey(1))
    logits = np.asarray(
        task.model.apply(variables, batch["input_ids"], batch["masked_lm_positions"])
    )
    assert logits.shape == (3, 4, 50)
    expected = _numpy_loss(logits, batch["masked_lm_ids"], batch["masked_lm_weights"])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    w = batch["masked_lm_weights"]
    hits = (logits.argmax(-1) == batch["masked_lm_ids"]) * w
    np.testing.assert_allclose(
        float(metrics["mlm_accuracy"]), hits.sum() / (w.sum() + 1e-5), rtol=1e-6
    )
    out = jax.tree.map(np.asarray, task.eval_fn(variables, batch))
    summary = task.summarize(out)
    np.testing.assert_allclose(summary["loss"], expected, rtol=1e-4)


def test_bert_logits_at_positions_do_not_depend_on_padding():
    model = BertMLM(
        vocab_size=40,
        width=16,
        depth=1,
        heads=2,
        mlp_dim=32,
        max_len=16,
        dropout=0.0,
        scan_layers=False,
    )
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 40, size=(2, 6)).astype(np.int32)
    positions = np.array([[0, 3], [5, 1]], np.int32)
    padded = np.concatenate([ids, np.zeros((2, 4), np.int32)], axis=1)
    variables = model.init(jax.random.PRNGKey(0), padded, positions)
    short = model.apply(variables, ids, positions)
    long = model.apply(variables, padded, positions)
    np.testing.assert_allclose(np.asarray(short), np.asarray(long), rtol=1e-5, atol=1e-5)


def test_masked_lm_loss_ignores_zero_weight_slots():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
    ids = rng.integers(0, 7, size=(2, 3)).astype(np.int32)
    weights = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    changed = logits.copy()
    changed[0, 1] += 100.0  # a slot with weight 0
    np.testing.assert_allclose(
        float(masked_lm_loss(logits, ids, weights)), _numpy_loss(logits, ids, weights), rtol=1e-5
    )
    assert float(masked_lm_loss(changed, ids, weights)) == pytest.approx(
        float(masked_lm_loss(logits, ids, weights)), rel=1e-6
    )


def _imported_modules(module) -> set[str]:
    """Every module a source file imports, at top level or inside functions."""
    tree = ast.parse(inspect.getsource(module))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_tasks_and_tasks_mlm_do_not_import_each_other_both_ways():
    """tasks.py registers the mlm task; tasks_mlm.py takes Task from task_base (no cycle)."""
    from jaxbatch.train import task_base, tasks_mlm

    assert "jaxbatch.train.tasks_mlm" in _imported_modules(tasks)
    assert not {"jaxbatch.train.tasks", "jaxbatch.train"} & {
        m for m in _imported_modules(tasks_mlm) if not m.startswith("jaxbatch.train.task_base")
    }
    assert tasks.Task is task_base.Task and tasks.split_variables is task_base.split_variables
