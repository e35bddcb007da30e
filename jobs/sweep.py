#!/usr/bin/env python
"""The elbow study: fit every K, report train/test inertia, accuracy, homogeneity and NMI.

Example::

    python jobs/sweep.py --data outputs/data/mnist.zarr --ks 10,16,36,64,144,256,400 \\
        --out outputs/mnist-sweep

Writes sweep.csv, sweep.json and elbow.png into --out.
"""

import argparse
import sys

from kmeans_dask import _cli, workflows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="STORE.zarr")
    p.add_argument("--ks", required=True, help="comma-separated K values, e.g. 10,16,36,64")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier sweep folder at --out; anything else is never replaced")
    _cli.add_model_options(p, k_required=False)
    _cli.add_cluster_options(p)
    return p


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--ks must be comma-separated integers, got {text!r}") from None
    if not ks:
        raise ValueError("--ks is empty")
    bad = [k for k in ks if k < 1]
    if bad:
        raise ValueError(f"--ks must be positive integers, got {bad}")
    return ks


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup(args)
    ks = parse_ks(args.ks)
    from kmeans_dask import store

    params = _cli.model_params(args)
    _cli.check_model_params({**params, "n_clusters": max(ks)})
    # Every check before any cluster work.
    for split in store.list_splits(args.data):
        data = store.open_data(args.data, split)
    store.check_output(args.out, store.SWEEP_FORMAT, overwrite=args.overwrite, inputs=[data.path])
    with _cli.open_client(args):
        print(f"{'K':>5} {'train inertia':>14} {'test inertia':>14} {'accuracy':>9} "
              f"{'homog.':>7} {'NMI':>7} {'iters':>6} {'s':>6}")

        def show(r):
            test = f"{r['test_inertia']:.6g}" if r["test_inertia"] is not None else "-"
            print(f"{r['k']:>5} {r['train_inertia']:>14.6g} {test:>14} {r['accuracy']:>9.4f} "
                  f"{r['homogeneity']:>7.4f} {r['nmi']:>7.4f} {r['n_iter']:>6} {r['seconds']:>6.1f}",
                  flush=True)

        workflows.sweep(args.data, ks, params, args.out, progress=show, overwrite=args.overwrite)
    print(f"wrote {args.out}/sweep.csv, sweep.json and elbow.png")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
