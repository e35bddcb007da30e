#!/usr/bin/env python
"""Evaluate a fitted result against the true labels: majority-label accuracy, NMI, ARI, ...

Each cluster is mapped to its most common true label on the split the model
was fitted on (normally train); the mapping is scored on --split.  Writes
metrics.json, centroids.png, confusion.png and members.png.

Example::

    python jobs/evaluate.py --result outputs/fashion-k10.zarr --split test
"""

import argparse
import sys

from kmeans_dask import _cli, metrics, workflows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result", required=True, metavar="RESULT.zarr")
    p.add_argument("--split", default="test", help="split to score (default: %(default)s)")
    p.add_argument("--data", default=None, metavar="STORE.zarr",
                   help="data store (default: the one recorded in the result)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: RESULT-eval-SPLIT next to the result)")
    _cli.add_cluster_options(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup_logging(args.quiet)
    from kmeans_dask import load

    load(args.result)  # schema check before any cluster work
    with _cli.open_client(args):
        report = workflows.evaluate_result(args.result, args.split, data_path=args.data,
                                           out_dir=args.out)
    print(metrics.format_report(
        report, f"{report['dataset']} K={report['k']} on {report['split']} "
                f"(labels mapped on {report['mapping_split']})"))
    print(f"wrote {report['metrics_path']}")
    for name, path in report["pictures"].items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
