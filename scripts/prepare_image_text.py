"""Writes image-caption pairs listed in a JSONL manifest as 'image_text' ArrayRecord shards.

Each manifest line is a JSON object with the image path (absolute, or relative to the manifest)
and either its caption text or the caption's token ids from a tokenizer run beforehand:

  {"image": "images/000001.jpg", "caption": "a dog on a beach"}
  {"image": "images/000002.jpg", "tokens": [312, 88, 1042, 7]}

The trainer reads the splits 'train' and 'test' from one directory (``configs/siglip_pod.py``
with ``--config.dataset.options.data_dir=OUT_DIR``):

  python scripts/prepare_image_text.py --manifest train.jsonl --out_dir /data/pairs \\
      --split train --num_shards 1024
  python scripts/prepare_image_text.py --manifest heldout.jsonl --out_dir /data/pairs --split test

Text captions become byte tokens (vocabulary 258) when read; token ids are used as stored. The
original image bytes are stored (not re-encoded); every image is decoded once to check it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

from jaxbatch.data import image_text


def read_manifest(path: str) -> Iterator[tuple[str, str | list[int]]]:
    """(image path, caption or token ids) per line of a JSONL manifest; errors name the line."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON object: {err}") from err
            keys = {"caption", "tokens"} & set(entry) if isinstance(entry, dict) else set()
            if not isinstance(entry, dict) or "image" not in entry or len(keys) != 1:
                raise ValueError(
                    f"{path}:{number}: expected {{'image': path, 'caption': text}} or "
                    f"{{'image': path, 'tokens': [ids]}}, got {line.strip()[:200]!r}"
                )
            yield os.path.join(base, entry["image"]), entry[keys.pop()]


def main(argv: list[str] | None = None) -> dict:
    """Parses ``argv`` (default ``sys.argv[1:]``), converts, prints and returns the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="JSONL file of image/caption pairs")
    parser.add_argument("--out_dir", required=True, help="directory for the shards")
    parser.add_argument("--split", required=True, help="split name: 'train' or 'test'")
    parser.add_argument("--num_shards", type=int, default=1, help="number of ArrayRecord files")
    parser.add_argument("--no_verify", action="store_true", help="skip decoding every image")
    args = parser.parse_args(argv)
    paths, count = image_text.write_image_text_shards(
        read_manifest(args.manifest),
        args.out_dir,
        split=args.split,
        num_shards=args.num_shards,
        verify=not args.no_verify,
    )
    print(f"image_text/{args.split}: {count} pairs, {len(paths)} shards in {args.out_dir}")
    return {"paths": paths, "num_examples": count}


if __name__ == "__main__":
    main(sys.argv[1:])
