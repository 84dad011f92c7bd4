"""Hyper-parameters as a function of batch size: pure Python functions, no JAX state.

Every rule takes the value tuned at a reference batch ``base_batch`` and returns the value for
``batch``; kappa = batch / base_batch throughout. Schedules count warmup and decay in samples so
the regime in epochs survives a change of batch size.
"""

from jaxbatch.scaling.adam import AdamHParams, adam_sde
from jaxbatch.scaling.ema import ema_decay
from jaxbatch.scaling.learning_rates import LEARNING_RATE_RULES, learning_rate, surge_lr
from jaxbatch.scaling.rescale import RESCALE_RULES, Change, rescale_hparams
from jaxbatch.scaling.schedules import (
    regime_adaptation,
    steps_for_samples,
    warmup_constant_in_samples,
    warmup_cosine_in_samples,
    warmup_linear_in_samples,
    warmup_rsqrt_in_samples,
)
from jaxbatch.scaling.weight_decay import adamw_timescale, weight_decay_for_timescale

__all__ = [
    "LEARNING_RATE_RULES",
    "RESCALE_RULES",
    "AdamHParams",
    "Change",
    "adam_sde",
    "adamw_timescale",
    "ema_decay",
    "learning_rate",
    "regime_adaptation",
    "rescale_hparams",
    "steps_for_samples",
    "surge_lr",
    "warmup_constant_in_samples",
    "warmup_cosine_in_samples",
    "warmup_linear_in_samples",
    "warmup_rsqrt_in_samples",
    "weight_decay_for_timescale",
]
