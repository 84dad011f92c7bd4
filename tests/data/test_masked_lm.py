"""masked_lm: packing and masking against their definitions, shards, the CLI, and the BERT task."""

import importlib.util
import itertools
import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn

from jaxbatch.data import files, masked_lm, tokens
from jaxbatch.data.masked_lm import SpecialTokens

_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "prepare_bert_data.py"
SPECIAL = SpecialTokens(pad=0, cls=1, sep=2, mask=3)
VOCAB = 40
MLM_KEYS = {"input_ids", "masked_lm_positions", "masked_lm_ids", "masked_lm_weights"}


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_bert_data", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _docs(rng, n=12, max_len=40, vocab=VOCAB, special=SPECIAL):
    """Random documents of ordinary ids (lengths 0..max_len, one empty document included)."""
    ordinary = np.setdiff1d(np.arange(vocab), special.ids)
    docs = [rng.choice(ordinary, size=rng.integers(1, max_len + 1)) for _ in range(n)]
    docs.insert(3, np.zeros((0,), np.int64))
    return docs


def _kw(**overrides):
    kw = dict(seq_len=16, max_predictions=4, vocab_size=VOCAB, special=SPECIAL, seed=7)
    return {**kw, **overrides}


# ---------------------------------------------------------------- special tokens


def test_presets():
    assert masked_lm.BERT_UNCASED.ids == (0, 101, 102, 103)
    byte = masked_lm.byte_special_tokens()
    assert byte.ids == (tokens.PAD, tokens.CLS, 258, 259)
    assert masked_lm.BYTE_VOCAB_SIZE == 260 == max(byte.ids) + 1
    assert not set(byte.ids) & set(range(1, 257))  # bytes keep their ids


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(cls=1, sep=1, mask=3), ValueError, "distinct"),
        (dict(cls=-1, sep=2, mask=3), ValueError, "SpecialTokens.cls must be >= 0, got -1"),
        (dict(cls=1, sep=2.0, mask=3), TypeError, "SpecialTokens.sep must be an int, got 2.0"),
        (dict(pad=True, cls=1, sep=2, mask=3), TypeError, "SpecialTokens.pad must be an int"),
    ],
)
def test_special_tokens_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        SpecialTokens(**kwargs)


# ---------------------------------------------------------------- packing


def _body_tokens(row, special):
    return row[~np.isin(row, special.ids)]


@pytest.mark.parametrize("seq_len", [3, 4, 7, 16])
def test_pack_preserves_tokens_and_row_structure(seq_len):
    docs = _docs(np.random.default_rng(seq_len))
    rows = list(masked_lm.pack_sequences(docs, seq_len=seq_len, special=SPECIAL))
    assert all(r.dtype == np.int32 and r.shape == (seq_len,) for r in rows)
    # Every document token, in order, exactly once.
    np.testing.assert_array_equal(
        np.concatenate([_body_tokens(r, SPECIAL) for r in rows]), np.concatenate(docs)
    )
    for i, row in enumerate(rows):
        n = int(np.sum(row != SPECIAL.pad))
        assert np.all(row[n:] == SPECIAL.pad) and np.all(row[:n] != SPECIAL.pad)  # pad at end
        assert row[0] == SPECIAL.cls and row[n - 1] == SPECIAL.sep and n >= 3
        assert SPECIAL.cls not in row[1:] and SPECIAL.mask not in row
        inner = row[1 : n - 1]
        assert inner[0] != SPECIAL.sep and inner[-1] != SPECIAL.sep  # no empty segment
        assert not np.any((inner[1:] == SPECIAL.sep) & (inner[:-1] == SPECIAL.sep))
        if i < len(rows) - 1:
            assert n >= seq_len - 1  # only the last row may be shorter than that


