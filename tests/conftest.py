"""Test-wide set-up: 8 simulated CPU devices for every test.

XLA reads ``--xla_force_host_platform_device_count`` once, when the CPU backend starts, so it
must be set before anything imports jax. conftest.py is imported by pytest before any test module,
which makes this the one place to do it. Single-device tests are unaffected (jit places on device
0); multi-device tests build meshes over ``jax.devices()``.

Compiled programs are kept in JAX's persistent compilation cache for the session and for the
processes tests start (they inherit the environment): many tests compile the same program more
than once (a run and its resumption, the same train step in a worker process), and XLA's CPU
compile is most of their time. An entry is keyed by the program's HLO, the compile options, the
backend and the jax version, so a hit is the executable a fresh compile would give.

The tests' programs are compiled with LLVM's cheap pipeline (``--xla_backend_optimization_level=0``,
``--xla_llvm_disable_expensive_passes``): XLA:CPU's compile is most of the suite's time and these
flags cut it by a third. They change how the CPU code is scheduled and vectorised, not the HLO,
its buffer assignment (so compiled memory analyses are the same) or IEEE semantics; benchmarks
under scripts/ run with XLA's defaults.
"""

import os
import tempfile

_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"jaxbatch-tests-xla-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def eight_devices():
    """The 8 simulated CPU devices; fails loudly if jax was started without them."""
    devices = jax.devices()
    if len(devices) != 8:
        raise RuntimeError(
            f"expected 8 simulated devices, got {len(devices)}: jax was imported before "
            "tests/conftest.py could set XLA_FLAGS"
        )
    return devices


def _digit_images(split: str):
    """Digits as RGB uint8 images 40 wide × 32 high (non-square, so crops matter), with labels."""
    import numpy as np

    from jaxbatch.data import digits

    arrays = digits.digits_arrays(split)
    grey = (arrays["image"][..., 0] * 255).astype(np.uint8)  # [n, 8, 8]
    big = np.repeat(np.repeat(grey, 4, axis=1), 5, axis=2)  # [n, 32, 40]
    tint = np.array([1.0, 0.8, 0.6])
    rgb = (big[..., None] * tint).astype(np.uint8)
    return rgb, arrays["label"]


@pytest.fixture(scope="session")
def imagenet_like_dir(tmp_path_factory):
    """sklearn digits written as JPEG class folders and converted to 'imagenet2012' shards.

    Returns the ArrayRecord directory (train: 1,437 images in 3 shards, test: 360 in 1), with the
    class folders under ``folders/`` beside it.
    """
    from jaxbatch.data import image_folder, images

    root = tmp_path_factory.mktemp("imagenet_like")
    out = root / "records"
    for split, shards in (("train", 3), ("test", 1)):
        pixels, labels = _digit_images(split)
        for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
            folder = root / "folders" / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}_{i:05d}.JPEG").write_bytes(images.encode_jpeg(image))
        image_folder.convert_image_folder(
            root / "folders" / split,
            out,
            name="imagenet2012",
            split=split,
            num_shards=shards,
            classes=None if split == "train" else image_folder.load_classes(out, "imagenet2012"),
        )
    return out


@pytest.fixture(scope="session")
def image_text_dir(tmp_path_factory):
    """Digit images with captions naming the digit ('seven, handwritten', ...) as 'image_text'
    shards; returns the directory. The digit comes first, so captions differ in their first
    bytes (the runlocal config keeps 8 tokens)."""
    from jaxbatch.data import image_text, images

    words = "zero one two three four five six seven eight nine".split()
    root = tmp_path_factory.mktemp("image_text")
    for split in ("train", "test"):
        pixels, labels = _digit_images(split)
        pairs = []
        for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
            path = root / "images" / f"{split}_{i:05d}.jpg"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(images.encode_jpeg(image))
            pairs.append((path, f"{words[label]}, handwritten"))
        image_text.write_image_text_shards(pairs, root / "records", split=split, num_shards=2)
    return root / "records"


@pytest.fixture(scope="session")
def bert_pretraining_dir(tmp_path_factory):
    """Pre-masked 'bert_pretraining' shards (seq_len 32, 5 predictions, byte tokens + SEP/MASK,
    vocabulary 260) from standard-library sources: 40 files for train, the next 8 for test."""
    from jaxbatch.data import masked_lm, stdlib_files, tokens

    out = tmp_path_factory.mktemp("bert_pretraining")
    sources = stdlib_files.list_stdlib_files()
    docs = [tokens.encode_bytes(f.path.read_bytes()[:4000]) for f in sources[:48]]
    for split, part in (("train", docs[:40]), ("test", docs[40:])):
        masked_lm.write_masked_lm_shards(
            part,
            out,
            split=split,
            num_shards=2,
            seq_len=32,
            max_predictions=5,
            vocab_size=masked_lm.BYTE_VOCAB_SIZE,
            special=masked_lm.byte_special_tokens(),
            seed=0,
        )
    return out
