r"""Prepares the ``bert_pretraining`` dataset: text or token ids -> masked-LM ArrayRecord shards.

Documents are packed into ``[CLS] ... [SEP]`` rows and masked as in BERT's
``create_pretraining_data.py`` by ``jaxbatch.data.masked_lm``; the shards are
``{out_dir}/{name}-{split}.array_record-{i:05d}-of-{n:05d}``, one ``jaxbatch.train.tasks_mlm``
example per record.

Inputs, one of:

- ``--input PATTERN ...``: text files (glob patterns), one document per file, or one per
  non-empty line with ``--documents_per_line``; tokenized with the byte tokenizer of
  ``jaxbatch.data.tokens`` (token = byte + 1) plus [SEP] = 258 and [MASK] = 259, vocabulary 260.
- ``--token_ids FILE.npz --vocab_size V --special bert_uncased|byte``: documents tokenized
  elsewhere (e.g. by a WordPiece tokenizer), stored as an ``.npz`` with ``ids`` int [total] (all
  documents concatenated) and ``offsets`` int [num_docs + 1] (document i is
  ``ids[offsets[i]:offsets[i + 1]]``); ``jaxbatch.data.masked_lm.save_token_documents`` writes it.

Demo: the standard library of this interpreter as a small corpus (phase-1 shapes)::

  python scripts/prepare_bert_data.py \
      --input "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')/*.py" \
      --out_dir /tmp/bert_stdlib --split train --num_shards 4 --seq_len 128 --max_predictions 20

The ``bert_pretraining`` dataset reads the splits 'train' and 'test': run once per split, on
different documents (e.g. ``--split test --input held_out/*.txt``). It prints one summary line
and the flags the training config needs, e.g.
``--config.model.vocab_size=260 --config.dataset.options.data_dir=/tmp/bert_stdlib``.
"""

from __future__ import annotations

import argparse
import glob
import os
import pathlib

import numpy as np

from jaxbatch.data import masked_lm, tokens

SPECIALS = {"bert_uncased": masked_lm.BERT_UNCASED, "byte": masked_lm.byte_special_tokens()}


def _input_files(patterns: list[str]) -> list[str]:
    paths: list[str] = []
    for pattern in patterns:
        found = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"--input pattern {pattern!r} matches no file")
        paths.extend(p for p in found if p not in paths)
    return paths


def read_text_documents(patterns: list[str], *, per_line: bool) -> list[np.ndarray]:
    """Byte-token documents of the files matching ``patterns`` (whole files or non-empty lines)."""
    docs = []
    for path in _input_files(patterns):
        data = pathlib.Path(path).read_bytes()
        pieces = [line for line in data.splitlines() if line.strip()] if per_line else [data]
        docs.extend(tokens.encode_bytes(piece) for piece in pieces if piece)
    return docs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="glob patterns of text files")
    source.add_argument("--token_ids", help=".npz with 'ids' [total] and 'offsets' [docs + 1]")
    p.add_argument("--documents_per_line", action="store_true", help="one document per line")
    p.add_argument("--vocab_size", type=int, help="vocabulary size (required with --token_ids)")
    p.add_argument("--special", choices=sorted(SPECIALS), help="special token ids (--token_ids)")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--name", default="bert_pretraining")
    p.add_argument("--num_shards", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--max_predictions", type=int, default=20)
    p.add_argument("--mask_prob", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dupe_factor", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> dict:
    """Runs the CLI; returns ``write_masked_lm_shards``'s result plus the vocab_size used."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.token_ids is not None:
        if args.vocab_size is None or args.special is None:
            parser.error("--token_ids needs --vocab_size and --special")
        if args.documents_per_line:
            parser.error("--documents_per_line applies to --input text files only")
        documents = masked_lm.load_token_documents(args.token_ids)
        special, vocab_size = SPECIALS[args.special], args.vocab_size
    else:
        if args.special not in (None, "byte"):
            parser.error(
                f"--input text is byte-tokenized: --special must be 'byte', got {args.special!r}"
            )
        if args.vocab_size not in (None, masked_lm.BYTE_VOCAB_SIZE):
            parser.error(
                f"--input text is byte-tokenized: --vocab_size must be "
                f"{masked_lm.BYTE_VOCAB_SIZE}, got {args.vocab_size}"
            )
        documents = read_text_documents(args.input, per_line=args.documents_per_line)
        special, vocab_size = masked_lm.byte_special_tokens(), masked_lm.BYTE_VOCAB_SIZE
    result = masked_lm.write_masked_lm_shards(
        documents,
        args.out_dir,
        split=args.split,
        num_shards=args.num_shards,
        name=args.name,
        seq_len=args.seq_len,
        max_predictions=args.max_predictions,
        vocab_size=vocab_size,
        special=special,
        seed=args.seed,
        mask_prob=args.mask_prob,
        dupe_factor=args.dupe_factor,
    )
    num_tokens = sum(int(d.size) for d in documents)
    print(
        f"wrote {result['count']} examples (seq_len={args.seq_len}, "
        f"max_predictions={args.max_predictions}, dupe_factor={args.dupe_factor}) from "
        f"{len(documents)} documents ({num_tokens} tokens) to {len(result['paths'])} shards "
        f"{args.name}-{args.split}.array_record-*-of-{args.num_shards:05d} in {args.out_dir}"
    )
    print(
        f"train with: --config.model.vocab_size={vocab_size} (or larger) "
        f"--config.dataset.options.data_dir={args.out_dir} "
        f"--config.dataset.options.seq_len={args.seq_len} "
        f"--config.dataset.options.max_predictions={args.max_predictions}"
    )
    return {**result, "vocab_size": vocab_size}


if __name__ == "__main__":
    main()
