#!/usr/bin/env python
"""Side-by-side K-Means benchmark on Fashion-MNIST (all 70,000 images).

In one process and on the same data, initial centres and iteration count:

* kmeans-dask on a LocalCluster of 2 workers x 1 thread (rows persisted as uint8);
* dask-ml's KMeans on the same cluster (rows persisted as float32, as it needs);
* scikit-learn's KMeans (lloyd) and MiniBatchKMeans in this process (2 threads).

For each K it reports the per-iteration time (median of repeated fits, as
``(T(iters) - T(1)) / (iters - 1)`` so set-up is not counted; for
kmeans-dask also the median of its own per-iteration record), the time of a
default fit to convergence (init included), the inertia of every result
computed the same way (float64, here), and the peak and data memory of the
workers.  It also times an empty iteration of kmeans-dask's orchestration
(the same tasks, doing no work).  Writes a table and JSON.

Run: ``python benchmarks/bench_kmeans.py --source ../shared/datasets``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _noop_pass(spec, centers, indices, rows, weights, publish=()):
    """The pass task's arguments and reply, with no work done (every cluster keeps a row)."""
    from distributed import get_worker

    k, d = centers.shape
    return {"sums": np.zeros((k, d)), "counts": np.ones(k), "rows": 0, "computed": 0,
            "pairs": 0, "changed": 0, "worker": get_worker().address}


def _noop_chunks(states, chunks, centers, spec, pool=None, workspaces=None):
    """A chained step's pass with no work done (every cluster keeps a row, so the loop goes on)."""
    k, d = centers.shape
    return {"sums": np.zeros((k, d)), "counts": np.ones(k), "rows": 0, "computed": 0,
            "pairs": 0, "changed": 0}


def empty_iteration(client, Xp, k=10) -> dict:
    """Seconds per iteration of a whole 20-iteration engine loop whose tasks do no
    work (2 workers), submission included: the
    chained loop (``peer-workers``, the default here) and the loop through the client."""
    import dask

    from kmeans_dask._passes import ChunkedRows
    from kmeans_dask.engine import ClusterEngine

    class NoopEngine(ClusterEngine):
        task = staticmethod(_noop_pass)
        chunks_pass = staticmethod(_noop_chunks)

    rows = ChunkedRows(Xp, None, scale=1 / 255)
    out = {}
    for name, peers in (("chained", 4), ("client", 0)):
        with dask.config.set({"kmeans_dask.peer-workers": peers}):
            engine = NoopEngine(client, rows, rows.stats(), persisted=True)
            c = np.zeros((k, Xp.shape[1]))
            stamps = [time.perf_counter()]
            for step in engine.iterate(c, 1, max_iter=20, tol=-1.0):
                assert step["kind"] in ("iteration", "end"), step["kind"]
                stamps.append(time.perf_counter())
            engine.close()
        # The whole loop, start to end, per iteration: the chained loop's
        # records reach the client in bursts, so gaps between them say little.
        out[name] = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return out


def _reset_peak():
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) of this process.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _trim():
    # Hands memory that is free but kept by glibc's allocator back to the OS, so
    # a second reading can tell live data from allocator retention.
    import ctypes

    return ctypes.CDLL("libc.so.6").malloc_trim(0)


def _memory():
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def inertia_of(X: np.ndarray, centers: np.ndarray, scale: float | None = None) -> float:
    """Sum of squared distances to the nearest centre, float64, computed the same for all.

    ``X`` is float64 already scaled, or (with ``scale``) raw rows converted block by block.
    """
    c = centers.astype(np.float64)
    csq = (c * c).sum(1)
    total = 0.0
    for s in range(0, len(X), 4096):
        x = X[s:s + 4096] if scale is None else X[s:s + 4096].astype(np.float64) * scale
        d = (x * x).sum(1)[:, None] - 2 * x @ c.T + csq
        total += float(np.maximum(d.min(1), 0).sum())
    return total


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def load_rows(args, scratch):
    from kmeans_dask import datasets, store

    path = Path(args.store) if args.store else None
    if path is None or not path.exists():
        sources = datasets.resolve("fashion-mnist", args.source, download=False)
        path = store.ingest("fashion-mnist", scratch, sources).path
    import dask.array as da

    splits = [store.open_data(path, s).images for s in store.list_splits(path)]
    return da.concatenate(splits), path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=None, help="directory with the IDX files (default: sources as ingest)")
    p.add_argument("--store", default=None, help="an existing fashion-mnist.zarr to read instead")
    p.add_argument("--ks", default="10,256", help="comma-separated numbers of clusters (default: 10,256)")
    p.add_argument("--iters", type=int, default=20,
                   help="Lloyd iterations per timed fit, at least 2 (default: 20)")
    p.add_argument("--repeats", type=int, default=3, help="timed fits per engine; the median is kept (default: 3)")
    p.add_argument("--skip-default-fits", action="store_true",
                   help="leave out the default fits to convergence (the longest part)")
    p.add_argument("--json", default="benchmarks/results.json", help="where to write the results")
    args = p.parse_args(argv)
    if args.iters < 2:
        p.error(f"--iters must be at least 2 (the per-iteration time is (T(iters) - T(1)) / "
                f"(iters - 1)), got {args.iters}")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    with tempfile.TemporaryDirectory(prefix="kmeans-bench-") as scratch:
        run(args, scratch)


