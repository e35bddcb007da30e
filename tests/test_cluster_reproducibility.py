"""Bit-for-bit reproducibility on real dask scheduler/worker processes (1, 2 and 3 workers).

The module's tests share one ``dask scheduler`` (``dask_cluster``); each asks for
the workers it needs, which are started or stopped to make up that number.
"""

from __future__ import annotations

import dask
import numpy as np
import pytest
from distributed import Client, get_task_stream

from kmeans_dask import KMeans, MiniBatchKMeans, engine, store

pytestmark = pytest.mark.cluster

# Rows in 20 chunks of 500, kept as they are when persisted: many more chunks
# than workers, so each worker passes and combines several.
SMALL_TASKS = {"kmeans_dask.task-bytes": 1}


def _rows(path):
    return store.open_data(path, "test").images.rechunk({0: 500})


def _result(km):
    return km.cluster_centers_, km.inertia_, km.labels_.compute(), [h["inertia"] for h in km.history_]


def _native_ranking(client, on: bool) -> None:
    """Turn the workers' integer-tile ranking of uint8 rows on or off (``kmeans_dask.native``)."""
    client.run(lambda value=on: dask.config.set({"kmeans_dask.native": value}) and None)


def _assert_same(results):
    first = results[0]
    for centers, inertia, labels, history in results[1:]:
        np.testing.assert_array_equal(centers, first[0])
        assert inertia == first[1]
        np.testing.assert_array_equal(labels, first[2])
        assert history == first[3]


@pytest.mark.parametrize("persist", [True, False], ids=["persisted", "streamed"])
def test_lloyd_same_on_one_two_and_three_workers(dask_cluster, fashion_test_small_chunks,
                                                 persist):
    results = []
    # The last run repeats the one before on the same cluster, with the workers
    # ranking by the float32 GEMM and the bounds instead of the integer tiles.
    for n_workers, native in ((1, True), (2, True), (3, True), (3, False)):
        address = dask_cluster.workers(n_workers)
        with (Client(address, timeout=30) as client,
              dask.config.set({**SMALL_TASKS, "kmeans_dask.persist": persist})):
            assert len(client.scheduler_info()["workers"]) == n_workers
            _native_ranking(client, native)
            try:
                X = _rows(fashion_test_small_chunks)
                km = KMeans(10, init="k-means||", random_state=0, max_iter=8, tol=0).fit(X)
            finally:
                _native_ranking(client, True)
            assert km.labels_.chunks == X.chunks[:1]
            results.append(_result(km))
    assert len(results[0][3]) == 8
    _assert_same(results)


def test_weighted_and_grouped_same_on_one_and_three_workers_persisted_or_streamed(
        dask_cluster, fashion_test_small_chunks):
    # K = 64 splits the centres into 4 groups (Yinyang bounds); weights make the
    # sums float, summed again every pass and added on the workers' grid.
    w = np.random.default_rng(0).random(10_000) * 2
    runs = {}
    for n_workers in (1, 3):
        address = dask_cluster.workers(n_workers)
        with Client(address, timeout=30) as client, dask.config.set(SMALL_TASKS):
            assert len(client.scheduler_info()["workers"]) == n_workers
            # The bounds are what this test is about: the workers rank by float32.
            _native_ranking(client, False)
            X = _rows(fashion_test_small_chunks)
            for persist in (True, False):
                for weights in (None, w):
                    with dask.config.set({"kmeans_dask.persist": persist}):
                        # Random rows to start from: k-means++'s 64 sequential draws
                        # run on the client and would cost more than the fit here.
                        km = KMeans(64, init="random", n_init=1, random_state=1, max_iter=6,
                                    tol=0).fit(X, sample_weight=weights)
                    # The bounds spared work by the last iterations (so they were used).
                    assert km.history_[-1]["skipped"] > 0.3, km.history_
                    runs[n_workers, persist, weights is None] = _result(km)
            _native_ranking(client, True)
    for unweighted in (True, False):
        # Persisted and streamed rows keep the same 500-row chunks here.
        _assert_same([runs[n, p, unweighted] for n in (1, 3) for p in (True, False)])


# A lambda travels to the workers by value (the tests are not importable there).
_partials_received = lambda dask_worker: getattr(  # noqa: E731
    dask_worker.plugins.get("kmeans-dask"), "received", 0)


