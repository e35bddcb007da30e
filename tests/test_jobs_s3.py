"""The jobs on s3:// against a real S3 API server (moto) and real dask processes.

The scheduler and each worker run in an empty working directory of their own
and reach the S3 server only through the standard variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), as on a cluster without a
shared file system: the workers read and write every chunk themselves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, DaskProcesses, run_job
from kmeans_dask import store
from s3_server import S3Server, s3_env, s3_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.cluster

BUCKET = "s3://kd-jobs"
FIT = ["--k", 10, "--tol", 0, "--max-iter", 40, "--seed", 1, "--split", "test", "--no-report"]


class IsolatedDaskProcesses(DaskProcesses):
    """Each process in an empty working directory of its own."""

    def _spawn(self, args, name):
        import subprocess

        cwd = self.workdir / f"{name}-{len(self.procs)}-cwd"
        cwd.mkdir()
        log = open(self.workdir / f"{name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([self.dask, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, cwd=cwd)
        proc.cwd = cwd
        self.procs.append(proc)
        return proc


@pytest.fixture(scope="module")
def s3_cluster(s3_server, tmp_path_factory):
    """A scheduler and three workers that know only the S3 server's address."""
    import s3fs

    env = s3_server.env()
    s3fs.S3FileSystem(endpoint_url=s3_server.endpoint, key=env["AWS_ACCESS_KEY_ID"],
                      secret=env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True).mkdir(BUCKET[5:])
    procs = IsolatedDaskProcesses(tmp_path_factory.mktemp("s3-dask"))
    procs.env = {**{k: v for k, v in procs.env.items() if not k.startswith("AWS_")},
                 **{k: v for k, v in env.items() if k.startswith("AWS_")}}
    procs.start_scheduler()
    for _ in range(3):
        procs.start_worker()
    from distributed import Client

    with Client(procs.address, timeout=30) as client:
        client.wait_for_workers(3, timeout=60)
    yield procs
    procs.stop_all()


def _job(s3_server, name, *args, cluster):
    env = s3_server.env()
    done = run_job(name, *args, "--scheduler", cluster.address, env=env)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def calm(s3_server, s3_cluster, test_sources):
    """ingest -> fit on s3:// (undisturbed), shared by the fault tests."""
    _job(s3_server, "ingest", "--dataset", "fashion-mnist", "--source", test_sources,
         "--out", f"{BUCKET}/data", "--chunk-rows", 2500, cluster=s3_cluster)
    _job(s3_server, "fit", "--data", f"{BUCKET}/data/fashion-mnist.zarr", *FIT,
         "--out", f"{BUCKET}/calm.zarr", cluster=s3_cluster)
    return f"{BUCKET}/calm.zarr"


def test_ingest_fit_evaluate_on_s3_equal_the_local_run_bit_for_bit(
        s3_server, s3_cluster, calm, s3_env, test_sources, tmp_path):
    ev = _job(s3_server, "evaluate", "--result", calm, "--split", "test", cluster=s3_cluster)
    assert f"wrote {BUCKET}/calm-eval-test/metrics.json" in ev.stdout
    # The same chain on local stores, with the same scheduler and workers.
    _job(s3_server, "ingest", "--dataset", "fashion-mnist", "--source", test_sources,
         "--out", tmp_path, "--chunk-rows", 2500, cluster=s3_cluster)
    _job(s3_server, "fit", "--data", tmp_path / "fashion-mnist.zarr", *FIT,
         "--out", tmp_path / "local.zarr", cluster=s3_cluster)
    _job(s3_server, "evaluate", "--result", tmp_path / "local.zarr", cluster=s3_cluster)
    a, b = store.read_result(calm), store.read_result(tmp_path / "local.zarr")
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.attrs["inertia"] == b.attrs["inertia"] and a.attrs["n_iter"] == b.attrs["n_iter"]
    np.testing.assert_array_equal(a.labels.compute(), b.labels.compute())
    assert a.attrs["data"]["fingerprint"] == b.attrs["data"]["fingerprint"]
    assert a.attrs["data"]["store"] == f"{BUCKET}/data/fashion-mnist.zarr"
    remote = json.loads(store.read_text(f"{BUCKET}/calm-eval-test/metrics.json"))
    local = json.loads((tmp_path / "local-eval-test" / "metrics.json").read_text())
    assert remote["accuracy"] == local["accuracy"] and remote["nmi"] == local["nmi"]
    assert store.output_kind(f"{BUCKET}/calm-eval-test") == store.EVALUATION_FORMAT
    # Nothing was written where the processes run; no checkpoint or staging is left.
    assert all(not any(p.cwd.iterdir()) for p in s3_cluster.procs)
    left = sorted(n.rsplit("/", 1)[-1] for n in store._children(store.absolute(BUCKET)))
    assert left == ["calm-eval-test", "calm.zarr", "data"]


def _wait_for_checkpoint(ckpt, iteration, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"job ended early: {proc.communicate()}")
        try:
            if store.read_checkpoint(ckpt)["iteration"] >= iteration:
                return
        except store.StoreError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at iteration {iteration} in {timeout} s")


def _start_fit(s3_server, cluster, *args):
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "fit.py"), *map(str, args),
                             "--scheduler", cluster.address], env=s3_server.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_client_killed_then_resumed_from_the_s3_checkpoint(s3_server, s3_cluster, calm, s3_env):
    out = f"{BUCKET}/resumed.zarr"
    proc = _start_fit(s3_server, s3_cluster, "--data", f"{BUCKET}/data/fashion-mnist.zarr",
                      *FIT, "--out", out)
    ckpt = store.checkpoint_path(out)
    _wait_for_checkpoint(ckpt, 3, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    doc = store.read_checkpoint(ckpt)
    assert 3 <= doc["iteration"] < store.read_result(calm).attrs["n_iter"]
    assert store.output_kind(out) in (None, store.INCOMPLETE)
    _job(s3_server, "fit", "--data", f"{BUCKET}/data/fashion-mnist.zarr", *FIT, "--out", out,
         "--resume", cluster=s3_cluster)
    a, b = store.read_result(out), store.read_result(calm)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.attrs["inertia"] == b.attrs["inertia"] and a.attrs["n_iter"] == b.attrs["n_iter"]
    assert a.attrs["resumed_from"] == doc["iteration"]
    assert not store.exists(ckpt)
    assert len(store._children(store.absolute(out))) == 2  # zarr.json and one generation


def test_worker_killed_mid_fit_on_s3_gives_the_undisturbed_result(s3_server, s3_cluster, calm,
                                                                  s3_env):
    out = f"{BUCKET}/hurt.zarr"
    proc = _start_fit(s3_server, s3_cluster, "--data", f"{BUCKET}/data/fashion-mnist.zarr",
                      *FIT, "--out", out)
    _wait_for_checkpoint(store.checkpoint_path(out), 2, proc)
    victim = next(p for p in s3_cluster.procs[1:] if p.poll() is None)
    os.kill(victim.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert victim.poll() is not None
    a, b = store.read_result(out), store.read_result(calm)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.attrs["inertia"] == b.attrs["inertia"]
    np.testing.assert_array_equal(a.labels.compute(), b.labels.compute())
