"""Bit-for-bit reproducibility on real dask scheduler/worker processes (1, 2 and 3 workers)."""

from __future__ import annotations

import numpy as np
import pytest
from distributed import Client

from kmeans_dask import KMeans, store

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("init, algorithm", [("k-means||", "lloyd"), ("k-means++", "minibatch")])
def test_same_centres_on_one_two_and_three_workers(dask_processes, fashion_test_small_chunks,
                                                    init, algorithm):
    from kmeans_dask import MiniBatchKMeans

    address = dask_processes.start_scheduler()
    results = []
    for n_workers in (1, 2, 3, 3):  # the last one repeats the run on the same cluster
        if len(dask_processes.procs) - 1 < n_workers:
            dask_processes.start_worker()
        with Client(address, timeout=30) as client:
            client.wait_for_workers(n_workers, timeout=60)
            assert len(client.scheduler_info()["workers"]) == n_workers
            X = store.open_data(fashion_test_small_chunks, "test").images
            if algorithm == "lloyd":
                km = KMeans(10, init=init, random_state=0, max_iter=30, task_rows=1500).fit(X)
            else:
                km = MiniBatchKMeans(10, init=init, random_state=0, max_iter=30,
                                     batch_size=512).fit(X)
            assert km.labels_.chunks == X.chunks[:1]
            results.append((km.cluster_centers_, km.inertia_, km.labels_.compute()))
            if n_workers == 2 and algorithm == "lloyd":
                # Task graphs instead of worker-resident actors: the same answer.
                km = KMeans(10, init=init, random_state=0, max_iter=30, task_rows=1500,
                            resident=False).fit(X)
                results.append((km.cluster_centers_, km.inertia_, km.labels_.compute()))
    first = results[0]
    for centers, inertia, labels in results[1:]:
        np.testing.assert_array_equal(centers, first[0])
        assert inertia == first[1]
        np.testing.assert_array_equal(labels, first[2])


def test_resident_bounds_and_task_graphs_agree_with_weights_and_groups(dask_processes,
                                                                     fashion_test_small_chunks):
    # K = 64 splits the centres into 4 groups (Yinyang bounds); weights make
    # the sums float, recomputed every pass instead of updated in place.
    with dask_processes.client(2):
        X = store.open_data(fashion_test_small_chunks, "test").images
        w = np.random.default_rng(0).random(X.shape[0]) * 2
        runs = {}
        for resident in (True, False):
            for weights in (None, w):
                km = KMeans(64, init="k-means++", random_state=1, max_iter=25, tol=0,
                            task_rows=2500, resident=resident).fit(X, sample_weight=weights)
                runs[resident, weights is None] = km
        for unweighted in (True, False):
            a, b = runs[True, unweighted], runs[False, unweighted]
            np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
            assert a.inertia_ == b.inertia_
            assert [h["inertia"] for h in a.history_] == [h["inertia"] for h in b.history_]
            np.testing.assert_array_equal(a.labels_.compute(), b.labels_.compute())


def test_one_worker_with_two_threads_gives_the_same_result(dask_processes, fashion_test_small_chunks):
    # ``dask worker``'s default shape: one process, several threads; the actor
    # passes its chunks in a pool of the worker's size.
    with dask_processes.client(1, "--nthreads", "2") as client:
        assert list(client.nthreads().values()) == [2]
        X = store.open_data(fashion_test_small_chunks, "test").images
        runs = [KMeans(10, init="k-means++", random_state=0, max_iter=15, tol=0, task_rows=2500,
                       resident=resident).fit(X) for resident in (True, False)]
        np.testing.assert_array_equal(runs[0].cluster_centers_, runs[1].cluster_centers_)
        assert runs[0].inertia_ == runs[1].inertia_
