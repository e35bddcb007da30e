"""jobs/ingest.py as a user runs it: a subprocess with real arguments and exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from kmeans_dask import datasets, store

from conftest import ROOT, leftovers, raw_payload

JOB = ROOT / "jobs" / "ingest.py"


def run_job(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, str(JOB), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_ingest_job_on_a_local_cluster(tmp_path, shared_datasets):
    out = tmp_path / "out"
    res = run_job("--dataset", "mnist", "--source", shared_datasets, "--out", out,
                  "--chunk-rows", "15000", "--no-download")
    assert res.returncode == 0, res.stderr
    assert f"wrote {out / 'mnist.zarr'} (train: 60000 rows, test: 10000 rows)" in res.stdout
    assert "dashboard http://127.0.0.1:" in res.stderr
    data = store.open_data(out / "mnist.zarr", "train")
    assert data.images.chunks[0] == (15000,) * 4
    files = datasets.get_spec("mnist").files["train"]
    assert data.labels.compute().tobytes() == raw_payload(shared_datasets / "mnist" / files["labels"].name)[8:]
    again = run_job("--dataset", "mnist", "--source", shared_datasets, "--out", out,
                    "--chunk-rows", "15000", "--no-download")
    assert again.returncode == 0 and "already up to date" in again.stdout


@pytest.mark.t10k
def test_ingest_job_bad_file_exits_non_zero_and_leaves_nothing(tmp_path, shared_datasets, jobs):
    src = tmp_path / "src" / "fashion-mnist"
    src.mkdir(parents=True)
    for f in datasets.get_spec("fashion-mnist").files["test"].values():
        shutil.copy(shared_datasets / "fashion-mnist" / f.name, src / f.name)
    bad = src / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:100_000])
    out = tmp_path / "out"
    res = jobs.run("ingest", "--dataset", "fashion-mnist", "--source", tmp_path / "src",
                   "--out", out, "--no-download")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: corrupt gzip data")
    assert leftovers(out) == []


def test_ingest_job_bundled_fallback_says_so(tmp_path):
    res = run_job("--dataset", "fashion-mnist", "--out", tmp_path / "out", "--no-download",
                  "--chunk-rows", "5000")
    assert res.returncode == 0, res.stderr
    assert "fashion-mnist test: bundled" in res.stderr
    assert "split(s) ['train'] not available from any source; ingesting ['test'] only" in res.stderr
    assert store.list_splits(tmp_path / "out" / "fashion-mnist.zarr") == ["test"]
    labels = store.open_data(tmp_path / "out" / "fashion-mnist.zarr", "test").labels.compute()
    assert np.bincount(labels).tolist() == [1000] * 10
