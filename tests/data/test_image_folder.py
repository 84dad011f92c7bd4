"""jaxbatch.data.image_folder and scripts/prepare_image_folder.py on small trees in tmp_path."""

import functools
import importlib.util
import io
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from jaxbatch.data import files, image_folder, images

_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "prepare_image_folder.py"


@functools.cache
def _digits() -> np.ndarray:
    return load_digits().images


def _digit_image(index: int, fmt: str) -> bytes:
    """One sklearn digit, upscaled to 24 x 24 RGB, encoded as ``fmt``."""
    digit = _digits()[index]
    grey = np.kron(digit / 16 * 255, np.ones((3, 3))).round().astype(np.uint8)
    rgb = np.stack([grey, 255 - grey, np.full_like(grey, 9 * index % 256)], -1)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt)
    return buffer.getvalue()


# class -> file names (images) created in that order; the listing must sort both.
_TREE = {
    "n02": ["b.JPEG", "a.jpg"],
    "n01": ["c.png", "a.JPEG", "sub/z.jpeg"],
    "b_class": ["x.PNG"],
}


def _write_tree(root: pathlib.Path) -> dict[str, bytes]:
    """Writes _TREE plus non-image clutter; returns {relative path: file bytes}."""
    written = {}
    for i, (cls, names) in enumerate(_TREE.items()):
        for j, name in enumerate(names):
            path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            fmt = "PNG" if name.lower().endswith(".png") else "JPEG"
            data = _digit_image(3 * i + j, fmt)
            path.write_bytes(data)
            written[f"{cls}/{name}"] = data
        (root / cls / "README.txt").write_text("not an image")
        (root / cls / ".hidden.jpg").write_bytes(b"hidden files are ignored")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.jpg").write_bytes(b"hidden folders are ignored")
    (root / "labels.txt").write_text("a file at the root is not a class")
    return written


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "train"
    return root, _write_tree(root)


_EXPECTED_ORDER = [
    ("b_class/x.PNG", 0),
    ("n01/a.JPEG", 1),
    ("n01/c.png", 1),
    ("n01/sub/z.jpeg", 1),
    ("n02/a.jpg", 2),
    ("n02/b.JPEG", 2),
]


def test_list_image_folder_sorts_classes_and_files_and_ignores_clutter(tree):
    root, _ = tree
    paths, labels, classes = image_folder.list_image_folder(root)
    assert classes == ["b_class", "n01", "n02"]
    assert labels.dtype == np.int32
    relative = [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]
    assert list(zip(relative, labels.tolist(), strict=True)) == _EXPECTED_ORDER


def test_list_image_folder_with_given_classes_follows_their_order(tree):
    root, _ = tree
    given = ["n02", "extra_class_without_folder", "n01", "b_class"]
    paths, labels, classes = image_folder.list_image_folder(root, classes=given)
    assert classes == given
    relative = [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]
    assert relative == [
        "n02/a.jpg",
        "n02/b.JPEG",
        "n01/a.JPEG",
        "n01/c.png",
        "n01/sub/z.jpeg",
        "b_class/x.PNG",
    ]
    assert labels.tolist() == [0, 0, 2, 2, 2, 3]