@pytest.mark.parametrize("seq_len", [3, 5, 8, 13])
def test_pack_separators_sit_exactly_at_document_boundaries(seq_len):
    """Document i is made of the id 4 + i only, so every token names its document."""
    lengths = np.random.default_rng(seq_len).integers(1, 12, size=15)
    docs = [np.full((k,), 4 + i) for i, k in enumerate(lengths)]
    rows = list(masked_lm.pack_sequences(docs, seq_len=seq_len, special=SPECIAL))
    previous_doc = None
    for row in rows:
        n = int(np.sum(row != SPECIAL.pad))
        segments = np.split(row[1 : n - 1], np.flatnonzero(row[1 : n - 1] == SPECIAL.sep))
        segments = [seg[seg != SPECIAL.sep] for seg in segments]
        owners = []
        for seg in segments:
            assert seg.size and np.all(seg == seg[0])  # one document per segment
            owners.append(int(seg[0]) - 4)
        # Segments of a row are consecutive documents; a row continues the previous document
        # (cut mid-document) or starts the next one.
        assert owners == list(range(owners[0], owners[0] + len(owners)))
        if previous_doc is not None:
            assert owners[0] in (previous_doc, previous_doc + 1)
        previous_doc = owners[-1]
    assert previous_doc == len(docs) - 1


def test_pack_small_examples_by_hand():
    a, b, c = np.array([10, 11, 12]), np.array([20]), np.array([30, 31, 32, 33, 34, 35, 36])
    rows = [r.tolist() for r in masked_lm.pack_sequences([a, b, c], seq_len=7, special=SPECIAL)]
    # Capacity 5: "10 11 12 [SEP] 20" fills row 0; document c fills row 1 and spills into row 2.
    assert rows == [
        [1, 10, 11, 12, 2, 20, 2],
        [1, 30, 31, 32, 33, 34, 2],
        [1, 35, 36, 2, 0, 0, 0],
    ]
    # Capacity 4 and 3 tokens used: one slot is left, too few for "[SEP] x", so a new row.
    rows = [r.tolist() for r in masked_lm.pack_sequences([a, c[:2]], seq_len=6, special=SPECIAL)]
    assert rows == [[1, 10, 11, 12, 2, 0], [1, 30, 31, 2, 0, 0]]


def test_pack_is_deterministic_and_independent_of_input_type():
    docs = _docs(np.random.default_rng(1))
    a = list(masked_lm.pack_sequences(docs, seq_len=9, special=SPECIAL))
    b = list(masked_lm.pack_sequences(iter(docs), seq_len=9, special=SPECIAL))
    c = list(masked_lm.pack_sequences([list(d) for d in docs], seq_len=9, special=SPECIAL))
    assert len(a) == len(b) == len(c)
    for x, y, z in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)


# ---------------------------------------------------------------- masking


def _expected_num(row, special, max_predictions, mask_prob=0.15):
    n = int(np.sum(~np.isin(row, special.ids)))
    return min(max_predictions, max(1, round(n * mask_prob)))


