"""jaxbatch.data: grain pipelines over real data that ships with every Python install.

Datasets (``load_split(name, split, **options)`` -> ``DataSplit``; ``load_arrays`` for the
in-memory ones):

- ``digits``: scikit-learn's 1,797 8x8 digit images, stratified 1,437 / 360 split.
- ``codesearch``: (docstring, function source without docstring) pairs from the standard library.
- ``stdlib_text``: the standard library's source as a byte-level language-modelling stream.
- ``npz``: user ``.npz`` files; ArrayRecord files via ``ArrayRecordExamples``; TFDS via
  ``tfds_data_source`` (optional dependency).
- pod scale, decoded on the fly from record files: ``imagenet2012`` (TFDS or ArrayRecord shards
  from ``scripts/prepare_image_folder.py``), ``image_text`` (``scripts/prepare_image_text.py``),
  ``bert_pretraining`` (``scripts/prepare_bert_data.py``).

Pipelines: ``make_train_iterator`` (sharded per process, shuffled per epoch, per-example
augmentation RNG, checkpointable) and ``make_eval_batches`` (every example once, padded, with a
'mask'); ``DataSplit.train_iterator`` / ``eval_batches`` apply a split's transforms.
"""

from jaxbatch.data.baselines import identifier_tokens, tfidf_retrieval_recall, tfidf_similarity
from jaxbatch.data.cache import cache_dir
from jaxbatch.data.codesearch import (
    CodePair,
    codesearch_arrays,
    extract_from_source,
    load_codesearch_pairs,
)
from jaxbatch.data.digits import digits_arrays
from jaxbatch.data.files import (
    ArrayRecordExamples,
    check_arrays,
    decode_example,
    encode_example,
    load_npz,
    shard_paths,
    write_array_record,
    write_example_shards,
)
from jaxbatch.data.pipeline import (
    MASK_KEY,
    default_read_options,
    make_eval_batches,
    make_train_iterator,
    steps_per_epoch,
)
from jaxbatch.data.registry import (
    ARRAY_DATASETS,
    DATASETS,
    SPLITS,
    dataset_info,
    dataset_options,
    load_arrays,
    load_split,
)
from jaxbatch.data.split import DataSplit, as_split
from jaxbatch.data.stdlib_files import list_stdlib_files, python_version, stdlib_root
from jaxbatch.data.stdlib_text import stdlib_text_arrays, stdlib_token_stream
from jaxbatch.data.tfds_source import tfds_data_source
from jaxbatch.data.tokens import BOS, CLS, PAD, VOCAB_SIZE, decode, encode, encode_batch

__all__ = [
    "ARRAY_DATASETS",
    "BOS",
    "CLS",
    "DATASETS",
    "MASK_KEY",
    "PAD",
    "SPLITS",
    "VOCAB_SIZE",
    "ArrayRecordExamples",
    "DataSplit",
    "as_split",
    "CodePair",
    "cache_dir",
    "check_arrays",
    "codesearch_arrays",
    "dataset_info",
    "dataset_options",
    "decode",
    "decode_example",
    "default_read_options",
    "digits_arrays",
    "encode",
    "encode_batch",
    "encode_example",
    "extract_from_source",
    "identifier_tokens",
    "list_stdlib_files",
    "load_arrays",
    "load_codesearch_pairs",
    "load_npz",
    "load_split",
    "make_eval_batches",
    "make_train_iterator",
    "python_version",
    "shard_paths",
    "steps_per_epoch",
    "stdlib_root",
    "stdlib_text_arrays",
    "stdlib_token_stream",
    "tfds_data_source",
    "tfidf_retrieval_recall",
    "tfidf_similarity",
    "write_array_record",
    "write_example_shards",
]
