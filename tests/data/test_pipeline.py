"""grain pipelines: epochs, per-process sharding, exact resume, padded eval batches, errors."""

import json
import math

import numpy as np
import pytest

from jaxbatch.data import pipeline


def _data(n=103):
    # 'x' identifies the example; 'y' checks that all arrays are gathered with the same rows.
    return {"x": np.arange(n, dtype=np.int64), "y": np.arange(n, dtype=np.float32)[:, None] * 2}


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_each_epoch_is_a_new_permutation_without_the_remainder():
    data = _data(103)
    it = pipeline.make_train_iterator(data, batch_size=10, seed=3)
    epochs = [np.concatenate([b["x"] for b in _take(it, 10)]) for _ in range(3)]
    for batch in _take(it, 2):
        assert batch["x"].shape == (10,) and batch["y"].shape == (10, 1)
        np.testing.assert_array_equal(batch["y"][:, 0], 2 * batch["x"])
    for ids in epochs:
        assert len(set(ids.tolist())) == 100 and set(ids.tolist()) <= set(range(103))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])


def test_same_seed_same_order_other_seed_other_order():
    data = _data()
    first = [b["x"] for b in _take(pipeline.make_train_iterator(data, batch_size=8, seed=0), 5)]
    again = [b["x"] for b in _take(pipeline.make_train_iterator(data, batch_size=8, seed=0), 5)]
    other = [b["x"] for b in _take(pipeline.make_train_iterator(data, batch_size=8, seed=1), 5)]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_num_epochs_and_steps_per_epoch():
    data = _data(103)
    batches = list(pipeline.make_train_iterator(data, batch_size=10, seed=0, num_epochs=2))
    assert len(batches) == 2 * pipeline.steps_per_epoch(103, batch_size=10) == 20
    kept = list(
        pipeline.make_train_iterator(
            data, batch_size=10, seed=0, num_epochs=1, drop_remainder=False
        )
    )
    assert [b["x"].shape[0] for b in kept] == [10] * 10 + [3]
    assert len(kept) == pipeline.steps_per_epoch(103, batch_size=10, drop_remainder=False)
    assert sorted(np.concatenate([b["x"] for b in kept]).tolist()) == list(range(103))


@pytest.mark.parametrize("shard_count", [2, 4])
def test_union_over_processes_is_the_global_batch(shard_count):
    data = _data(103)
    per_process, steps = 4, 15  # 103 // 16 = 6 steps per epoch at 4 shards: crosses epochs
    global_it = pipeline.make_train_iterator(data, batch_size=per_process * shard_count, seed=7)
    shards = [
        pipeline.make_train_iterator(
            data, batch_size=per_process, seed=7, shard_index=p, shard_count=shard_count
        )
        for p in range(shard_count)
    ]
    for _ in range(steps):
        expected = next(global_it)
        parts = [next(s) for s in shards]
        for key in data:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])
        ids = np.concatenate([p["x"] for p in parts])
        assert len(set(ids.tolist())) == ids.size  # processes never share an example in a step


@pytest.mark.parametrize("consumed", [3, 12])  # 12 crosses the epoch boundary (10 steps/epoch)
def test_state_is_json_and_resumes_exactly(consumed):
    data = _data(103)
    it = pipeline.make_train_iterator(data, batch_size=10, seed=5)
    _take(it, consumed)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 9)
    fresh = pipeline.make_train_iterator(data, batch_size=10, seed=5)
    fresh.set_state(state)
    for got, want in zip(_take(fresh, 9), expected, strict=True):
        for key in data:
            np.testing.assert_array_equal(got[key], want[key])


def test_state_resumes_a_sharded_iterator():
    data = _data(103)
    kwargs = dict(batch_size=5, seed=2, shard_index=1, shard_count=2)
    it = pipeline.make_train_iterator(data, **kwargs)
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    expected = [b["x"] for b in _take(it, 6)]
    fresh = pipeline.make_train_iterator(data, **kwargs)
    fresh.set_state(state)
    np.testing.assert_array_equal([b["x"] for b in _take(fresh, 6)], expected)


