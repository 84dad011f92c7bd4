"""Test-wide set-up: 8 simulated CPU devices for every test.

XLA reads ``--xla_force_host_platform_device_count`` once, when the CPU backend starts, so it
must be set before anything imports jax. conftest.py is imported by pytest before any test module,
which makes this the one place to do it. Single-device tests are unaffected (jit places on device
0); multi-device tests build meshes over ``jax.devices()``.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def eight_devices():
    """The 8 simulated CPU devices; fails loudly if jax was started without them."""
    devices = jax.devices()
    if len(devices) != 8:
        raise RuntimeError(
            f"expected 8 simulated devices, got {len(devices)}: jax was imported before "
            "tests/conftest.py could set XLA_FLAGS"
        )
    return devices
