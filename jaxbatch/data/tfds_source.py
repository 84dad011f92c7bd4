"""Optional TFDS source for ImageNet-scale configs (needs ``tensorflow-datasets``; optional).

``tfds.data_source`` reads a prepared TFDS dataset (ArrayRecord format) with random access and
without TensorFlow; the result is a grain ``RandomAccessDataSource`` of example dicts that
``pipeline.make_train_iterator`` / ``make_eval_batches`` consume directly (decode and crop images
with their ``transform`` argument).
"""

from __future__ import annotations

import os
from typing import Any

_INSTALL_HINT = (
    "jaxbatch.data.tfds_data_source needs the optional package tensorflow-datasets: "
    "`pip install tensorflow-datasets` (and prepare the dataset in ArrayRecord format, e.g. "
    "`tfds build imagenet2012 --file_format=array_record`). The bundled datasets (digits, "
    "codesearch, stdlib_text) and .npz / ArrayRecord files do not need it."
)


def tfds_data_source(
    name: str,
    *,
    split: str,
    data_dir: str | os.PathLike | None = None,
    decoders: Any = None,
    skip_decoding: tuple[str, ...] = (),
    download: bool = False,
) -> Any:
    """A random-access TFDS data source, e.g. ``tfds_data_source('imagenet2012', split='train')``.

    Args:
      name: TFDS dataset name, optionally with config and version ('name/config:1.0.0').
      split: TFDS split string ('train', 'validation', 'train[:1%]', ...).
      data_dir: directory holding the prepared dataset (default: TFDS's).
      decoders: TFDS decoders, e.g. ``{'image': tfds.decode.SkipDecoding()}`` to decode later.
      skip_decoding: features to leave encoded (added to ``decoders`` as ``SkipDecoding``), e.g.
        ``('image',)`` to decode and crop with Pillow in the pipeline instead.
      download: let TFDS download and prepare the data (off by default: pod jobs should read
        data prepared once, not start a download on every host).

    Returns:
      the ``tfds.data_source(...)`` object: ``len()`` and ``[i]`` -> dict of NumPy arrays.

    Raises:
      ImportError: if ``tensorflow_datasets`` is not installed (the message says how to fix it).
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    if skip_decoding:
        decoders = {**(decoders or {}), **{f: tfds.decode.SkipDecoding() for f in skip_decoding}}
    return tfds.data_source(
        name, split=split, data_dir=data_dir, decoders=decoders, download=download
    )
