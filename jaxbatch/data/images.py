"""Image decoding and the standard ImageNet / image-text crops, on the host with Pillow and NumPy.

Records store images as their original encoded file bytes (a uint8 1-D array); these functions
turn such bytes into fixed-size uint8 [size, size, 3] arrays:

* :func:`random_resized_crop`: the training crop of Szegedy et al. (2015) as used by Goyal et al.
  (2017) and torchvision's ``RandomResizedCrop``, with a random horizontal flip.
* :func:`center_crop`: the evaluation crop (shorter side to size/0.875, central size x size).
* :func:`resize`: the whole image squashed to size x size (big_vision's ``resize``, used by SigLIP).

Each decodes once and resizes once, with ``Image.resize(..., box=...)`` so the crop and the resize
are one bilinear resampling. For JPEG, decoding uses libjpeg's DCT-domain downscaling
(``Image.draft``) by a factor of 2, 4 or 8 whenever the crop box stays at least ``size`` pixels on
each side after it, which makes decoding large photographs several times faster. All randomness
comes from the ``np.random.Generator`` passed in, so one seed gives one crop.

References:
  Szegedy et al., 2015, "Going deeper with convolutions" (Sec. 6: crops of 8%-100% of the area,
  aspect ratio in [3/4, 4/3]).
  Goyal et al., 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour" (Sec. 5).
"""

from __future__ import annotations

import io
import math
import numbers
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

_BILINEAR = Image.Resampling.BILINEAR
Box = tuple[int, int, int, int]


