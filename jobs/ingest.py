#!/usr/bin/env python
"""Ingest MNIST or Fashion-MNIST from IDX files into a chunked Zarr v3 store.

Example::

    python jobs/ingest.py --dataset fashion-mnist --source ../shared/datasets --out data
"""

import argparse
import sys

from kmeans_dask import _cli, datasets, store


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(datasets.DATASETS))
    p.add_argument("--source", metavar="DIR", default=None,
                   help="directory holding mnist/ and fashion-mnist/ IDX files "
                        "(default: $KMEANS_DASK_DATA, Debian's package, the bundled test split, "
                        "then the download cache)")
    p.add_argument("--out", metavar="DIR", required=True, help="writes DIR/<dataset>.zarr")
    p.add_argument("--chunk-rows", type=int, default=store.DEFAULT_CHUNK_ROWS,
                   help="rows per Zarr chunk (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store that differs")
    p.add_argument("--no-download", action="store_true", help="never download missing splits")
    p.add_argument("--mirror", action="append", metavar="URL", default=None,
                   help="download mirror base URL (repeatable; default: the official mirrors)")
    _cli.add_cluster_options(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup(args)
    if args.chunk_rows < 1:
        raise ValueError(f"--chunk-rows must be a positive integer, got {args.chunk_rows}")
    final = store.data_store_path(args.out, args.dataset)
    if store.output_kind(final) not in (None, store.DATA_FORMAT):
        store.check_output(final, store.DATA_FORMAT, overwrite=args.overwrite)
    sources = datasets.resolve(args.dataset, args.source, download=not args.no_download,
                               mirrors=args.mirror)
    for split, src in sources.items():
        print(f"{args.dataset} {split}: {src.describe()}", file=sys.stderr)
    missing = [s for s in datasets.SPLITS if s not in sources]
    if missing:
        print(f"{args.dataset}: split(s) {missing} not available from any source; "
              f"ingesting {sorted(sources)} only", file=sys.stderr)
    with _cli.open_client(args):
        bar, progress = _cli.chunk_bar(f"ingest {args.dataset}", args.quiet)
        with bar:
            report = store.ingest(args.dataset, args.out, sources, chunk_rows=args.chunk_rows,
                                  overwrite=args.overwrite, progress=progress)
    verb = "already up to date" if report.skipped else "wrote"
    rows = ", ".join(f"{s}: {n} rows" for s, n in report.splits.items())
    print(f"{verb} {report.path} ({rows})")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
