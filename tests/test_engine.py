"""The engine's pieces: exact grid sums, kept vs fresh state, labels, config, placement.

The subprocess-cluster tests (test_cluster_reproducibility.py,
test_faults_cluster.py) drive the same engine over real workers.
"""

from __future__ import annotations

import itertools

import dask
import dask.array as da
import numpy as np
import pytest
from sklearn.datasets import make_blobs

from kmeans_dask import KMeans, _kernels, engine
from kmeans_dask._passes import ChunkedRows


def test_grid_sums_do_not_depend_on_order_or_grouping():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(3, 5)) * 10.0 ** rng.integers(-3, 4) for _ in range(12)]
    bound = sum(np.abs(p).sum() for p in parts)
    g = engine.grid_for(bound)
    assert bound < 2.0 ** 52 * g <= 2 * bound
    rounded = [engine.on_grid(p, g) for p in parts]
    assert all(np.abs(r - p).max() <= g / 2 for r, p in zip(rounded, parts))
    totals = set()
    for perm in itertools.islice(itertools.permutations(range(12)), 0, 4000, 97):
        # Two groupings of every order: pairs first, or one after the other.
        seq = engine.add_parts([{"s": rounded[i]} for i in perm])["s"]
        pairs = engine.add_parts([engine.add_parts([{"s": rounded[a]}, {"s": rounded[b]}])
                                  for a, b in zip(perm[::2], perm[1::2])])["s"]
        totals.add(seq.tobytes())
        totals.add(pairs.tobytes())
    assert len(totals) == 1
    # Without the grid, float addition is not associative: the check above could fail.
    plain = {sum(parts[i] for i in perm).tobytes()
             for perm in itertools.islice(itertools.permutations(range(12)), 0, 4000, 97)}
    assert len(plain) > 1


def test_grid_of_zero_and_of_non_finite_bounds():
    assert engine.grid_for(0.0) == 0.0
    assert engine.on_grid(np.array([1.5]), 0.0).tolist() == [1.5]
    with pytest.raises(ValueError, match="non-finite"):
        engine.grid_for(float("inf"))


def _rows(X, w=None, chunks=250, scale=1.0):
    Xd = da.from_array(X, chunks=(chunks, -1))
    wd = None if w is None else da.from_array(w, chunks=chunks)
    rows = ChunkedRows(Xd, wd, scale=scale)
    return rows, rows.stats()


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.float64])
def test_kept_state_equals_fresh_state_bit_for_bit(weighted, dtype, float32_ranking):
    # K = 40: two groups of centres, so the Yinyang group bounds are used.
    X, _ = make_blobs(2000, 12, centers=40, random_state=1)
    if dtype == np.uint8:
        X = np.clip((X - X.min()) * 8, 0, 255).astype(np.uint8)
    w = np.random.default_rng(2).random(len(X)) * 3 if weighted else None
    scale = 1 / 255 if dtype == np.uint8 else 1.0
    rows, stats = _rows(X, w, scale=scale)
    kept = engine.LocalEngine(rows, stats, persisted=True)
    centers = X[:40].astype(np.float64) * scale
    skipped = 0
    for _ in range(8):
        a = kept.lloyd(centers)
        fresh = engine.LocalEngine(rows, stats, persisted=False)
        b = fresh.lloyd(centers)
        fresh.close()
        np.testing.assert_array_equal(a["sums"], b["sums"])
        np.testing.assert_array_equal(a["counts"], b["counts"])
        assert a["inertia"] == b["inertia"]
        assert b["pairs"] == len(X) * 40  # a fresh state ranks everything
        skipped += len(X) * 40 - a["pairs"]
        keep = a["counts"] > 0
        centers = centers.copy()
        centers[keep] = a["sums"][keep] / a["counts"][keep, None]
    assert skipped > 0  # the kept bounds did spare work
    labels = kept.labels(centers)
    kept.close()
    # The labels the last pass left are the nearest-centre labels of those centres.
    np.testing.assert_array_equal(labels.compute(),
                                  _kernels.predict_chunk(X, centers, scale=scale))


