#!/usr/bin/env python
"""Fit K-Means on a split of a data store; write centroids, labels and the run record to Zarr.

Example::

    python jobs/fit.py --data outputs/data/fashion-mnist.zarr --split train --k 10 \\
        --out outputs/fashion-k10.zarr

Writes RESULT.zarr (centroids, labels, attributes) and RESULT-report.html
(a Dask performance report) next to it.  A Lloyd fit keeps a checkpoint,
RESULT.zarr.checkpoint.json, updated after every iteration and removed when
the result is complete; --resume continues an interrupted fit from it.
"""

import argparse
import sys

from kmeans_dask import _cli, features, workflows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="STORE.zarr", help="a data store from ingest.py")
    p.add_argument("--split", default="train", help="split to fit (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="RESULT.zarr")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier result store (and its report) at --out; anything "
                        "else there is never replaced")
    p.add_argument("--no-report", action="store_true", help="skip the Dask performance report")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted fit from RESULT.zarr.checkpoint.json "
                        "(Lloyd, --n-init 1; same arguments as the interrupted run)")
    _cli.add_model_options(p)
    p.add_argument("--features", default="none", metavar="none|pca:N",
                   help="cluster N principal components (computed on the workers) instead of "
                        "the pixels; predict, evaluate and classify apply them (default: none)")
    _cli.add_cluster_options(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup(args)
    data = workflows.open_fit_input(args.data, args.split, args.k)
    params = _cli.model_params(args)
    if features.parse(args.features) is not None:
        params["features"] = args.features
    _cli.check_model_params(params)
    out = workflows.check_fit_outputs(data, args.out, overwrite=args.overwrite,
                                      resume=args.resume, with_report=not args.no_report)
    with _cli.open_client(args):
        total = params["max_iter"] if args.algorithm == "lloyd" else None
        bar, callback = _cli.iteration_bar(total, f"fit K={args.k}", args.quiet)
        with bar:
            model, path = workflows.fit_store(data, out, params, overwrite=args.overwrite,
                                              callback=callback, with_report=not args.no_report,
                                              resume=args.resume)
    print(f"inertia {model.inertia_:.6g} after {model.n_iter_} iterations "
          f"({model.fit_seconds_:.1f} s)")
    print(f"wrote {path}")
    if not args.no_report:
        print(f"performance report {workflows.report_path(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
