"""Shapes of one training example of a config's dataset, known without reading the data.

The planner (``jaxbatch plan``) compiles a pod-scale train step on a laptop; it needs the shape and
dtype of every field the task reads, not the data. Each dataset a config may name has a function
here computing them from ``config.dataset.options`` (with the loader's defaults):

- bundled datasets (``jaxbatch.data``): 'digits', 'codesearch', 'stdlib_text';
- pod-scale datasets, read from record files by ``jaxbatch.data`` (the files are not needed to
  plan; their loaders produce exactly these shapes, which the tests check):
  'imagenet2012'      image float32 [S, S, 3] (decoded, cropped, normalised), label int32 [];
  'bert_pretraining'  the fields of ``jaxbatch.train.tasks_mlm`` ([L] ids, [P] predictions);
  'image_text'        image float32 [S, S, 3], text int32 [T] (``config.dataset.pair_fields``).
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
    size = o["image_size"]
    return {"image": _sds((size, size, 3), np.float32), "label": _sds((), np.int32)}


def _bert(o: Mapping[str, Any]) -> Shapes:
    length, preds = o["seq_len"], o["max_predictions"]
    return {
        "input_ids": _sds((length,), np.int32),
        "masked_lm_positions": _sds((preds,), np.int32),
        "masked_lm_ids": _sds((preds,), np.int32),
        "masked_lm_weights": _sds((preds,), np.float32),
    }


def _image_text(o: Mapping[str, Any]) -> Shapes:
    size, text_len = o["image_size"], o["text_len"]
    return {"image": _sds((size, size, 3), np.float32), "text": _sds((text_len,), np.int32)}


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
    fn = _BUNDLED.get(name) or _POD.get(name)
    if fn is None:
        raise ValueError(
            f"config.dataset.name={name!r} has no shape function for planning; expected one of "
            f"{SHAPE_DATASETS}"
        )
    accepted = jdata.dataset_options(name)
    full = {**accepted, **options}  # required options (data_dir) are not read by fn
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
