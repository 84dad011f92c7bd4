"""Fixtures shared by the optimizer tests (test modules cannot import each other under
``--import-mode=importlib``)."""

import jax
import optax
import pytest


def _run_optimizer(tx, params, grads_seq, *, jit=True, state=None):
    """Applies ``tx`` to each gradient of ``grads_seq`` in turn, starting from ``params``.

    ``state`` is the initial optimizer state; None: ``tx.init(params)``.

    Returns:
      ``(updates, state)``: the list of per-step updates and the state after the last step.
    """
    state = tx.init(params) if state is None else state
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for g in grads_seq:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        outs.append(u)
    return outs, state


@pytest.fixture
def run_optimizer():
    """``run_optimizer(tx, params, grads_seq, *, jit=True, state=None) -> (updates, state)``."""
    return _run_optimizer
