#!/usr/bin/env python
"""Raw pixels against principal components before K-Means (``--features pca:N``).

For MNIST and Fashion-MNIST (stores made by ``jobs/ingest.py``), K = 10 and
256, on a LocalCluster of 2 workers x 1 thread: the whole fit's wall time
(the PCA on the workers included), its iterations, and the test split's
majority-label accuracy (mapping learned on train) and NMI.  One seed.

Run: ``python benchmarks/bench_features.py --data outputs/data --json benchmarks/results-features.json``
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="outputs/data")
    p.add_argument("--ks", default="10,256")
    p.add_argument("--features", default="none,pca:50,pca:100")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import numpy as np
    from distributed import Client, LocalCluster
    from sklearn.metrics import normalized_mutual_info_score

    from kmeans_dask import KMeans, features, metrics, store

    rows = []
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster):
        for name in ("mnist", "fashion-mnist"):
            train = store.open_data(f"{args.data}/{name}.zarr", "train")
            test = store.open_data(f"{args.data}/{name}.zarr", "test")
            y, yt = np.asarray(train.labels.compute()), np.asarray(test.labels.compute())
            for k in map(int, args.ks.split(",")):
                for spec in args.features.split(","):
                    n = features.parse(spec)
                    t = time.perf_counter()
                    X, Xt = train.images, test.images
                    if n:
                        f = features.PCAFeatures(n, scale=1 / 255).fit(X)
                        X, Xt = f.transform(X), f.transform(Xt)
                    km = KMeans(k, random_state=0).fit(X)
                    labels = np.asarray(km.labels_.compute())
                    seconds = time.perf_counter() - t
                    mapping = metrics.majority_mapping(y, labels, k, 10)
                    pred = np.asarray(km.predict(Xt).compute())
                    row = {"data": name, "k": k, "features": spec, "fit_s": seconds,
                           "n_iter": km.n_iter_, "accuracy": float((mapping[pred] == yt).mean()),
                           "nmi": float(normalized_mutual_info_score(yt, pred))}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
