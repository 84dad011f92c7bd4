"""Optax transforms for large-batch training.

- ``scale_by_trust_ratio``: layer-wise trust ratio with masks, clipping and per-layer ratios on
  stacked (scanned) leaves; the ratios are kept in the state for logging.
- ``lars``: LARS in the form of You, Gitman, Ginsburg 2017.
- ``lamb``: LAMB (You et al. 2019); equals ``optax.lamb`` when masks and clips are off.
- ``model_ema`` / ``model_ema_of_params`` / ``ema_decay``: model EMA with the batch-size scaling
  rule rho^(B / B_ref) (Busbridge et al. 2023).
- ``vrgd`` / ``accumulate_with_moments``: GSNR-scaled gradients (Jiang et al. 2023).
- ``agvm`` / ``accumulate_halves``: per-group learning-rate scales from two half-batch
  gradients (Xue et al. 2022).
- ``masks``: ``exclude_bias_and_norm`` and ``from_rules`` (big_vision-style regex rules).
"""

from jaxbatch.optim import masks
from jaxbatch.optim.accumulate import AccumulateState, GradNoiseStats, accumulate
from jaxbatch.optim.agvm import AGVMState, accumulate_halves, agvm, split_halves
from jaxbatch.optim.lamb import lamb
from jaxbatch.optim.lars import lars
from jaxbatch.optim.model_ema import ModelEmaState, ema_decay, model_ema, model_ema_of_params
from jaxbatch.optim.trust_ratio import TrustRatioState, scale_by_trust_ratio, trust_ratio
from jaxbatch.optim.vrgd import VRGDState, accumulate_with_moments, gsnr_multipliers, vrgd

__all__ = [
    "AccumulateState",
    "GradNoiseStats",
    "accumulate",
    "ModelEmaState",
    "TrustRatioState",
    "ema_decay",
    "lamb",
    "lars",
    "masks",
    "model_ema",
    "model_ema_of_params",
    "scale_by_trust_ratio",
    "trust_ratio",
    "VRGDState",
    "accumulate_with_moments",
    "gsnr_multipliers",
    "vrgd",
    "AGVMState",
    "accumulate_halves",
    "agvm",
    "split_halves",
]
