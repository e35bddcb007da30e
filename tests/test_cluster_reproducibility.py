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
    address = dask_processes.start_scheduler()
    results = []
    for n_workers in (1, 2, 3, 3):  # the last one repeats the run on the same cluster
        if len(dask_processes.procs) - 1 < n_workers:
            dask_processes.start_worker()
        with Client(address, timeout=30) as client:
            client.wait_for_workers(n_workers, timeout=60)
            assert len(client.scheduler_info()["workers"]) == n_workers
            X = store.open_data(fashion_test_small_chunks, "test").images
            km = KMeans(10, init=init, algorithm=algorithm, random_state=0, max_iter=30,
                        batch_size=512, task_rows=1500).fit(X)
            assert km.labels_.chunks == X.chunks[:1]
            results.append((km.cluster_centers_, km.inertia_, km.labels_.compute()))
    first = results[0]
    for centers, inertia, labels in results[1:]:
        np.testing.assert_array_equal(centers, first[0])
        assert inertia == first[1]
        np.testing.assert_array_equal(labels, first[2])
