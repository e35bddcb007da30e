"""Paths as remote workers see them, and Ctrl-C, with real processes on 127.0.0.1.

Workers started in another directory must read and write the stores the
client names; a worker that sees other files at the same path (here: a
worker in its own mount namespace, with another directory mounted over the
data or the output) must stop the job before any work, by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from kmeans_dask import datasets, load, store

from conftest import ROOT, leftovers

pytestmark = pytest.mark.cluster


def ingest(out, chunk_rows=2000, name="mnist"):
    src = {"test": datasets.resolve_split(name, "test", datasets.BUNDLED_DIR, download=False)}
    return store.ingest(name, out, src, chunk_rows=chunk_rows).path


def test_relative_paths_reach_workers_started_elsewhere(dask_cluster, tmp_path, jobs):
    here = tmp_path / "client"
    data = ingest(here / "data")
    address = dask_cluster.workers(2)  # in their own directory, dask_cluster.workdir
    # The jobs run from ``here``: relative paths resolve there.
    res = jobs.run("fit", "--data", "data/mnist.zarr", "--split", "test", "--k", 10,
                   "--max-iter", 10, "--out", "out/r.zarr", "--scheduler", address, cwd=here)
    assert res.returncode == 0, res.stderr
    pred = jobs.run("predict", "--result", "out/r.zarr", "--data", "data/mnist.zarr",
                    "--out", "out/labels.zarr", "--scheduler", address, cwd=here)
    assert pred.returncode == 0, pred.stderr
    model = load(here / "out" / "r.zarr")
    expect = np.asarray(model.predict(store.open_data(data, "test").images).compute())
    labels = model.labels_.compute()
    np.testing.assert_array_equal(labels, expect)
    assert len(np.unique(labels)) == 10
    np.testing.assert_array_equal(store.read_labels(here / "out" / "labels.zarr")[0].compute(),
                                  expect)
    assert model.get_params()["n_clusters"] == 10
    # Nothing landed in the workers' own directory.
    assert not [p for p in dask_cluster.workdir.rglob("*.zarr")]


def _namespaced_worker(dask_processes, address, over, decoy):
    """A ``dask worker`` in its own mount namespace, with ``decoy`` mounted over ``over``."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"needs mount namespaces (unshare --mount failed: {probe.stderr.strip()})")
    cmd = (f"mount --bind {decoy} {over} && exec {dask_processes.dask} worker {address} "
           f"--nthreads 1 --host 127.0.0.1 --no-dashboard --no-nanny")
    log = open(dask_processes.workdir / "namespaced-worker.log", "wb")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd],
                            stdout=log, stderr=subprocess.STDOUT, env=dask_processes.env,
                            cwd=dask_processes.workdir)
    dask_processes.procs.append(proc)
    return proc


@pytest.mark.parametrize("hidden", ["data", "output"])
def test_a_worker_that_sees_other_files_is_named(hidden, dask_cluster, tmp_path, jobs):
    from distributed import Client

    data = ingest(tmp_path / "data")
    decoy = tmp_path / "decoy"
    if hidden == "data":
        ingest(decoy, chunk_rows=5000)  # the same data set, other chunks: other fingerprints
        over = tmp_path / "data"
    else:
        decoy.mkdir()
        over = tmp_path / "out"
        over.mkdir()
    address = dask_cluster.workers(1)
    namespaced = _namespaced_worker(dask_cluster, address, over, decoy)
    try:
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
            odd = [w for w, pid in client.run(os.getpid).items() if pid == namespaced.pid]
        assert len(odd) == 1
        out = tmp_path / "out" / "r.zarr"
        res = jobs.run("fit", "--data", data, "--split", "test", "--k", 10, "--out", out,
                       "--scheduler", address, cwd=tmp_path)
    finally:
        dask_cluster.stop(namespaced)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    if hidden == "data":
        assert last == (f"error: worker {odd[0]} cannot see {data} as the client does (it sees "
                        f"different contents); use a shared file system or an object store URL")
    else:
        assert last == (f"error: worker {odd[0]} cannot see {tmp_path}/out as the client does "
                        f"(it cannot read a file the client wrote there); use a shared file "
                        f"system or an object store URL")
    assert leftovers(tmp_path / "out") == []
    assert "Traceback" not in res.stderr


def test_ctrl_c_prints_one_line_and_leaves_no_output(tmp_path):
    data = ingest(tmp_path / "data", name="fashion-mnist")
    out = tmp_path / "out" / "r.zarr"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "fit.py"), "--data", str(data), "--split", "test",
         "--k", "256", "--tol", "0", "--max-iter", "300", "--out", str(out),
         "--cluster", str(_loopback_config(tmp_path))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # As a terminal's shell would start it: SIGINT not ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "init k-means||" in line:
                break
        else:
            pytest.fail("the fit never reached its iterations:\n" + "".join(seen))
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole process group
        rest = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, "".join(seen) + rest
    lines = rest.strip().splitlines()
    assert lines[-1] == "interrupted; no partial output is left", rest
    # No worker's traceback: at most a progress line logged before the signal arrived.
    assert "Traceback" not in rest and len(lines) <= 3, rest
    assert [n for n in leftovers(tmp_path / "out") if not n.endswith(".checkpoint.json")] == []


def _loopback_config(tmp_path):
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("local:\n  n_workers: 2\n  dashboard_address: 127.0.0.1:0\n")
    return cfg

