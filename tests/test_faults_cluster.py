"""Faults caused for real on dask scheduler/worker processes on 127.0.0.1.

A worker killed mid-fit, the client killed mid-fit then resumed, the
scheduler lost, and data larger than the cluster's memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import dask
import numpy as np
from dask.sizeof import sizeof
import pytest
from distributed import Client

from kmeans_dask import KMeans, store
from kmeans_dask.kmeans import _should_persist

from conftest import ROOT, leftovers, run_job

pytestmark = pytest.mark.cluster


def _worker_pids(client) -> dict:
    return client.run(os.getpid)


@pytest.mark.parametrize("persist", [True, False], ids=["persisted", "streamed"])
def test_worker_killed_mid_fit_gives_the_undisturbed_centres(dask_processes, fashion_store,
                                                             persist, caplog):
    with (dask_processes.client(3) as client,
          dask.config.set({"kmeans_dask.task-bytes": 1, "kmeans_dask.persist": persist})):
        # 28 chunks of 2,500 rows over 3 workers: each pass task holds several.
        X = store.open_data(fashion_store, "train").images.rechunk({0: 2500})
        params = dict(n_clusters=10, random_state=0, tol=0, max_iter=8)
        calm = KMeans(**params).fit(X)

        killed = {}

        def kill_during_iteration_3(record):
            if record["iteration"] == 2:
                # A worker dies while iteration 3 runs.
                victim = sorted(client.scheduler_info()["workers"])[0]
                pid = _worker_pids(client)[victim]

                def kill():
                    time.sleep(0.01)
                    os.kill(pid, signal.SIGKILL)
                    killed["pid"] = pid

                killed["thread"] = threading.Thread(target=kill)
                killed["thread"].start()
            elif record["iteration"] == 4:
                # On a loaded machine the killer may run late: it must have
                # struck before the fit goes on, or the fit could end unhurt.
                killed["thread"].join()

        with caplog.at_level("INFO", logger="kmeans_dask.engine"):
            hurt = KMeans(**params).fit(X, callback=kill_during_iteration_3)
        assert "pid" in killed
        # The engine saw its chunks passed elsewhere and placed the passes again.
        moved = [r for r in caplog.records if "placing the passes again" in r.getMessage()]
        assert moved
        assert len(client.scheduler_info()["workers"]) == 2
        np.testing.assert_array_equal(hurt.cluster_centers_, calm.cluster_centers_)
        assert hurt.inertia_ == calm.inertia_
        # Every iteration recorded once, in order, as in the undisturbed fit.
        assert hurt.n_iter_ == calm.n_iter_
        assert ([h["iteration"] for h in hurt.history_]
                == [h["iteration"] for h in calm.history_] == list(range(1, calm.n_iter_ + 1)))
        assert [h["inertia"] for h in hurt.history_] == [h["inertia"] for h in calm.history_]
        np.testing.assert_array_equal(hurt.labels_.compute(), calm.labels_.compute())


def _wait_for_checkpoint(path, iteration, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"job ended early: {proc.communicate()}")
        try:
            if json.loads(path.read_text())["iteration"] >= iteration:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at iteration {iteration} in {timeout} s")


def _start_fit(args):
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "fit.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_client_killed_then_resumed_ends_with_the_same_centres(dask_processes, fashion_store,
                                                               tmp_path):
    address = dask_processes.start_scheduler()
    dask_processes.start_worker()
    dask_processes.start_worker()
    common = ["--data", fashion_store, "--k", 10, "--tol", 0, "--max-iter", 40, "--seed", 1,
              "--scheduler", address]
    whole = run_job("fit", *common, "--out", tmp_path / "whole.zarr")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "r.zarr"
    proc = _start_fit([*common, "--out", out])
    ckpt = store.checkpoint_path(out)
    _wait_for_checkpoint(ckpt, 3, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    doc = store.read_checkpoint(ckpt)
    b = store.read_result(tmp_path / "whole.zarr")
    assert 3 <= doc["iteration"] < b.attrs["n_iter"] and not out.exists()
    again = run_job("fit", *common, "--out", out, "--resume")
    assert again.returncode == 0, again.stderr
    a = store.read_result(out)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.attrs["inertia"] == b.attrs["inertia"] and a.attrs["n_iter"] == b.attrs["n_iter"]
    assert a.attrs["resumed_from"] == doc["iteration"]
    assert [h["inertia"] for h in a.attrs["history"]] == [h["inertia"] for h in b.attrs["history"]]
    assert sorted(leftovers(tmp_path)) == ["r-report.html", "r.zarr", "whole-report.html", "whole.zarr"]
    # Resuming a finished run, or another run's checkpoint, is refused by name.
    done = run_job("fit", *common, "--out", out, "--resume")
    assert done.returncode == 2 and f"{out} is already complete" in done.stderr


def test_resume_refuses_a_checkpoint_of_another_run(dask_processes, fashion_store, tmp_path):
    address = dask_processes.start_scheduler()
    dask_processes.start_worker()
    out = tmp_path / "r.zarr"
    common = ["--data", fashion_store, "--k", 10, "--tol", 0, "--max-iter", 60,
              "--scheduler", address, "--out", out]
    proc = _start_fit(common)
    _wait_for_checkpoint(store.checkpoint_path(out), 2, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    other = run_job("fit", *common[:3], 12, *common[4:], "--resume")
    assert other.returncode == 2
    assert "the checkpoint belongs to another run (params differ in ['n_clusters'])" in other.stderr
    missing = run_job("fit", *common[:-1], tmp_path / "none.zarr", "--resume")
    assert missing.returncode == 2 and "none.zarr.checkpoint.json: no checkpoint to resume from" in missing.stderr


def test_scheduler_lost_exits_with_the_checkpoint_location(dask_processes, fashion_store, tmp_path):
    address = dask_processes.start_scheduler()
    dask_processes.start_worker()
    out = tmp_path / "r.zarr"
    proc = _start_fit(["--data", fashion_store, "--k", 10, "--tol", 0, "--max-iter", 300,
                       "--scheduler", address, "--out", out])
    ckpt = store.checkpoint_path(out)
    _wait_for_checkpoint(ckpt, 2, proc)
    t0 = time.monotonic()
    os.kill(dask_processes.scheduler.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: lost the scheduler at {address}"), last
    assert f"the last checkpoint is {ckpt} (iteration " in last and "rerun with --resume" in last
    assert elapsed < 60
    doc = store.read_checkpoint(ckpt)  # intact and readable
    assert doc["iteration"] >= 2
    assert sorted(leftovers(tmp_path)) == [ckpt.name]


def _big_store(fashion_store, path, repeats: int) -> int:
    """A data store of Fashion-MNIST's train images repeated ``repeats`` times."""
    import dask.array as da

    src = store.open_data(fashion_store, "train")
    split = store.SplitData(images=da.concatenate([src.images] * repeats),
                            labels=da.concatenate([src.labels] * repeats),
                            attrs={"source": f"{fashion_store} x {repeats}"})
    store.write_data(path, dataset="fashion-mnist", splits={"train": split})
    return split.images.shape[0] * 784


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_data_larger_than_cluster_memory_is_streamed(dask_processes, fashion_store, tmp_path):
    # A worker's own baseline (Python, Dask, NumPy, Numba's compiled loops, Zarr) takes
    # about 250 MiB, so the limit leaves 150 MiB for rows; the data exceeds both limits.
    limit = 400 * 2**20
    nbytes = _big_store(fashion_store, tmp_path / "big.zarr", repeats=18)  # 847 MB of uint8
    address = dask_processes.start_scheduler()
    workers = [dask_processes.start_worker("--memory-limit", str(limit)) for _ in range(2)]
    assert nbytes > 2 * limit  # more than the whole cluster may hold
    with Client(address, timeout=30) as client:
        client.wait_for_workers(2, timeout=60)
        X = store.open_data(tmp_path / "big.zarr", "train").images
        km = KMeans(10, init="random", n_init=1, random_state=0, max_iter=3, tol=0)
        assert not _should_persist(X)
        km.fit(X)
        assert km.n_iter_ == 3 and km.inertia_ > 0
        assert len(client.scheduler_info()["workers"]) == 2  # nobody was killed for memory
        stored = sum(client.run(lambda dask_worker: sum(
            sizeof(v) for v in dask_worker.data.values())).values())
    peaks = [_peak_rss(w.pid) for w in workers]
    print(f"streamed {nbytes / 2**20:.0f} MiB through 2 workers limited to "
          f"{limit / 2**20:.0f} MiB: peak RSS {[round(p / 2**20) for p in peaks]} MiB")
    assert max(peaks) < limit, peaks
    # The rows were never kept on the workers: only the labels (4 bytes a row)
    # and a few k x d results are.
    assert stored < nbytes / 784 * 4 + 5 * 2**20, stored