def test_chained_loop_equals_the_loop_through_the_client(dask_cluster, fashion_test_small_chunks):
    # kmeans_dask.peer-workers chooses where each iteration's partials are added
    # (on every worker, or on the client), never what the fit finds: with a
    # tolerance reached, spherical centres, an empty cluster moved mid-loop,
    # and checkpoints, which need the centres of every iteration.
    address = dask_cluster.workers(2)
    with Client(address, timeout=30) as client, dask.config.set(SMALL_TASKS):
        X = _rows(fashion_test_small_chunks)
        far = X[:10].compute() / 255.0
        far[3] = 50.0  # nearest to no row: empty after the first pass
        cases = {"tol": dict(n_clusters=10, init="k-means++", random_state=0, max_iter=60,
                             tol=1e-2),
                 "cosine": dict(n_clusters=10, metric="cosine", random_state=0, max_iter=6,
                                tol=0),
                 "empty": dict(n_clusters=10, init=far, max_iter=6, tol=0)}
        before = sum(client.run(_partials_received).values())
        for name, params in cases.items():
            fits = {}
            for peers in (4, 0):
                saved = []
                with dask.config.set({"kmeans_dask.peer-workers": peers}):
                    km = KMeans(**params).fit(X, checkpoint=lambda s: saved.append(
                        (s["iteration"], s["centers"].copy())))
                received = sum(client.run(_partials_received).values()) - before
                before += received
                # Chained, every worker sent its partials straight to the other.
                assert (received >= 2 * km.n_iter_) if peers else (received == 0), \
                    (name, peers, received)
                history = [{k: v for k, v in h.items() if k != "seconds"} for h in km.history_]
                fits[peers] = (*_result(km), history, saved)
            chained, client_loop = fits[4], fits[0]
            _assert_same([chained[:4], client_loop[:4]])
            assert chained[4] == client_loop[4], name
            assert [i for i, _ in chained[5]] == [i for i, _ in client_loop[5]]
            for (_, a), (_, b) in zip(chained[5], client_loop[5]):
                np.testing.assert_array_equal(a, b)
            if name == "tol":
                assert km.n_iter_ < params["max_iter"]  # ended by the tolerance
        assert km.n_iter_ == 6 and km.history_[0]["relocated"] == 1
        assert fits[4][4][-1]["center_shift"] > 0


