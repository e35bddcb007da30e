#!/usr/bin/env python
"""Label the rows of a data store with a fitted result (the result store is the model).

Example::

    python jobs/predict.py --result outputs/fashion-k10.zarr \\
        --data outputs/data/fashion-mnist.zarr --split test --out outputs/fashion-test-labels.zarr
"""

import argparse
import sys

from kmeans_dask import _cli, workflows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result", required=True, metavar="RESULT.zarr")
    p.add_argument("--data", required=True, metavar="STORE.zarr")
    p.add_argument("--split", default="test", help="default: %(default)s")
    p.add_argument("--out", required=True, metavar="LABELS.zarr")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier labels store at --out; anything else is never replaced")
    p.add_argument("--allow-other-data", action="store_true",
                   help="apply the result to a data store of another data set than it was fitted on")
    _cli.add_cluster_options(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup(args)
    from kmeans_dask import store

    # Every check before any cluster work.
    result = store.read_result(args.result)
    data = store.open_data(args.data, args.split)
    workflows.check_same_data(result.attrs, data, result.path,
                              allow_other_data=args.allow_other_data)
    store.check_output(args.out, store.LABELS_FORMAT, overwrite=args.overwrite,
                       inputs=[result.path, data.path])
    with _cli.open_client(args):
        path = workflows.predict_store(args.result, args.data, args.split, args.out,
                                       overwrite=args.overwrite,
                                       allow_other_data=args.allow_other_data)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
