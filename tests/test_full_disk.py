"""A full disk while writing: a clear error, a non-zero exit, and nothing left behind.

The disk is a small tmpfs mounted for the test (CI runs as root); where mounting
is not permitted, the job runs under RLIMIT_FSIZE instead, which makes the same
writes fail with EFBIG.
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import leftovers


@pytest.fixture(params=[("64k", "tmpfs"), ("3m", "tmpfs"), ("64k", "rlimit")],
                ids=["tiny-tmpfs", "small-tmpfs", "tiny-rlimit"])
def small_disk(request, tmp_path):
    size, how = request.param
    mount = tmp_path / "disk"
    mount.mkdir()
    limit = {"64k": 64 * 1024, "3m": 3 * 2**20}[size]
    mounted = False
    if how == "tmpfs":
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                             capture_output=True, text=True)
        # Not allowed to mount: cap the size of any file the job writes instead.
        mounted = res.returncode == 0
    yield mount, (None if mounted else limit)
    if mounted:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _run(jobs, job, args, limit):
    # With a limit: SIGXFSZ ignored and RLIMIT_FSIZE set in the job's process (its
    # workers inherit both), so an oversized write fails with EFBIG.
    return jobs.run(job, *args, timeout=300, fsize=limit)


def _disk_error(stderr):
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), stderr
    assert "No space left on device" in last or "File too large" in last, last


@pytest.mark.t10k
def test_ingest_onto_a_full_disk(small_disk, shared_datasets, jobs):
    mount, limit = small_disk
    out = mount / "data"
    res = _run(jobs, "ingest", ["--dataset", "mnist", "--source", shared_datasets,
                                "--out", out, "--no-download"], limit)
    assert res.returncode == 2
    _disk_error(res.stderr)
    assert leftovers(out) == []


def test_fit_result_onto_a_full_disk(small_disk, fashion_test_small_chunks, jobs):
    mount, limit = small_disk
    out = mount / "r.zarr"
    res = _run(jobs, "fit", ["--data", fashion_test_small_chunks, "--split", "test",
                             "--k", 10, "--max-iter", 5, "--out", out], limit)
    if res.returncode == 0:
        # 3 MB holds a K = 10 result over 10,000 rows: then it must be complete and valid.
        from kmeans_dask import store

        assert store.read_result(out).labels.shape == (10000,)
        assert sorted(leftovers(mount)) == ["r-report.html", "r.zarr"]
        return
    assert res.returncode == 2
    _disk_error(res.stderr)
    assert leftovers(mount) == []