def test_state_moves_between_process_counts():
    # Step s is the same global batch for any process count, so a 2-process state resumes a
    # 1-process run with the same global batch (and the reverse).
    data = _data(103)
    two = [
        pipeline.make_train_iterator(data, batch_size=5, seed=2, shard_index=p, shard_count=2)
        for p in range(2)
    ]
    for it in two:
        _take(it, 13)
    state = json.loads(json.dumps(two[0].get_state()))
    one = pipeline.make_train_iterator(data, batch_size=10, seed=2)
    one.set_state(state)
    for _ in range(4):
        np.testing.assert_array_equal(next(one)["x"], np.concatenate([next(it)["x"] for it in two]))


def test_transform_is_applied_per_example():
    data = _data(20)
    it = pipeline.make_train_iterator(
        data, batch_size=4, seed=0, transform=lambda e: {"x": e["x"], "x2": e["x"] ** 2}
    )
    batch = next(it)
    assert set(batch) == {"x", "x2"}
    np.testing.assert_array_equal(batch["x2"], batch["x"] ** 2)


@pytest.mark.parametrize("n, batch_size, shard_count", [(103, 10, 1), (103, 8, 3), (16, 4, 4)])
def test_eval_batches_cover_every_example_once(n, batch_size, shard_count):
    data = _data(n)
    per_process = [
        pipeline.make_eval_batches(
            data, batch_size=batch_size, shard_index=p, shard_count=shard_count
        )
        for p in range(shard_count)
    ]
    steps = math.ceil(n / (batch_size * shard_count))
    assert all(len(ds) == steps for ds in per_process)
    single = pipeline.make_eval_batches(data, batch_size=batch_size * shard_count)
    seen = []
    for s in range(steps):
        parts = [ds[s] for ds in per_process]
        for part in parts:
            assert part["x"].shape == (batch_size,) and part["mask"].dtype == bool
            assert np.all(part["x"][~part["mask"]] == 0) and np.all(part["y"][~part["mask"]] == 0)
            seen += part["x"][part["mask"]].tolist()
        for key in ("x", "y", "mask"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), single[s][key])
    assert seen == list(range(n))
    assert [b["x"].tolist() for b in per_process[0]] == [
        per_process[0][s]["x"].tolist() for s in range(steps)
    ]


def test_grain_source_input_matches_arrays():
    data = _data(30)
    rows = [{k: v[i] for k, v in data.items()} for i in range(30)]
    # A list of example dicts satisfies grain's RandomAccessDataSource protocol.
    from_list = pipeline.make_train_iterator(rows, batch_size=6, seed=4)
    from_arrays = pipeline.make_train_iterator(data, batch_size=6, seed=4)
    for a, b in zip(_take(from_list, 7), _take(from_arrays, 7), strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0, seed=0), "batch_size must be a positive integer"),
        (dict(batch_size=104, seed=0), "exceeds the dataset size 103"),
        (dict(batch_size=30, seed=0, shard_count=4), "30 \\* 4 = 120 exceeds"),
        (
            dict(batch_size=4, seed=0, shard_index=2, shard_count=2),
            "shard_index must be in \\[0, 2\\)",
        ),
        (dict(batch_size=4, seed=-1), "seed must be an integer"),
        (dict(batch_size=4, seed=0, num_epochs=0), "num_epochs must be None or a positive"),
        (dict(batch_size=4, seed=0, shard_count=2, drop_remainder=False), "drop_remainder=False"),
    ],
)
def test_train_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipeline.make_train_iterator(_data(103), **kwargs)


