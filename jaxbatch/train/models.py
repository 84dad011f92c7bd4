"""Builds a ``jaxbatch.nn`` model from the free-form ``config.model`` section.

``config.model.name`` picks a constructor; every other key is one of its keyword arguments. A
dual encoder names its towers in the sub-sections ``x_encoder`` and ``y_encoder``, built the same
way. Keyword arguments are checked against the constructor's signature so that a typo fails before
any work, naming the key and the accepted ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxbatch import nn as jnn
from jaxbatch.nn.bert import BertMLM

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet_cifar": jnn.resnet_cifar,
    "resnet18": jnn.resnet18,
    "resnet50": jnn.resnet50,
    "vit": jnn.ViT,
    "text_encoder": jnn.TextEncoder,
    "ngram_bag": jnn.NgramBagEncoder,
    "subtoken_bag": jnn.SubtokenBagEncoder,
    "dual_encoder": jnn.DualEncoder,
    "decoder_lm": jnn.DecoderLM,
    "bert_mlm": BertMLM,
}
_TOWERS = ("x_encoder", "y_encoder")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _accepted(ctor: Callable[..., Any]) -> set[str] | None:
    if isinstance(ctor, type) and issubclass(ctor, nn.Module):
        return {f for f in ctor.__dataclass_fields__ if f not in ("parent", "name")}
    params = inspect.signature(ctor).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return {f for f in jnn.ResNet.__dataclass_fields__ if f not in ("parent", "name")} | {
            p.name for p in params if p.kind is not p.VAR_KEYWORD
        }
    return {p.name for p in params}


def build_model(spec: Mapping[str, Any], *, where: str = "config.model") -> nn.Module:
    """The linen module described by ``spec`` (a dict with 'name' and constructor kwargs)."""
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"{where}.name={name!r}; expected one of {sorted(MODELS)}")
    ctor = MODELS[name]
    if name == "dual_encoder":
        for tower in _TOWERS:
            if tower == "y_encoder" and kwargs.get("share_towers"):
                kwargs.setdefault(tower, None)
                continue
            if not isinstance(kwargs.get(tower), Mapping):
                raise ValueError(f"{where}.{tower} must be a model section with a 'name'")
            kwargs[tower] = build_model(kwargs[tower], where=f"{where}.{tower}")
    unknown = sorted(set(kwargs) - (_accepted(ctor) or set()))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in {where} for model {name!r}; "
            f"accepted: {sorted(_accepted(ctor) or ())}"
        )
    for key in ("dtype", "param_dtype"):
        if isinstance(kwargs.get(key), str):
            if kwargs[key] not in _DTYPES:
                raise ValueError(f"{where}.{key}={kwargs[key]!r}; expected one of {list(_DTYPES)}")
            kwargs[key] = _DTYPES[kwargs[key]]
    for key, value in kwargs.items():
        if isinstance(value, list):
            kwargs[key] = tuple(value)
    return ctor(**kwargs)
