"""fit.py against a real `dask scheduler` and two `dask worker` processes on 127.0.0.1."""

from __future__ import annotations

import numpy as np
import pytest

from kmeans_dask import store

from conftest import run_job

pytestmark = pytest.mark.cluster


def test_fit_job_on_real_processes_matches_the_local_cluster(dask_processes, fashion_store,
                                                             tmp_path):
    address = dask_processes.start_scheduler()
    dask_processes.start_worker()
    dask_processes.start_worker()
    common = ["--data", fashion_store, "--split", "train", "--k", 10, "--seed", 3,
              "--init", "k-means||"]
    remote = run_job("fit", *common, "--out", tmp_path / "remote.zarr", "--scheduler", address)
    assert remote.returncode == 0, remote.stderr
    assert f"scheduler {address}: 2 workers, 2 threads" in remote.stderr
    local = run_job("fit", *common, "--out", tmp_path / "local.zarr")
    assert local.returncode == 0, local.stderr
    a = store.read_result(tmp_path / "remote.zarr")
    b = store.read_result(tmp_path / "local.zarr")
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.attrs["inertia"] == b.attrs["inertia"]
    np.testing.assert_array_equal(a.labels.compute(), b.labels.compute())
    # The job connected; it did not start a cluster of its own, and left the workers running.
    assert all(p.poll() is None for p in dask_processes.procs)
