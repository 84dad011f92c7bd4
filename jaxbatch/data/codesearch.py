"""``codesearch``: (docstring, function source) pairs mined from the Python standard library.

For every function or method with a docstring in the stdlib source (see ``stdlib_files``), the
query is the docstring's first paragraph and the target is the function's source *with the
docstring statement removed* (signature and body kept), so retrieval cannot match the text
verbatim. Pairs whose code still contains the query, trivially short pairs, and repeated queries
or targets are dropped. The split is by a SHA-256 hash of ``module:qualname``, so it never changes
between runs or machines. The extraction (a few seconds) is cached as JSON, keyed by the
interpreter version, the extractor version and a fingerprint of the file list.
"""

from __future__ import annotations

import ast
import dataclasses
import warnings
from collections.abc import Iterator

import numpy as np

from jaxbatch.data import cache, stdlib_files, subtokens, tokens

EXTRACTOR_VERSION = 1
MIN_DOC_CHARS = 20  # a query shorter than this says almost nothing ("Return x.")
MIN_DOC_WORDS = 3
MIN_CODE_CHARS = 64  # a target shorter than this is a one-line accessor
SPLITS = ("train", "test", "all")
TOKENIZERS = ("bytes", "subtokens", "subtokens+prefixes", "subtokens+bigrams")

_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_NESTED_BODIES = ("body", "orelse", "finalbody", "handlers")


@dataclasses.dataclass(frozen=True)
class CodePair:
    """One retrieval pair: the query ``doc`` and the target ``code`` of ``module.qualname``."""

    module: str
    qualname: str
    doc: str
    code: str


def _first_paragraph(docstring: str) -> str:
    return " ".join(docstring.strip().split("\n\n")[0].split())


def _definitions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, ast.AST]]:
    """Functions in ``body`` with their qualnames, descending into classes, functions and blocks."""
    for node in body:
        if isinstance(node, _DEFINITIONS):
            yield prefix + node.name, node
            yield from _definitions(node.body, f"{prefix}{node.name}.<locals>.")
        elif isinstance(node, ast.ClassDef):
            yield from _definitions(node.body, f"{prefix}{node.name}.")
        else:  # functions defined under if/try/with/for at any level
            for field in _NESTED_BODIES:
                for child in getattr(node, field, None) or ():
                    block = child.body if isinstance(child, ast.ExceptHandler) else [child]
                    yield from _definitions(block, prefix)


def _strip_docstring(lines: list[str], node: ast.FunctionDef) -> str | None:
    """Source of ``node`` without its docstring lines, dedented; None if that is not clean."""
    doc_stmt = node.body[0]
    if len(node.body) == 1:
        return None  # nothing but the docstring: an abstract method or a stub
    first, last = doc_stmt.lineno - 1, doc_stmt.end_lineno - 1
    # The docstring must own its lines, or removing them would cut code.
    if (
        lines[first][: doc_stmt.col_offset].strip()
        or lines[last][doc_stmt.end_col_offset :].strip()
    ):
        return None
    kept = lines[node.lineno - 1 : first] + lines[last + 1 : node.end_lineno]
    indent = node.col_offset
    out = [line[indent:] if not line[:indent].strip() else line for line in kept]
    return "".join(out).rstrip()


