"""Image-text pairs for ``configs/siglip_pod.py``: dataset 'image_text'.

Stored as ArrayRecord shards ``image_text-{train,test}.array_record-*`` (written by
:func:`write_image_text_shards` or ``scripts/prepare_image_text.py`` from a manifest of image
paths and captions), one record per pair: ``{'image': uint8 encoded image bytes, 'text': uint8
UTF-8 caption bytes}``, or ``'tokens'`` int32 ids from any tokenizer run beforehand instead of
``'text'``.

Model inputs, as SigLIP's big_vision recipe (Zhai et al. 2023) prepares them: ``image`` float32
[S, S, 3], the whole image resized to S×S and scaled to [-1, 1]; ``text`` int32 [text_len]:
byte tokens of the caption (``jaxbatch.data.tokens``, pad 0) or the stored ids, truncated /
padded with 0 to ``text_len``. No random augmentation (SigLIP trains on plain resizes).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from jaxbatch.data import files, images, tokens
from jaxbatch.data.split import DataSplit

NAME = "image_text"
SPLITS = ("train", "test")


def _text_ids(record, text_len: int) -> np.ndarray:
    if "tokens" in record:
        ids = np.asarray(record["tokens"], np.int32).reshape(-1)[:text_len]
        return np.pad(ids, (0, text_len - ids.size))
    if "text" in record:
        return tokens.encode(np.asarray(record["text"], np.uint8).tobytes(), text_len)
    raise ValueError(f"image_text record has neither 'text' nor 'tokens'; keys {sorted(record)}")


def image_text_split(
    split: str, *, data_dir: str | os.PathLike, image_size: int = 224, text_len: int = 64
) -> DataSplit:
    """One split of image-text pairs: {'image': float32 [S, S, 3], 'text': int32 [text_len]}.

    Args:
      split: 'train' or 'test'.
      data_dir: directory of the ``image_text-{split}`` ArrayRecord shards.
      image_size: side S of the square image input.
      text_len: tokens per caption.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown {NAME} split {split!r}; expected one of {SPLITS}")
    for key, value in (("image_size", image_size), ("text_len", text_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    source = files.ArrayRecordExamples(files.shard_paths(data_dir, NAME, split))

    def prepare(record) -> dict[str, np.ndarray]:
        pixels = images.resize(record["image"], image_size)
        return {"image": images.to_unit_range(pixels), "text": _text_ids(record, text_len)}

    return DataSplit(source, transform=prepare)


Caption = str | Sequence[int] | np.ndarray


def image_text_examples(
    pairs: Iterable[tuple[str | os.PathLike, Caption]], *, verify: bool = True
) -> Iterator[dict[str, np.ndarray]]:
    """Records of (image path, caption) pairs: {'image': the file's bytes, 'text': UTF-8 caption
    bytes} for a ``str`` caption, {'image', 'tokens': int32 ids} for a pre-tokenised one.

    Args:
      pairs: image file paths with their captions (text, or token ids of any tokenizer).
      verify: decode every image once and raise ``ValueError`` naming a file that does not decode.
    """
    for path, caption in pairs:
        image = images.read_image_file(path, verify=verify)
        if isinstance(caption, str):
            if not caption:
                raise ValueError(f"caption of {os.fspath(path)!r} must be a non-empty str")
            yield {"image": image, "text": np.frombuffer(caption.encode("utf-8"), np.uint8)}
            continue
        ids = np.asarray(caption)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"caption of {os.fspath(path)!r} must be a non-empty str or 1-D integer token "
                f"ids, got {type(caption).__name__} of shape {ids.shape} and dtype {ids.dtype}"
            )
        if ids.min() < 0:
            raise ValueError(f"token ids of {os.fspath(path)!r} must be >= 0, got {ids.min()}")
        yield {"image": image, "tokens": ids.astype(np.int32)}


def write_image_text_shards(
    pairs: Iterable[tuple[str | os.PathLike, Caption]],
    out_dir: str | os.PathLike,
    *,
    split: str,
    num_shards: int = 1,
    verify: bool = True,
) -> tuple[list[str], int]:
    """Writes (image path, caption) pairs as the ``image_text-{split}`` shards in ``out_dir``.

    Returns:
      (shard paths, number of pairs written).
    """
    return files.write_example_shards(
        image_text_examples(pairs, verify=verify),
        out_dir=out_dir,
        name=NAME,
        split=split,
        num_shards=num_shards,
    )
