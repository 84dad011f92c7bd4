"""ImageNet (ILSVRC-2012) for ``configs/imagenet_resnet50_lars.py``: dataset 'imagenet2012'.

Two stored formats, both read with random access and decoded on the fly with Pillow:

- ``format='tfds'`` (default): a TFDS ``imagenet2012`` prepared in ArrayRecord format
  (``tfds build imagenet2012 --file_format=array_record``), read by ``tfds.data_source`` with the
  image left encoded; needs the optional ``tensorflow-datasets`` package. Held-out split: TFDS's
  'validation' (the 50,000 images on which results are reported).
- ``format='array_record'``: shards written by ``scripts/prepare_image_folder.py`` from a
  class-folder tree (``train/n01440764/*.JPEG``, and the validation images sorted into the same
  folders), named ``imagenet2012-{train,test}.array_record-*``; records ``{'image': uint8 JPEG
  bytes, 'label': int32}``. Labels follow the sorted WordNet ids, as TFDS's do.

Preprocessing (the ResNet-50 recipe of Goyal et al. 2017 and MLPerf): training takes an Inception
random-resized crop (Szegedy et al. 2015: area in [8 %, 100 %], aspect ratio in [3/4, 4/3])
resized to ``image_size`` and a random horizontal flip; evaluation takes the central crop of
0.875 of the shorter side (256 -> 224). Both normalise by the ImageNet channel mean and standard
deviation. Model inputs: ``image`` float32 [S, S, 3], ``label`` int32 [].
"""

from __future__ import annotations

import os

import numpy as np

from jaxbatch.data import files, images
from jaxbatch.data.split import DataSplit
from jaxbatch.data.tfds_source import tfds_data_source

NAME = "imagenet2012"
SPLITS = ("train", "test")
FORMATS = ("tfds", "array_record")
_TFDS_SPLITS = {"train": "train", "test": "validation"}


def _label(record) -> np.ndarray:
    return np.asarray(record["label"], np.int32).reshape(())


def imagenet_split(
    split: str,
    *,
    data_dir: str | os.PathLike,
    image_size: int = 224,
    format: str = "tfds",
    min_crop_area: float = 0.08,
) -> DataSplit:
    """One split of ImageNet as a :class:`DataSplit` of decoded, cropped, normalised images.

    Args:
      split: 'train' or 'test' (TFDS 'validation').
      data_dir: the TFDS data directory, or the directory holding the ArrayRecord shards.
      image_size: side S of the square model input.
      format: 'tfds' or 'array_record' (see the module docstring).
      min_crop_area: smallest fraction of the image a training crop covers (0.08 in the
        Inception recipe; big_vision's short ResNet schedules and small models often use more).

    Returns:
      a split of examples {'image': float32 [S, S, 3], 'label': int32 []}.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown {NAME} split {split!r}; expected one of {SPLITS}")
    if format not in FORMATS:
        raise ValueError(f"unknown {NAME} format {format!r}; expected one of {FORMATS}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if not 0.0 < min_crop_area <= 1.0:
        raise ValueError(f"min_crop_area must be in (0, 1], got {min_crop_area!r}")
    if format == "tfds":
        source = tfds_data_source(
            NAME, split=_TFDS_SPLITS[split], data_dir=data_dir, skip_decoding=("image",)
        )
    else:
        source = files.ArrayRecordExamples(files.shard_paths(data_dir, NAME, split))

    def evaluate(record) -> dict[str, np.ndarray]:
        pixels = images.center_crop(record["image"], image_size)
        return {"image": images.normalize(pixels), "label": _label(record)}

    def augment(record, rng: np.random.Generator) -> dict[str, np.ndarray]:
        pixels = images.random_resized_crop(
            record["image"], image_size, rng, area_range=(min_crop_area, 1.0)
        )
        return {"image": images.normalize(pixels), "label": _label(record)}

    return DataSplit(source, transform=evaluate, train_transform=augment)