def test_list_image_folder_errors(tree, tmp_path):
    root, _ = tree
    with pytest.raises(ValueError, match="b_class"):
        image_folder.list_image_folder(root, classes=["n01", "n02"])
    with pytest.raises(ValueError, match="duplicates"):
        image_folder.list_image_folder(root, classes=["n01", "n02", "n01", "b_class"])
    with pytest.raises(FileNotFoundError, match="missing"):
        image_folder.list_image_folder(tmp_path / "missing")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(_digit_image(0, "JPEG"))
    with pytest.raises(ValueError, match="no class sub-directories"):
        image_folder.list_image_folder(flat)
    (root / "n00_empty").mkdir()
    (root / "n00_empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="n00_empty"):
        image_folder.list_image_folder(root)


def test_image_folder_examples_are_the_original_bytes(tree):
    root, written = tree
    paths, labels, _ = image_folder.list_image_folder(root)
    examples = list(image_folder.image_folder_examples(paths, labels))
    assert len(examples) == len(_EXPECTED_ORDER)
    for example, (relative, label) in zip(examples, _EXPECTED_ORDER, strict=True):
        assert example["image"].dtype == np.uint8 and example["image"].ndim == 1
        assert example["image"].tobytes() == written[relative]
        assert example["label"].dtype == np.int32 and example["label"].shape == ()
        assert int(example["label"]) == label
    with pytest.raises(ValueError, match="one per path"):
        next(image_folder.image_folder_examples(paths, labels[:-1]))


def _read_split(out_dir, name, split) -> list[tuple[int, bytes]]:
    source = files.ArrayRecordExamples(files.shard_paths(out_dir, name, split))
    records = [source[i] for i in range(len(source))]
    return sorted((int(r["label"]), r["image"].tobytes()) for r in records)


def test_convert_round_trip_through_array_record(tree, tmp_path):
    root, written = tree
    out = tmp_path / "out"
    summary = image_folder.convert_image_folder(root, out, name="toy", split="train", num_shards=2)
    assert summary["num_examples"] == len(_EXPECTED_ORDER)
    assert summary["classes"] == ["b_class", "n01", "n02"]
    assert summary["paths"] == files.shard_paths(out, "toy", "train")
    expected = sorted((label, written[relative]) for relative, label in _EXPECTED_ORDER)
    assert _read_split(out, "toy", "train") == expected
    assert json.loads((out / "toy-classes.json").read_text()) == summary["classes"]
    assert image_folder.load_classes(out, "toy") == summary["classes"]
    # Example 0 (b_class/x.PNG) is record 0 of shard 0; it decodes to the file's pixels.
    record = files.ArrayRecordExamples(summary["paths"])[0]
    png = written["b_class/x.PNG"]
    assert record["image"].tobytes() == png
    with Image.open(io.BytesIO(png)) as reference:
        expected = np.asarray(reference.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(images.decode_image(record["image"])), expected)


def test_convert_validation_split_shares_the_train_classes(tree, tmp_path):
    root, written = tree
    out = tmp_path / "out"
    image_folder.convert_image_folder(root, out, name="toy", split="train")
    val = tmp_path / "val"
    (val / "n02").mkdir(parents=True)
    (val / "n02" / "v.jpg").write_bytes(written["n02/a.jpg"])
    # Without the train classes the val folder alone gives classes ['n02']: refused.
    with pytest.raises(ValueError, match="toy-classes.json"):
        image_folder.convert_image_folder(val, out, name="toy", split="test")
    assert not list(out.glob("toy-test.*"))
    classes = image_folder.load_classes(out, "toy")
    summary = image_folder.convert_image_folder(val, out, name="toy", split="test", classes=classes)
    assert summary["classes"] == ["b_class", "n01", "n02"]
    assert _read_split(out, "toy", "test") == [(2, written["n02/a.jpg"])]


def test_convert_verify_names_the_bad_file_and_leaves_nothing(tree, tmp_path):
    root, _ = tree
    (root / "n01" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="broken.jpg"):
        image_folder.convert_image_folder(root, out, name="toy", split="train", num_shards=3)
    assert not list(out.glob("toy-*"))
    summary = image_folder.convert_image_folder(
        root, out, name="toy", split="train", num_shards=3, verify=False
    )
    assert summary["num_examples"] == len(_EXPECTED_ORDER) + 1
    stored = {data for _, data in _read_split(out, "toy", "train")}
    assert b"\xff\xd8\xff\xe0 truncated" in stored


def test_load_classes_missing_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope-classes.json"):
        image_folder.load_classes(tmp_path, "nope")


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_image_folder", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_main_writes_train_then_test(tree, tmp_path, capsys):
    root, written = tree
    out = tmp_path / "out"
    script = _load_script()
    common = ["--out_dir", str(out), "--name", "toy"]
    summary = script.main(["--root", str(root), *common, "--split", "train", "--num_shards", "2"])
    line = capsys.readouterr().out.strip()
    assert line == f"toy/train: 6 examples, 3 classes, 2 shards in {out}"
    assert summary["num_examples"] == 6
    val = tmp_path / "val"
    (val / "n01").mkdir(parents=True)
    (val / "n01" / "v.png").write_bytes(written["n01/c.png"])
    script.main(["--root", str(val), *common, "--split", "test", "--classes_from_out_dir"])
    assert "toy/test: 1 examples, 3 classes, 1 shards" in capsys.readouterr().out
    assert _read_split(out, "toy", "test") == [(1, written["n01/c.png"])]
