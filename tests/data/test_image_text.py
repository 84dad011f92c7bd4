"""'image_text' pairs: records written from (image, caption) files, read back as model inputs."""

import numpy as np
import pytest

from jaxbatch.data import files, image_text, images, registry, tokens


def test_pairs_are_resized_images_in_unit_range_and_byte_tokens(image_text_dir):
    split = registry.load_split(
        "image_text", "test", data_dir=str(image_text_dir), image_size=16, text_len=24
    )
    assert len(split) == 360
    raw = files.ArrayRecordExamples(files.shard_paths(image_text_dir, "image_text", "test"))
    got = split.examples([3, 200])
    for row, index in enumerate([3, 200]):
        record = raw[index]
        np.testing.assert_array_equal(
            got["image"][row], images.to_unit_range(images.resize(record["image"], 16))
        )
        caption = record["text"].tobytes().decode()
        assert caption.endswith(", handwritten")
        np.testing.assert_array_equal(got["text"][row], tokens.encode(caption, 24))
        assert tokens.decode(got["text"][row]) == caption
    assert got["image"].min() >= -1.0 and got["image"].max() <= 1.0
    assert got["image"].dtype == np.float32 and got["text"].dtype == np.int32
    assert split.train_transform is None  # SigLIP trains on plain resizes


def test_pre_tokenised_captions_are_padded_and_truncated(tmp_path):
    jpeg = images.encode_jpeg(np.full((8, 12, 3), 200, np.uint8))
    records = [
        {"image": np.frombuffer(jpeg, np.uint8), "tokens": np.arange(1, n + 1, dtype=np.int32)}
        for n in (3, 9)
    ]
    files.write_example_shards(records, out_dir=tmp_path, name="image_text", split="train")
    got = image_text.image_text_split("train", data_dir=str(tmp_path), image_size=4, text_len=6)
    out = got.examples([0, 1])["text"]
    np.testing.assert_array_equal(out[0], [1, 2, 3, 0, 0, 0])
    np.testing.assert_array_equal(out[1], [1, 2, 3, 4, 5, 6])


def test_errors(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        image_text.write_image_text_shards([(bad, "a caption")], tmp_path, split="train")
    good = tmp_path / "good.jpg"
    good.write_bytes(images.encode_jpeg(np.zeros((4, 4, 3), np.uint8)))
    with pytest.raises(ValueError, match="non-empty str"):
        image_text.write_image_text_shards([(good, "")], tmp_path, split="train")
    with pytest.raises(ValueError, match="needs a data_dir"):
        registry.load_split("image_text", "train", data_dir="")
    with pytest.raises(ValueError, match="text_len must be a positive integer"):
        image_text.image_text_split("train", data_dir=str(tmp_path), text_len=0)


def _script():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[2] / "scripts" / "prepare_image_text.py"
    spec = importlib.util.spec_from_file_location("prepare_image_text", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_script_reads_text_and_token_manifests(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        pixels = np.full((6, 9, 3), 40 * i, np.uint8)
        (tmp_path / "img" / f"{i}.jpg").write_bytes(images.encode_jpeg(pixels))
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(
        '{"image": "img/0.jpg", "caption": "zero"}\n\n'
        '{"image": "img/1.jpg", "tokens": [5, 6, 7]}\n'
        f'{{"image": "{tmp_path}/img/2.jpg", "caption": "two"}}\n'
    )
    out = tmp_path / "records"
    summary = _script().main(
        ["--manifest", str(manifest), "--out_dir", str(out), "--split", "test"]
    )
    assert summary["num_examples"] == 3
    got = image_text.image_text_split("test", data_dir=str(out), image_size=4, text_len=4)
    text = got.examples([0, 1, 2])["text"]
    np.testing.assert_array_equal(text[0], tokens.encode("zero", 4))
    np.testing.assert_array_equal(text[1], [5, 6, 7, 0])
    np.testing.assert_array_equal(text[2], tokens.encode("two", 4))
    manifest.write_text('{"image": "img/0.jpg"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: expected"):
        _script().main(["--manifest", str(manifest), "--out_dir", str(out), "--split", "x"])
