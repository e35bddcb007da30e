"""Bit-for-bit reproducibility on real dask scheduler/worker processes (1, 2 and 3 workers)."""

from __future__ import annotations

import dask
import numpy as np
import pytest
from distributed import Client, get_task_stream

from kmeans_dask import KMeans, MiniBatchKMeans, store

pytestmark = pytest.mark.cluster

# Rows in 20 chunks of 500, kept as they are when persisted: many more chunks
# than workers, so each worker passes and combines several.
SMALL_TASKS = {"kmeans_dask.task-bytes": 1}


def _rows(path):
    return store.open_data(path, "test").images.rechunk({0: 500})


def _result(km):
    return km.cluster_centers_, km.inertia_, km.labels_.compute(), [h["inertia"] for h in km.history_]


def _assert_same(results):
    first = results[0]
    for centers, inertia, labels, history in results[1:]:
        np.testing.assert_array_equal(centers, first[0])
        assert inertia == first[1]
        np.testing.assert_array_equal(labels, first[2])
        assert history == first[3]


@pytest.mark.parametrize("persist", [True, False], ids=["persisted", "streamed"])
def test_lloyd_same_on_one_two_and_three_workers(dask_processes, fashion_test_small_chunks,
                                                 persist):
    address = dask_processes.start_scheduler()
    results = []
    for n_workers in (1, 2, 3, 3):  # the last one repeats the run on the same cluster
        while len(dask_processes.procs) - 1 < n_workers:
            dask_processes.start_worker()
        with (Client(address, timeout=30) as client,
              dask.config.set({**SMALL_TASKS, "kmeans_dask.persist": persist})):
            client.wait_for_workers(n_workers, timeout=60)
            assert len(client.scheduler_info()["workers"]) == n_workers
            X = _rows(fashion_test_small_chunks)
            km = KMeans(10, init="k-means||", random_state=0, max_iter=30).fit(X)
            assert km.labels_.chunks == X.chunks[:1]
            results.append(_result(km))
    _assert_same(results)


def test_weighted_and_grouped_same_on_one_and_three_workers_persisted_or_streamed(
        dask_processes, fashion_test_small_chunks):
    # K = 64 splits the centres into 4 groups (Yinyang bounds); weights make the
    # sums float, summed again every pass and added on the workers' grid.
    address = dask_processes.start_scheduler()
    w = np.random.default_rng(0).random(10_000) * 2
    runs = {}
    for n_workers in (1, 3):
        while len(dask_processes.procs) - 1 < n_workers:
            dask_processes.start_worker()
        with Client(address, timeout=30) as client, dask.config.set(SMALL_TASKS):
            client.wait_for_workers(n_workers, timeout=60)
            X = _rows(fashion_test_small_chunks)
            for persist in (True, False):
                for weights in (None, w):
                    with dask.config.set({"kmeans_dask.persist": persist}):
                        km = KMeans(64, init="k-means++", random_state=1, max_iter=25,
                                    tol=0).fit(X, sample_weight=weights)
                    runs[n_workers, persist, weights is None] = _result(km)
    for unweighted in (True, False):
        # Persisted and streamed rows keep the same 500-row chunks here.
        _assert_same([runs[n, p, unweighted] for n in (1, 3) for p in (True, False)])


def test_one_worker_with_two_threads_equals_two_workers(dask_processes, fashion_test_small_chunks):
    # ``dask worker``'s default shape: one process, several threads; the pass
    # runs its chunks over a pool of the worker's size.
    results = []
    for args in (("--nthreads", "2"), ()):
        with dask_processes.client(1 if args else 2, *args) as client, dask.config.set(SMALL_TASKS):
            X = _rows(fashion_test_small_chunks)
            results.append(_result(KMeans(10, init="k-means++", random_state=0, max_iter=15,
                                          tol=0).fit(X)))
        dask_processes.stop_all()
    _assert_same(results)


@pytest.mark.parametrize("persist", [True, False], ids=["persisted", "streamed"])
def test_every_iteration_is_a_task_on_every_worker(dask_processes, fashion_test_small_chunks,
                                                   persist):
    with (dask_processes.client(2) as client,
          dask.config.set({**SMALL_TASKS, "kmeans_dask.persist": persist})):
        X = _rows(fashion_test_small_chunks)
        with get_task_stream(client) as ts:
            km = KMeans(10, init="k-means++", random_state=0, max_iter=6, tol=0).fit(X)
        lloyd = [t for t in ts.data if str(t["key"]).startswith("('kmeans-lloyd-")]
        # Every iteration and the final pass: one task per worker, named for its iteration.
        passes = km.n_iter_ + 1
        assert len(lloyd) == 2 * passes
        workers = {t["worker"] for t in lloyd}
        assert len(workers) == 2
        for it in range(1, passes + 1):
            mine = [t for t in lloyd if str(t["key"]).startswith(f"('kmeans-lloyd-{it}-")]
            assert {t["worker"] for t in mine} == workers, it
        # The labels come from the states the final pass left: one small task a chunk.
        labels = [t for t in ts.data if str(t["key"]).startswith("('kmeans-labels-")]
        assert len(labels) == X.numblocks[0]


def test_minibatch_same_on_one_and_two_workers(dask_processes, fashion_test_small_chunks):
    address = dask_processes.start_scheduler()
    results = []
    for n_workers in (1, 2):
        while len(dask_processes.procs) - 1 < n_workers:
            dask_processes.start_worker()
        with Client(address, timeout=30) as client:
            client.wait_for_workers(n_workers, timeout=60)
            X = store.open_data(fashion_test_small_chunks, "test").images
            km = MiniBatchKMeans(10, random_state=0, max_iter=30, batch_size=512).fit(X)
            results.append(_result(km))
    _assert_same(results)
