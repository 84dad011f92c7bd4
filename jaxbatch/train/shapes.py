"""Shapes of one training example of a config's dataset, known without reading the data.

The planner (``jaxbatch plan``) compiles a pod-scale train step on a laptop; it needs the shape and
dtype of every field the task reads, not the data. Each dataset a config may name has a function
here computing them from ``config.dataset.options`` (with the loader's defaults):

- bundled datasets (``jaxbatch.data``): 'digits', 'codesearch', 'stdlib_text';
- pod-scale datasets, named by the pod configs and described by the example format a loader must
  produce (not loadable by ``jaxbatch.data`` yet, see BUILD.md "Scale-out"):
  'imagenet2012'      image float32 [S, S, 3] (decoded, cropped, normalised), label int32 [];
  'bert_pretraining'  the fields of ``jaxbatch.train.tasks_mlm`` ([L] ids, [P] predictions);
  'image_text'        image-text pairs for the 'contrastive' task: x = image under 'doc',
                      y = text tokens under 'code' (the field names that task reads).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxbatch import data as jdata

Shapes = dict[str, jax.ShapeDtypeStruct]


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), np.dtype(dtype))


def _digits(o: Mapping[str, Any]) -> Shapes:
    del o
    return {"image": _sds((8, 8, 1), np.float32), "label": _sds((), np.int32)}


def _codesearch(o: Mapping[str, Any]) -> Shapes:
    return {"doc": _sds((o["doc_len"],), np.int32), "code": _sds((o["code_len"],), np.int32)}


def _stdlib_text(o: Mapping[str, Any]) -> Shapes:
    return {"tokens": _sds((o["seq_len"] + 1,), np.int32)}


def _imagenet(o: Mapping[str, Any]) -> Shapes:
    size = o.get("image_size", 224)
    return {"image": _sds((size, size, 3), np.float32), "label": _sds((), np.int32)}


def _bert(o: Mapping[str, Any]) -> Shapes:
    length, preds = o.get("seq_len", 128), o.get("max_predictions", 20)
    return {
        "input_ids": _sds((length,), np.int32),
        "masked_lm_positions": _sds((preds,), np.int32),
        "masked_lm_ids": _sds((preds,), np.int32),
        "masked_lm_weights": _sds((preds,), np.float32),
    }


def _image_text(o: Mapping[str, Any]) -> Shapes:
    size, text_len = o.get("image_size", 224), o.get("text_len", 64)
    return {"doc": _sds((size, size, 3), np.float32), "code": _sds((text_len,), np.int32)}


_BUNDLED: dict[str, Callable[[Mapping[str, Any]], Shapes]] = {
    "digits": _digits,
    "codesearch": _codesearch,
    "stdlib_text": _stdlib_text,
}
_POD: dict[str, Callable[[Mapping[str, Any]], Shapes]] = {
    "imagenet2012": _imagenet,
    "bert_pretraining": _bert,
    "image_text": _image_text,
}
POD_DATASET_OPTIONS: dict[str, tuple[str, ...]] = {
    "imagenet2012": ("image_size", "data_dir"),
    "bert_pretraining": ("seq_len", "max_predictions", "data_dir"),
    "image_text": ("image_size", "text_len", "data_dir"),
}
"""Options each pod-scale dataset accepts in ``config.dataset.options``."""

SHAPE_DATASETS: tuple[str, ...] = (*_BUNDLED, *_POD)


def example_shapes(cfg: ml_collections.ConfigDict) -> Shapes:
    """Per-example ``ShapeDtypeStruct`` of every field of ``cfg.dataset`` (no batch dimension).

    Args:
      cfg: a training config; ``cfg.dataset.name`` must be one of ``SHAPE_DATASETS``.

    Returns:
      {field: ShapeDtypeStruct(shape, dtype)}.

    Raises:
      ValueError: a dataset without a shape function, or an option it does not accept.
    """
    name = cfg.dataset.name
    options = dict(cfg.dataset.options.to_dict()) if cfg.dataset.options else {}
    if name in _BUNDLED:
        accepted = jdata.dataset_options(name)
        full = {**accepted, **options}
        fn = _BUNDLED[name]
    elif name in _POD:
        accepted = POD_DATASET_OPTIONS[name]
        full = options
        fn = _POD[name]
    else:
        raise ValueError(
            f"config.dataset.name={name!r} has no shape function for planning; expected one of "
            f"{SHAPE_DATASETS}"
        )
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} in config.dataset.options for {name!r}; accepted: "
            f"{sorted(accepted)}"
        )
    return fn(full)


def zero_examples(shapes: Mapping[str, jax.ShapeDtypeStruct], rows: int = 2) -> dict:
    """NumPy zeros [rows, *shape] per field: enough for ``loop.build`` to trace the model's init."""
    return {k: np.zeros((rows, *s.shape), s.dtype) for k, s in shapes.items()}