def test_data_errors():
    with pytest.raises(ValueError, match="share the leading"):
        pipeline.make_train_iterator({"a": np.zeros(3), "b": np.zeros(4)}, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="no examples"):
        pipeline.make_eval_batches({"a": np.zeros((0, 2))}, batch_size=1)
    with pytest.raises(TypeError, match="dict of arrays or a grain RandomAccessDataSource"):
        pipeline.make_train_iterator(42, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="already have a 'mask' key"):
        pipeline.make_eval_batches({"mask": np.ones(4)}, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        pipeline.make_eval_batches(_data(), batch_size=-2)


def _noise(example, rng):
    """An augmentation whose output reveals the RNG it was given: the example id and one draw."""
    return {"id": example["id"], "draw": rng.random(1)}


def _augmented(n=40, epochs=2, **kwargs):
    it = pipeline.make_train_iterator(
        {"id": np.arange(n)}, seed=3, random_transform=_noise, num_epochs=epochs, **kwargs
    )
    return list(it)


def _draws_by_epoch_and_id(batches, steps_per_epoch):
    out = {}
    for step, batch in enumerate(batches):
        for i, d in zip(batch["id"], batch["draw"][:, 0], strict=True):
            out[(step // steps_per_epoch, int(i))] = d
    return out


def test_augmentation_rng_does_not_depend_on_batch_size_or_process_count():
    """Example j of an epoch gets the same random crop however the epoch is cut or sharded."""
    reference = _draws_by_epoch_and_id(_augmented(batch_size=8), steps_per_epoch=5)
    assert len(reference) == 80
    assert len(set(reference.values())) == 80  # every (epoch, example) gets its own draw
    by_4 = _draws_by_epoch_and_id(_augmented(batch_size=4), steps_per_epoch=10)
    assert by_4 == reference
    shards = [_augmented(batch_size=4, shard_index=p, shard_count=2) for p in range(2)]
    merged = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*shards, strict=True)]
    assert _draws_by_epoch_and_id(merged, steps_per_epoch=5) == reference


def test_augmentation_differs_between_epochs_and_seeds_and_resumes():
    draws = _draws_by_epoch_and_id(_augmented(batch_size=8), steps_per_epoch=5)
    assert all(draws[(0, i)] != draws[(1, i)] for i in range(40))
    other_seed = pipeline.make_train_iterator(
        {"id": np.arange(40)}, batch_size=8, seed=4, random_transform=_noise
    )
    first = next(other_seed)
    assert not any(
        draws[(0, int(i))] == d for i, d in zip(first["id"], first["draw"][:, 0], strict=True)
    )

    it = pipeline.make_train_iterator(
        {"id": np.arange(40)}, batch_size=8, seed=3, random_transform=_noise
    )
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    resumed = pipeline.make_train_iterator(
        {"id": np.arange(40)}, batch_size=8, seed=3, random_transform=_noise
    )
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["id"], want["id"])
        np.testing.assert_array_equal(got["draw"], want["draw"])


def test_transform_and_random_transform_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        pipeline.make_train_iterator(
            {"id": np.arange(8)},
            batch_size=2,
            seed=0,
            transform=lambda e: e,
            random_transform=_noise,
        )


def test_transform_threads_do_not_change_the_batches():
    data = {"id": np.arange(40)}

    def tag(example):
        return {"id": example["id"], "twice": example["id"] * 2}

    for kwargs in ({"random_transform": _noise}, {"transform": tag}):
        one, four = (
            list(
                pipeline.make_train_iterator(
                    data, batch_size=8, seed=3, num_epochs=2, transform_threads=t, **kwargs
                )
            )
            for t in (1, 4)
        )
        assert len(one) == len(four) == 10
        for a, b in zip(one, four, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    serial, threaded = (
        list(pipeline.make_eval_batches(data, batch_size=7, transform=tag, transform_threads=t))
        for t in (1, 3)
    )
    for a, b in zip(serial, threaded, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="transform_threads must be a positive integer, got 0"):
        pipeline.make_train_iterator(data, batch_size=8, seed=0, transform=tag, transform_threads=0)
