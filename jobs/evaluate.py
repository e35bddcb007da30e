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
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier evaluation folder at --out; anything else is never "
                        "replaced")
    p.add_argument("--allow-other-data", action="store_true",
                   help="evaluate on a data store other than the one the result was fitted on "
                        "(clusters are then mapped to labels on its rows)")
    _cli.add_cluster_options(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup(args)
    from kmeans_dask import store

    # Every check before any cluster work.
    result, fit_data, _ = workflows.open_evaluation_input(
        args.result, args.split, args.data, allow_other_data=args.allow_other_data)
    store.check_output(workflows.evaluation_dir(result.path, args.split, args.out),
                       store.EVALUATION_FORMAT, overwrite=args.overwrite,
                       inputs=[result.path, fit_data.path])
    with _cli.open_client(args):
        report = workflows.evaluate_result(args.result, args.split, data_path=args.data,
                                           out_dir=args.out, overwrite=args.overwrite,
                                           allow_other_data=args.allow_other_data)
    print(metrics.format_report(
        report, f"{report['dataset']} K={report['k']} on {report['split']} "
                f"(labels mapped on {report['mapping_split']})"))
    print(f"wrote {report['metrics_path']}")
    for name, path in report["pictures"].items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
