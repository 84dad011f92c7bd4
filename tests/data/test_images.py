"""jaxbatch.data.images: decoding, the Inception crop box, the crops, normalisation."""

import functools
import io
import math

import numpy as np
import pytest
from PIL import Image

from jaxbatch.data import images

_BILINEAR = Image.Resampling.BILINEAR


def _smooth_image(height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3]: gradients plus a slow wave; asymmetric left-right and top-bottom."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [
        x / width * 255,
        y / height * 255,
        (np.sin(x / 7.0) + np.cos(y / 5.0) + 2) / 4 * 255,
    ]
    return np.stack(channels, -1).round().astype(np.uint8)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _pil_resize(array: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((size, size), _BILINEAR))


# ---------------------------------------------------------------- encode / decode


def test_jpeg_round_trip_is_close_and_array_input_matches_bytes():
    x = _smooth_image(40, 56)
    encoded = images.encode_jpeg(x)
    assert encoded[:2] == b"\xff\xd8"  # JPEG SOI marker
    decoded = images.decode_image(encoded)
    assert decoded.mode == "RGB" and decoded.size == (56, 40)
    error = np.abs(np.asarray(decoded, np.int32) - x)
    assert error.mean() < 2.0 and error.max() <= 16
    from_array = images.decode_image(np.frombuffer(encoded, np.uint8))
    np.testing.assert_array_equal(np.asarray(from_array), np.asarray(decoded))


def test_png_round_trip_is_exact():
    x = _smooth_image(17, 23)
    np.testing.assert_array_equal(np.asarray(images.decode_image(_png(x))), x)