def encode_jpeg(image: np.ndarray, *, quality: int = 95) -> bytes:
    """Encodes a uint8 image [H, W, 3] (RGB) or [H, W] (greyscale) as JPEG bytes.

    Args:
      image: uint8 array [H, W, 3] or [H, W].
      quality: JPEG quality, 1..100.

    Returns:
      The JPEG file as bytes.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise TypeError(f"encode_jpeg needs a uint8 numpy array, got {kind}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)) or 0 in image.shape:
        raise ValueError(f"encode_jpeg needs an image [H, W, 3] or [H, W], got shape {image.shape}")
    if isinstance(quality, bool) or not isinstance(quality, numbers.Integral):
        raise TypeError(f"quality must be an integer in 1..100, got {quality!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


def _as_bytes(encoded: bytes | np.ndarray) -> bytes:
    if isinstance(encoded, np.ndarray):
        if encoded.dtype != np.uint8 or encoded.ndim != 1:
            raise TypeError(
                "an encoded image array must be the file's bytes as uint8 [n], got "
                f"{encoded.dtype} {encoded.shape}"
            )
        return encoded.tobytes()
    if isinstance(encoded, bytes | bytearray | memoryview):
        return bytes(encoded)
    raise TypeError(f"encoded image must be bytes or a uint8 array, got {type(encoded).__name__}")


def _not_decodable(data: bytes, error: Exception) -> ValueError:
    return ValueError(
        f"bytes are not a decodable image ({len(data)} bytes, starting {data[:16].hex()!r}): "
        f"{type(error).__name__}: {error}"
    )


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _open(encoded: bytes | np.ndarray) -> tuple[Image.Image, bytes]:
    """Reads the header only (size, format); pixels are decoded later by :func:`_to_rgb`."""
    data = _as_bytes(encoded)
    try:
        return Image.open(io.BytesIO(data)), data
    except _DECODE_ERRORS as error:
        raise _not_decodable(data, error) from error


def _to_rgb(image: Image.Image, data: bytes) -> Image.Image:
    """Decodes the pixels and converts them to 8-bit RGB."""
    try:
        image.load()
    except _DECODE_ERRORS as error:
        raise _not_decodable(data, error) from error
    if image.mode == "RGB":
        return image
    if image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit greyscale (PNG/TIFF): Pillow's convert would clip at 255, so rescale 0..65535.
        grey = np.clip(np.rint(np.asarray(image, np.float64) / 257.0), 0, 255)
        image = Image.fromarray(grey.astype(np.uint8), mode="L")
    # Alpha is dropped, as torchvision's loader (convert('RGB')) and TF's decode_image do.
    return image.convert("RGB")


def read_image_file(path, *, verify: bool = True) -> np.ndarray:
    """An image file's own bytes as uint8 [n] (how records store them, not re-encoded).

    Args:
      path: the file.
      verify: decode it once and raise ``ValueError`` naming the file if it does not decode.
    """
    with open(path, "rb") as f:
        data = f.read()
    if verify:
        try:
            decode_image(data)
        except ValueError as error:
            raise ValueError(f"image file {os.fspath(path)!r} does not decode: {error}") from error
    return np.frombuffer(data, np.uint8)


def decode_image(encoded: bytes | np.ndarray) -> Image.Image:
    """Decodes an encoded image file (JPEG, PNG, ...) into an RGB PIL image.

    Args:
      encoded: the file's bytes, as ``bytes`` or a uint8 array [n] (how records store them).

    Returns:
      A decoded ``PIL.Image.Image`` in mode 'RGB'; greyscale, palette, CMYK and RGBA images are
      converted (alpha dropped, 16-bit greyscale scaled to 8 bits).

    Raises:
      ValueError: the bytes are empty, truncated or not an image format Pillow reads.
    """
    image, data = _open(encoded)
    return _to_rgb(image, data)


def _check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _check_range(value, what: str, *, upper: float | None) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be a pair (lo, hi) of numbers, got {value!r}") from error
    if not (0 < lo <= hi and math.isfinite(hi) and (upper is None or hi <= upper)):
        bound = f"0 < lo <= hi <= {upper}" if upper is not None else "0 < lo <= hi < inf"
        raise ValueError(f"{what} must satisfy {bound}, got {value!r}")
    return lo, hi


def inception_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    *,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    max_attempts: int = 10,
) -> Box:
    """Samples the "Inception" random crop box of an image of ``width`` x ``height`` pixels.

    Each attempt draws a target area a ~ U(area_range) * W * H and an aspect ratio r with
    log r ~ U(log aspect_ratio_range), and sets w = round(sqrt(a * r)), h = round(sqrt(a / r)).
    The first attempt with 0 < w <= W and 0 < h <= H is placed uniformly at random in the image.
    After ``max_attempts`` failures the box is central: the whole image if W / H lies in the ratio
    range, else the largest central box whose ratio is the nearest end of the range (as
    torchvision's ``RandomResizedCrop``).

    References:
      Szegedy et al., 2015, "Going deeper with convolutions", Sec. 6.
      Goyal et al., 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", Sec. 5.

    Args:
      width: image width W in pixels.
      height: image height H in pixels.
      rng: the only source of randomness; draws (area, log ratio) per attempt, then (top, left).
      area_range: (lo, hi) fraction of the image area, 0 < lo <= hi <= 1.
      aspect_ratio_range: (lo, hi) range of w / h, 0 < lo <= hi.
      max_attempts: attempts before the central fallback, >= 1.

    Returns:
      (left, top, right, bottom) in pixels, 0 <= left < right <= W, 0 <= top < bottom <= H.
    """
    width = _check_positive_int(width, "width")
    height = _check_positive_int(height, "height")
    max_attempts = _check_positive_int(max_attempts, "max_attempts")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    area_lo, area_hi = _check_range(area_range, "area_range", upper=1.0)
    ratio_lo, ratio_hi = _check_range(aspect_ratio_range, "aspect_ratio_range", upper=None)
    area = width * height
    log_lo, log_hi = math.log(ratio_lo), math.log(ratio_hi)
    for _ in range(max_attempts):
        target = area * rng.uniform(area_lo, area_hi)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    image_ratio = width / height
    if image_ratio < ratio_lo:
        w, h = width, min(height, max(1, round(width / ratio_lo)))
    elif image_ratio > ratio_hi:
        w, h = min(width, max(1, round(height * ratio_hi))), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _draft(image: Image.Image, box: Box, size: int) -> tuple[Image.Image, tuple[float, ...]]:
    """Lets libjpeg decode at 1/2, 1/4 or 1/8 scale if the box keeps >= size pixels per side.

    Returns the (lazy) image and the box in its coordinates; non-JPEG images pass through.
    """
    if image.format != "JPEG":
        return image, box
    width, height = image.size
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    # Pillow picks the largest s in {1, 2, 4, 8} with W // s >= request; W // s >= W * size / box_w
    # holds exactly when box_w / s >= size, so the box never shrinks below the output size.
    request = (math.ceil(width * size / box_w), math.ceil(height * size / box_h))
    drafted = image.draft("RGB", request)
    if drafted is None:
        return image, box
    scale = round(width / drafted[1][2])  # draft returns the box (0, 0, W / s, H / s)
    return image, tuple(c / scale for c in box)


def _crop_resize(
    encoded: bytes | np.ndarray,
    size: int,
    box_fn: Callable[[int, int], Box],
    *,
    draft: bool = True,
) -> np.ndarray:
    """Decodes, then resizes the region ``box_fn(W, H)`` to size x size in one bilinear pass."""
    size = _check_positive_int(size, "size")
    image, data = _open(encoded)
    box = box_fn(*image.size)
    image, scaled_box = _draft(image, box, size) if draft else (image, box)
    rgb = _to_rgb(image, data)
    return np.array(rgb.resize((size, size), _BILINEAR, box=scaled_box), dtype=np.uint8)


def random_resized_crop(
    encoded: bytes | np.ndarray,
    size: int,
    rng: np.random.Generator,
    *,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> np.ndarray:
    """The ImageNet training crop: an :func:`inception_crop_box` resized to size x size.

    References:
      Szegedy et al., 2015, "Going deeper with convolutions", Sec. 6.
      Goyal et al., 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", Sec. 5.

    Args:
      encoded: the image file's bytes (bytes or uint8 [n]).
      size: output side in pixels.
      rng: source of the box and of the flip (drawn after the box, only if ``flip``).
      area_range: fraction of the image area to crop, see :func:`inception_crop_box`.
      aspect_ratio_range: range of the crop's w / h.
      flip: mirror left-right with probability 1/2.

    Returns:
      uint8 [size, size, 3] RGB.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")

    def box_fn(width: int, height: int) -> Box:
        return inception_crop_box(
            width,
            height,
            rng,
            area_range=area_range,
            aspect_ratio_range=aspect_ratio_range,
        )

    out = _crop_resize(encoded, size, box_fn)
    if flip and rng.random() < 0.5:
        out = np.ascontiguousarray(out[:, ::-1])
    return out


def center_crop_box(width: int, height: int, *, crop_fraction: float = 0.875) -> Box:
    """The central square of side round(crop_fraction * min(W, H)), offset (W - side) // 2 etc."""
    crop_fraction = float(crop_fraction)
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
    side = max(1, round(crop_fraction * min(width, height)))
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def center_crop(
    encoded: bytes | np.ndarray, size: int, *, crop_fraction: float = 0.875
) -> np.ndarray:
    """The ImageNet evaluation crop: the central square of side crop_fraction * min(W, H).

    With the default 0.875 this equals resizing the shorter side to size / 0.875 (256 for 224) and
    taking the central size x size pixels, done here as one bilinear resize of the central box.

    Args:
      encoded: the image file's bytes (bytes or uint8 [n]).
      size: output side in pixels.
      crop_fraction: side of the central square relative to the shorter image side, in (0, 1].

    Returns:
      uint8 [size, size, 3] RGB.
    """
    crop_fraction = float(crop_fraction)
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
    return _crop_resize(
        encoded, size, lambda w, h: center_crop_box(w, h, crop_fraction=crop_fraction)
    )


def resize(encoded: bytes | np.ndarray, size: int) -> np.ndarray:
    """The whole image resized (aspect ratio not kept) to size x size, bilinearly.

    This is big_vision's ``decode|resize(224)`` used by SigLIP (Zhai et al., 2023, "Sigmoid Loss
    for Language Image Pre-Training").

    Returns:
      uint8 [size, size, 3] RGB.
    """
    return _crop_resize(encoded, size, lambda w, h: (0, 0, w, h))


def normalize(
    image: np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Per-channel standardisation (image - mean) / std over the last axis, as float32.

    Args:
      image: [..., C] array on the 0..255 scale (uint8 or float).
      mean: C channel means (default ImageNet RGB means times 255).
      std: C channel standard deviations, all > 0.

    Returns:
      float32 [..., C].
    """
    image = np.asarray(image)
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    if mean.ndim != 1 or mean.shape != std.shape:
        raise ValueError(f"mean and std must be 1-D of equal length, got {mean.shape}, {std.shape}")
    if image.ndim == 0 or image.shape[-1] != mean.shape[0]:
        raise ValueError(
            f"image must be [..., {mean.shape[0]}] to match mean/std, got shape {image.shape}"
        )
    if not np.all(std > 0):
        raise ValueError(f"std must be positive, got {std.tolist()}")
    return ((image.astype(np.float32) - mean) / std).astype(np.float32)


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """Maps 0..255 pixels to [-1, 1] as float32: x / 127.5 - 1 (big_vision's ``value_range``)."""
    return (np.asarray(image).astype(np.float32) / np.float32(127.5) - np.float32(1.0)).astype(
        np.float32
    )
