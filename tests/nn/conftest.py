"""Fixtures for the jaxbatch.nn tests."""

import functools

import jax
import pytest

# XLA:CPU spends most of a small model's test time in backend optimisation (LLVM); level 0 cuts a
# tiny ResNet's train-step compile ~4x and changes nothing the tests compare.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="session")
def fast_jit():
    """``jax.jit`` with cheap XLA:CPU backend optimisation, for compiled checks of tiny models."""
    return functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