def test_grey_rgba_and_16_bit_are_converted_to_rgb():
    x = _smooth_image(9, 11)
    grey = images.decode_image(_png(x[..., 0]))
    np.testing.assert_array_equal(np.asarray(grey), np.repeat(x[..., :1], 3, axis=-1))
    rgba = np.concatenate([x, np.full((9, 11, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(np.asarray(images.decode_image(_png(rgba))), x)
    grey16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    expected = np.rint(grey16 / 257.0).astype(np.uint8)
    decoded16 = np.asarray(images.decode_image(_png(grey16)))
    np.testing.assert_array_equal(decoded16, np.repeat(expected[..., None], 3, axis=-1))


def test_cmyk_jpeg_is_converted_to_rgb():
    # With K = 0, CMYK -> RGB is R = 255 - C, G = 255 - M, B = 255 - Y.
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[..., :3] = (40, 120, 200)
    buffer = io.BytesIO()
    Image.fromarray(cmyk, mode="CMYK").save(buffer, format="JPEG", quality=95)
    rgb = np.asarray(images.decode_image(buffer.getvalue()), np.int32)
    assert rgb.shape == (16, 16, 3)
    assert np.abs(rgb - np.array([215, 135, 55])).max() <= 3


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", images.encode_jpeg(_smooth_image(32, 32))[:200]],
    ids=["empty", "text", "truncated_jpeg"],
)
def test_corrupt_bytes_raise_value_error_with_length_and_hex(data):
    with pytest.raises(ValueError, match="not a decodable image") as info:
        images.decode_image(data)
    assert f"{len(data)} bytes" in str(info.value)
    assert data[:16].hex() in str(info.value)


def test_decode_and_encode_reject_wrong_types():
    with pytest.raises(TypeError, match="bytes or a uint8"):
        images.decode_image([1, 2, 3])
    with pytest.raises(TypeError, match="uint8"):
        images.decode_image(np.zeros(4, np.int16))
    with pytest.raises(TypeError, match="uint8"):
        images.encode_jpeg(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        images.encode_jpeg(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="quality"):
        images.encode_jpeg(np.zeros((4, 4, 3), np.uint8), quality=0)


# ---------------------------------------------------------------- inception_crop_box


@pytest.mark.parametrize("width,height", [(64, 64), (640, 480), (400, 480), (33, 31)])
def test_crop_box_inside_image_with_area_and_ratio_in_range(width, height):
    # Image ratios lie in [3/4, 4/3], so even the fallback (whole image) satisfies the ranges.
    area_lo, area_hi, ratio_lo, ratio_hi = 0.08, 1.0, 3 / 4, 4 / 3
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, right, bottom = images.inception_crop_box(width, height, rng)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        w, h = right - left, bottom - top
        # w, h are sqrt(a r), sqrt(a / r) rounded, so each is within 1/2 of the exact value.
        assert (w + 0.5) * (h + 0.5) >= area_lo * width * height
        assert (w - 0.5) * (h - 0.5) <= area_hi * width * height
        assert (w + 0.5) / max(h - 0.5, 1e-9) >= ratio_lo
        assert (w - 0.5) / (h + 0.5) <= ratio_hi


def _ks_uniform(samples: np.ndarray, lo: float, hi: float) -> float:
    """Kolmogorov-Smirnov distance between the samples and U(lo, hi)."""
    x = np.sort((samples - lo) / (hi - lo))
    n = len(x)
    return float(max(np.max(np.arange(1, n + 1) / n - x), np.max(x - np.arange(n) / n)))


def test_crop_box_area_log_ratio_and_position_are_uniform():
    # a * r <= 0.7 * 4/3 < 1 on a square image: no attempt is ever rejected, so the accepted
    # area fraction is U(0.1, 0.7) and log(w / h) is U(log 3/4, log 4/3), up to rounding.
    n, side = 4000, 1000
    rng = np.random.default_rng(1)
    boxes = np.array(
        [images.inception_crop_box(side, side, rng, area_range=(0.1, 0.7)) for _ in range(n)]
    )
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = w * h / side**2
    log_ratio = np.log(w / h)
    critical = 1.63 / math.sqrt(n)  # 1% KS critical value
    assert abs(area.mean() - 0.4) < 4 * (0.6 / math.sqrt(12)) / math.sqrt(n)
    assert _ks_uniform(area, 0.1, 0.7) < critical + 0.005
    assert _ks_uniform(log_ratio, math.log(3 / 4), math.log(4 / 3)) < critical + 0.005
    for offset, extent in ((boxes[:, 0], w), (boxes[:, 1], h)):  # left, top: U{0..side-extent}
        position = offset / (side - extent)
        assert abs(position.mean() - 0.5) < 4 * (1 / math.sqrt(12)) / math.sqrt(n)
        assert position.min() >= 0 and position.max() <= 1


def test_crop_box_is_deterministic_given_the_seed():
    def boxes(seed):
        rng = np.random.default_rng(seed)
        return [images.inception_crop_box(300, 200, rng) for _ in range(20)]

    assert boxes(5) == boxes(5)
    assert boxes(5) != boxes(6)


def test_crop_box_falls_back_to_central_crop_with_clamped_ratio():
    rng = np.random.default_rng(0)
    # Ratio 1 needs h = sqrt(a) >= sqrt(0.08 * 10000) > 10: every attempt fails. The image ratio
    # 100 > 1, so the box is h = 10, w = round(10 * 1) = 10 at left (1000 - 10) // 2 = 495.
    wide = images.inception_crop_box(1000, 10, rng, aspect_ratio_range=(1, 1))
    assert wide == (495, 0, 505, 10)
    tall = images.inception_crop_box(10, 1000, rng, aspect_ratio_range=(1, 1))
    assert tall == (0, 495, 10, 505)
    # Ratio 0.01 < 2: w = 10, h = round(10 / 2) = 5, top = (1000 - 5) // 2 = 497.
    clamped = images.inception_crop_box(10, 1000, rng, aspect_ratio_range=(2, 3))
    assert clamped == (0, 497, 10, 502)
    # Image ratio 1.25 inside the range: the fallback is the whole image. (An accepted attempt
    # with area 2000 must have w <= 50 and h <= 40 and so is the whole image too.)
    for _ in range(20):
        whole = images.inception_crop_box(
            50, 40, rng, area_range=(1, 1), aspect_ratio_range=(0.5, 2), max_attempts=1
        )
        assert whole == (0, 0, 50, 40)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"area_range": (0.0, 1.0)}, "area_range"),
        ({"area_range": (0.5, 0.4)}, "area_range"),
        ({"area_range": (0.1, 1.5)}, "area_range"),
        ({"aspect_ratio_range": (0.0, 1.0)}, "aspect_ratio_range"),
        ({"aspect_ratio_range": (2.0, 1.0)}, "aspect_ratio_range"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"width": 0}, "width"),
        ({"height": 2.5}, "height"),
        ({"width": True}, "width"),
    ],
)
def test_crop_box_validates_arguments(kwargs, match):
    args = {"width": 10, "height": 10, "rng": np.random.default_rng(0)} | kwargs
    with pytest.raises(ValueError, match=match):
        images.inception_crop_box(**args)