def run(args, scratch):
    import dask_ml.cluster
    from distributed import Client, LocalCluster, wait
    from sklearn.cluster import KMeans as SKKMeans
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_info, threadpool_limits

    from kmeans_dask import KMeans
    from kmeans_dask import MiniBatchKMeans as MiniBatchKMeansDask
    from kmeans_dask import config
    from kmeans_dask.kmeans import _regroup

    X, path = load_rows(args, scratch)
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "blas": [(i["internal_api"], i.get("architecture")) for i in threadpool_info()]},
              "data": {"store": str(path), "shape": list(X.shape), "chunks": len(X.chunks[0]),
                       "uint8_bytes": int(X.nbytes)},
              "iters": args.iters, "repeats": args.repeats, "results": []}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        # Warm up (imports, Zarr codecs) so the RSS growth below is the data alone.
        X[:10].compute()
        client.run(lambda: X[:1000].compute(scheduler="sync"))
        base = client.run(_memory)
        # The grouping KMeans.fit applies itself, done once here so every fit reuses it.
        Xp, _ = _regroup(X, None, config.get("task-bytes"))
        Xp = Xp.persist()
        wait(Xp)
        after = client.run(_memory)
        client.run(_trim)
        trimmed = client.run(_memory)
        data_bytes = sum(after[w]["VmRSS"] - base[w]["VmRSS"] for w in after)
        trimmed_bytes = sum(trimmed[w]["VmRSS"] - base[w]["VmRSS"] for w in after)
        report["data"]["task_chunks"] = len(Xp.chunks[0])
        report["data"]["worker_rss_for_data"] = data_bytes
        report["data"]["ratio_to_uint8"] = data_bytes / X.nbytes
        report["data"]["worker_rss_for_data_after_trim"] = trimmed_bytes
        report["data"]["per_worker_rss_growth"] = [after[w]["VmRSS"] - base[w]["VmRSS"]
                                                   for w in sorted(after)]
        managed = sum(client.run(lambda dask_worker: sum(
            getattr(v, "nbytes", 0) for v in dask_worker.data.values())).values())
        report["data"]["dask_managed_bytes"] = managed
        Xn = Xp.compute()
        Xf64 = Xn / 255.0
        Xf32 = Xf64.astype(np.float32)
        Xd32 = (Xp.astype(np.float32) / 255).persist()
        wait(Xd32)

        # Empty iteration: the engine's tasks and combine, with passes that do no work.
        report["empty_iteration_s"] = empty_iteration(client, Xp)

        for k in [int(v) for v in args.ks.split(",")]:
            rng = np.random.default_rng(0)
            init = Xf64[rng.choice(len(Xf64), k, replace=False)]
            res = {"k": k}

            def ours(iters):
                client.run(_reset_peak)
                km = KMeans(k, init=init, max_iter=iters, tol=0).fit(Xp)
                return km

            ours(1)  # warm-up (imports, first-call costs) before anything is timed
            t1, _ = timed(lambda: ours(1), args.repeats)
            tn, km = timed(lambda: ours(args.iters), args.repeats)
            peak = client.run(_memory)
            res["kmeans_dask"] = {
                "per_iter_s": (tn - t1) / (args.iters - 1),
                "per_iter_history_median_s": statistics.median(h["seconds"] for h in km.history_),
                "fit_s": tn, "inertia": inertia_of(Xf64, km.cluster_centers_),
                "peak_worker_rss": max(v["VmHWM"] for v in peak.values())}

            def daskml(iters):
                client.run(_reset_peak)
                return dask_ml.cluster.KMeans(n_clusters=k, init=init, max_iter=iters,
                                              tol=0).fit(Xd32)

            daskml(1)
            t1, _ = timed(lambda: daskml(1), args.repeats)
            tn, dm = timed(lambda: daskml(args.iters), args.repeats)
            peak = client.run(_memory)
            res["dask_ml"] = {"per_iter_s": (tn - t1) / (args.iters - 1), "fit_s": tn,
                              "inertia": inertia_of(Xf64, dm.cluster_centers_),
                              "peak_worker_rss": max(v["VmHWM"] for v in peak.values())}

            with threadpool_limits(2):
                def skl(iters):
                    return SKKMeans(k, init=init, n_init=1, max_iter=iters, tol=0,
                                    algorithm="lloyd").fit(Xf32)

                skl(1)
                t1, _ = timed(lambda: skl(1), args.repeats)
                tn, sk = timed(lambda: skl(args.iters), args.repeats)
            res["sklearn"] = {"per_iter_s": (tn - t1) / (args.iters - 1), "fit_s": tn,
                              "inertia": inertia_of(Xf64, sk.cluster_centers_)}

            if not args.skip_default_fits:
                t, km = timed(lambda: KMeans(k, random_state=0).fit(Xp), 1)
                res["kmeans_dask"].update(default_fit_s=t, default_n_iter=km.n_iter_,
                                          default_inertia=inertia_of(Xf64, km.cluster_centers_))
                t, km = timed(lambda: MiniBatchKMeansDask(k, random_state=0).fit(Xp), 1)
                res["kmeans_dask_minibatch"] = {
                    "default_fit_s": t, "default_n_steps": km.n_steps_,
                    "default_inertia": inertia_of(Xf64, km.cluster_centers_)}
                t, dm = timed(lambda: dask_ml.cluster.KMeans(n_clusters=k, random_state=0).fit(Xd32), 1)
                res["dask_ml"].update(default_fit_s=t, default_n_iter=int(dm.n_iter_),
                                      default_inertia=inertia_of(Xf64, dm.cluster_centers_))
                with threadpool_limits(2):
                    t, sk = timed(lambda: SKKMeans(k, n_init=1, random_state=0).fit(Xf32), 1)
                    res["sklearn"].update(default_fit_s=t, default_n_iter=int(sk.n_iter_),
                                          default_inertia=inertia_of(Xf64, sk.cluster_centers_))
                    t, mb = timed(lambda: MiniBatchKMeans(k, n_init=1, random_state=0).fit(Xf32), 1)
                    res["sklearn_minibatch"] = {"default_fit_s": t, "default_n_steps": int(mb.n_steps_),
                                                "default_inertia": inertia_of(Xf64, mb.cluster_centers_)}
            report["results"].append(res)
            print_table([res], report)

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    empty = report["empty_iteration_s"]
    print(f"\nempty iteration (orchestration only: one kmeans-lloyd task per worker): "
          f"{1e3 * empty['chained']:.1f} ms chained, {1e3 * empty['client']:.1f} ms through "
          f"the client")
    print(f"worker memory for the data: RSS growth {report['data']['worker_rss_for_data'] / 2**20:.1f} MiB "
          f"= {report['data']['ratio_to_uint8']:.2f} x its uint8 size; held by Dask "
          f"{report['data']['dask_managed_bytes'] / 2**20:.1f} MiB "
          f"({report['data']['task_chunks']} chunks); after malloc_trim "
          f"{report['data']['worker_rss_for_data_after_trim'] / 2**20:.1f} MiB "
          f"= {report['data']['worker_rss_for_data_after_trim'] / report['data']['uint8_bytes']:.2f} x")
    print(f"wrote {args.json}")