def _original(example):
    """The unmasked row: input_ids with the predicted positions restored."""
    row = example["input_ids"].copy()
    w = example["masked_lm_weights"] > 0
    row[example["masked_lm_positions"][w]] = example["masked_lm_ids"][w]
    return row


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_predictions", [1, 3, 20])
def test_mask_tokens_properties(seed, max_predictions):
    rng = np.random.default_rng(seed)
    rows = list(masked_lm.pack_sequences(_docs(rng), seq_len=24, special=SPECIAL))
    for row in rows:
        ex = masked_lm.mask_tokens(
            row, rng, max_predictions=max_predictions, vocab_size=VOCAB, special=SPECIAL
        )
        assert set(ex) == MLM_KEYS
        assert {k: (v.dtype, v.shape) for k, v in ex.items()} == {
            "input_ids": (np.int32, (24,)),
            "masked_lm_positions": (np.int32, (max_predictions,)),
            "masked_lm_ids": (np.int32, (max_predictions,)),
            "masked_lm_weights": (np.float32, (max_predictions,)),
        }
        num = _expected_num(row, SPECIAL, max_predictions)
        w = ex["masked_lm_weights"]
        np.testing.assert_array_equal(w, (np.arange(max_predictions) < num).astype(np.float32))
        pos = ex["masked_lm_positions"][:num]
        assert np.all(np.diff(pos) > 0)  # unique and ascending
        assert not np.isin(row[pos], SPECIAL.ids).any()  # never pad, [CLS], [SEP]
        np.testing.assert_array_equal(ex["masked_lm_ids"][:num], row[pos])
        assert np.all(ex["masked_lm_positions"][num:] == 0) and np.all(
            ex["masked_lm_ids"][num:] == 0
        )
        untouched = np.setdiff1d(np.arange(24), pos)
        np.testing.assert_array_equal(ex["input_ids"][untouched], row[untouched])
        replaced = ex["input_ids"][pos]
        assert np.all((replaced == SPECIAL.mask) | ~np.isin(replaced, SPECIAL.ids))
        assert np.all((replaced >= 0) & (replaced < VOCAB))
        np.testing.assert_array_equal(_original(ex), row)


def test_number_of_predictions_follows_the_rounding_rule():
    """num = min(P, max(1, round(n · 0.15))), Python's round as in the reference (Python 3)."""
    rng = np.random.default_rng(0)
    for n in range(1, 70):
        row = np.concatenate([[SPECIAL.cls], np.full(n, 9), [SPECIAL.sep], np.zeros(40, int)])
        for p in (1, 6, 40):
            ex = masked_lm.mask_tokens(
                row, rng, max_predictions=p, vocab_size=VOCAB, special=SPECIAL
            )
            assert ex["masked_lm_weights"].sum() == min(p, max(1, round(n * 0.15))), (n, p)
    # Hand-checked values: 3 -> max(1, 0) = 1, 10 -> round(1.5) = 2, 100 -> 15, capped at 6.
    for n, p, expected in ((3, 40, 1), (10, 40, 2), (100, 40, 15), (100, 6, 6)):
        row = np.concatenate([[SPECIAL.cls], np.full(n, 9), [SPECIAL.sep], np.zeros(40, int)])
        ex = masked_lm.mask_tokens(row, rng, max_predictions=p, vocab_size=VOCAB, special=SPECIAL)
        assert ex["masked_lm_weights"].sum() == expected


def test_row_without_candidates_has_no_predictions():
    row = np.array([SPECIAL.cls, SPECIAL.sep, 0, 0], np.int32)
    ex = masked_lm.mask_tokens(
        row, np.random.default_rng(0), max_predictions=2, vocab_size=VOCAB, special=SPECIAL
    )
    assert ex["masked_lm_weights"].sum() == 0
    np.testing.assert_array_equal(ex["input_ids"], row)


def _binomial_ok(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def test_80_10_10_split_and_random_tokens_are_uniform_over_ordinary_ids():
    # Specials not contiguous, every document token the same id 1: a replacement that is not
    # [MASK] and not 1 can only come from the random branch.
    special = SpecialTokens(pad=0, cls=5, sep=2, mask=7)
    vocab = 9
    ordinary = [1, 3, 4, 6, 8]
    rng = np.random.default_rng(123)
    row = np.concatenate([[5], np.ones(60, np.int32), [2]])
    counts = {"mask": 0, "same": 0}
    random_counts = dict.fromkeys(ordinary, 0)
    total = 0
    for _ in range(1500):
        ex = masked_lm.mask_tokens(row, rng, max_predictions=9, vocab_size=vocab, special=special)
        got = ex["input_ids"][ex["masked_lm_positions"][ex["masked_lm_weights"] > 0]]
        total += got.size
        counts["mask"] += int(np.sum(got == 7))
        counts["same"] += int(np.sum(got == 1))
        for j in ordinary:
            random_counts[j] += int(np.sum(got == j)) if j != 1 else 0
        assert np.isin(got, [7, *ordinary]).all()
    assert total == 1500 * 9
    assert _binomial_ok(counts["mask"], total, 0.8)
    # kept (0.1) plus a random draw that happens to be 1 (0.1 / 5)
    assert _binomial_ok(counts["same"], total, 0.1 + 0.1 / 5)
    for j in (3, 4, 6, 8):
        assert _binomial_ok(random_counts[j], total, 0.1 / 5)


def test_mask_tokens_is_deterministic_given_the_generator():
    row = next(
        masked_lm.pack_sequences(_docs(np.random.default_rng(3)), seq_len=32, special=SPECIAL)
    )
    a, b, c = (
        masked_lm.mask_tokens(
            row, np.random.default_rng(s), max_predictions=6, vocab_size=VOCAB, special=SPECIAL
        )
        for s in (5, 5, 6)
    )
    for key in MLM_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a[k], c[k]) for k in MLM_KEYS)


