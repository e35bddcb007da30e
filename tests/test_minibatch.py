"""MiniBatchKMeans: scikit-learn's semantics, reproducibility on any number of workers."""

from __future__ import annotations

import asyncio
import math
import time

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream
from sklearn.cluster import MiniBatchKMeans as SKMiniBatchKMeans

from kmeans_dask import KMeans, MiniBatchKMeans, datasets, store
from kmeans_dask import minibatch as mb
from kmeans_dask._passes import ChunkedRows


def blobs(n=600, d=4, seed=0):
    rng = np.random.default_rng(seed)
    means = np.array([[0.0] * d, [6.0] * d, [0.0, 6.0] * (d // 2)])
    return np.vstack([rng.normal(m, 1.0, (n // 3, d)) for m in means])


@pytest.fixture(scope="module")
def fashion_t10k_store(tmp_path_factory):
    """Fashion-MNIST's bundled 10,000 test images, ingested in chunks of 2,500 rows."""
    out = tmp_path_factory.mktemp("mb-store")
    sources = {"test": datasets.resolve_split("fashion-mnist", "test", datasets.BUNDLED_DIR,
                                              download=False)}
    return store.ingest("fashion-mnist", out, sources, chunk_rows=2500).path


@pytest.fixture(scope="module")
def fashion_t10k(fashion_t10k_store):
    return store.open_data(fashion_t10k_store, "test").images


@pytest.mark.parametrize("mode", ["whole", "persisted", "streamed"])
def test_fetcher_takes_rows_from_every_chunk_in_one_compute(mode):
    """Sampled rows as stored, in the order drawn, one compute per round; the
    first round brings every chunk's statistics (small rows come whole)."""
    X = np.arange(50 * 3, dtype=np.uint8).reshape(50, 3)
    rows = ChunkedRows(da.from_array(X, chunks=(7, 3)), None, scale=1.0, block_rows=8)
    fetch = mb._Fetcher(rows, mode)
    loaded = fetch.load() if mode == "whole" else None
    idx = np.array([49, 0, 7, 7, 13, 48, 0, 21])
    got, stats = fetch.first(idx)
    stats = stats if loaded is None else loaded
    assert got.rows(0, len(idx)).dtype == np.uint8
    np.testing.assert_array_equal(got.rows(0, len(idx)), X[idx])
    np.testing.assert_array_equal(got.window(2, 3).rows(0, 3), X[idx[2:5]])
    assert stats["n"] == 50 and stats["sqnorm"] == float((X.astype(np.float64) ** 2).sum())
    more = np.array([3, 3, 40, 1])
    np.testing.assert_array_equal(fetch.result(fetch.submit(more)).rows(0, 4), X[more])
    assert fetch.calls == (1 if mode == "whole" else 2)
    assert mode != "streamed" or fetch.round_bytes > mb.config.get("minibatch-round-bytes")


@pytest.mark.parametrize("by_address,read_here", [(True, False), (False, "auto"),
                                                   (True, "auto")],
                         ids=["workers-read", "read-here", "same-machine"])
def test_streamed_rounds_read_and_sample_runs_of_chunks(fashion_t10k, monkeypatch, by_address,
                                                        read_here):
    """A streamed round reads runs of chunks and keeps the sampled rows (no whole
    chunk is a task result): on the workers, one task per run
    (``minibatch-read-here: false``); here, on this process's threads, where
    every worker is on this machine ("auto": beside a LocalCluster it started,
    or for a client of a scheduler whose workers are at 127.0.0.1).  Either way
    the rows come in the order drawn, with every chunk's statistics, and
    nothing is left on the workers once they have come, or once a round is
    cancelled."""
    monkeypatch.setitem(dask.config.config["kmeans_dask"], "minibatch-read-here", read_here)
    monkeypatch.setattr(mb, "STREAM_CHUNKS_PER_TASK", 3)
    X = fashion_t10k.compute()
    rows = ChunkedRows(fashion_t10k, None, scale=1 / 255)
    rng = np.random.default_rng(0)
    idx, more = rng.integers(0, len(X), 3000), rng.integers(0, len(X), 5000)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                      host="127.0.0.1", dashboard_address=":0") as lc, \
            Client(lc.scheduler_address if by_address else lc) as client:
        fetch = mb._Fetcher(rows, "streamed")
        with get_task_stream(client) as ts:
            got, stats = fetch.first(idx)
            nxt = fetch.result(fetch.submit(more))
        np.testing.assert_array_equal(got.rows(0, len(idx)), X[idx])
        np.testing.assert_array_equal(nxt.rows(0, len(more)), X[more])
        assert stats["n"] == len(X)
        assert stats["sqnorm"] == pytest.approx(float((X.astype(np.float64) ** 2).sum()) / 255**2,
                                                rel=1e-12)
        keys = [str(t["key"]) for t in ts.data]
        assert fashion_t10k.numblocks[0] > 3
        if read_here is False:
            assert len(keys) == 2 * math.ceil(fashion_t10k.numblocks[0] / 3), keys
            assert all("kmeans-minibatch-rows" in k for k in keys), keys
        else:
            assert fetch.here == 2 and keys == []
        assert not lc.scheduler.tasks  # every result came here and was released
        handle = fetch.submit(rng.integers(0, len(X), 20_000))
        fetch.cancel(handle)
        client.sync(lambda: asyncio.sleep(0.2))
        assert not lc.scheduler.tasks


@pytest.mark.parametrize("by_address", [True, False], ids=["workers-read", "read-here"])
def test_a_damaged_chunk_ends_a_streamed_fit_naming_it(fashion_t10k_store, tmp_path,
                                                        monkeypatch, by_address):
    """A chunk whose bytes changed ends a streamed fit with the store's error, whether
    the workers or this process read the round, and nothing is left running."""
    import shutil

    from kmeans_dask.errors import StoreError

    path = tmp_path / "copy.zarr"
    shutil.copytree(fashion_t10k_store, path)
    chunk = path / "test" / "images" / "c" / "2" / "0"
    twin = (path / "test" / "images" / "c" / "1" / "0").read_bytes()
    chunk.write_bytes(twin)  # another chunk's valid bytes: only the checksum can tell
    monkeypatch.setattr(mb._Fetcher, "mode_for", staticmethod(lambda X: "streamed"))
    X = store.open_data(path, "test").images
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                      host="127.0.0.1", dashboard_address=":0") as lc, \
            Client(lc.scheduler_address if by_address else lc), \
            dask.config.set({"kmeans_dask.minibatch-read-here": not by_address}):
        with pytest.raises(StoreError, match=r"images chunk 2 \(rows 5000.7499\): checksum "
                                             r"mismatch"):
            MiniBatchKMeans(10, batch_size=512, random_state=0).fit(X)
        deadline = time.monotonic() + 5
        while lc.scheduler.tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not lc.scheduler.tasks


def test_weighted_streamed_fits_equal_the_whole_one(fashion_t10k, monkeypatch):
    """Sample weights in a streamed fit (read here, or by the workers for a client of
    the scheduler's address): the statistics come with the first round and the
    centres and inertia are those of the fit with every row here."""
    w = da.from_array(np.random.default_rng(0).integers(0, 3, fashion_t10k.shape[0])
                      .astype(np.float64), chunks=fashion_t10k.chunks[:1])
    params = dict(n_clusters=10, batch_size=512, random_state=0, max_iter=3)
    ref = MiniBatchKMeans(**params).fit(fashion_t10k, sample_weight=w)
    monkeypatch.setattr(mb._Fetcher, "mode_for", staticmethod(lambda X: "streamed"))
    for by_address in (False, True):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                          host="127.0.0.1", dashboard_address=":0") as lc, \
                Client(lc.scheduler_address if by_address else lc), \
                dask.config.set({"kmeans_dask.minibatch-read-here": not by_address}):
            km = MiniBatchKMeans(**params).fit(fashion_t10k, sample_weight=w)
        np.testing.assert_array_equal(km.cluster_centers_, ref.cluster_centers_)
        assert km.inertia_ == ref.inertia_


def test_read_here_key_and_bad_values():
    """``minibatch-read-here`` takes "auto", true or false (YAML or environment text
    too); anything else is an error naming the key."""
    from kmeans_dask import config

    for value, want in (("auto", "auto"), (True, True), ("false", False), ("TRUE", True)):
        with dask.config.set({"kmeans_dask.minibatch-read-here": value}):
            assert config.minibatch_read_here() == want
    with dask.config.set({"kmeans_dask.minibatch-read-here": "sometimes"}), \
            pytest.raises(ValueError, match="kmeans_dask.minibatch-read-here must be"):
        config.minibatch_read_here()


def test_small_rows_come_whole_and_large_ones_in_rounds(monkeypatch):
    X = da.zeros((1000, 10), dtype=np.uint8, chunks=(100, 10))
    assert mb._Fetcher.mode_for(X) == "whole"
    with dask.config.set({"kmeans_dask.minibatch-round-bytes": 1000}):
        assert mb._Fetcher.mode_for(X) == "persisted"


def test_same_seed_same_centres_on_one_and_two_workers(fashion_t10k, monkeypatch):
    """One seed, one result: without a cluster, on one or two workers, with the
    rows brought whole or streamed from the store (read here beside a
    LocalCluster of this process, or by the workers with
    ``minibatch-read-here: false``), or sampled from worker memory in small
    rounds."""
    params = dict(n_clusters=10, batch_size=512, random_state=3, max_no_improvement=None,
                  max_iter=8)
    local = MiniBatchKMeans(**params).fit(fashion_t10k)
    results = []
    for n_workers, mode, by_address in ((1, "whole", False), (2, "whole", False),
                                        (2, "whole", True), (2, "persisted", False),
                                        (1, "streamed", False), (2, "streamed", True)):
        monkeypatch.setattr(mb._Fetcher, "mode_for", staticmethod(lambda X, mode=mode: mode))
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=False,
                          protocol="tcp://", host="127.0.0.1", dashboard_address=":0") as lc, \
                Client(lc.scheduler_address if by_address else lc) as client, \
                dask.config.set({"kmeans_dask.minibatch-round-bytes": 2**20,
                                 "kmeans_dask.minibatch-stream-round-bytes": 3 * 2**20,
                                 "kmeans_dask.minibatch-read-here": "auto" if not by_address
                                 else False}):
            with get_task_stream(client) as ts:
                km = MiniBatchKMeans(**params).fit(fashion_t10k)
            read_by_workers = any(("_take_chunks" in str(t["key"])
                                   or "kmeans-minibatch-rows" in str(t["key"])) for t in ts.data)
            assert read_by_workers == (mode == "persisted" or by_address), (mode, by_address)
            results.append((km.cluster_centers_, km.inertia_, km.labels_.compute()))
    for centers, inertia, labels in results:
        np.testing.assert_array_equal(centers, local.cluster_centers_)
        assert inertia == local.inertia_
        np.testing.assert_array_equal(labels, local.labels_.compute())
    assert local.n_steps_ == 8 * 10_000 // 512
    assert local.n_iter_ == 8


def test_labels_are_predict_and_inertia_is_over_all_rows(fashion_t10k):
    km = MiniBatchKMeans(12, random_state=0).fit(fashion_t10k)
    labels = km.labels_.compute()
    assert labels.dtype == np.int32 and km.labels_.chunks == fashion_t10k.chunks[:1]
    np.testing.assert_array_equal(labels, km.predict(fashion_t10k).compute())
    X = fashion_t10k.compute().astype(np.float64) / 255
    c = km.cluster_centers_.astype(np.float64)
    exact = ((X - c[labels]) ** 2).sum()
    assert km.inertia_ == pytest.approx(exact, rel=1e-9)
    assert km.score(fashion_t10k) == pytest.approx(-exact, rel=1e-5)
    assert km.cluster_centers_.dtype == np.float32 and km.scale_ == 1 / 255
    assert km.init_centers_.shape == (12, 784) and km.n_features_in_ == 784
    assert len(km.history_) == km.n_steps_ < 100 * 10_000 // 1024


@pytest.mark.parametrize("init", ["array", "k-means++", "random"])
def test_partial_fit_equals_scikit_learn(init):
    X = blobs(n=3000, d=6)
    rng = np.random.default_rng(1)
    start = X[rng.choice(len(X), 5, replace=False)] if init == "array" else init
    kw = dict(n_clusters=5, init=start, batch_size=200, random_state=4)
    ours = MiniBatchKMeans(scale=1, **kw)
    ref = SKMiniBatchKMeans(n_init=1, **kw)
    for _ in range(25):
        block = X[rng.integers(0, len(X), 200)]
        w = rng.integers(1, 4, 200).astype(np.float64)
        ours.partial_fit(block, sample_weight=w)
        ref.partial_fit(block, sample_weight=w)
        np.testing.assert_allclose(ours.cluster_centers_, ref.cluster_centers_, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours._counts, ref._counts)
    assert ours.n_steps_ == ref.n_steps_ == 25
    assert ours._n_since_last_reassign == ref._n_since_last_reassign
    np.testing.assert_array_equal(ours.labels_, ref.labels_)
    assert ours.inertia_ == pytest.approx(ref.inertia_, rel=1e-9)


def test_partial_fit_takes_dask_blocks_and_reassigns_like_scikit_learn():
    X = blobs(n=1200, d=4)
    # A centre nobody is near: it gets no weight, so it is reassigned on the first step.
    start = np.vstack([X[:3], [[1e3] * 4]])
    ours = MiniBatchKMeans(4, init=start, batch_size=100, scale=1, random_state=0)
    ref = SKMiniBatchKMeans(4, init=start, batch_size=100, n_init=1, random_state=0)
    for i in range(0, 1200, 100):
        block = X[np.random.default_rng(i).permutation(1200)[:100]]
        ours.partial_fit(da.from_array(block, chunks=30))
        ref.partial_fit(block)
    assert np.abs(ours.cluster_centers_).max() < 100
    assert ours.history_[0]["relocated"] == 1
    np.testing.assert_allclose(ours.cluster_centers_, ref.cluster_centers_, atol=1e-6)


def test_partial_fit_reads_a_store_chunk_by_chunk(fashion_t10k_store):
    """Data arriving in pieces: each chunk of a Zarr store is one step, as
    scikit-learn's partial_fit on the same images (scaled to [0, 1])."""
    images = store.open_data(fashion_t10k_store, "test").images
    start = images[:6].compute() / 255.0
    ours = MiniBatchKMeans(6, init=start, random_state=0)
    ref = SKMiniBatchKMeans(6, init=start, n_init=1, random_state=0)
    for block in images.blocks:  # 2,500 rows each, read when the step runs
        ours.partial_fit(block)
        ref.partial_fit(block.compute() / 255.0)
    assert ours.n_steps_ == ref.n_steps_ == len(images.chunks[0])
    np.testing.assert_allclose(ours.cluster_centers_, ref.cluster_centers_, atol=1e-5)
    np.testing.assert_allclose(ours._counts, ref._counts)


def test_integer_weights_equal_repeated_rows():
    X = blobs(n=900, d=4)
    rng = np.random.default_rng(2)
    # As many 0s as 2s: the repeated data has the same number of rows, so the
    # number of steps and the smoothing of scikit-learn's rule are the same too.
    w = rng.permutation(np.repeat([0, 1, 2], 300))
    rep = np.repeat(X, w, axis=0)
    assert len(rep) == len(X)
    kw = dict(n_clusters=3, batch_size=64, random_state=5, scale=1, max_iter=5)
    weighted = MiniBatchKMeans(**kw).fit(da.from_array(X, chunks=100), sample_weight=w)
    repeated = MiniBatchKMeans(**kw).fit(da.from_array(rep, chunks=250))
    np.testing.assert_array_equal(weighted.cluster_centers_, repeated.cluster_centers_)
    assert weighted.n_steps_ == repeated.n_steps_
    assert weighted.inertia_ == pytest.approx(repeated.inertia_, rel=1e-9)
    np.testing.assert_array_equal(np.repeat(weighted.labels_.compute(), w),
                                  repeated.labels_.compute())
    # partial_fit: a weighted block is that block with its rows repeated.
    a = MiniBatchKMeans(3, init=X[:3], scale=1, reassignment_ratio=0).partial_fit(X, sample_weight=w)
    b = MiniBatchKMeans(3, init=X[:3], scale=1, reassignment_ratio=0).partial_fit(rep)
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-12)
    np.testing.assert_allclose(a._counts, b._counts)


def test_early_stopping_and_tol_as_scikit_learn_documents():
    X = blobs(n=3000, d=4)
    n_max = 50 * len(X) // 100
    kw = dict(n_clusters=3, batch_size=100, max_iter=50, random_state=0, scale=1)
    full = MiniBatchKMeans(max_no_improvement=None, **kw).fit(X)
    assert full.n_steps_ == n_max and full.n_iter_ == 50
    early = MiniBatchKMeans(max_no_improvement=3, **kw).fit(X)
    assert early.n_steps_ < n_max
    assert early.n_iter_ == -(-early.n_steps_ * 100 // len(X))
    # tol: stop once a step moves the centres by at most tol x the mean variance.
    tol = MiniBatchKMeans(max_no_improvement=None, tol=1e-2, **kw).fit(X)
    assert 2 <= tol.n_steps_ < n_max
    assert tol.history_[-1]["center_shift"] <= 1e-2 * np.var(X, axis=0).mean() * 1.0001
    # Without labels, inertia_ is the smoothed batch inertia times the total weight.
    quick = MiniBatchKMeans(max_no_improvement=3, compute_labels=False, **kw).fit(X)
    assert not hasattr(quick, "labels_")
    np.testing.assert_array_equal(quick.cluster_centers_, early.cluster_centers_)
    assert quick.inertia_ == pytest.approx(quick._ewa_inertia * len(X))
    assert quick.inertia_ == pytest.approx(early.inertia_, rel=0.2)


def test_reassignment_moves_starved_centres():
    X = blobs(n=1200, d=4)
    start = np.vstack([X[[0, 500, 1000]], [[1e3] * 4]])
    kw = dict(n_clusters=4, init=start, batch_size=100, max_iter=3, random_state=0, scale=1,
              max_no_improvement=None)
    moved = MiniBatchKMeans(**kw).fit(X)
    assert moved.history_[0]["relocated"] == 1
    assert np.abs(moved.cluster_centers_).max() < 100
    assert np.bincount(moved.labels_, minlength=4).min() > 0
    kept = MiniBatchKMeans(reassignment_ratio=0, **kw).fit(X)
    assert sum(h["relocated"] for h in kept.history_) == 0
    assert kept.cluster_centers_[3].tolist() == [1e3] * 4


def test_partial_fit_after_fit_keeps_counts():
    X = blobs(n=600, d=4)
    km = MiniBatchKMeans(3, batch_size=50, random_state=0, scale=1, max_iter=2).fit(X)
    counts, steps = km._counts.copy(), km.n_steps_
    km.partial_fit(X[:50])
    assert km.n_steps_ == steps + 1
    assert km._counts.sum() == pytest.approx(counts.sum() + 50)
    with pytest.raises(ValueError, match="X has 3 features"):
        km.partial_fit(X[:10, :3])


@pytest.mark.parametrize("params, message", [
    ({"n_clusters": 0}, "The 'n_clusters' parameter of MiniBatchKMeans must be an int >= 1; got 0"),
    ({"batch_size": 0}, "The 'batch_size' parameter of MiniBatchKMeans must be an int >= 1; got 0"),
    ({"max_iter": 1.5}, "The 'max_iter' parameter of MiniBatchKMeans must be an int >= 1; got 1.5"),
    ({"max_no_improvement": -1}, "The 'max_no_improvement' parameter of MiniBatchKMeans must be an int >= 0 or None; got -1"),
    ({"init_size": 0}, "The 'init_size' parameter of MiniBatchKMeans must be an int >= 1 or None; got 0"),
    ({"n_init": 0}, "The 'n_init' parameter of MiniBatchKMeans must be one of 'auto' or an int >= 1; got 0"),
    ({"tol": -1.0}, "The 'tol' parameter of MiniBatchKMeans must be a float >= 0; got -1.0"),
    ({"reassignment_ratio": -0.1}, "The 'reassignment_ratio' parameter of MiniBatchKMeans must be a float >= 0; got -0.1"),
    ({"scale": 0}, "The 'scale' parameter of MiniBatchKMeans must be one of 'auto' or a float > 0; got 0"),
    ({"init": "kmeans"}, "The 'init' parameter of MiniBatchKMeans must be one of 'k-means.., 'random', 'k-means||' or a callable or an array-like; got 'kmeans'"),
    ({"init": np.zeros((2, 4))}, r"The shape of the initial centers \(2, 4\) does not match the number of clusters 3."),
    ({"compute_labels": "yes"}, "The 'compute_labels' parameter of MiniBatchKMeans must be a bool; got 'yes'"),
    ({"n_clusters": 700}, "n_samples=600 should be >= n_clusters=700."),
])
def test_bad_parameters_are_named(params, message):
    kw = {"n_clusters": 3, **params}
    with pytest.raises(ValueError, match=message):
        MiniBatchKMeans(**kw).fit(blobs())
    if "n_clusters" not in params or params["n_clusters"] != 700:
        with pytest.raises(ValueError, match=message):
            MiniBatchKMeans(**kw).partial_fit(blobs())


def test_bad_data_and_weights_are_named():
    X = blobs()
    X[5, 1] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        MiniBatchKMeans(3).fit(X)
    with pytest.raises(ValueError, match="Input X contains NaN"):
        MiniBatchKMeans(3).partial_fit(X)
    with pytest.raises(ValueError, match=r"X contains NaN or infinity \(first in rows 0-299\)"):
        MiniBatchKMeans(3).fit(da.from_array(X, chunks=300))
    with pytest.raises(ValueError, match="negative"):
        MiniBatchKMeans(3).fit(blobs(), sample_weight=-np.ones(600))
    with pytest.raises(ValueError, match="not fitted"):
        MiniBatchKMeans(3).predict(blobs())


def test_inertia_close_to_scikit_learn_on_fashion_mnist(fashion_t10k):
    X = fashion_t10k
    Xf = X.compute().astype(np.float32) / 255
    ours = [MiniBatchKMeans(10, random_state=s).fit(X).inertia_ for s in range(3)]
    ref = [SKMiniBatchKMeans(10, batch_size=1024, random_state=s).fit(Xf).inertia_
           for s in range(3)]
    assert np.median(ours) == pytest.approx(np.median(ref), rel=0.02)


def test_jobs_build_a_minibatch_estimator(fashion_t10k_store, tmp_path):
    import argparse

    from kmeans_dask import _cli, load, workflows

    parser = argparse.ArgumentParser()
    _cli.add_model_options(parser)
    params = _cli.model_params(parser.parse_args(["--k", "10", "--algorithm", "minibatch"]))
    assert params == {"algorithm": "minibatch", "init": "k-means++", "max_iter": 100, "tol": 0.0,
                      "n_init": "auto", "batch_size": 1024, "random_state": 0, "n_clusters": 10}
    lloyd = _cli.model_params(parser.parse_args(["--k", "10"]))
    assert lloyd == {"algorithm": "lloyd", "init": "k-means||", "max_iter": 300, "tol": 1e-4,
                     "n_init": "auto", "random_state": 0, "n_clusters": 10}
    with pytest.raises(ValueError, match="--batch-size is a mini-batch option"):
        _cli.model_params(parser.parse_args(["--k", "10", "--batch-size", "64"]))
    assert not hasattr(KMeans(), "batch_size")
    with pytest.raises(ValueError, match="The 'algorithm' parameter of KMeans must be one of 'lloyd'"):
        KMeans(2, algorithm="minibatch").fit(blobs())
    with pytest.raises(ValueError, match="The 'batch_size' parameter of MiniBatchKMeans must be an int >= 1; got 0"):
        _cli.check_model_params({**params, "batch_size": 0})
    data = store.open_data(fashion_t10k_store, "test")
    model, path = workflows.fit_store(data, tmp_path / "mb.zarr", params, with_report=False)
    assert isinstance(model, MiniBatchKMeans)
    back = load(path)
    np.testing.assert_array_equal(back.cluster_centers_, model.cluster_centers_)
    np.testing.assert_array_equal(back.labels_.compute(), model.labels_.compute())
    assert back.n_steps_ == model.n_steps_ and back.inertia_ == model.inertia_
    with pytest.raises(ValueError, match="--resume continues a Lloyd fit"):
        workflows.fit_store(data, tmp_path / "mb2.zarr", params, with_report=False, resume=True)
