"""User data: .npz loading, ArrayRecord round trip, and both feeding the grain pipelines."""

import numpy as np
import pytest

from jaxbatch.data import files, pipeline


def _arrays(n=24):
    rng = np.random.default_rng(0)
    return {
        "image": rng.normal(size=(n, 4, 4, 3)).astype(np.float32),
        "label": rng.integers(0, 10, size=(n,)).astype(np.int32),
    }


def test_load_npz_round_trip(tmp_path):
    arrays = _arrays()
    np.savez(tmp_path / "train.npz", **arrays)
    loaded = files.load_npz(tmp_path / "train.npz")
    assert set(loaded) == {"image", "label"}
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value)
        assert loaded[key].dtype == value.dtype


def test_load_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .npz file"):
        files.load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "ragged.npz", a=np.zeros(3), b=np.zeros(4))
    with pytest.raises(ValueError, match="share the leading"):
        files.load_npz(tmp_path / "ragged.npz")
    np.savez(tmp_path / "objects.npz", a=np.array([{"k": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):  # numpy refuses: allow_pickle=False
        files.load_npz(tmp_path / "objects.npz")


def test_example_codec_round_trip():
    example = {"tokens": np.arange(5, dtype=np.int32), "label": np.int64(3), "name": np.str_("a")}
    decoded = files.decode_example(files.encode_example(example))
    assert set(decoded) == set(example)
    for key, value in example.items():
        np.testing.assert_array_equal(decoded[key], value)
        assert decoded[key].dtype == np.asarray(value).dtype
    with pytest.raises(TypeError, match="dtype object"):
        files.encode_example({"x": np.array([None], dtype=object)})


def test_array_record_round_trip_and_pipeline(tmp_path):
    arrays = _arrays(24)
    paths = [tmp_path / "part-0.arrayrecord", tmp_path / "part-1.arrayrecord"]
    files.write_array_record(paths[0], {k: v[:10] for k, v in arrays.items()})
    files.write_array_record(paths[1], {k: v[10:] for k, v in arrays.items()})
    source = files.ArrayRecordExamples(paths)
    assert len(source) == 24
    np.testing.assert_array_equal(source[13]["image"], arrays["image"][13])
    assert int(source[13]["label"]) == arrays["label"][13]

    from_records = pipeline.make_train_iterator(source, batch_size=5, seed=9)
    from_memory = pipeline.make_train_iterator(arrays, batch_size=5, seed=9)
    for _ in range(7):  # more than one epoch (4 steps per epoch)
        a, b = next(from_records), next(from_memory)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])

    evals = pipeline.make_eval_batches(source, batch_size=10)
    assert len(evals) == 3
    last = evals[2]
    assert last["mask"].tolist() == [True] * 4 + [False] * 6
    np.testing.assert_array_equal(last["image"][:4], arrays["image"][20:])


def test_array_record_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ArrayRecord files not found"):
        files.ArrayRecordExamples(tmp_path / "nothing.arrayrecord")
    with pytest.raises(ValueError, match="no examples"):
        files.write_array_record(tmp_path / "empty.arrayrecord", {"a": np.zeros((0,))})


def test_example_shards_round_trip_and_completeness(tmp_path):
    examples = [{"x": np.arange(3) + i, "label": np.int32(i)} for i in range(7)]
    paths, count = files.write_example_shards(
        examples, out_dir=tmp_path, name="toy", split="train", num_shards=3
    )
    assert count == 7 and [p.rsplit("/", 1)[1] for p in paths] == [
        f"toy-train.array_record-0000{i}-of-00003" for i in range(3)
    ]
    source = files.ArrayRecordExamples(files.shard_paths(tmp_path, "toy", "train"))
    got = sorted(int(e["label"]) for e in source)  # shard i holds examples i, i + 3, ...
    assert got == list(range(7))
    with pytest.raises(FileExistsError, match="another shard count"):
        files.write_example_shards(examples, out_dir=tmp_path, name="toy", split="train")
    (tmp_path / "toy-train.array_record-00001-of-00003").unlink()
    with pytest.raises(FileNotFoundError, match=r"shards \[1\] of 3 are missing"):
        files.shard_paths(tmp_path, "toy", "train")
    with pytest.raises(FileNotFoundError, match="toy-test.array_record"):
        files.shard_paths(tmp_path, "toy", "test")
    with pytest.raises(ValueError, match="no examples"):
        files.write_example_shards([], out_dir=tmp_path, name="toy", split="val")
    with pytest.raises(ValueError, match="plain identifier"):
        files.write_example_shards(examples, out_dir=tmp_path, name="a/b", split="train")


def test_a_failing_example_stream_leaves_no_partial_shards(tmp_path):
    def examples():
        for i in range(5):
            yield {"x": np.arange(3) + i}
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        files.write_example_shards(
            examples(), out_dir=tmp_path, name="toy", split="train", num_shards=2
        )
    assert not list(tmp_path.glob("toy-train.*"))