# ---------------------------------------------------------------- examples, dupes, shards


def _assert_examples_equal(xs, ys):
    xs, ys = list(xs), list(ys)
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert set(x) == set(y) == MLM_KEYS
        for key in MLM_KEYS:
            np.testing.assert_array_equal(x[key], y[key])
            assert x[key].dtype == y[key].dtype


def test_examples_are_rows_masked_with_their_own_generator():
    docs = _docs(np.random.default_rng(4))
    kw = _kw()
    examples = list(masked_lm.masked_lm_examples(docs, **kw))
    rows = list(masked_lm.pack_sequences(docs, seq_len=kw["seq_len"], special=SPECIAL))
    expected = [
        masked_lm.mask_tokens(
            row,
            np.random.default_rng([kw["seed"], 0, i]),
            max_predictions=kw["max_predictions"],
            vocab_size=VOCAB,
            special=SPECIAL,
        )
        for i, row in enumerate(rows)
    ]
    _assert_examples_equal(examples, expected)


def test_examples_do_not_depend_on_chunking_or_on_later_documents():
    docs = _docs(np.random.default_rng(5), n=20)
    full = list(masked_lm.masked_lm_examples(docs, **_kw()))
    # Read in chunks of 3 from a one-shot iterator of lists.
    stream = masked_lm.masked_lm_examples(iter([list(d) for d in docs]), **_kw())
    chunked = []
    while chunk := list(itertools.islice(stream, 3)):
        chunked.extend(chunk)
    _assert_examples_equal(chunked, full)
    # A prefix of the corpus gives the same examples for its complete rows.
    prefix = list(masked_lm.masked_lm_examples(docs[:10], **_kw()))
    _assert_examples_equal(prefix[:-1], full[: len(prefix) - 1])
    # A different seed gives different masks on the same rows.
    other = list(masked_lm.masked_lm_examples(docs, **_kw(seed=8)))
    assert [_original(x).tolist() for x in other] == [_original(x).tolist() for x in full]
    assert any(
        not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(other, full, strict=True)
    )


def test_dupe_factor_repeats_rows_with_different_masks():
    docs = _docs(np.random.default_rng(6))
    once = list(masked_lm.masked_lm_examples(docs, **_kw()))
    thrice = list(masked_lm.masked_lm_examples(docs, **_kw(), dupe_factor=3))
    r = len(once)
    assert len(thrice) == 3 * r
    _assert_examples_equal(thrice[:r], once)
    originals = [_original(x) for x in thrice]
    for d in (1, 2):
        for i in range(r):
            np.testing.assert_array_equal(originals[d * r + i], originals[i])
        differs = [
            not np.array_equal(
                thrice[d * r + i]["masked_lm_positions"], once[i]["masked_lm_positions"]
            )
            for i in range(r)
        ]
        assert sum(differs) > r // 2
    with pytest.raises(TypeError, match="re-iterable"):
        masked_lm.masked_lm_examples(iter(docs), **_kw(), dupe_factor=2)


