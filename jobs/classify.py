#!/usr/bin/env python
"""Classify your own digit (or clothing) images with a fitted result.

Each image (PNG, JPEG, ...; or a directory of them) is brought to MNIST's
form: grey, light ink on dark (inverted when the background is light), the
ink fitted into a 20 x 20 box keeping its aspect ratio, and centred by its
centre of mass in 28 x 28.  Its class is the majority true label of its
nearest cluster, learned on the split the result was fitted on.  Prints
file, class, cluster and distance per image; --out also writes them as CSV.

Example::

    python jobs/classify.py --result outputs/mnist-k10.zarr my-digits/ --out my-digits.csv
"""

import argparse
import sys

from kmeans_dask import _cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result", required=True, metavar="RESULT.zarr")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories of them")
    p.add_argument("--data", default=None, metavar="STORE.zarr",
                   help="the data store the result was fitted on, if it has moved "
                        "(default: the one the result records)")
    p.add_argument("--out", default=None, metavar="FILE.csv", help="also write the table as CSV")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("-q", "--quiet", action="store_true", help="only print warnings and errors")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup(args)
    from kmeans_dask import classify, store

    have = store.output_kind(args.out) if args.out else None
    if have is not None and not args.overwrite:
        raise store.exists_error(store.absolute(args.out), f"({have})")
    # Small work (the images, the fitted split's labels, k centres): no cluster needed.
    rows = classify.classify(args.result, args.images, data_path=args.data)
    width = max(len(r["file"]) for r in rows)
    print(f"{'file':<{width}}  class        cluster  distance")
    for r in rows:
        print(f"{r['file']:<{width}}  {r['class']:<12} {r['cluster']:>7}  {r['distance']:8.3f}")
    if args.out:
        store.write_text(store.absolute(args.out), classify.to_csv(rows))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
