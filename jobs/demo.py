#!/usr/bin/env python
"""The demo: ingest -> fit K = 10 -> evaluate, on Fashion-MNIST and MNIST, on one local cluster.

Uses the full data sets when a source holds them (--source, $KMEANS_DASK_DATA,
Debian's package, the download cache or a download), otherwise the test
splits bundled with the package, and says which.  Ends by printing where the
outputs, pictures and performance reports are.
"""

import argparse
import sys
from pathlib import Path

from kmeans_dask import _cli, datasets, metrics, store, workflows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs", metavar="DIR")
    p.add_argument("--source", default=None, metavar="DIR",
                   help="directory holding mnist/ and fashion-mnist/ IDX files")
    p.add_argument("--datasets", default="fashion-mnist,mnist")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-download", action="store_true")
    _cli.add_cluster_options(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup(args)
    out = Path(args.out)
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    plan = {}
    for name in names:
        sources = datasets.resolve(name, args.source, download=not args.no_download)
        for split, src in sources.items():
            print(f"{name} {split}: {src.describe()}", file=sys.stderr)
        if "train" not in sources:
            print(f"{name}: the train split is not reachable; using the bundled test split "
                  f"(10,000 images) for fitting and evaluation", file=sys.stderr)
        plan[name] = sources
    summary = []
    with _cli.open_client(args):
        for name, sources in plan.items():
            report = store.ingest(name, out / "data", sources)
            splits = store.list_splits(report.path)
            fit_split = "train" if "train" in splits else "test"
            data = workflows.open_fit_input(report.path, fit_split, args.k)
            result = out / f"{name}-k{args.k}.zarr"
            bar, callback = _cli.iteration_bar(300, f"{name} K={args.k}", args.quiet)
            with bar:
                model, result = workflows.fit_store(
                    data, result, {"n_clusters": args.k, "random_state": args.seed},
                    overwrite=True, callback=callback)
            ev = workflows.evaluate_result(result, "test", overwrite=True)
            print(metrics.format_report(
                ev, f"\n{name}: K={args.k} fitted on {fit_split} ({data.images.shape[0]} images), "
                    f"scored on test"))
            summary.append((name, report.path, result, ev))
    print("\noutputs:")
    for name, data_path, result, ev in summary:
        print(f"  {name}: data {data_path}")
        print(f"  {name}: result {result} (accuracy {ev['accuracy']:.3f}, NMI {ev['nmi']:.3f})")
        print(f"  {name}: performance report {workflows.report_path(result)}")
        print(f"  {name}: metrics {ev['metrics_path']}")
        for pic, path in ev["pictures"].items():
            print(f"  {name}: {pic} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