def test_a_fit_stopped_by_its_callback_frees_the_workers(dask_cluster, fashion_test_small_chunks):
    # The chained loop's steps run ahead of the client: when the fit raises,
    # the step still running (waiting for partials that will never be sent)
    # is told to stop, rather than hold its worker until its patience runs out.
    import time

    address = dask_cluster.workers(2)
    with Client(address, timeout=30) as client, dask.config.set(SMALL_TASKS):
        X = _rows(fashion_test_small_chunks)

        def stop(record):
            if record["iteration"] == 2:
                raise RuntimeError("stop here")

        with pytest.raises(RuntimeError, match="stop here"):
            KMeans(10, init="k-means++", random_state=0, max_iter=200, tol=0).fit(
                X, callback=stop)
        busy = lambda dask_worker: (len(dask_worker.state.executing)  # noqa: E731
                                    + len(dask_worker.state.long_running))
        deadline = time.monotonic() + 30  # far below the steps' patience (300 s)
        while sum(client.run(busy).values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sum(client.run(busy).values()) == 0
        # And the cluster fits again, the same as a fit that was never stopped.
        again = KMeans(10, init="k-means++", random_state=0, max_iter=5, tol=0).fit(X)
        assert again.n_iter_ == 5


def test_a_worker_that_refuses_partials_leaves_the_loop_to_the_client(
        dask_cluster, fashion_test_small_chunks, caplog):
    # A worker without the handler the chained loop sends partials to (say,
    # one that kept an older plugin): the fit goes on through the client, with
    # the same result.
    address = dask_cluster.workers(2)
    with Client(address, timeout=30) as client, dask.config.set(SMALL_TASKS):
        X = _rows(fashion_test_small_chunks)
        params = dict(n_clusters=10, init="k-means++", random_state=0, max_iter=8, tol=0)
        calm = _result(KMeans(**params).fit(X))
        victim = sorted(client.scheduler_info()["workers"])[1]
        handler = engine.PEER_HANDLER
        client.run(lambda dask_worker: dask_worker.handlers.pop(handler) and None,
                   workers=[victim])
        try:
            with caplog.at_level("INFO", logger="kmeans_dask.engine"):
                hurt = _result(KMeans(**params).fit(X))
        finally:
            # The module's later tests may get this worker again.
            client.run(lambda dask_worker, name=engine.EXTENSION: dask_worker.handlers.update(
                {handler: dask_worker.plugins[name].receive}) and None, workers=[victim])
        assert any("through the client" in r.getMessage() for r in caplog.records)
        _assert_same([calm, hurt])


def test_one_worker_with_two_threads_equals_two_workers(dask_cluster, fashion_test_small_chunks):
    # ``dask worker``'s default shape: one process, several threads; the pass
    # runs its chunks over a pool of the worker's size.
    results = []
    for args in (("--nthreads", "2"), ()):
        address = dask_cluster.workers(1 if args else 2, *args)
        with Client(address, timeout=30) as client, dask.config.set(SMALL_TASKS):
            assert sum(client.nthreads().values()) == 2
            X = _rows(fashion_test_small_chunks)
            results.append(_result(KMeans(10, init="k-means++", random_state=0, max_iter=10,
                                          tol=0).fit(X)))
    _assert_same(results)


@pytest.mark.parametrize("persist", [True, False], ids=["persisted", "streamed"])
def test_every_iteration_is_a_task_on_every_worker(dask_cluster, fashion_test_small_chunks,
                                                   persist):
    address = dask_cluster.workers(2)
    with (Client(address, timeout=30) as client,
          dask.config.set({**SMALL_TASKS, "kmeans_dask.persist": persist})):
        X = _rows(fashion_test_small_chunks)
        with get_task_stream(client) as ts:
            km = KMeans(10, init="k-means++", random_state=0, max_iter=6, tol=0).fit(X)
        lloyd = [t for t in ts.data if str(t["key"]).startswith("('kmeans-lloyd-")]
        # Every iteration and the final pass: one task per worker, named for its
        # iteration.  The chained loop adds the step that reads the final pass,
        # and at most a few submitted ahead, which do nothing.
        passes = km.n_iter_ + 1
        assert 2 * (passes + 1) <= len(lloyd) <= 2 * (passes + engine.STEPS_AHEAD)
        workers = {t["worker"] for t in lloyd}
        assert len(workers) == 2
        for it in range(1, passes + 2):
            mine = [t for t in lloyd if str(t["key"]).startswith(f"('kmeans-lloyd-{it}-")]
            assert len(mine) == 2 and {t["worker"] for t in mine} == workers, it
        # The labels come from the states the final pass left: one task a worker.
        labels = [t for t in ts.data if str(t["key"]).startswith("('kmeans-labels-")]
        assert len(labels) == 2 and {t["worker"] for t in labels} == workers


def test_two_workers_with_two_threads_equal_one_thread_each(dask_cluster,
                                                           fashion_test_small_chunks):
    # With two threads a worker starts the loop's next step while its last one
    # runs; the early step waits, off the worker's threads, for this worker's
    # own partial before it waits for the other's.
    results = []
    for args in (("--nthreads", "2"), ()):
        address = dask_cluster.workers(2, *args)
        with Client(address, timeout=30) as client, dask.config.set(SMALL_TASKS):
            assert sorted(client.nthreads().values()) == ([2, 2] if args else [1, 1])
            X = _rows(fashion_test_small_chunks)
            results.append(_result(KMeans(10, init="k-means++", random_state=0, max_iter=10,
                                          tol=0).fit(X)))
    _assert_same(results)


def test_minibatch_same_on_one_and_two_workers(dask_cluster, fashion_test_small_chunks):
    results = []
    for n_workers in (1, 2):
        address = dask_cluster.workers(n_workers)
        with Client(address, timeout=30) as client:
            assert len(client.scheduler_info()["workers"]) == n_workers
            X = store.open_data(fashion_test_small_chunks, "test").images
            km = MiniBatchKMeans(10, random_state=0, max_iter=30, batch_size=512).fit(X)
            results.append(_result(km))
    _assert_same(results)
