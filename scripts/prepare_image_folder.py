"""Writes an ImageFolder tree (root/<class>/<images>) as ArrayRecord shards for the trainer.

The trainer reads the splits 'train' and 'test'; write ImageNet's validation images as split
'test', with the train split's class list so both splits share one label order:

  python scripts/prepare_image_folder.py --root /data/imagenet/train --out_dir /data/ai \\
      --name imagenet2012 --split train --num_shards 1024
  python scripts/prepare_image_folder.py --root /data/imagenet/val --out_dir /data/ai \\
      --name imagenet2012 --split test --num_shards 64 --classes_from_out_dir

``val/`` must first be reorganised into one folder per WordNet id (the usual valprep.sh). The
first run also writes /data/ai/imagenet2012-classes.json (sorted WordNet ids, TFDS's label
order); the second reads it. Each record holds the original JPEG bytes and an int32 label.
"""

from __future__ import annotations

import argparse
import sys

from jaxbatch.data import image_folder


def main(argv: list[str] | None = None) -> dict:
    """Parses ``argv`` (default ``sys.argv[1:]``), converts, prints and returns the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="ImageFolder root: root/<class>/<images>")
    parser.add_argument("--out_dir", required=True, help="directory for shards and classes.json")
    parser.add_argument("--name", required=True, help="dataset name, e.g. imagenet2012")
    parser.add_argument("--split", required=True, help="split name: 'train' or 'test'")
    parser.add_argument("--num_shards", type=int, default=1, help="number of ArrayRecord files")
    parser.add_argument(
        "--classes_from_out_dir",
        action="store_true",
        help="label order from {out_dir}/{name}-classes.json (written by the train split)",
    )
    parser.add_argument(
        "--no_verify", action="store_true", help="skip decoding every image before writing"
    )
    args = parser.parse_args(argv)
    classes = (
        image_folder.load_classes(args.out_dir, args.name) if args.classes_from_out_dir else None
    )
    summary = image_folder.convert_image_folder(
        args.root,
        args.out_dir,
        name=args.name,
        split=args.split,
        num_shards=args.num_shards,
        classes=classes,
        verify=not args.no_verify,
    )
    print(
        f"{args.name}/{args.split}: {summary['num_examples']} examples, "
        f"{len(summary['classes'])} classes, {len(summary['paths'])} shards in {args.out_dir}"
    )
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
