"""The job scripts on the default LocalCluster: outputs, pictures, metrics, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import numpy as np
import psutil
import pytest

from kmeans_dask import load, metrics, store

from conftest import ROOT, free_port, leftovers, run_job


@pytest.fixture(scope="module")
def fashion_fit(fashion_store, tmp_path_factory):
    """fit.py K = 10 on Fashion-MNIST train, default LocalCluster."""
    out = tmp_path_factory.mktemp("fit") / "fashion-k10.zarr"
    res = run_job("fit", "--data", fashion_store, "--split", "train", "--k", 10, "--seed", 0,
                  "--out", out)
    assert res.returncode == 0, res.stderr
    return out, res


def test_fit_writes_the_result_store(fashion_fit, fashion_store):
    out, res = fashion_fit
    assert f"wrote {out}" in res.stdout
    assert "dashboard http://127.0.0.1:" in res.stderr
    result = store.read_result(out)
    assert result.centroids.shape == (10, 784) and result.centroids.dtype == np.float32
    data = store.open_data(fashion_store, "train")
    assert result.labels.dtype == np.int32 and result.labels.shape == (60000,)
    assert result.labels.chunks == data.images.chunks[:1]
    attrs = result.attrs
    assert attrs["params"]["n_clusters"] == 10 and attrs["params"]["random_state"] == 0
    assert attrs["n_iter"] == len(attrs["history"]) and attrs["inertia"] > 0
    assert attrs["data"]["split"] == "train"
    assert attrs["data"]["payload_sha256"] == data.attrs["payload_sha256"]
    assert attrs["versions"]["dask"] and attrs["elapsed_s"] > 0
    report = out.with_name("fashion-k10-report.html")
    assert report.exists() and "<html" in report.read_text()[:2000].lower()
    model = load(out)
    labels = model.predict(data.images).compute()
    np.testing.assert_array_equal(labels, result.labels.compute())


def test_evaluate_accuracy_in_published_range(fashion_fit, fashion_store, tmp_path):
    out, _ = fashion_fit
    res = run_job("evaluate", "--result", out, "--split", "test", "--out", tmp_path / "eval")
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.47 <= rep["accuracy"] <= 0.60, rep["accuracy"]
    assert rep["n"] == 10000 and rep["split"] == "test" and rep["mapping_split"] == "train"
    # The mapping is the majority one, learned on train.
    train_true = store.open_data(fashion_store, "train").labels.compute()
    train_pred = store.read_result(out).labels.compute()
    table = metrics.contingency(train_true, train_pred, 10, 10)
    names = store.open_data(fashion_store, "train").class_names
    assert rep["mapping"] == [names[j] for j in table.argmax(1)]
    assert "accuracy" in res.stdout and "most common" in res.stdout
    for key in ("nmi", "ari", "homogeneity", "completeness", "v_measure", "inertia"):
        assert rep[key] > 0
    from PIL import Image

    for name in ("centroids", "confusion", "members"):
        with Image.open(tmp_path / "eval" / f"{name}.png") as im:
            assert im.format == "PNG"
            if name == "centroids":
                assert im.size == (5 * 120, 2 * 145 + 40)


def test_predict_job(fashion_fit, fashion_store, tmp_path):
    out, _ = fashion_fit
    labels_path = tmp_path / "test-labels.zarr"
    res = run_job("predict", "--result", out, "--data", fashion_store, "--split", "test",
                  "--out", labels_path)
    assert res.returncode == 0, res.stderr
    labels, attrs = store.read_labels(labels_path)
    want = load(out).predict(store.open_data(fashion_store, "test").images).compute()
    np.testing.assert_array_equal(labels.compute(), want)
    assert attrs["data"]["split"] == "test"


def test_dashboard_answers_on_loopback_only(fashion_store, tmp_path):
    port = free_port()
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(f"local:\n  dashboard_address: 127.0.0.1:{port}\n")
    out = tmp_path / "r.zarr"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "fit.py"), "--data", str(fashion_store), "--k", "64",
         "--tol", "0", "--max-iter", "200", "--out", str(out), "--cluster", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = r.read().decode()
                    break
            except OSError:
                time.sleep(0.3)
        assert health == "ok"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read(4000).lower()
        listening = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening == {"127.0.0.1"}
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    # Stopped mid-fit by SIGTERM: nothing half-written is left.
    assert proc.returncode != 0
    assert leftovers(tmp_path) == ["cluster.yaml"]


def test_sweep_and_blobs(mnist_store, tmp_path):
    res = run_job("sweep", "--data", mnist_store, "--ks", "3,5", "--out", tmp_path / "sweep",
                  "--max-iter", 50)
    assert res.returncode == 0, res.stderr
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    assert [r["k"] for r in table] == [3, 5]
    assert table[0]["train_inertia"] > table[1]["train_inertia"]
    assert all(0 < r["accuracy"] < 1 and r["test_inertia"] > 0 for r in table)
    assert (tmp_path / "sweep" / "sweep.csv").read_text().startswith("k,train_inertia,test_inertia")
    from PIL import Image

    with Image.open(tmp_path / "sweep" / "elbow.png") as im:
        assert im.size == (1100, 420)
    res = run_job("blobs2d", "--out", tmp_path / "blobs")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout[: res.stdout.rindex("}") + 1])
    centers = sorted(out["centers"])
    np.testing.assert_allclose(centers, [[1, 1], [5, 5]], atol=0.35)
    with Image.open(tmp_path / "blobs" / "blobs2d.png") as im:
        assert im.size == (1000, 460)


@pytest.mark.parametrize("case", ["missing store", "missing split", "k too large", "existing output",
                                  "malformed cluster.yaml", "unreachable scheduler", "bad k",
                                  "bad scheduler address", "store with wrong dtype"])
def test_bad_job_input(case, fashion_test_small_chunks, tmp_path, jobs):
    out = tmp_path / "out" / "r.zarr"
    out.parent.mkdir()
    args = ["--data", fashion_test_small_chunks, "--split", "test", "--k", 10, "--out", out]
    expect = None
    if case == "missing store":
        args[1] = tmp_path / "nope.zarr"
        expect = f"error: {tmp_path / 'nope.zarr'}: data store not found"
    elif case == "missing split":
        args[3] = "train"
        expect = f"error: {fashion_test_small_chunks}: split 'train' not in the store (it holds ['test'])"
    elif case == "k too large":
        args[5] = 10001
        expect = f"error: --k 10001 is larger than the 10000 rows of {fashion_test_small_chunks}/test"
    elif case == "bad k":
        args[5] = 0
        expect = "error: --k must be a positive integer, got 0"
    elif case == "existing output":
        out.mkdir()
        expect = f"error: {out} already exists (an empty directory); pass --overwrite to replace it"
    elif case == "malformed cluster.yaml":
        cfg = tmp_path / "cluster.yaml"
        cfg.write_text("local:\n  n_workers: lots\n")
        args += ["--cluster", cfg]
        expect = f"error: {cfg}: local.n_workers: expected int, got 'lots'"
    elif case == "unreachable scheduler":
        args += ["--scheduler", f"tcp://127.0.0.1:{free_port()}"]
        expect = "error: could not reach the scheduler at tcp://127.0.0.1:"
    elif case == "bad scheduler address":
        args += ["--scheduler", "127.0.0.1:8786"]
        expect = ("error: --scheduler: remote.address: expected tcp://HOST:PORT or "
                  "tls://HOST:PORT, got '127.0.0.1:8786'")
    elif case == "store with wrong dtype":
        import shutil

        import zarr

        bad = tmp_path / "bad.zarr"
        shutil.copytree(fashion_test_small_chunks, bad)
        group = zarr.open_group(str(bad / "test"), mode="a")
        del group["images"]
        group.create_array("images", shape=(10000, 784), chunks=(1500, 784), dtype="float32")
        args[1] = bad
        expect = f"error: {bad}/test/images: dtype float32, expected uint8"
    t0 = time.monotonic()
    res = jobs.run("fit", *args, timeout=120)
    elapsed = time.monotonic() - t0
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(expect), res.stderr
    if case == "unreachable scheduler":
        assert "within 10 s" in res.stderr and elapsed < 40
    expected_left = ["r.zarr"] if case == "existing output" else []
    assert leftovers(out.parent) == expected_left