def test_crop_box_needs_a_generator():
    with pytest.raises(TypeError, match="Generator"):
        images.inception_crop_box(10, 10, np.random.RandomState(0))


# ---------------------------------------------------------------- crops


def test_resize_is_pil_bilinear_of_the_whole_image():
    x = _smooth_image(30, 50)
    for size in (16, 64):
        out = images.resize(_png(x), size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, _pil_resize(x, size))


def test_random_resized_crop_of_the_whole_area_equals_resize():
    square, wide = _png(_smooth_image(48, 48)), _png(_smooth_image(40, 60))
    rng = np.random.default_rng(0)
    for _ in range(10):
        out = images.random_resized_crop(square, 32, rng, area_range=(1, 1), flip=False)
        np.testing.assert_array_equal(out, images.resize(square, 32))
        out = images.random_resized_crop(
            wide, 32, rng, area_range=(1, 1), aspect_ratio_range=(1.5, 1.5), flip=False
        )
        np.testing.assert_array_equal(out, images.resize(wide, 32))


def test_random_resized_crop_is_the_box_then_the_flip_from_the_same_rng():
    x = _smooth_image(50, 70)
    encoded = _png(x)
    for seed in range(8):
        out = images.random_resized_crop(encoded, 24, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        box = images.inception_crop_box(70, 50, rng)
        left, top, right, bottom = box
        expected = np.asarray(
            Image.fromarray(x).resize((24, 24), _BILINEAR, box=(left, top, right, bottom))
        )
        if rng.random() < 0.5:
            expected = expected[:, ::-1]
        np.testing.assert_array_equal(out, expected)
        again = images.random_resized_crop(encoded, 24, np.random.default_rng(seed))
        np.testing.assert_array_equal(again, out)


def test_random_resized_crop_flips_half_the_time():
    encoded = _png(_smooth_image(32, 32))
    plain = images.resize(encoded, 16)
    mirrored = plain[:, ::-1]
    assert not np.array_equal(plain, mirrored)
    rng = np.random.default_rng(3)
    n, flips = 400, 0
    for _ in range(n):
        out = images.random_resized_crop(encoded, 16, rng, area_range=(1, 1))
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
        if np.array_equal(out, mirrored):
            flips += 1
        else:
            np.testing.assert_array_equal(out, plain)
    assert abs(flips / n - 0.5) < 4 * 0.5 / math.sqrt(n)


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "224"])
def test_crops_validate_size(size):
    encoded = _png(_smooth_image(8, 8))
    for crop in (
        lambda: images.resize(encoded, size),
        lambda: images.center_crop(encoded, size),
        lambda: images.random_resized_crop(encoded, size, np.random.default_rng(0)),
    ):
        with pytest.raises(ValueError, match="size must be a positive integer"):
            crop()


def test_center_crop_box_by_hand():
    # side = round(0.875 * 200) = 175; left = (300 - 175) // 2 = 62; top = (200 - 175) // 2 = 12.
    assert images.center_crop_box(300, 200) == (62, 12, 237, 187)
    # 256 x 341 (shorter side 256): the central 224 x 224, as resize-to-256 + crop 224 takes.
    assert images.center_crop_box(341, 256) == (58, 16, 282, 240)
    with pytest.raises(ValueError, match="crop_fraction"):
        images.center_crop(_png(_smooth_image(8, 8)), 4, crop_fraction=1.5)


