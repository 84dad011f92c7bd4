"""What every Pallas op of this package resolves the same way: which kernel family runs where.

``jax.default_backend()`` names map to a kernel family: 'tpu' (Mosaic TPU) or 'gpu' (Triton);
'cpu' has no compiled kernels and runs the TPU family in the Pallas interpreter (tests).
"""

from __future__ import annotations

import jax

# jax.default_backend() names -> kernel family; 'cpu' runs the TPU kernels in interpret mode.
BACKENDS = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "cpu": "tpu"}


def kernel_family(op: str, backend: str | None, interpret: bool | None) -> tuple[str, bool]:
    """(family, interpret) of ``op``'s kernels for ``backend`` (None: ``jax.default_backend()``).

    ``interpret`` None means True exactly when ``jax.default_backend()`` is 'cpu' (no accelerator
    to run compiled kernels on); pass False to lower for a TPU/GPU from a CPU host.

    Raises:
      NotImplementedError: a backend without kernels, or 'cpu' without interpret mode (so that a
        dispatcher falls back to XLA).
    """
    platform = jax.default_backend() if backend is None else backend
    if platform not in BACKENDS:
        raise NotImplementedError(
            f"no {op} Pallas kernel for backend {platform!r}; expected one of {sorted(BACKENDS)}"
        )
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if platform == "cpu" and not interpret:
        raise NotImplementedError(
            "on the 'cpu' backend the Pallas kernels only run with interpret=True"
        )
    return BACKENDS[platform], bool(interpret)
