"""Shared fixtures: the real data sets and stores ingested from them.

Two kinds of real data:

* the 10,000-image test splits (the ``t10k`` files), always at hand: taken from
  ``../shared/datasets`` (or ``$KMEANS_DASK_SHARED``) when it holds them, else
  from the copies bundled in ``kmeans_dask/data/`` (byte for byte the same
  files; ``test_datasets.py`` checks both against the published checksums);
* the full sets (train splits too, 70,000 images each), only in
  ``../shared/datasets``, ``$KMEANS_DASK_SHARED`` or ``$KMEANS_DASK_DATA``.
  A test that needs them is skipped when they are absent, with the reason in
  pytest's summary; with ``KMEANS_DASK_REQUIRE_FULL_DATA=1`` (set by ``.ci/run``)
  it fails instead.

A test marked ``@pytest.mark.t10k`` reads only the test splits: for it
``shared_datasets`` is the ``test_sources`` directory and ``fashion_rows`` /
``fashion_float`` are Fashion-MNIST's 10,000 test images, so it runs anywhere
on the same bytes.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest

from kmeans_dask import datasets, store

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KMEANS_DASK_SHARED", ROOT.parent / "shared" / "datasets"))
# Read once here: the autouse fixture below removes it from every test's environment.
_USER_DATA = os.environ.get("KMEANS_DASK_DATA")
REQUIRE_FULL = os.environ.get("KMEANS_DASK_REQUIRE_FULL_DATA", "") not in ("", "0")


def _holds(directory: Path, splits) -> bool:
    """``directory`` has ``mnist/`` and ``fashion-mnist/`` with every file of ``splits``."""
    return all((directory / name / f.name).is_file()
               for name, spec in datasets.DATASETS.items()
               for split in splits for f in spec.files[split].values())


def _first_holding(splits) -> Path | None:
    candidates = [SHARED] + ([Path(_USER_DATA)] if _USER_DATA else [])
    return next((d for d in candidates if _holds(d, splits)), None)


FULL = _first_holding(datasets.SPLITS)
NO_FULL = (f"the full MNIST/Fashion-MNIST train splits are not in {SHARED} "
           "(nor $KMEANS_DASK_SHARED or $KMEANS_DASK_DATA)")
# The fixtures that a ``t10k`` mark switches to the test splits.
T10K_FIXTURES = ("shared_datasets", "fashion_rows", "fashion_float")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("t10k") is None:
        return
    names = [n for n in T10K_FIXTURES if n in metafunc.fixturenames]
    if not names:
        raise pytest.UsageError(f"{metafunc.definition.nodeid} is marked t10k but uses none of "
                                f"{', '.join(T10K_FIXTURES)}")
    # Function scope: the full-set values of these session fixtures are not
    # regrouped around the marked tests, and the stores built from the full
    # sets (data_root) do not depend on them.
    metafunc.parametrize(names, [("t10k",) * len(names)], ids=["t10k"], indirect=True,
                         scope="function")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(items):
    """A test that starts real ``dask scheduler``/``dask worker`` processes (through
    ``dask_processes`` or ``dask_cluster``) is ``cluster``, whether or not its module says so."""
    for item in items:
        if {"dask_processes", "dask_cluster"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def full_datasets() -> Path:
    """The full MNIST and Fashion-MNIST IDX files, every split (read-only); skips without them."""
    if FULL is None:
        if REQUIRE_FULL:
            pytest.fail(f"{NO_FULL}, and KMEANS_DASK_REQUIRE_FULL_DATA is set")
        pytest.skip(NO_FULL)
    return FULL


@pytest.fixture(scope="session")
def test_sources(tmp_path_factory) -> Path:
    """A directory with ``mnist/`` and ``fashion-mnist/`` holding only the real t10k files.

    Copied from ``../shared/datasets`` when it holds them, else from the bundled
    copies: the same bytes either way, and a test can never write into ../shared.
    """
    origin = _first_holding(["test"]) or datasets.BUNDLED_DIR
    out = tmp_path_factory.mktemp("test-sources")
    for name, spec in datasets.DATASETS.items():
        (out / name).mkdir()
        for f in spec.files["test"].values():
            shutil.copyfile(origin / name / f.name, out / name / f.name)
    return out


@pytest.fixture(scope="session")
def shared_datasets(request) -> Path:
    """The real IDX files a test reads: the full sets (see ``full_datasets``), or for a
    ``t10k`` test the ``test_sources`` directory."""
    if getattr(request, "param", None) == "t10k":
        return request.getfixturevalue("test_sources")
    return request.getfixturevalue("full_datasets")


@pytest.fixture(scope="session", autouse=True)
def _compiled_loops():
    """The pass's compiled loops, in numba's on-disk cache before any test starts a worker
    process: in a fresh clone each process would otherwise compile them on its own
    (seconds of CPU each, several at once on a small machine); from the cache they load."""
    import numpy as np

    from kmeans_dask import _kernels

    for dtype in (np.uint8, np.float32, np.float64):
        _kernels.warm_up(dtype)


@pytest.fixture
def float32_ranking():
    """Rank uint8 rows by the float32 GEMM and the bounds, not the integer tiles
    (``kmeans_dask.native``): for the tests of the bounds themselves."""
    import dask

    with dask.config.set({"kmeans_dask.native": False}):
        yield


@pytest.fixture(autouse=True)
def _isolated_sources(monkeypatch, tmp_path_factory):
    """No test reads the user's cache or environment, and none reaches the network."""
    monkeypatch.delenv("KMEANS_DASK_DATA", raising=False)
    monkeypatch.setenv("KMEANS_DASK_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def data_root(full_datasets, tmp_path_factory) -> Path:
    """Both full data sets, every split, ingested once per session (chunks of 10,000 rows)."""
    out = tmp_path_factory.mktemp("stores")
    for name in datasets.DATASETS:
        sources = datasets.resolve(name, full_datasets, download=False)
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


def _fashion_images(request):
    """Fashion-MNIST as one uint8 Dask array: all 70,000 images (train then test),
    or for a ``t10k`` test the 10,000 test images (chunks of 1,500 rows)."""
    import dask.array as da

    if getattr(request, "param", None) == "t10k":
        return store.open_data(request.getfixturevalue("fashion_test_small_chunks"), "test").images
    fashion = request.getfixturevalue("fashion_store")
    return da.concatenate([store.open_data(fashion, s).images for s in ("train", "test")])


@pytest.fixture(scope="session")
def fashion_rows(request):
    """All 70,000 Fashion-MNIST images (train then test) as one uint8 Dask array
    (the 10,000 test images for a ``t10k`` test)."""
    return _fashion_images(request)


@pytest.fixture(scope="session")
def fashion_float(request):
    """The same rows as ``fashion_rows``, as float64 in [0, 1], in memory, for scikit-learn."""
    return _fashion_images(request).compute() / 255.0


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
        self._workers, self._worker_args = [], ()  # those of workers()
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

    def workers(self, n: int, *worker_args, timeout=60.0) -> str:
        """Exactly ``n`` live workers, each started with ``worker_args``, on this object's
        scheduler (started on first use): workers are started, or stopped, to make it so.
        Returns the scheduler's address once the scheduler sees them all."""
        import time

        from distributed import Client

        if self.address is None:
            self.start_scheduler()
        if worker_args != self._worker_args:
            for proc in self._workers:
                self.stop(proc)
            self._workers, self._worker_args = [], worker_args
        self._workers = [p for p in self._workers if p.poll() is None]
        while len(self._workers) > n:
            self.stop(self._workers.pop())
        while len(self._workers) < n:
            self._workers.append(self.start_worker(*worker_args))
        with Client(self.address, timeout=30) as client:
            deadline = time.monotonic() + timeout
            while len(client.scheduler_info(n_workers=-1)["workers"]) != n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the scheduler does not see {n} workers; see {self.workdir}")
                time.sleep(0.05)
        return self.address

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


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A ``DaskProcesses`` shared by a module's tests: one ``dask scheduler``, and the
    workers each test asks for with ``dask_cluster.workers(n)``."""
    procs = DaskProcesses(tmp_path_factory.mktemp("dask-cluster"))
    yield procs
    procs.stop_all()


@pytest.fixture(scope="session")
def fashion_test_small_chunks(test_sources, tmp_path_factory) -> Path:
    """Fashion-MNIST's 10,000 test images in chunks of 1,500 rows (7 chunks)."""
    out = tmp_path_factory.mktemp("small-chunks")
    sources = {"test": datasets.resolve_split("fashion-mnist", "test", test_sources,
                                              download=False)}
    return store.ingest("fashion-mnist", out, sources, chunk_rows=1500).path


def run_job(name: str, *args, timeout: float = 600, env=None):
    """Run ``jobs/NAME.py`` as a user would; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(ROOT / "jobs" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


class JobServer:
    """``jobs/NAME.py`` run in a real process of its own, without paying for its imports
    each time: each run is forked from one process (``tests/jobserver.py``) that has
    imported every job's modules once.  Same argv, working directory, environment
    (the caller's at the time of the call), exit status, stdout and stderr as
    ``run_job``; ``fsize`` caps the size of any file the job writes (RLIMIT_FSIZE)."""

    def __init__(self, workdir: Path):
        import subprocess
        import sys

        self.workdir = workdir
        self.count = 0
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "jobserver.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=ROOT)
        if self._reply(120) != {"ready": True}:
            raise RuntimeError("tests/jobserver.py did not start")

    def _reply(self, timeout):
        import json
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"tests/jobserver.py ended (status {self.proc.wait()})")
        return json.loads(line)

    def run(self, name: str, *args, cwd=None, env=None, timeout: float = 600, fsize=None):
        import json
        import signal
        import subprocess
        import time

        self.count += 1
        out, err = (self.workdir / f"{self.count}.{s}" for s in ("out", "err"))
        args = [str(a) for a in args]
        req = {"job": name, "args": args, "cwd": str(cwd or os.getcwd()),
               "env": dict(os.environ if env is None else env),
               "stdout": str(out), "stderr": str(err), "fsize": fsize}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        pid = self._reply(60)["pid"]
        done = self._reply(max(deadline - time.monotonic(), 0))
        cmd = [f"jobs/{name}.py", *args]
        if done is None:
            os.kill(pid, signal.SIGKILL)
            self._reply(60)
            raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text())
        res = subprocess.CompletedProcess(cmd, done["returncode"], out.read_text(),
                                          err.read_text())
        out.unlink()
        err.unlink()
        return res

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def jobs(tmp_path_factory):
    """A ``JobServer``: ``jobs.run("fit", "--data", ..., cwd=..., timeout=...)``."""
    server = JobServer(tmp_path_factory.mktemp("job-output"))
    yield server
    server.close()


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


def killed_after(script: str, *args, marker: str, env=None) -> int:
    """Run ``python -c script args`` until it prints ``marker``, then SIGKILL it (no
    clean-up of its own runs, as when a machine or job is killed); returns its pid."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        line = proc.stdout.readline().decode()
        assert line.strip() == marker, line + proc.stdout.read().decode()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return proc.pid