@pytest.mark.parametrize("weighted", [False, True])
def test_kmeans_parallel_steps_with_kept_state_equal_fresh_state(weighted):
    # The rows' nearest candidates are kept between k-means|| steps and updated
    # with the new candidates only; a chunk that lost its state (moved to another
    # worker) is computed from all candidates at once.  Both must agree exactly.
    X, _ = make_blobs(3000, 12, centers=30, random_state=3)
    X = np.clip((X - X.min()) * 8, 0, 255).astype(np.uint8)
    w = np.random.default_rng(4).random(len(X)) * 3 if weighted else None
    rows, stats = _rows(X, w, scale=1 / 255)
    kept = engine.LocalEngine(rows, stats, persisted=True)
    candidates = X[[5]].astype(np.float64) / 255
    for r in range(4):
        cost = kept.seed(candidates, "cost", token="t")
        fresh = engine.LocalEngine(rows, stats, persisted=True)
        assert fresh.seed(candidates, "cost", token="t") == cost
        # The cost is the weighted sum of every row's distance to its nearest candidate.
        d = ((X[:, None, :] / 255 - candidates[None]) ** 2).sum(-1).min(1)
        assert cost == pytest.approx(float(d.sum() if w is None else d @ w), rel=1e-9)
        new = kept.seed(candidates, "sample", token="t", factor=20, total=cost, seed=(7, r))
        np.testing.assert_array_equal(
            new, fresh.seed(candidates, "sample", token="t", factor=20, total=cost, seed=(7, r)))
        weights = kept.seed(candidates, "weights", token="t")
        np.testing.assert_array_equal(weights, fresh.seed(candidates, "weights", token="t"))
        assert weights.sum() == pytest.approx(len(X) if w is None else w.sum())
        fresh.close()
        assert len(new) > 0
        candidates = np.vstack([candidates, new])
    # Another seeding (another token) does not read this one's state.
    assert kept.seed(candidates[:1], "cost", token="u") == pytest.approx(
        float(((X / 255 - candidates[0]) ** 2).sum(1) @ (np.ones(len(X)) if w is None else w)),
        rel=1e-9)
    # The last step of a seeding drops the rows' nearest candidates.
    assert any(isinstance(key, tuple) for key in kept.states)
    kept.seed(candidates[:1], "weights", token="u", release=True)
    assert not any(isinstance(key, tuple) for key in kept.states)
    kept.close()


def test_pass_sums_match_brute_force():
    rng = np.random.default_rng(3)
    X = rng.random((500, 4))
    w = rng.random(500)
    rows, stats = _rows(X, w, chunks=60)
    eng = engine.LocalEngine(rows, stats, persisted=True)
    centers = X[[0, 100, 200]]
    part = eng.lloyd(centers)
    eng.close()
    d = ((X[:, None, :] - centers[None]) ** 2).sum(-1)
    lab = d.argmin(1)
    for j in range(3):
        np.testing.assert_allclose(part["sums"][j], (w[lab == j, None] * X[lab == j]).sum(0),
                                   rtol=1e-12)
        np.testing.assert_allclose(part["counts"][j], w[lab == j].sum(), rtol=1e-12)
    np.testing.assert_allclose(part["inertia"], (w * d.min(1)).sum(), rtol=1e-9)


def test_config_knobs_change_no_result_and_bad_values_are_named():
    # Unweighted uint8 rows: exact integer sums, whatever the blocks.
    X, _ = make_blobs(3000, 6, centers=5, random_state=0)
    X = np.clip((X - X.min()) * 8, 0, 255).astype(np.uint8)
    Xd = da.from_array(X, chunks=500)
    init = X[:5] / 255.0
    base = KMeans(5, init=init, max_iter=20, tol=0).fit(Xd)
    with dask.config.set({"kmeans_dask.block-rows": 7, "kmeans_dask.split-every": 2}):
        other = KMeans(5, init=init, max_iter=20, tol=0).fit(Xd)
    np.testing.assert_array_equal(base.cluster_centers_, other.cluster_centers_)
    # Its sum of |x|^2 is an exact integer sum too.
    assert other.inertia_ == base.inertia_
    with dask.config.set({"kmeans_dask.block-rows": 0}):
        with pytest.raises(ValueError, match=r"kmeans_dask.block-rows must be an integer >= 1, got 0"):
            KMeans(5).fit(Xd)
    with dask.config.set({"kmeans_dask.split-every": "many"}):
        with pytest.raises(ValueError, match="kmeans_dask.split-every must be an integer >= 2"):
            KMeans(5).fit(Xd)