def test_shards_round_trip(tmp_path):
    docs = _docs(np.random.default_rng(7), n=30)
    expected = list(masked_lm.masked_lm_examples(docs, **_kw(), dupe_factor=2))
    out = masked_lm.write_masked_lm_shards(
        docs, tmp_path, split="train", num_shards=3, **_kw(), dupe_factor=2
    )
    assert out["count"] == len(expected)
    paths = files.shard_paths(tmp_path, "bert_pretraining", "train")
    assert paths == out["paths"] and len(paths) == 3
    # Example i is in shard i mod 3; read shard by shard and interleave back.
    shards = [files.ArrayRecordExamples(p) for p in paths]
    per_shard = [[shard[j] for j in range(len(shard))] for shard in shards]
    got = [per_shard[i % 3][i // 3] for i in range(len(expected))]
    _assert_examples_equal(got, expected)
    assert len(files.ArrayRecordExamples(paths)) == len(expected)


def test_token_documents_npz_round_trip(tmp_path):
    docs = _docs(np.random.default_rng(8))
    assert masked_lm.save_token_documents(tmp_path / "t.npz", docs) == len(docs)
    loaded = masked_lm.load_token_documents(tmp_path / "t.npz")
    assert len(loaded) == len(docs)
    for a, b in zip(loaded, docs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_token_documents_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no token-ids"):
        masked_lm.load_token_documents(tmp_path / "none.npz")
    np.savez(tmp_path / "a.npz", ids=np.arange(5))
    with pytest.raises(ValueError, match="lacks arrays \\['offsets'\\]"):
        masked_lm.load_token_documents(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", ids=np.arange(5), offsets=np.array([0, 3, 4]))
    with pytest.raises(ValueError, match="from 0 to len\\(ids\\)=5"):
        masked_lm.load_token_documents(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", ids=np.arange(5), offsets=np.array([0, 4, 3, 5]))
    with pytest.raises(ValueError, match="non-decreasing"):
        masked_lm.load_token_documents(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", ids=np.ones(5), offsets=np.array([0, 5]))
    with pytest.raises(ValueError, match="'ids'.*1-D integer"):
        masked_lm.load_token_documents(tmp_path / "d.npz")


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(seq_len=2, max_predictions=1), ValueError, "seq_len must be >= 3, got 2"),
        (dict(max_predictions=0), ValueError, "max_predictions must be in \\[1, 16\\], got 0"),
        (dict(max_predictions=17), ValueError, "max_predictions must be in \\[1, 16\\], got 17"),
        (dict(mask_prob=0.0), ValueError, "mask_prob must be in \\(0, 1\\), got 0.0"),
        (dict(mask_prob=1.0), ValueError, "mask_prob must be in \\(0, 1\\), got 1.0"),
        (dict(vocab_size=3), ValueError, "vocab_size must be >= 5, got 3"),
        (
            dict(vocab_size=30, special=SpecialTokens(cls=1, sep=2, mask=30)),
            ValueError,
            "< vocab_size=30",
        ),
        (dict(special=(0, 1, 2, 3)), TypeError, "SpecialTokens"),
        (dict(seed=-1), ValueError, "seed must be >= 0, got -1"),
        (dict(dupe_factor=0), ValueError, "dupe_factor must be >= 1, got 0"),
        (dict(seq_len=16.0), TypeError, "seq_len must be an int"),
    ],
)
def test_option_validation(overrides, error, match):
    with pytest.raises(error, match=match):
        masked_lm.masked_lm_examples([np.arange(4, 9)], **_kw(**overrides))


@pytest.mark.parametrize(
    "bad_doc, error, match",
    [
        (np.array([5, 40, 6]), ValueError, "document 2 holds token id 40 outside \\[0, 40\\)"),
        (np.array([5, -1]), ValueError, "document 2 holds token id -1 outside"),
        (np.array([5, 3, 6]), ValueError, "document 2 holds token id 3, a special token"),
        (np.array([5, 0]), ValueError, "document 2 holds token id 0, a special token"),
        (np.array([5.0, 6.0]), TypeError, "document 2 must be a 1-D integer array"),
        (np.array([[5, 6]]), TypeError, "document 2 must be a 1-D integer array"),
    ],
)
def test_document_validation(bad_doc, error, match):
    docs = [np.arange(4, 9), np.arange(9, 20), bad_doc]
    with pytest.raises(error, match=match):
        list(masked_lm.masked_lm_examples(docs, **_kw()))


def test_mask_tokens_validation():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="row token ids must be in \\[0, vocab_size=40\\)"):
        masked_lm.mask_tokens(
            np.array([1, 50, 2]), rng, max_predictions=1, vocab_size=40, special=SPECIAL
        )
    with pytest.raises(TypeError, match="row must be a 1-D integer array"):
        masked_lm.mask_tokens(
            np.ones((2, 3), int), rng, max_predictions=1, vocab_size=40, special=SPECIAL
        )
    with pytest.raises(ValueError, match="max_predictions must be in \\[1, 3\\], got 4"):
        masked_lm.mask_tokens(
            np.array([1, 9, 2]), rng, max_predictions=4, vocab_size=40, special=SPECIAL
        )


# ---------------------------------------------------------------- the script


def test_script_on_text_files(tmp_path, capsys):
    script = _load_script()
    texts = {"a.txt": "héllo wörld\n\nsecond line\n", "b.txt": "x" * 50, "c.md": "ignored"}
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    out_dir = tmp_path / "out"
    argv = ["--input", str(tmp_path / "*.txt"), "--out_dir", str(out_dir), "--seq_len", "16"]
    argv += ["--max_predictions", "3", "--num_shards", "2", "--seed", "4", "--dupe_factor", "2"]
    result = script.main(argv)
    byte = masked_lm.byte_special_tokens()
    docs = [tokens.encode_bytes(texts[n].encode()) for n in ("a.txt", "b.txt")]
    expected = list(
        masked_lm.masked_lm_examples(
            docs,
            seq_len=16,
            max_predictions=3,
            vocab_size=260,
            special=byte,
            seed=4,
            dupe_factor=2,
        )
    )
    got = files.ArrayRecordExamples(files.shard_paths(out_dir, "bert_pretraining", "train"))
    assert result["vocab_size"] == 260 and result["count"] == len(expected) == len(got)
    by_shard = sorted(range(len(expected)), key=lambda i: (i % 2, i))  # shard 0 then shard 1
    _assert_examples_equal([got[j] for j in range(len(got))], [expected[i] for i in by_shard])
    stdout = capsys.readouterr().out
    assert f"wrote {len(expected)} examples" in stdout and "2 documents" in stdout
    assert "--config.model.vocab_size=260" in stdout

    # One document per non-empty line: 'héllo wörld', 'second line', 'xxx...'.
    result = script.main([*argv[:4], "--documents_per_line", "--split", "lines", "--seq_len", "64"])
    lines = [tokens.encode_bytes(t.encode()) for t in ("héllo wörld", "second line", "x" * 50)]
    rows = list(masked_lm.pack_sequences(lines, seq_len=64, special=byte))
    assert result["count"] == len(rows) == 2
    first = files.ArrayRecordExamples(files.shard_paths(out_dir, "bert_pretraining", "lines"))[0]
    np.testing.assert_array_equal(_original(first), rows[0])
    assert np.sum(rows[0] == byte.sep) == 3  # two separators between three documents + the end


def test_script_on_token_ids(tmp_path, capsys):
    script = _load_script()
    rng = np.random.default_rng(9)
    docs = _docs(rng, vocab=30522, special=masked_lm.BERT_UNCASED)
    masked_lm.save_token_documents(tmp_path / "ids.npz", docs)
    argv = ["--token_ids", str(tmp_path / "ids.npz"), "--vocab_size", "30522"]
    argv += ["--special", "bert_uncased", "--out_dir", str(tmp_path / "o"), "--seq_len", "32"]
    result = script.main([*argv, "--max_predictions", "5", "--name", "wiki"])
    expected = list(
        masked_lm.masked_lm_examples(
            docs,
            seq_len=32,
            max_predictions=5,
            vocab_size=30522,
            special=masked_lm.BERT_UNCASED,
            seed=0,
        )
    )
    got = files.ArrayRecordExamples(files.shard_paths(tmp_path / "o", "wiki", "train"))
    _assert_examples_equal([got[i] for i in range(len(got))], expected)
    assert result["vocab_size"] == 30522
    assert "--config.model.vocab_size=30522" in capsys.readouterr().out


def test_script_errors(tmp_path):
    script = _load_script()
    (tmp_path / "a.txt").write_text("abc")
    masked_lm.save_token_documents(tmp_path / "ids.npz", [np.arange(295, 305)])
    out = ["--out_dir", str(tmp_path / "o")]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        script.main(["--input", str(tmp_path / "*.none"), *out])
    with pytest.raises(SystemExit):  # --token_ids without --vocab_size / --special
        script.main(["--token_ids", str(tmp_path / "ids.npz"), *out])
    with pytest.raises(SystemExit):  # text is byte-tokenized
        script.main(["--input", str(tmp_path / "a.txt"), "--special", "bert_uncased", *out])
    with pytest.raises(SystemExit):  # exactly one source
        script.main(["--input", "x", "--token_ids", "y", *out])
    with pytest.raises(ValueError, match="document 0 holds token id 300 outside \\[0, 300\\)"):
        script.main(
            ["--token_ids", str(tmp_path / "ids.npz"), "--vocab_size", "300", "--special", "byte"]
            + out
        )
    with pytest.raises(ValueError, match="max_predictions must be in \\[1, 8\\], got 9"):
        script.main(
            ["--input", str(tmp_path / "a.txt"), "--seq_len", "8", "--max_predictions", "9"] + out
        )


# ---------------------------------------------------------------- the BERT task


def test_examples_train_bert_mlm_with_a_finite_loss():
    from jaxbatch.train import config as config_lib
    from jaxbatch.train import tasks
    from jaxbatch.train.tasks_mlm import MLM_FIELDS

    docs = [tokens.encode_bytes(t.encode()) for t in ("def f(x):\n    return x\n", "a" * 70, "b c")]
    examples = list(
        masked_lm.masked_lm_examples(
            docs,
            seq_len=32,
            max_predictions=5,
            vocab_size=masked_lm.BYTE_VOCAB_SIZE,
            special=masked_lm.byte_special_tokens(),
            seed=0,
        )
    )
    batch = {k: np.stack([ex[k] for ex in examples]) for k in MLM_FIELDS}
    cfg = config_lib.default_config()
    cfg.task = "mlm"
    cfg.model.update(
        name="bert_mlm",
        vocab_size=masked_lm.BYTE_VOCAB_SIZE,
        width=16,
        depth=1,
        heads=2,
        mlp_dim=32,
        max_len=32,
        dropout=0.0,
    )
    task = tasks.make_task(cfg)
    assert task.fields == MLM_FIELDS
    variables = nn.meta.unbox(task.init_fn(jax.random.PRNGKey(0), batch))
    params, state = tasks.split_variables(variables)
    loss, (metrics, _) = task.loss_fn(params, state, batch, jax.random.PRNGKey(1))
    assert np.isfinite(float(loss)) and 0.0 < float(loss)
    # Near log V at initialisation: the predictions are over the 260 ids.
    assert abs(float(loss) - np.log(masked_lm.BYTE_VOCAB_SIZE)) < 1.5
    assert 0.0 <= float(metrics["mlm_accuracy"]) <= 1.0
