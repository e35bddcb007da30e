#!/usr/bin/env python
"""Scaling benchmark: kmeans-dask beside oneDAL, scikit-learn and FAISS at 70k to 8.1M rows.

Data: Fashion-MNIST (all 70,000 images); beyond 70,000 rows, copies of it
shifted by seeded -2..+2 pixels in each direction (the issue's setup),
written once to a Zarr store through ``kmeans_dask.store.write_data``.

For every size and K, in one run on this machine:

* kmeans-dask on a LocalCluster of 2 workers x 1 thread, rows persisted as
  uint8 from the store (the fit's own placement);
* scikit-learn-intelex (oneDAL), scikit-learn (lloyd) and FAISS in this
  process with 2 threads, on a float32 copy in [0, 1] (where it fits in
  memory: ``--peer-max-rows``).

All start from the same random rows as centres, with ``tol=0``.
Per iteration is ``(T(iters) - T(3)) / (iters - 3)`` of whole fits, so
set-up drops out; the whole fit (set-up, iterations, final labels and
inertia) is reported too.  Medians of ``--repeats`` fits.  kmeans-dask also
reports its workers' peak RSS, the RSS its persisted data takes, and the
bytes each worker sends per iteration (distributed's transfer counters over
one whole fit).

``--streamed-limit 2GiB`` adds a streamed fit (rows read from the store
every pass) on workers with that memory limit, and checks that no worker was
lost or paused.

Run: ``python benchmarks/bench_scaling.py --source ../shared/datasets --sizes 70000,1400000``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

import bench_kmeans  # noqa: E402
from bench_kmeans import _memory, _reset_peak, empty_iteration, inertia_of, timed  # noqa: E402

# The no-op pass is sent to the workers, which need not find benchmarks/ on their path.
import cloudpickle  # noqa: E402

cloudpickle.register_pickle_by_value(bench_kmeans)


def fashion(source) -> np.ndarray:
    from kmeans_dask import datasets

    parts = []
    for split in ("train", "test"):
        src = datasets.resolve_split("fashion-mnist", split, source, download=False)
        parts.append(datasets.read_idx(src.images, "images").reshape(-1, 784))
    return np.concatenate(parts)


def shifted_copy(base: np.ndarray, copy: int) -> np.ndarray:
    """Copy number ``copy`` (0 is ``base`` itself), shifted by seeded pixels."""
    if copy == 0:
        return base
    dx, dy = np.random.default_rng([7, copy]).integers(-2, 3, 2)
    img = base.reshape(-1, 28, 28)
    return np.roll(np.roll(img, dx, axis=1), dy, axis=2).reshape(len(base), 784)


def build_store(path: Path, base: np.ndarray, n: int, chunk_rows: int) -> Path:
    """A data store of ``n`` rows (tiled shifted copies), built once and reused."""
    import dask.array as da
    from dask import delayed

    from kmeans_dask import store

    final = path / "fashion-mnist.zarr"
    if final.exists():
        data = store.open_data(final, "train")
        if data.images.shape[0] == n:
            return final
        raise SystemExit(f"{final} holds {data.images.shape[0]} rows, not {n}; remove it")
    copies = -(-n // len(base))
    blocks = [da.from_delayed(delayed(shifted_copy)(base, c), (len(base), 784), np.uint8)
              for c in range(copies)]
    images = da.concatenate(blocks)[:n].rechunk((chunk_rows, 784))
    labels = da.zeros(n, dtype=np.uint8, chunks=chunk_rows)
    store.write_data(final, dataset="fashion-mnist",
                     splits={"train": store.SplitData(images, labels, {"source": "bench_scaling"})},
                     attrs={"source": "benchmarks/bench_scaling.py (shifted copies)"})
    return final


def per_iter(fit, iters, repeats):
    """(T(iters) - T(3)) / (iters - 3), and the whole iters-fit time and result."""
    t3, _ = timed(lambda: fit(3), repeats)
    tn, out = timed(lambda: fit(iters), repeats)
    return (tn - t3) / (iters - 3), tn, out


def ours(client, X, init, iters, repeats):
    from kmeans_dask import KMeans

    def fit(it):
        return KMeans(len(init), init=init, max_iter=it, tol=0).fit(X)

    client.run(_reset_peak)
    fit(3)  # warm: plugin, compiled loops
    pi, whole, km = per_iter(fit, iters, repeats)
    peak = client.run(_memory)
    return {"per_iter_s": pi, "fit_s": whole, "n_iter": km.n_iter_,
            "sent_bytes_per_iter": sent_per_iteration(client, fit, iters),
            "history_per_iter_median_s": statistics.median(h["seconds"] for h in km.history_[3:]),
            "skipped_last": km.history_[-1]["skipped"],
            "peak_worker_rss": max(v["VmHWM"] for v in peak.values()), "model": km}


def peers(Xf, init, iters, repeats, which):
    from threadpoolctl import threadpool_limits

    out = {}
    with threadpool_limits(2):
        if "onedal" in which:
            from sklearnex.cluster import KMeans as DAL

            def dal(it):
                km = DAL(len(init), init=init, n_init=1, max_iter=it, tol=0).fit(Xf)
                return km.cluster_centers_

            dal(3)
            pi, whole, c = per_iter(dal, iters, repeats)
            out["onedal"] = {"per_iter_s": pi, "fit_s": whole, "centers": c}
        if "sklearn" in which:
            from sklearn.cluster import KMeans as SK

            def skl(it):
                return SK(len(init), init=init, n_init=1, max_iter=it, tol=0,
                          algorithm="lloyd").fit(Xf).cluster_centers_

            pi, whole, c = per_iter(skl, iters, repeats)
            out["sklearn"] = {"per_iter_s": pi, "fit_s": whole, "centers": c}
        if "faiss" in which:
            import faiss

            faiss.omp_set_num_threads(2)

            def fai(it):
                km = faiss.Kmeans(Xf.shape[1], len(init), niter=it, seed=0,
                                  max_points_per_centroid=len(Xf), verbose=False)
                km.train(Xf, init_centroids=init)
                km.index.search(Xf, 1)  # the labels, as the others give them
                return km.centroids

            pi, whole, c = per_iter(fai, iters, repeats)
            out["faiss"] = {"per_iter_s": pi, "fit_s": whole, "centers": c}
    return out


def _sent(dask_worker) -> int:
    # Data fetched from this worker, plus the partials it sent other workers
    # itself in the chained loop (their arrays' bytes: not a data transfer).
    ext = dask_worker.plugins.get("kmeans-dask")
    return dask_worker.transfer_outgoing_bytes_total + getattr(ext, "sent_bytes", 0)


def sent_per_iteration(client, fit, iters) -> dict:
    """Bytes each worker sent (to other workers and the client) per pass of one fit,
    from distributed's own transfer counters and the engine's count of the
    partials it sent other workers; and k x d x 8 for scale."""
    before = client.run(_sent)
    km = fit(iters)
    after = client.run(_sent)
    passes = km.n_iter_ + 1
    k, d = km.cluster_centers_.shape
    return {"per_worker": {w: (after[w] - before[w]) / passes for w in after},
            "k_d_8": k * d * 8}


def streamed(path, limit, k, iters, seed_rows):
    import dask
    from distributed import Client, LocalCluster

    from kmeans_dask import KMeans, store

    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=limit,
                      host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        X = store.open_data(path, "train").images
        init = seed_rows
        paused = []

        def watch(dask_worker):
            return str(dask_worker.status)

        t = time.perf_counter()
        with dask.config.set({"kmeans_dask.persist": False}):
            km = KMeans(k, init=init, max_iter=iters, tol=0).fit(X)
        whole = time.perf_counter() - t
        paused = client.run(watch)
        peak = client.run(_memory)
        return {"limit": limit, "fit_s": whole, "n_iter": km.n_iter_,
                "per_iter_median_s": statistics.median(h["seconds"] for h in km.history_),
                "workers_at_end": len(client.scheduler_info()["workers"]),
                "worker_status": sorted(paused.values()),
                "peak_worker_rss": max(v["VmHWM"] for v in peak.values())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=None, help="directory holding fashion-mnist/ IDX files")
    p.add_argument("--sizes", default="70000,1400000", help="rows (comma-separated)")
    p.add_argument("--ks", default="64", help="numbers of clusters (comma-separated)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-rows", type=int, default=10_000, help="rows per store chunk")
    p.add_argument("--peers", default="onedal,sklearn,faiss")
    p.add_argument("--peer-max-rows", type=int, default=1_400_000,
                   help="largest size the peers run at (their float32 copy must fit in memory)")
    p.add_argument("--streamed-limit", default=None, help="e.g. 2GiB: add a streamed fit")
    p.add_argument("--scratch", default=str(ROOT / "outputs" / "bench-scaling"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results-scaling.json"))
    args = p.parse_args(argv)
    if args.iters < 4:
        p.error("--iters must be at least 4")
    warnings.filterwarnings("ignore")
    from distributed import Client, LocalCluster, wait
    from threadpoolctl import threadpool_info

    from kmeans_dask import _native, store

    base = fashion(args.source)
    print(f"uint8 rows ranked on: {_native.kernel() or 'float32 (' + str(_native.why_not()) + ')'}",
          flush=True)
    report = {"machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(),
                          "python": platform.python_version(),
                          "blas": [i["internal_api"] for i in threadpool_info()],
                          # The integer kernel uint8 rows are ranked with, or why none.
                          "int8_kernel": _native.kernel() or f"none: {_native.why_not()}"},
              "iters": args.iters, "repeats": args.repeats, "results": []}
    for n in [int(v) for v in args.sizes.split(",")]:
        path = build_store(Path(args.scratch) / f"n{n}", base, n, args.chunk_rows)
        with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            X = store.open_data(path, "train").images
            before = client.run(_memory)
            from kmeans_dask import config
            from kmeans_dask.kmeans import _regroup

            Xp = _regroup(X, None, config.get("task-bytes"))[0].persist()
            wait(Xp)
            after = client.run(_memory)
            data_rss = sum(after[w]["VmRSS"] - before[w]["VmRSS"] for w in after)
            empty = empty_iteration(client, Xp)
            print(f"n={n:,}: empty iteration {1e3 * empty['chained']:.1f} ms chained, "
                  f"{1e3 * empty['client']:.1f} ms through the client", flush=True)
            for k in [int(v) for v in args.ks.split(",")]:
                rng = np.random.default_rng(0)
                pick = np.sort(rng.choice(n, k, replace=False))
                init = (X[pick].compute().astype(np.float64) / 255).astype(np.float32)
                res = {"n": n, "k": k, "chunks": len(Xp.chunks[0]), "empty_iteration_s": empty,
                       "data_rss_ratio_to_uint8": data_rss / X.nbytes}
                mine = ours(client, Xp, init.astype(np.float64), args.iters, args.repeats)
                km = mine.pop("model")
                res["kmeans_dask"] = mine
                res["kmeans_dask"]["inertia"] = km.inertia_
                Xn = None
                if n <= args.peer_max_rows and args.peers:
                    Xn = Xp.compute()
                    Xf = Xn.astype(np.float32)
                    Xf /= np.float32(255)
                    got = peers(Xf, init, args.iters, args.repeats, args.peers.split(","))
                    del Xf
                    for name, r in got.items():
                        r["inertia"] = inertia_of(Xn, r.pop("centers"), 1 / 255)
                        res[name] = r
                    res["kmeans_dask"]["inertia_check"] = inertia_of(Xn, km.cluster_centers_,
                                                                     1 / 255)
                else:
                    res["peers"] = (f"not run: a float32 copy of {n} rows is "
                                    f"{n * 784 * 4 / 2**30:.1f} GiB")
                report["results"].append(res)
                print_row(res)
                Path(args.json).write_text(json.dumps(report, indent=2, default=float))
                del Xn
        if args.streamed_limit:
            rng = np.random.default_rng(0)
            k = int(args.ks.split(",")[-1])
            pick = np.sort(rng.choice(n, k, replace=False))
            seed_rows = store.open_data(path, "train").images[pick].compute() / 255.0
            res = {"n": n, "k": k, "streamed": streamed(path, args.streamed_limit, k,
                                                        min(args.iters, 5), seed_rows)}
            report["results"].append(res)
            print(json.dumps(res))
            Path(args.json).write_text(json.dumps(report, indent=2, default=float))


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                platform.processor())


def print_row(res):
    ours_ = res["kmeans_dask"]
    line = (f"n={res['n']:>9,} K={res['k']:<4} kmeans-dask {1e3 * ours_['per_iter_s']:8.1f} ms/iter "
            f"fit {ours_['fit_s']:7.2f} s")
    for name in ("onedal", "sklearn", "faiss"):
        if name in res:
            r = res[name]
            line += f" | {name} {1e3 * r['per_iter_s']:8.1f} ms fit {r['fit_s']:7.2f} s"
    print(line, flush=True)


if __name__ == "__main__":
    main()