def test_numpy_and_streamed_rows_give_the_same_fit():
    X, _ = make_blobs(4000, 8, centers=6, random_state=4)
    Xd = da.from_array(X, chunks=700)
    with dask.config.set({"kmeans_dask.task-bytes": 1}):
        with dask.config.set({"kmeans_dask.persist": True}):
            a = KMeans(6, random_state=0).fit(Xd)
        with dask.config.set({"kmeans_dask.persist": "false"}):
            b = KMeans(6, random_state=0).fit(Xd)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.inertia_ == b.inertia_
    np.testing.assert_array_equal(a.labels_.compute(), b.labels_.compute())


def test_uint8_fit_does_not_depend_on_the_chunks():
    """Unweighted uint8 rows: exact integer sums and statistics per chunk, so from
    one set of initial centres every chunking gives the same centres and inertia."""
    X, _ = make_blobs(3000, 6, centers=5, random_state=1)
    X = np.clip((X - X.min()) * 8, 0, 255).astype(np.uint8)
    init = X[:5] / 255.0
    with dask.config.set({"kmeans_dask.task-bytes": 1}):  # keep the chunks as given
        fits = [KMeans(5, init=init, max_iter=20, tol=0).fit(da.from_array(X, chunks=c))
                for c in (3000, 1000, 257)]
    for other in fits[1:]:
        np.testing.assert_array_equal(fits[0].cluster_centers_, other.cluster_centers_)
        assert other.inertia_ == fits[0].inertia_
        assert other.n_iter_ == fits[0].n_iter_
    # Float rows are summed on a grid per chunk: the chunking may move last bits.
    Xf = X / 255.0
    with dask.config.set({"kmeans_dask.task-bytes": 1}):
        a = KMeans(5, init=init, max_iter=20, tol=0).fit(da.from_array(Xf, chunks=3000))
        b = KMeans(5, init=init, max_iter=20, tol=0).fit(da.from_array(Xf, chunks=257))
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-6)


def test_chunks_held_twice_are_shared_out_between_workers():
    """A replicated chunk goes to the holder with the fewest rows so far, so a
    pass after a replication (or a task that ran away from its chunks) still
    uses every worker."""
    from distributed import Client, LocalCluster, wait

    X = np.arange(8000 * 4, dtype=np.float64).reshape(8000, 4)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                      host="127.0.0.1", dashboard_address=":0") as lc, Client(lc) as client:
        Xp = da.from_array(X, chunks=(1000, 4)).persist()
        wait(Xp)
        client.replicate(engine._chunk_futures(Xp), n=2)
        rows = ChunkedRows(Xp, None, scale=1.0)
        eng = engine.ClusterEngine(client, rows, rows.stats(), persisted=True)
        try:
            assert [len(idx) for _, idx in eng.plan] == [4, 4]
            part = eng.lloyd(X[[0, 4000]])
            assert part["counts"].sum() == 8000
        finally:
            eng.close()


