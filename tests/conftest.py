"""Shared fixtures: the real data sets in ../shared/datasets and stores ingested from them."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from kmeans_dask import datasets, store

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KMEANS_DASK_SHARED", ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The real MNIST and Fashion-MNIST IDX files (read-only)."""
    if not (SHARED / "mnist").is_dir() or not (SHARED / "fashion-mnist").is_dir():
        pytest.fail(f"the real data sets are expected in {SHARED} (set KMEANS_DASK_SHARED)")
    return SHARED


@pytest.fixture(autouse=True)
def _isolated_sources(monkeypatch, tmp_path_factory):
    """No test reads the user's cache or environment, and none reaches the network."""
    monkeypatch.delenv("KMEANS_DASK_DATA", raising=False)
    monkeypatch.setenv("KMEANS_DASK_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def data_root(shared_datasets, tmp_path_factory) -> Path:
    """Both data sets, every split, ingested once per session (chunks of 10,000 rows)."""
    out = tmp_path_factory.mktemp("stores")
    for name in datasets.DATASETS:
        sources = datasets.resolve(name, shared_datasets, download=False)
        store.ingest(name, out, sources)
    return out


@pytest.fixture(scope="session")
def fashion_store(data_root) -> Path:
    return data_root / "fashion-mnist.zarr"


@pytest.fixture(scope="session")
def mnist_store(data_root) -> Path:
    return data_root / "mnist.zarr"


def raw_payload(path: Path) -> bytes:
    with gzip.open(path, "rb") as fh:
        return fh.read()


def write_gz(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as fh:
        fh.write(payload)
    return path


def leftovers(directory: Path) -> list[str]:
    """Everything in ``directory``: an aborted write must leave it empty."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture(scope="session")
def fashion_rows(fashion_store):
    """All 70,000 Fashion-MNIST images (train then test) as one uint8 Dask array."""
    import dask.array as da

    parts = [store.open_data(fashion_store, s).images for s in ("train", "test")]
    return da.concatenate(parts)


@pytest.fixture(scope="session")
def fashion_float(fashion_rows):
    """The same rows as float64 in [0, 1], in memory, for scikit-learn."""
    return fashion_rows.compute() / 255.0


class DaskProcesses:
    """Real ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, stopped by pid."""

    def __init__(self, workdir: Path):
        import shutil
        import sys

        self.workdir = workdir
        exe = Path(sys.executable).parent / "dask"
        self.dask = str(exe) if exe.exists() else shutil.which("dask")
        self.procs = []
        self.address = None
        # What Dask's nanny would set for its worker (these workers run without one,
        # so SIGKILL hits the worker itself): one BLAS thread, so results do not
        # depend on how a GEMM was split, and freed memory returned to the OS.
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                    "MKL_NUM_THREADS": "1", "MALLOC_TRIM_THRESHOLD_": "65536"}

    def _spawn(self, args, name):
        import subprocess

        log = open(self.workdir / f"{name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([self.dask, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, cwd=self.workdir)
        self.procs.append(proc)
        return proc

    def start_scheduler(self, *extra, timeout=30.0):
        import json
        import time

        sched_file = self.workdir / "scheduler.json"
        self.scheduler = self._spawn(["scheduler", "--host", "127.0.0.1", "--port", "0",
                                      "--no-dashboard", "--scheduler-file", str(sched_file),
                                      *extra], "scheduler")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sched_file.exists():
                try:
                    self.address = json.loads(sched_file.read_text())["address"]
                    return self.address
                except (ValueError, KeyError):
                    pass
            if self.scheduler.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"dask scheduler did not start; see {self.workdir}")

    def start_worker(self, *extra, address=None):
        return self._spawn(["worker", address or self.address, "--nthreads", "1",
                            "--host", "127.0.0.1", "--no-dashboard", "--no-nanny", *extra],
                           "worker")

    def client(self, n_workers: int, *worker_args):
        """A scheduler with ``n_workers`` workers (each started with ``worker_args``), and a
        Client that has seen them all."""
        from distributed import Client

        address = self.start_scheduler()
        for _ in range(n_workers):
            self.start_worker(*worker_args)
        client = Client(address, timeout=30)
        client.wait_for_workers(n_workers, timeout=60)
        return client

    def stop(self, proc, sig=None):
        import signal

        if proc.poll() is None:
            os.kill(proc.pid, sig or signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except Exception:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)

    def stop_all(self):
        for proc in reversed(self.procs):
            self.stop(proc)


@pytest.fixture
def dask_processes(tmp_path_factory):
    procs = DaskProcesses(tmp_path_factory.mktemp("dask"))
    yield procs
    procs.stop_all()


@pytest.fixture(scope="session")
def fashion_test_small_chunks(shared_datasets, tmp_path_factory) -> Path:
    """Fashion-MNIST's 10,000 test images in chunks of 1,500 rows (7 chunks)."""
    out = tmp_path_factory.mktemp("small-chunks")
    sources = {"test": datasets.resolve_split("fashion-mnist", "test", shared_datasets,
                                              download=False)}
    return store.ingest("fashion-mnist", out, sources, chunk_rows=1500).path


def run_job(name: str, *args, timeout: float = 600, env=None):
    """Run ``jobs/NAME.py`` as a user would; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(ROOT / "jobs" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def lloyd_step(part: dict, centers):
    """The Lloyd update from a pass's sums and counts (empty centres stay where they are)."""
    keep = part["counts"] > 0
    new = centers.copy()
    new[keep] = part["sums"][keep] / part["counts"][keep, None]
    return new


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
