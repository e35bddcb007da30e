"""The worker-resident actor's passes, without a cluster (the cluster tests drive it for real)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import lloyd_step

from kmeans_dask import _kernels, _resident


@pytest.mark.t10k
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_actor_passes_equal_the_plain_kernel_in_any_number_of_threads(fashion_rows, monkeypatch,
                                                                      threads):
    monkeypatch.setattr(_resident, "_worker_threads", lambda: threads)
    X = fashion_rows[:9000].compute()
    chunks = [X[:4000], X[4000:7000], X[7000:]]
    scale = 1 / 255
    sq = [_kernels.chunk_stats(c, scale=scale)["sqnorm"] for c in chunks]
    actor = _resident.ChunkActor([4, 5, 6], *chunks, scale=scale, sqnorms=sq)
    assert (actor._pool is None) == (threads == 1)
    centers = X[:12] * scale
    for _ in range(6):
        got = actor.lloyd(centers)
        assert [i for i, _ in got] == [4, 5, 6]
        for (_, part), chunk, s in zip(got, chunks, sq):
            want = _kernels.lloyd_chunk(chunk, centers, scale=scale, sqnorm=s)
            np.testing.assert_array_equal(part["sums"], want["sums"])
            assert part["inertia"] == want["inertia"]
        centers = lloyd_step(_kernels.add(*[p for _, p in got]), centers)


def test_auto_keeps_task_graphs_for_many_chunks(caplog):
    import dask.array as da
    from distributed import Client, LocalCluster

    from kmeans_dask import KMeans

    X = da.from_array(np.random.default_rng(0).random((400, 3)), chunks=10)  # 40 chunks
    # In-process (inproc:// transport): no sockets at all.
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster):
        with caplog.at_level("INFO", logger="kmeans_dask.kmeans"):
            km = KMeans(3, random_state=0, max_iter=3, task_rows=10).fit(X)
    assert any("40 row chunks: Lloyd passes as task graphs" in r.getMessage()
               for r in caplog.records)
    assert km.n_iter_ >= 1


def test_rebuild_waits_for_the_holders_of_recomputed_chunks(monkeypatch, caplog):
    # Just after a worker dies, the scheduler can list no holder for chunks whose
    # futures still look finished (it is recomputing them).  The rebuild must wait
    # for the holders rather than place the actors without them.
    import dask.array as da
    from distributed import Client, LocalCluster, wait

    from kmeans_dask._passes import ChunkedRows

    data = np.random.default_rng(1).random((400, 3))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        X = da.from_array(data, chunks=100).persist()
        wait(X)
        rows = ChunkedRows(X, None, scale=1.0, block_rows=64)
        rows.stats()
        real_who_has = client.who_has
        calls = []

        def who_has_after_two_empty_answers(futures):
            calls.append(len(futures))
            return {} if len(calls) <= 2 else real_who_has(futures)

        monkeypatch.setattr(client, "who_has", who_has_after_two_empty_answers)
        with caplog.at_level("INFO", logger="kmeans_dask._resident"):
            driver = _resident.ResidentRows(client, rows)
        assert len(calls) == 3
        assert [r.getMessage() for r in caplog.records if r.name == "kmeans_dask._resident"] == [
            "waiting for 4 row chunk(s) lost with a worker to be recomputed"]
        chunk_holders = real_who_has(driver.blocks)
        actor_holders = real_who_has(driver._futures)
        # One actor on each worker that holds chunks, none elsewhere.
        workers = sorted({w for f in driver.blocks for w in chunk_holders[f.key]})
        assert sorted(w for f in driver._futures for w in actor_holders[f.key]) == workers
        centers = data[:4]
        want = rows.lloyd(centers)
        got = driver.lloyd(centers)
        np.testing.assert_array_equal(got["sums"], want["sums"])
        assert got["inertia"] == want["inertia"]

        # When the holders do not come back in time, the chunks are placed anyway.
        monkeypatch.setattr(_resident, "HOLDER_WAIT", 0.0)
        calls.clear()
        driver._build()
        assert len(calls) == 1 and len(driver.actors) == 1
        got = driver.lloyd(centers)
        np.testing.assert_array_equal(got["sums"], want["sums"])
        driver.close()