def print_table(results, report):
    mib = 2 ** 20
    for res in results:
        k = res["k"]
        print(f"\nK = {k}, {report['iters']} iterations, same initial centres "
              f"(median of {report['repeats']})")
        print(f"{'engine':<24}{'ms/iter':>9}{'fit s':>8}{'inertia':>14}{'default fit s':>15}"
              f"{'iters':>7}{'default inertia':>17}{'peak MiB':>10}")
        for name in ("kmeans_dask", "dask_ml", "sklearn", "kmeans_dask_minibatch", "sklearn_minibatch"):
            r = res.get(name)
            if not r:
                continue
            per = f"{1e3 * r['per_iter_s']:.1f}" if "per_iter_s" in r else "-"
            fit = f"{r['fit_s']:.2f}" if "fit_s" in r else "-"
            inert = f"{r['inertia']:.1f}" if "inertia" in r else "-"
            dfit = f"{r['default_fit_s']:.2f}" if "default_fit_s" in r else "-"
            dn = r.get("default_n_iter", r.get("default_n_steps", "-"))
            dinert = f"{r['default_inertia']:.1f}" if "default_inertia" in r else "-"
            peak = f"{r['peak_worker_rss'] / mib:.0f}" if "peak_worker_rss" in r else "-"
            print(f"{name:<24}{per:>9}{fit:>8}{inert:>14}{dfit:>15}{dn!s:>7}{dinert:>17}{peak:>10}")
        ours, dm, sk = res["kmeans_dask"], res["dask_ml"], res["sklearn"]
        own = f"(own record: {1e3 * ours['per_iter_history_median_s']:.1f} ms)"
        if min(ours["per_iter_s"], dm["per_iter_s"], sk["per_iter_s"]) <= 0:
            # T(iters) - T(1) was lost in the noise: too few iterations to tell.
            print(f"kmeans-dask per iteration: no ratio, an engine's iterations were within "
                  f"the timing noise; use more --iters {own}")
        else:
            print(f"kmeans-dask per iteration: {ours['per_iter_s'] / dm['per_iter_s']:.3f} x dask-ml, "
                  f"{ours['per_iter_s'] / sk['per_iter_s']:.2f} x scikit-learn {own}")


if __name__ == "__main__":
    main()
