#!/usr/bin/env python
"""Grow a data store's train split to N rows with elastic deformations (infinite MNIST).

Example::

    python jobs/augment.py --data outputs/data/mnist.zarr --rows 8100000 \\
        --out outputs/data/mnist8m.zarr

The train split of OUT.zarr holds the source's train rows, then deformations
of them (row i >= n0 deforms source row (i - n0) mod n0), each a function of
the row index and --seed only; the test split is the source's, unchanged.
One Dask task per output chunk, on the job's cluster.  Re-running with the
same arguments is a no-op; --overwrite replaces the store.
"""

import argparse
import sys

from kmeans_dask import _cli, augment, plots, store


def build_parser() -> argparse.ArgumentParser:
    d = augment.Deformation()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="STORE.zarr",
                   help="a data store (from ingest.py, or augment.py)")
    p.add_argument("--rows", required=True, type=int, metavar="N",
                   help="train rows of the output, at least the source's train rows")
    p.add_argument("--out", required=True, metavar="OUT.zarr")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--chunk-rows", type=int, default=store.DEFAULT_CHUNK_ROWS,
                   help="rows per chunk and per task of the train split (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help="field strength in pixels: the RMS displacement is about 0.05 x alpha "
                        "at sigma 4 (default: %(default)s)")
    p.add_argument("--sigma", type=float, default=d.sigma,
                   help="smoothness: sd of the Gaussian smoothing the field, in pixels "
                        "(default: %(default)s)")
    p.add_argument("--max-shift", type=float, default=d.max_shift,
                   help="largest translation on each axis, in pixels (default: %(default)s)")
    p.add_argument("--grid", metavar="PNG", default=None,
                   help="also draw a few originals beside their deformations")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.zarr")
    _cli.add_cluster_options(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup(args)
    deformation = augment.Deformation(alpha=args.alpha, sigma=args.sigma, max_shift=args.max_shift)
    plan = augment.prepare(args.data, args.out, args.rows, seed=args.seed,
                           chunk_rows=args.chunk_rows, deformation=deformation,
                           overwrite=args.overwrite)
    if plan.up_to_date:
        report = augment.run(plan)
    else:
        with _cli.open_client(args):
            bar, progress = _cli.chunk_bar(f"augment {plan.dataset}", args.quiet)
            with bar:
                report = augment.run(plan, progress)
    rows = ", ".join(f"{s}: {n} rows" for s, n in report.splits.items())
    if report.skipped:
        print(f"already up to date {report.path} ({rows})")
    else:
        print(f"wrote {report.path} ({rows}; {report.deformed} deformed) in {report.seconds:.1f} s")
    if args.grid:
        originals, deformed, titles = augment.samples(plan.source, seed=plan.seed,
                                                      deformation=deformation)
        path = plots.deformation_grid(originals, deformed, args.grid, titles=titles,
                                      title=f"{plan.dataset}: originals and deformations "
                                            f"(alpha {deformation.alpha:g}, sigma "
                                            f"{deformation.sigma:g}, seed {plan.seed})")
        print(f"grid {path}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
