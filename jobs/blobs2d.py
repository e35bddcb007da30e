#!/usr/bin/env python
"""The 2-D demo: two Gaussian blobs (means (1, 1) and (5, 5), 100 points each, sd 1), K = 2.

Draws the data with the initial centres, and the final clustering with its
centres, into OUT/blobs2d.png.
"""

import argparse
import json
import sys

from kmeans_dask import _cli, workflows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/blobs2d", metavar="DIR")
    p.add_argument("--init", default="random", choices=["k-means||", "k-means++", "random"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier blobs2d folder")
    _cli.add_cluster_options(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup(args)
    from kmeans_dask import store

    store.check_output(args.out, workflows.BLOBS_FORMAT, overwrite=args.overwrite)
    with _cli.open_client(args):
        out = workflows.blobs_demo(args.out, init=args.init, seed=args.seed,
                                   overwrite=args.overwrite)
    print(json.dumps({k: out[k] for k in ("init", "centers", "inertia", "n_iter", "ari")}, indent=1))
    print(f"picture {out['picture']}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
