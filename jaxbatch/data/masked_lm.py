"""BERT pre-training data: pack token documents into rows and mask them, as BERT's reference does.

Documents (1-D arrays of token ids) are packed into rows ``[CLS] tokens ... [SEP]`` in the
FULL-SENTENCES style of RoBERTa (the model has no next-sentence head), then each row is masked as
in BERT's ``create_pretraining_data.py``; the output is the example format of
``jaxbatch.train.tasks_mlm`` (``input_ids`` int32 [L], ``masked_lm_positions`` int32 [P],
``masked_lm_ids`` int32 [P], ``masked_lm_weights`` float32 [P]) written to ArrayRecord shards.

Every row is masked with its own generator ``np.random.default_rng([seed, dupe, row])``, so the
output is reproducible and example i does not depend on how the corpus was read or iterated.

References:
  Devlin, Chang, Lee, Toutanova 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
  Language Understanding", Section 3.1 (masked LM) and Appendix A.1 (the 80/10/10 procedure);
  Liu et al. 2019, "RoBERTa: A Robustly Optimized BERT Pretraining Approach", Section 4.2
  (FULL-SENTENCES input format without next-sentence prediction).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator

import numpy as np

from jaxbatch.data import files, tokens


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecialTokens:
    """Ids of the special tokens; each must be a distinct non-negative int.

    ``pad`` must equal the model's ``pad_id`` (``BertMLM`` masks keys where ids == pad_id; both
    presets below use 0, the padding of the ``tasks_mlm`` example format).
    """

    pad: int = 0
    cls: int
    sep: int
    mask: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(f"SpecialTokens.{field.name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"SpecialTokens.{field.name} must be >= 0, got {value}")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"SpecialTokens ids must be distinct, got {self}")

    @property
    def ids(self) -> tuple[int, ...]:
        """(pad, cls, sep, mask)."""
        return (self.pad, self.cls, self.sep, self.mask)


BERT_UNCASED = SpecialTokens(pad=0, cls=101, sep=102, mask=103)
"""[PAD], [CLS], [SEP], [MASK] of the bert-base-uncased WordPiece vocabulary."""
BERT_UNCASED_VOCAB_SIZE = 30522
BYTE_VOCAB_SIZE = tokens.VOCAB_SIZE + 2
"""260: the byte vocabulary of ``jaxbatch.data.tokens`` (258) extended by [SEP] and [MASK]."""


def byte_special_tokens() -> SpecialTokens:
    """Special tokens for the byte tokenizer: pad 0, cls 257, sep 258, mask 259.

    ``jaxbatch.data.tokens`` has PAD = 0, bytes 1..256 and CLS = 257 (vocabulary 258); masked-LM
    data needs two more ids, [SEP] = 258 and [MASK] = 259, so the model's vocabulary is
    :data:`BYTE_VOCAB_SIZE` = 260.
    """
    return SpecialTokens(
        pad=tokens.PAD, cls=tokens.CLS, sep=tokens.VOCAB_SIZE, mask=tokens.VOCAB_SIZE + 1
    )


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _check_special(special: SpecialTokens, vocab_size: int) -> None:
    if not isinstance(special, SpecialTokens):
        raise TypeError(f"special must be a SpecialTokens, got {type(special).__name__}")
    _check_int("vocab_size", vocab_size, len(special.ids) + 1)
    if max(special.ids) >= vocab_size:
        raise ValueError(f"special token ids {special} must be < vocab_size={vocab_size}")


def _check_masking(
    *, seq_len: int, max_predictions: int, vocab_size: int, special: SpecialTokens, mask_prob
) -> None:
    _check_int("seq_len", seq_len, 3)
    _check_int("max_predictions", max_predictions, 1, seq_len)
    _check_special(special, vocab_size)
    if not isinstance(mask_prob, float | int) or not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob!r}")


def _check_document(index: int, doc, vocab_size: int | None, special: SpecialTokens) -> np.ndarray:
    doc = np.asarray(doc)
    if doc.ndim != 1 or (doc.size and not np.issubdtype(doc.dtype, np.integer)):
        raise TypeError(
            f"document {index} must be a 1-D integer array of token ids, got dtype {doc.dtype} "
            f"and shape {doc.shape}"
        )
    if doc.size == 0:
        return doc.astype(np.int32)
    high = np.iinfo(np.int32).max if vocab_size is None else vocab_size - 1
    bad = (doc < 0) | (doc > high)
    if bad.any():
        raise ValueError(
            f"document {index} holds token id {doc[bad][0]} outside [0, {high + 1})"
            + ("" if vocab_size is None else f" (vocab_size={vocab_size})")
        )
    bad = np.isin(doc, special.ids)
    if bad.any():
        raise ValueError(
            f"document {index} holds token id {doc[bad][0]}, a special token of {special}; "
            "documents must hold ordinary tokens only"
        )
    return doc.astype(np.int32)


def pack_sequences(
    documents: Iterable[np.ndarray], *, seq_len: int, special: SpecialTokens
) -> Iterator[np.ndarray]:
    """Packs documents into rows ``[CLS] tokens ... [SEP]``, FULL-SENTENCES style.

    Rows are filled contiguously from one or more documents, with a [SEP] between two documents
    inside a row (Liu et al. 2019, "RoBERTa", Section 4.2, FULL-SENTENCES: the input format for a
    model without the next-sentence head). A document longer than a row continues in the next row;
    each row holds at most ``seq_len - 2`` document tokens between its [CLS] and final [SEP]. A
    document starts a new row (rather than a [SEP] and no token of it) when only one slot is left,
    so a row is then one token short; the last row and such rows are right-padded with ``pad``.
    Empty documents are skipped. Deterministic: no randomness.

    Args:
      documents: 1-D integer arrays of token ids, none of them a special token.
      seq_len: row length L (>= 3).
      special: the special token ids.

    Returns:
      an iterator of int32 rows [seq_len].
    """
    _check_int("seq_len", seq_len, 3)
    if not isinstance(special, SpecialTokens):
        raise TypeError(f"special must be a SpecialTokens, got {type(special).__name__}")
    return _pack(documents, seq_len, special, vocab_size=None)


def _pack(documents, seq_len: int, special: SpecialTokens, vocab_size: int | None):
    end = seq_len - 1  # index of the final [SEP] of a full row
    row = np.full((seq_len,), special.pad, np.int32)
    row[0], n = special.cls, 1
    for index, doc in enumerate(documents):
        doc = _check_document(index, doc, vocab_size, special)
        if doc.size == 0:
            continue
        if n > 1:  # the row holds a previous document: separate, or close it if only 1 slot left
            if end - n >= 2:
                row[n], n = special.sep, n + 1
            else:
                row[n] = special.sep
                yield row
                row = np.full((seq_len,), special.pad, np.int32)
                row[0], n = special.cls, 1
        start = 0
        while start < doc.size:
            take = min(doc.size - start, end - n)
            row[n : n + take] = doc[start : start + take]
            n, start = n + take, start + take
            if n == end:
                row[n] = special.sep
                yield row
                row = np.full((seq_len,), special.pad, np.int32)
                row[0], n = special.cls, 1
    if n > 1:
        row[n] = special.sep
        yield row


def _random_ordinary_ids(draws: np.ndarray, special: SpecialTokens) -> np.ndarray:
    """Maps k in [0, vocab - #special) to the k-th non-special id (skipping specials in order)."""
    ids = draws.copy()
    for s in sorted(special.ids):
        ids += ids >= s
    return ids


def mask_tokens(
    row: np.ndarray,
    rng: np.random.Generator,
    *,
    max_predictions: int,
    vocab_size: int,
    special: SpecialTokens,
    mask_prob: float = 0.15,
) -> dict[str, np.ndarray]:
    """Masks one row as BERT's ``create_masked_lm_predictions`` does.

    Candidates are the positions of ordinary tokens (not pad, [CLS], [SEP], [MASK]); of them,
    num = min(P, max(1, round(n_candidates · mask_prob))) positions are chosen uniformly without
    replacement (the reference shuffles the candidates and takes a prefix). Each chosen position
    is, independently, replaced with [MASK] with probability 0.8, kept with probability 0.1, and
    replaced with a random token with probability 0.1 (Devlin et al. 2019, Section 3.1 and
    Appendix A.1). The decision follows the reference's order with one uniform draw u per
    position: u < 0.8 -> [MASK]; else u < 0.9 -> keep (the reference's second draw < 0.5); else
    random, so the probabilities are the reference's exactly.

    Deliberate differences from the reference: num counts the candidates rather than all tokens
    including [CLS] and the [SEP]s (so about 0.3 fewer predictions per row at mask_prob 0.15;
    ``round`` is Python's, half to even, as in the reference under Python 3; a row without
    candidates gets no prediction); a random replacement is drawn uniformly from the non-special
    ids of ``[0, vocab_size)`` (the reference may insert [CLS], [SEP] or [MASK] themselves); and
    there is no whole-word masking (the reference's ``--do_whole_word_mask``, off by default).

    Args:
      row: int [L] token ids, e.g. a row of :func:`pack_sequences`.
      rng: the generator of this row; consumed as: positions, then u, then random ids.
      max_predictions: P, the number of prediction slots (1 <= P <= L).
      vocab_size: vocabulary size V; token ids are in [0, V).
      special: the special token ids.
      mask_prob: fraction of candidates to predict (0.15 in BERT).

    Returns:
      {'input_ids': int32 [L], 'masked_lm_positions': int32 [P] (ascending, then 0),
      'masked_lm_ids': int32 [P] (the original tokens, then 0), 'masked_lm_weights': float32 [P]
      (1 for a prediction, then 0)}.
    """
    row = np.asarray(row)
    if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer):
        raise TypeError(f"row must be a 1-D integer array, got dtype {row.dtype} shape {row.shape}")
    _check_masking(
        seq_len=row.size,
        max_predictions=max_predictions,
        vocab_size=vocab_size,
        special=special,
        mask_prob=mask_prob,
    )
    if row.min() < 0 or row.max() >= vocab_size:
        raise ValueError(
            f"row token ids must be in [0, vocab_size={vocab_size}), got range "
            f"[{row.min()}, {row.max()}]"
        )
    candidates = np.flatnonzero(~np.isin(row, special.ids))
    num = min(max_predictions, candidates.size, max(1, round(candidates.size * mask_prob)))
    positions = np.sort(rng.choice(candidates, size=num, replace=False))
    u = rng.random(num)
    random_ids = _random_ordinary_ids(
        rng.integers(0, vocab_size - len(special.ids), size=num), special
    )
    input_ids = row.astype(np.int32)
    replaced = np.where(u < 0.8, special.mask, np.where(u < 0.9, row[positions], random_ids))
    input_ids[positions] = replaced
    out_positions = np.zeros((max_predictions,), np.int32)
    out_ids = np.zeros((max_predictions,), np.int32)
    weights = np.zeros((max_predictions,), np.float32)
    out_positions[:num] = positions
    out_ids[:num] = row[positions]
    weights[:num] = 1.0
    return {
        "input_ids": input_ids,
        "masked_lm_positions": out_positions,
        "masked_lm_ids": out_ids,
        "masked_lm_weights": weights,
    }


