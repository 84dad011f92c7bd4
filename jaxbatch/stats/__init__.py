"""Gradient statistics: noise scale, critical-batch fits, GSNR.

``noise_scale_from_two_batches`` and the ``noise_scale_ema_*`` helpers are jit-able and take the
``GradNoiseStats`` that ``jaxbatch.optim.accumulate`` keeps in its state; ``fit_critical_batch``
is a host-side NumPy fit over finished runs.
``norm_test_batch_size``: the AdAdaGrad norm-test rule for the next batch size (host-side).
"""

from jaxbatch.stats.adaptive_batch import norm_test_batch_size
from jaxbatch.stats.critical_batch import CriticalBatchFit, fit_critical_batch
from jaxbatch.stats.gsnr import gsnr
from jaxbatch.stats.noise_scale import (
    NoiseScaleEMA,
    noise_scale_ema_debiased,
    noise_scale_ema_init,
    noise_scale_ema_update,
    noise_scale_from_two_batches,
)

__all__ = [
    "CriticalBatchFit",
    "NoiseScaleEMA",
    "fit_critical_batch",
    "gsnr",
    "noise_scale_ema_debiased",
    "noise_scale_ema_init",
    "noise_scale_ema_update",
    "noise_scale_from_two_batches",
    "norm_test_batch_size",
]
