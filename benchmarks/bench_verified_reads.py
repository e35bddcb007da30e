#!/usr/bin/env python
"""What the per-chunk CRC-32C checks cost a pass over a data store.

On a LocalCluster of 2 workers x 1 thread, the same store is read chunk by
chunk (every pass of a streamed fit does this) two ways: through
``store.open_data`` (each chunk checked against its recorded CRC-32C) and
through plain ``dask.array.from_zarr`` (no check).  Each pass reduces every
chunk to one number so only the read is timed.  Also times the checksum
alone on one chunk, and a streamed K-Means pass (K=10) for scale.  Medians of
``--repeats``.  All of it once per codec of ``--codecs`` (the
``kmeans_dask.store-codec`` the store is written with), with the store's
size on disk.

Run: ``python benchmarks/bench_verified_reads.py --source ../shared/datasets``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(path: Path, repeats: int) -> dict:
    """The figures for one store, on the active cluster."""
    import dask
    import dask.array as da
    import numpy as np
    import zarr

    from kmeans_dask import KMeans, store

    checked = store.open_data(path, "train").images
    plain = da.from_zarr(zarr.open_array(str(path / "train" / "images"), mode="r"))
    assert checked.chunks == plain.chunks

    def one_pass(X):
        return X.map_blocks(lambda b: np.zeros((1, 1)), chunks=(1, 1)).sum().compute()

    one_pass(checked), one_pass(plain)  # warm the page cache and the workers
    t_checked = median_time(lambda: one_pass(checked), repeats)
    t_plain = median_time(lambda: one_pass(plain), repeats)
    block = plain.blocks[0].compute()
    t_crc = median_time(lambda: store.crc32c(block), max(repeats, 20))
    km = KMeans(10, init="random", n_init=1, random_state=0, max_iter=3, tol=0)
    with dask.config.set({"kmeans_dask.persist": False}):
        t_fit = median_time(lambda: km.fit(checked), 3)
    per_iter = statistics.median(h["seconds"] for h in km.history_)
    on_disk = sum(f.stat().st_size for f in (path / "train" / "images").rglob("*") if f.is_file())
    return {
        "rows": int(plain.shape[0]), "chunks": len(plain.chunks[0]),
        "chunk_mib": block.nbytes / 2**20, "images_mib_on_disk": on_disk / 2**20,
        "pass_checked_ms": t_checked * 1e3, "pass_plain_ms": t_plain * 1e3,
        "check_cost_per_pass_ms": (t_checked - t_plain) * 1e3,
        "crc32c_one_chunk_ms": t_crc * 1e3,
        "streamed_lloyd_iteration_ms": per_iter * 1e3, "streamed_fit_3_iters_s": t_fit,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=None, help="directory with the IDX files")
    p.add_argument("--dataset", default="fashion-mnist", choices=["mnist", "fashion-mnist"])
    p.add_argument("--repeats", type=int, default=7, help="passes timed per way (default: 7)")
    p.add_argument("--codecs", default="lz4,zstd",
                   help="store codecs to compare, comma-separated (default: lz4,zstd)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    import dask
    from distributed import Client, LocalCluster

    from kmeans_dask import datasets, store

    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    results = {}
    with tempfile.TemporaryDirectory() as scratch, \
            LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                         dashboard_address=":0") as cluster, Client(cluster):
        sources = datasets.resolve(args.dataset, args.source, download=False)
        for codec in codecs:
            with dask.config.set({"kmeans_dask.store-codec": codec}):
                path = store.ingest(args.dataset, Path(scratch) / codec,
                                    {"train": sources["train"]}).path
            results[codec] = measure(path, args.repeats)
    for codec, out in results.items():
        print(f"{args.dataset} train, {codec}: {out['rows']} rows in {out['chunks']} chunks of "
              f"{out['chunk_mib']:.1f} MiB ({out['images_mib_on_disk']:.1f} MiB on disk), "
              f"2 workers x 1 thread, medians of {args.repeats}")
        print(f"  read pass, chunks checked (CRC-32C):  {out['pass_checked_ms']:8.1f} ms")
        print(f"  read pass, plain from_zarr:           {out['pass_plain_ms']:8.1f} ms")
        print(f"  difference per pass:                  {out['check_cost_per_pass_ms']:8.1f} ms")
        print(f"  CRC-32C of one chunk:                 {out['crc32c_one_chunk_ms']:8.2f} ms")
        print(f"  streamed Lloyd iteration, K=10:       "
              f"{out['streamed_lloyd_iteration_ms']:8.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