def masked_lm_examples(
    documents: Iterable[np.ndarray],
    *,
    seq_len: int,
    max_predictions: int,
    vocab_size: int,
    special: SpecialTokens,
    seed: int,
    mask_prob: float = 0.15,
    dupe_factor: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Packs documents (:func:`pack_sequences`) and masks every row (:func:`mask_tokens`).

    With ``dupe_factor`` > 1 the corpus is packed again and masked differently, duplicate after
    duplicate (BERT's reference uses dupe_factor = 10, so each sequence is seen with 10 masks over
    its 40 epochs). Row r of duplicate d is masked with ``np.random.default_rng([seed, d, r])``.

    Args:
      documents: 1-D integer arrays of token ids in [0, vocab_size), none a special token; must be
        re-iterable (a list, not a generator) when dupe_factor > 1.
      seq_len: row length L (>= 3).
      max_predictions: P (1 <= P <= L).
      vocab_size: vocabulary size V (> every special id).
      special: the special token ids.
      seed: non-negative int seeding every row's generator.
      mask_prob: fraction of the ordinary tokens of a row to predict.
      dupe_factor: number of differently masked copies of the corpus (>= 1).

    Returns:
      an iterator of examples in the format of ``jaxbatch.train.tasks_mlm``.
    """
    _check_masking(
        seq_len=seq_len,
        max_predictions=max_predictions,
        vocab_size=vocab_size,
        special=special,
        mask_prob=mask_prob,
    )
    _check_int("seed", seed, 0)
    _check_int("dupe_factor", dupe_factor, 1)
    if dupe_factor > 1 and iter(documents) is documents:
        raise TypeError(
            f"dupe_factor={dupe_factor} reads the documents {dupe_factor} times: pass a list or "
            f"another re-iterable collection, not a one-shot {type(documents).__name__}"
        )

    def generate():
        for dupe in range(dupe_factor):
            rows = _pack(documents, seq_len, special, vocab_size)
            for index, row in enumerate(rows):
                rng = np.random.default_rng([seed, dupe, index])
                yield mask_tokens(
                    row,
                    rng,
                    max_predictions=max_predictions,
                    vocab_size=vocab_size,
                    special=special,
                    mask_prob=mask_prob,
                )

    return generate()


def write_masked_lm_shards(
    documents: Iterable[np.ndarray],
    out_dir: str | os.PathLike,
    *,
    split: str,
    num_shards: int,
    name: str = "bert_pretraining",
    seq_len: int,
    max_predictions: int,
    vocab_size: int,
    special: SpecialTokens,
    seed: int,
    mask_prob: float = 0.15,
    dupe_factor: int = 1,
) -> dict:
    """Writes :func:`masked_lm_examples` to ArrayRecord shards with ``files.write_example_shards``.

    Read them back with ``files.ArrayRecordExamples(files.shard_paths(out_dir, name, split))``;
    example i lands in shard i mod num_shards.

    Args:
      documents: as for :func:`masked_lm_examples`.
      out_dir: directory of the shards (created if missing).
      split: split name in the file names (e.g. 'train').
      num_shards: number of files.
      name: dataset name in the file names.
      seq_len, max_predictions, vocab_size, special, seed, mask_prob, dupe_factor: as for
        :func:`masked_lm_examples`.

    Returns:
      {'paths': the shard files in order, 'count': the number of examples written}.
    """
    examples = masked_lm_examples(
        documents,
        seq_len=seq_len,
        max_predictions=max_predictions,
        vocab_size=vocab_size,
        special=special,
        seed=seed,
        mask_prob=mask_prob,
        dupe_factor=dupe_factor,
    )
    paths, count = files.write_example_shards(
        examples, out_dir=out_dir, name=name, split=split, num_shards=num_shards
    )
    return {"paths": paths, "count": count}


def save_token_documents(path: str | os.PathLike, documents: Iterable[np.ndarray]) -> int:
    """Saves tokenized documents as ``.npz`` with ``ids`` int32 [total] and ``offsets`` int64
    [num_docs + 1] (document i is ``ids[offsets[i]:offsets[i + 1]]``); returns num_docs.

    This is the ``--token_ids`` input of ``scripts/prepare_bert_data.py``: run any tokenizer (e.g.
    a WordPiece one) elsewhere and store its output in this form.
    """
    docs = [np.asarray(d).reshape(-1) for d in documents]
    offsets = np.concatenate([[0], np.cumsum([d.size for d in docs], dtype=np.int64)])
    ids = np.concatenate(docs).astype(np.int32) if docs else np.zeros((0,), np.int32)
    np.savez(path, ids=ids, offsets=offsets)
    return len(docs)


def load_token_documents(path: str | os.PathLike) -> list[np.ndarray]:
    """Inverse of :func:`save_token_documents`: the documents as views into ``ids``.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: ``ids`` or ``offsets`` missing, not 1-D integers, or offsets not running
        from 0 to len(ids) without decreasing.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no token-ids .npz file at {os.fspath(path)!r}")
    with np.load(path, allow_pickle=False) as archive:
        missing = {"ids", "offsets"} - set(archive.files)
        if missing:
            raise ValueError(
                f"{os.fspath(path)!r} lacks arrays {sorted(missing)}; expected 'ids' [total] and "
                f"'offsets' [num_docs + 1], got {archive.files}"
            )
        ids, offsets = archive["ids"], archive["offsets"]
    for key, value in (("ids", ids), ("offsets", offsets)):
        if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
            raise ValueError(
                f"{key!r} in {os.fspath(path)!r} must be a 1-D integer array, got dtype "
                f"{value.dtype} shape {value.shape}"
            )
    if (
        offsets.size < 1
        or offsets[0] != 0
        or offsets[-1] != ids.size
        or np.any(np.diff(offsets) < 0)
    ):
        raise ValueError(
            f"'offsets' in {os.fspath(path)!r} must be non-decreasing from 0 to len(ids)="
            f"{ids.size}, got {offsets[:3]}...{offsets[-3:]} (size {offsets.size})"
        )
    return [ids[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