def test_a_large_pass_argument_is_one_key_of_the_graph(monkeypatch):
    """An array argument of a pass above SHARED_ARG_BYTES (k-means||'s candidates at
    MNIST8M's size are megabytes) goes into the graph once, as a key every
    worker's task depends on, not once per task; the pass gives the same sums."""
    from distributed import Client, LocalCluster

    X = np.arange(8000 * 4, dtype=np.float64).reshape(8000, 4)
    centers = X[[0, 4000, 7000]]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                      host="127.0.0.1", dashboard_address=":0") as lc, Client(lc) as client:
        rows = ChunkedRows(da.from_array(X, chunks=(1000, 4)).persist(), None, scale=1.0)
        eng = engine.ClusterEngine(client, rows, rows.stats(), persisted=True)
        try:
            want = eng.lloyd(centers)
            monkeypatch.setattr(engine, "SHARED_ARG_BYTES", centers.nbytes - 1)
            tasks = eng._tasks("probe", engine.worker_pass, (centers,), publish=False)
            graph = {}
            for t in tasks:
                graph.update(t.__dask_graph__())
            shared = [k for k in graph if "probe-arg-0" in str(k)]
            assert len(tasks) == 2 and len(shared) == 1
            assert all(shared[0] in graph[t.key].dependencies for t in tasks)
            got = eng.lloyd(centers)
            np.testing.assert_array_equal(got["sums"], want["sums"])
        finally:
            eng.close()


def test_worker_passes_run_blas_on_one_thread(monkeypatch):
    """A worker thread stands for one core: its passes and k-means|| steps run
    inside :func:`_kernels.one_blas_thread` (what that does to BLAS is
    tested with the kernels), whether or not a nanny set ``OMP_NUM_THREADS``."""
    from distributed import Client, LocalCluster

    seen = []
    for name in ("pass_chunks", "seed_chunks"):
        def spy(*args, _real=getattr(engine, name), _name=name, **kwargs):
            seen.append((_name, _kernels._blas_users))
            return _real(*args, **kwargs)

        monkeypatch.setattr(engine, name, spy)
    X, _ = make_blobs(4000, 8, centers=4, random_state=0)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                      host="127.0.0.1", dashboard_address=":0") as lc, Client(lc):
        KMeans(4, init="k-means||", random_state=0, max_iter=3).fit(
            da.from_array(X, chunks=(1000, 8)))
    assert {n for n, _ in seen} == {"pass_chunks", "seed_chunks"}, seen
    assert all(users >= 1 for _, users in seen), seen
    assert _kernels._blas_users == 0  # every context closed


def test_streamed_states_keep_no_per_chunk_sums():
    """Streamed rows: a chunk's state holds per-row data only; its integer sums
    are added again each pass and equal the kept ones."""
    rng = np.random.default_rng(5)
    X = rng.integers(0, 256, (700, 9), dtype=np.uint8)
    kept, fresh = _kernels.ChunkState(X, scale=1 / 255), _kernels.ChunkState(X, scale=1 / 255)
    c = X[:4] / 255.0
    for _ in range(4):
        a = _kernels.bounded_lloyd_chunk(X, kept, c, scale=1 / 255)
        b = _kernels.bounded_lloyd_chunk(X, fresh, c, scale=1 / 255, keep_sums=False)
        np.testing.assert_array_equal(a["raw_sums"], b["raw_sums"])
        np.testing.assert_array_equal(a["counts"], b["counts"])
        assert kept.raw_sums is not None and fresh.raw_sums is None
        keep = a["counts"] > 0
        c = c.copy()
        c[keep] = a["sums"][keep] / a["counts"][keep, None]


def test_integer_partials_travel_narrowed_and_add_wide():
    """A worker's exact integer sums travel as int32 where they fit, and are added
    in int64: two partials just below 2**31 each add without wrapping."""
    big = {"raw_sums": np.full((2, 3), 2**31 - 1, dtype=np.int64), "counts": np.ones(2)}
    small = engine.narrow(big)
    assert small["raw_sums"].dtype == np.int32 and big["raw_sums"].dtype == np.int64
    total = engine.add_parts([small, engine.narrow(dict(big))])
    assert total["raw_sums"].dtype == np.int64
    assert (total["raw_sums"] == 2 * (2**31 - 1)).all()
    # Sums that do not fit stay int64; float sums are left alone.
    wide = {"raw_sums": np.full((2, 3), 2**31, dtype=np.int64)}
    assert engine.narrow(wide)["raw_sums"].dtype == np.int64
    floats = {"sums": np.ones((2, 3))}
    assert engine.narrow(floats) is floats
