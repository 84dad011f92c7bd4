"""jaxbatch._validate: the argument checks of the whole package, strict and trace-tolerant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch import _validate


@pytest.mark.parametrize(
    "check, value, match",
    [
        (_validate.positive, 0, "x must be > 0, got 0"),
        (_validate.positive, -2.5, "x must be > 0, got -2.5"),
        (_validate.non_negative, -1e-3, "x must be >= 0, got -0.001"),
        (_validate.decay, 1.0, r"x must be in \[0, 1\), got 1.0"),
        (_validate.decay, True, "x must be a real number, got True"),
        (_validate.positive, "8", "x must be a real number, got '8' \\(str\\)"),
        (_validate.positive, None, "x must be a real number, got None"),
        (_validate.positive, float("inf"), "x must be finite, got inf"),
        (_validate.non_negative, float("nan"), "x must be finite, got nan"),
    ],
)
def test_strict_checks_name_the_value_and_the_expectation(check, value, match):
    with pytest.raises(ValueError, match=match):
        check("x", value)


def test_strict_checks_return_floats():
    assert _validate.positive("x", 3) == 3.0 and isinstance(_validate.positive("x", 3), float)
    assert _validate.decay("x", np.float32(0.5)) == 0.5
    assert _validate.kappa(256, 1024) == 4.0
    with pytest.raises(ValueError, match="base_batch must be > 0, got 0"):
        _validate.kappa(0, 1024)


@pytest.mark.parametrize(
    "check, value, match",
    [
        (_validate.check_positive, 0.0, "x must be > 0, got 0.0"),
        (_validate.check_non_negative, jnp.float32(-1.0), "x must be >= 0"),
        (_validate.check_decay, np.float64(1.0), r"x must be in \[0, 1\), got np.float64\(1.0\)"),
        (_validate.check_non_negative, float("nan"), "x must be >= 0, got nan"),
    ],
)
def test_trace_tolerant_checks_reject_concrete_values(check, value, match):
    with pytest.raises(ValueError, match=match):
        check("x", value)


def test_trace_tolerant_checks_skip_schedules_and_traced_values():
    _validate.check_positive("x", lambda step: -1.0)  # a schedule is not evaluated
    _validate.check_decay("x", jnp.ones(3))  # not a scalar: not checked here
    # Under jit the value is a tracer: the check must neither fail nor force it concrete.
    out = jax.jit(lambda v: (_validate.check_decay("x", v), v * 2)[1])(jnp.float32(5.0))
    assert float(out) == 10.0
    with pytest.raises(ValueError, match="x must be in"):
        jax.jit(lambda: _validate.check_decay("x", 5.0))()  # a Python constant is checked