def extract_from_source(source: str, module: str) -> list[CodePair]:
    """All (first docstring paragraph, code without docstring) pairs of one module's source.

    Args:
      source: Python source text.
      module: dotted module name recorded in each pair.

    Returns:
      pairs in source order, already filtered for length and for code that quotes its query;
      an empty list if the source does not parse.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    pairs = []
    for qualname, node in _definitions(tree.body, ""):
        docstring = ast.get_docstring(node, clean=True)
        if not docstring:
            continue
        doc = _first_paragraph(docstring)
        if len(doc) < MIN_DOC_CHARS or len(doc.split()) < MIN_DOC_WORDS:
            continue
        code = _strip_docstring(lines, node)
        if code is None or len(code) < MIN_CODE_CHARS:
            continue
        if doc.lower() in " ".join(code.split()).lower():
            continue
        pairs.append(CodePair(module, qualname, doc, code))
    return pairs


def extract_pairs(files: list[stdlib_files.StdlibFile] | None = None) -> list[CodePair]:
    """Extracts and deduplicates pairs from the standard library (no cache).

    Args:
      files: the files to read; defaults to :func:`stdlib_files.list_stdlib_files`.

    Returns:
      pairs in (file path, source) order; a pair is kept only if neither its query nor its
      target occurred earlier, so every query has exactly one correct target.
    """
    files = stdlib_files.list_stdlib_files() if files is None else files
    seen_docs: set[str] = set()
    seen_code: set[str] = set()
    pairs = []
    for f in files:
        source = stdlib_files.read_source(f.path)
        if source is None:
            continue
        for pair in extract_from_source(source, f.module):
            if pair.doc in seen_docs or pair.code in seen_code:
                continue
            seen_docs.add(pair.doc)
            seen_code.add(pair.code)
            pairs.append(pair)
    return pairs


def _cache_name(fingerprint: str) -> str:
    return f"codesearch-{stdlib_files.python_version()}-v{EXTRACTOR_VERSION}-{fingerprint}.json"


def _all_pairs(use_cache: bool) -> list[CodePair]:
    files = stdlib_files.list_stdlib_files()
    name = _cache_name(stdlib_files.fingerprint(files))
    cached = cache.read_json(name) if use_cache else None
    if cached is not None and cached.get("extractor_version") == EXTRACTOR_VERSION:
        return [CodePair(*row) for row in cached["pairs"]]
    pairs = extract_pairs(files)
    if use_cache:
        cache.write_json(
            name,
            {
                "dataset": "codesearch",
                "extractor_version": EXTRACTOR_VERSION,
                "python_version": stdlib_files.python_version(),
                "stdlib": str(stdlib_files.stdlib_root()),
                "num_files": len(files),
                "pairs": [[p.module, p.qualname, p.doc, p.code] for p in pairs],
            },
        )
    return pairs


def split_pairs(
    pairs: list[CodePair], split: str, *, test_fraction: float = 0.1, max_test: int | None = None
) -> list[CodePair]:
    """Selects one split by hash: test iff sha256(module:qualname) / 2**64 < test_fraction.

    Args:
      pairs: pairs from :func:`extract_pairs`.
      split: 'train', 'test' or 'all'.
      test_fraction: expected fraction of pairs in 'test'.
      max_test: keep only the ``max_test`` test pairs with the smallest hashes (a fixed, fast
        evaluation subset); the pairs dropped from 'test' do not move to 'train'.

    Returns:
      the selected pairs, in their original order.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown codesearch split {split!r}; expected one of {SPLITS}")
    stdlib_files.check_fraction("test_fraction", test_fraction)
    if max_test is not None and max_test < 1:
        raise ValueError(f"max_test must be None or >= 1, got {max_test!r}")
    if split == "all":
        return list(pairs)
    keys = [stdlib_files.hash_unit(f"{p.module}:{p.qualname}") for p in pairs]
    if split == "train":
        return [p for p, k in zip(pairs, keys, strict=True) if k >= test_fraction]
    test = [(k, i) for i, k in enumerate(keys) if k < test_fraction]
    if max_test is not None:
        test = sorted(test)[:max_test]
    return [pairs[i] for _, i in sorted(test, key=lambda t: t[1])]


def load_codesearch_pairs(
    split: str = "all",
    *,
    test_fraction: float = 0.1,
    max_test: int | None = None,
    use_cache: bool = True,
) -> list[CodePair]:
    """(docstring, function source) pairs of the running interpreter's standard library.

    Args:
      split: 'train', 'test' or 'all'.
      test_fraction: fraction of pairs assigned to 'test' by hash.
      max_test: cap on the number of test pairs (see :func:`split_pairs`).
      use_cache: read/write the JSON cache in :func:`cache.cache_dir`.

    Returns:
      a list of :class:`CodePair` (several thousand for 'all' on CPython 3.11).
    """
    return split_pairs(_all_pairs(use_cache), split, test_fraction=test_fraction, max_test=max_test)


def codesearch_arrays(
    split: str,
    *,
    doc_len: int = 128,
    code_len: int = 256,
    add_cls: bool = True,
    tokenizer: str = "bytes",
    test_fraction: float = 0.1,
    max_test: int | None = None,
    use_cache: bool = True,
) -> dict[str, np.ndarray]:
    """Tokenized codesearch pairs: row i of 'doc' matches row i of 'code'.

    Args:
      split: 'train', 'test' or 'all'.
      doc_len: tokens per query (truncated / padded with PAD = 0).
      code_len: tokens per target.
      add_cls: start every row with the CLS token (byte tokens only).
      tokenizer: 'bytes' (``tokens``: one id per UTF-8 byte), 'subtokens' (hashed identifier
        sub-tokens, see ``subtokens``), 'subtokens+prefixes' (and their 4-letter prefixes) or
        'subtokens+bigrams' (and adjacent sub-token pairs).
      test_fraction: fraction of pairs assigned to 'test'.
      max_test: cap on the number of test pairs.
      use_cache: use the on-disk extraction cache.

    Returns:
      {'doc': int32 [n, doc_len], 'code': int32 [n, code_len]}.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(
            f"unknown codesearch tokenizer {tokenizer!r}; expected one of {TOKENIZERS}"
        )
    pairs = load_codesearch_pairs(
        split, test_fraction=test_fraction, max_test=max_test, use_cache=use_cache
    )
    if tokenizer != "bytes":
        extra = {
            "prefixes": tokenizer == "subtokens+prefixes",
            "bigrams": tokenizer == "subtokens+bigrams",
        }
        return {
            "doc": subtokens.encode_subtokens([p.doc for p in pairs], doc_len, **extra),
            "code": subtokens.encode_subtokens([p.code for p in pairs], code_len, **extra),
        }
    return {
        "doc": tokens.encode_batch([p.doc for p in pairs], doc_len, add_cls=add_cls),
        "code": tokens.encode_batch([p.code for p in pairs], code_len, add_cls=add_cls),
    }
