"""Converts an ImageFolder tree (``root/<class name>/<image files>``) into ArrayRecord shards.

This is the layout of ImageNet's ``train/`` directory and of ``val/`` after the usual
reorganisation into one folder per WordNet id. Each record is ``{'image': uint8 [n] (the file's
original encoded bytes, not re-encoded), 'label': int32 []}``; the class names go to
``{out_dir}/{name}-classes.json`` so that every split written there shares one label order.
Read the shards back with ``files.shard_paths`` and ``files.ArrayRecordExamples``, and decode
the images with :mod:`jaxbatch.data.images`.

Example (ImageNet; the trainer reads splits 'train' and 'test', so validation goes to 'test')::

  convert_image_folder('/data/imagenet/train', '/data/ai', name='imagenet2012', split='train',
                       num_shards=1024)
  convert_image_folder('/data/imagenet/val', '/data/ai', name='imagenet2012', split='test',
                       num_shards=64, classes=load_classes('/data/ai', 'imagenet2012'))
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from jaxbatch.data import files, images

# torchvision's ImageFolder extensions; matched case-insensitively.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


def _is_image(file_name: str) -> bool:
    return not file_name.startswith(".") and file_name.lower().endswith(IMAGE_EXTENSIONS)


def _class_images(class_dir: str) -> list[str]:
    """Image files under ``class_dir`` (sub-folders included), sorted by relative path."""
    found = []
    for dir_path, dir_names, file_names in os.walk(class_dir, followlinks=True):
        dir_names[:] = [d for d in dir_names if not d.startswith(".")]
        found.extend(os.path.join(dir_path, f) for f in file_names if _is_image(f))
    return sorted(found, key=lambda p: os.path.relpath(p, class_dir).split(os.sep))


def _check_classes(classes: Sequence[str]) -> list[str]:
    if isinstance(classes, str) or not all(isinstance(c, str) and c for c in classes):
        raise TypeError(f"classes must be a sequence of non-empty strings, got {classes!r}")
    classes = list(classes)
    if not classes:
        raise ValueError("classes is empty; expected at least one class name")
    duplicates = sorted(c for c, k in collections.Counter(classes).items() if k > 1)
    if duplicates:
        raise ValueError(f"classes must be unique, got duplicates {duplicates}")
    return classes


def list_image_folder(
    root: str | os.PathLike, *, classes: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray, list[str]]:
    """Lists the images of an ImageFolder tree with their labels.

    Class names default to the sorted sub-directory names, which for ImageNet are the sorted
    WordNet ids: the label order of TFDS's ``imagenet2012``. Files whose extension is not in
    :data:`IMAGE_EXTENSIONS`, and hidden files and folders, are ignored.

    Args:
      root: directory with one sub-directory per class.
      classes: the label order to use (e.g. the train split's for the validation split); every
        sub-directory must be one of them, though some may have no folder.

    Returns:
      (paths sorted by class then file name, int32 labels [n], class names).

    Raises:
      FileNotFoundError: ``root`` is not a directory.
      ValueError: no class folders, a class folder without images, or (with ``classes``) a folder
        not among ``classes``.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder root {root!r} is not a directory")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise ValueError(f"{root!r} has no class sub-directories; expected root/<class>/<images>")
    if classes is None:
        classes = folders
    else:
        classes = _check_classes(classes)
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise ValueError(
                f"class folders {unknown[:10]} in {root!r} are not among the {len(classes)} given "
                f"classes (first: {classes[:3]})"
            )
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for folder in sorted(folders, key=index.__getitem__):
        found = _class_images(os.path.join(root, folder))
        if not found:
            raise ValueError(
                f"class folder {os.path.join(root, folder)!r} holds no images with an extension "
                f"in {IMAGE_EXTENSIONS}"
            )
        paths.extend(found)
        labels.extend([index[folder]] * len(found))
    return paths, np.asarray(labels, np.int32), list(classes)


def image_folder_examples(
    paths: Sequence[str | os.PathLike],
    labels: Iterable[int] | np.ndarray,
    *,
    verify: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``{'image': uint8 [n] file bytes, 'label': int32 []}`` per file, one at a time.

    The bytes are the file's own (not re-encoded), so JPEG quality is kept and records stay small.
    With ``verify`` each file is decoded once and one that does not decode raises ``ValueError``
    naming it.
    """
    labels = np.asarray(labels)
    if labels.shape != (len(paths),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be integers [{len(paths)}] (one per path), got {labels.dtype} "
            f"{labels.shape}"
        )
    for path, label in zip(paths, labels, strict=True):
        yield {"image": images.read_image_file(path, verify=verify), "label": np.int32(label)}


def classes_path(data_dir: str | os.PathLike, name: str) -> str:
    """``{data_dir}/{name}-classes.json``: the JSON list of class names of dataset ``name``."""
    return os.path.join(os.fspath(data_dir), f"{name}-classes.json")


def load_classes(data_dir: str | os.PathLike, name: str) -> list[str]:
    """Reads the class names written by :func:`convert_image_folder` (label i = entry i)."""
    path = classes_path(data_dir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no class list {path!r}; write the train split with convert_image_folder first"
        )
    with open(path) as f:
        classes = json.load(f)
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path!r} must hold a JSON list of class names, got {classes!r:.200}")
    return classes


def convert_image_folder(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str,
    split: str,
    num_shards: int = 1,
    classes: Sequence[str] | None = None,
    verify: bool = True,
) -> dict:
    """Writes an ImageFolder tree as ArrayRecord shards ``{name}-{split}.array_record-*``.

    Examples are streamed (one file in memory at a time) and dealt round-robin to the shards.

    Args:
      root: ImageFolder root (``root/<class>/<images>``).
      out_dir: output directory (created if missing).
      name: dataset name in file names, e.g. 'imagenet2012'.
      split: split name, e.g. 'train' or 'test' (the trainer's held-out split).
      num_shards: number of ArrayRecord files.
      classes: label order (default: sorted folder names); see :func:`list_image_folder`.
      verify: decode every image first-hand and fail, naming the file, on one that does not.

    Returns:
      {'paths': shard paths, 'num_examples': int, 'classes': list of class names}.

    Raises:
      ValueError: an undecodable image (with ``verify``), or ``{name}-classes.json`` already in
        ``out_dir`` with different classes. Nothing is left behind on failure.
    """
    paths, labels, class_names = list_image_folder(root, classes=classes)
    json_path = classes_path(out_dir, name)
    if os.path.exists(json_path):
        existing = load_classes(out_dir, name)
        if existing != class_names:
            differ = sorted(set(existing) ^ set(class_names))[:10]
            raise ValueError(
                f"{json_path!r} lists {len(existing)} classes but {os.fspath(root)!r} gives "
                f"{len(class_names)} (differing names {differ or 'none: the order differs'}); "
                "pass classes=load_classes(out_dir, name) or use a fresh out_dir"
            )
    examples = image_folder_examples(paths, labels, verify=verify)
    shards, count = files.write_example_shards(  # removes its partial shards on failure
        examples, out_dir=out_dir, name=name, split=split, num_shards=num_shards
    )
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(class_names, f, indent=0)
    os.replace(tmp, json_path)
    return {"paths": shards, "num_examples": count, "classes": class_names}