def test_center_crop_returns_the_central_pattern():
    x = np.zeros((200, 300, 3), np.uint8)
    x[...] = (0, 0, 255)  # outside the crop: blue
    quadrants = [(255, 0, 0), (0, 255, 0), (255, 255, 0), (255, 255, 255)]
    # The crop box of a 300 x 200 image is [62, 237) x [12, 187) (see the test above); its
    # centre is at column 149.5, row 99.5: split it into four quadrants at (150, 100).
    x[12:100, 62:150] = quadrants[0]
    x[12:100, 150:237] = quadrants[1]
    x[100:187, 62:150] = quadrants[2]
    x[100:187, 150:237] = quadrants[3]
    out = images.center_crop(_png(x), 64)
    assert out.shape == (64, 64, 3)
    border = 2  # bilinear taps reach one or two output pixels across each colour edge
    inner = slice(border, 32 - border), slice(32 + border, 64 - border)
    for (rows, cols), colour in zip(
        [(inner[0], inner[0]), (inner[0], inner[1]), (inner[1], inner[0]), (inner[1], inner[1])],
        quadrants,
        strict=True,
    ):
        np.testing.assert_array_equal(out[rows, cols], np.broadcast_to(colour, (28, 28, 3)))


def test_center_crop_equals_numpy_crop_then_pil_resize():
    x = _smooth_image(200, 300)
    out = images.center_crop(_png(x), 64).astype(np.int32)
    side = round(0.875 * min(200, 300))
    top, left = (200 - side) // 2, (300 - side) // 2
    expected = _pil_resize(np.ascontiguousarray(x[top : top + side, left : left + side]), 64)
    # One resize with a box samples just outside the box at the outermost pixels, which a crop
    # followed by a resize cannot: the two agree exactly inside and nearly on the edge.
    np.testing.assert_array_equal(out[1:-1, 1:-1], expected[1:-1, 1:-1])
    assert np.abs(out - expected).max() <= 8


@functools.cache
def _large_jpeg() -> bytes:
    return images.encode_jpeg(_smooth_image(960, 1280), quality=90)


def test_jpeg_draft_decodes_at_reduced_scale_with_the_box_mapped():
    encoded = _large_jpeg()
    # Whole image to 224: request (224, 224), 1280 // 224 = 5, 960 // 224 = 4 -> scale 4.
    image, _ = images._open(encoded)
    drafted, box = images._draft(image, (0, 0, 1280, 960), 224)
    assert drafted.size == (320, 240) and box == (0, 0, 320, 240)
    # Box 1000 x 800: request (287, 269), 1280 // 287 = 4, 960 // 269 = 3 -> scale 2.
    image, _ = images._open(encoded)
    drafted, box = images._draft(image, (100, 50, 1100, 850), 224)
    assert drafted.size == (640, 480) and box == (50, 25, 550, 425)
    # Box 300 x 300 < 2 * 224: no reduction.
    image, _ = images._open(encoded)
    drafted, box = images._draft(image, (0, 0, 300, 300), 224)
    assert drafted.size == (1280, 960) and box == (0, 0, 300, 300)


@pytest.mark.parametrize("box,size", [((0, 0, 1280, 960), 64), ((100, 50, 1100, 850), 224)])
def test_jpeg_draft_stays_close_to_full_decode(box, size):
    encoded = _large_jpeg()
    fast = images._crop_resize(encoded, size, lambda w, h: box).astype(np.int32)
    full = images._crop_resize(encoded, size, lambda w, h: box, draft=False).astype(np.int32)
    error = np.abs(fast - full)
    assert error.mean() < 1.5 and np.percentile(error, 99) <= 6


# ---------------------------------------------------------------- normalisation


def test_normalize_matches_numpy():
    x = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    mean = np.array([0.485, 0.456, 0.406]) * 255
    std = np.array([0.229, 0.224, 0.225]) * 255
    out = images.normalize(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, (x.astype(np.float64) - mean) / std, rtol=1e-5, atol=1e-5)
    custom = images.normalize(x.astype(np.float32), mean=(1, 2, 3), std=(2, 4, 8))
    np.testing.assert_allclose(custom, (x - np.array([1, 2, 3])) / np.array([2, 4, 8]), rtol=1e-6)


def test_normalize_validates():
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        images.normalize(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="positive"):
        images.normalize(np.zeros((4, 3)), std=(1, 0, 1))


def test_to_unit_range():
    x = np.arange(256, dtype=np.uint8)
    out = images.to_unit_range(x)
    assert out.dtype == np.float32 and out[0] == -1 and out[-1] == 1
    np.testing.assert_allclose(out, x / 127.5 - 1, atol=1e-6)
