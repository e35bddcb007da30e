#!/usr/bin/env python
"""Mini-batch K-Means: kmeans-dask's MiniBatchKMeans against scikit-learn's.

Fashion-MNIST 70,000 x 784 (train + test, ingested from the IDX files into a
temporary Zarr store), ``batch_size=1024``, each K of ``--ks``, seeds 0 .. n-1:

* kmeans-dask on a LocalCluster of 2 worker processes x 1 thread, the rows
  read from the store (uint8); the time is the whole fit with the labels
  computed (``fit`` then ``labels_.compute()``);
* scikit-learn's MiniBatchKMeans in this process with 2 threads
  (threadpoolctl), on the rows as float32 in [0, 1] already in memory; its
  fit computes the labels (``compute_labels=True``).

Both inertias are recomputed here the same way (float64, every row to its
nearest centre).  The table shows medians over the seeds.

    .venv/bin/python benchmarks/bench_minibatch.py [--source DIR] [--ks 10,256] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "datasets"
FULL_ROWS = 70_000


def inertia_of(X: np.ndarray, centers: np.ndarray) -> float:
    """Sum of squared distances to the nearest centre, float64, the same for both."""
    c = centers.astype(np.float64)
    csq = (c * c).sum(1)
    total = 0.0
    for s in range(0, len(X), 4096):
        x = X[s:s + 4096].astype(np.float64)
        d = (x * x).sum(1)[:, None] - 2 * x @ c.T + csq
        total += float(np.maximum(d.min(1), 0).sum())
    return total


def load(source, scratch):
    import dask.array as da

    from kmeans_dask import datasets, store

    sources = datasets.resolve("fashion-mnist", source, download=False)
    path = store.ingest("fashion-mnist", scratch, sources).path
    return da.concatenate([store.open_data(path, s).images for s in store.list_splits(path)])


def run(args, scratch) -> dict:
    from distributed import Client, LocalCluster
    from sklearn.cluster import MiniBatchKMeans as SKMiniBatchKMeans
    from threadpoolctl import threadpool_limits

    from kmeans_dask import MiniBatchKMeans

    X = load(args.source, scratch)
    Xf = (X.compute().astype(np.float32) / np.float32(255))
    print(f"Fashion-MNIST {X.shape[0]} x {X.shape[1]}, batch_size={args.batch_size}, "
          f"seeds 0..{args.seeds - 1}", file=sys.stderr)
    if X.shape[0] < FULL_ROWS:
        # The fallback sources (the bundled test split) are not what the targets are about.
        print(f"warning: only {X.shape[0]:,} rows, not Fashion-MNIST's {FULL_ROWS:,}: pass "
              f"--source DIR with the full IDX files", file=sys.stderr)
    results = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster, Client(cluster):
        # Warm-up: worker imports and the first graph, not part of any timing.
        MiniBatchKMeans(4, random_state=0, max_iter=1).fit(X).labels_.compute()
        with threadpool_limits(2):
            SKMiniBatchKMeans(4, random_state=0, max_iter=1, batch_size=args.batch_size).fit(Xf)
        for k in args.ks:
            runs = {"kmeans_dask": [], "sklearn": []}
            for seed in range(args.seeds):
                t = time.perf_counter()
                km = MiniBatchKMeans(k, batch_size=args.batch_size, random_state=seed).fit(X)
                km.labels_.compute()
                t = time.perf_counter() - t
                runs["kmeans_dask"].append({"seconds": t, "n_steps": km.n_steps_,
                                            "inertia": inertia_of(Xf, km.cluster_centers_),
                                            "inertia_attr": km.inertia_})
                with threadpool_limits(2):
                    t = time.perf_counter()
                    sk = SKMiniBatchKMeans(k, batch_size=args.batch_size, random_state=seed).fit(Xf)
                    t = time.perf_counter() - t
                runs["sklearn"].append({"seconds": t, "n_steps": int(sk.n_steps_),
                                        "inertia": inertia_of(Xf, sk.cluster_centers_),
                                        "inertia_attr": float(sk.inertia_)})
                print(f"K={k} seed {seed}: kmeans-dask {runs['kmeans_dask'][-1]['seconds']:.2f} s, "
                      f"sklearn {t:.2f} s", file=sys.stderr)
            results[k] = {
                name: {"runs": r, **{f"median_{key}": statistics.median(x[key] for x in r)
                                     for key in ("seconds", "n_steps", "inertia")}}
                for name, r in runs.items()}
    return results


def table(results: dict) -> str:
    lines = ["| K | kmeans-dask s | sklearn s | time ratio | kmeans-dask inertia | sklearn inertia "
             "| inertia ratio | steps (ours / sklearn) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, r in results.items():
        ours, ref = r["kmeans_dask"], r["sklearn"]
        lines.append(
            f"| {k} | {ours['median_seconds']:.2f} | {ref['median_seconds']:.2f} | "
            f"{ours['median_seconds'] / ref['median_seconds']:.2f} | {ours['median_inertia']:.6g} | "
            f"{ref['median_inertia']:.6g} | {ours['median_inertia'] / ref['median_inertia']:.4f} | "
            f"{ours['median_n_steps']:.0f} / {ref['median_n_steps']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=str(SHARED) if (SHARED / "fashion-mnist").is_dir() else None,
                   help="directory with the IDX files (default: ../shared/datasets beside the "
                        "project when it is there, else the sources ingest uses)")
    p.add_argument("--ks", default="10,256", help="comma-separated K (default: 10,256)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per K, medians kept (default: 3)")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per batch (default: 1024)")
    p.add_argument("--json", default=None, help="also write the runs to this JSON file")
    args = p.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",")]
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    with tempfile.TemporaryDirectory(prefix="kmeans-bench-mb-") as scratch:
        results = run(args, scratch)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
