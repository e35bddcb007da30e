"""Initial centres (kmeans_dask.init), on real Fashion-MNIST rows, without a cluster."""

from __future__ import annotations

import dask.array as da
import numpy as np

from kmeans_dask import init
from kmeans_dask._passes import ChunkedRows


def test_kmeans_parallel_weighs_each_candidate_by_the_rows_nearest_to_it(fashion_rows,
                                                                          monkeypatch):
    # The candidates' weights come from the nearest index kept round by round;
    # they must equal what ranking every row against all candidates at once gives.
    rows = ChunkedRows(fashion_rows[:12_000].rechunk((4_000, -1)), None, scale=1 / 255,
                       block_rows=256)
    seen = {}
    real = init.kmeans_plusplus

    def spy(candidates, k, sample_weight=None, random_state=None):
        seen["candidates"], seen["weights"] = candidates, sample_weight
        return real(candidates, k, sample_weight=sample_weight, random_state=random_state)

    monkeypatch.setattr(init, "kmeans_plusplus", spy)
    centers = init.init_kmeans_parallel(rows, 16, np.random.RandomState(0), rounds=4)
    assert centers.shape == (16, 784)
    candidates = seen["candidates"]
    assert len(candidates) > 4 * 16  # several rounds' worth were drawn
    labels = rows.predict(candidates)
    want = da.bincount(labels, minlength=len(candidates)).compute()
    np.testing.assert_array_equal(seen["weights"], want)
    assert seen["weights"].sum() == 12_000
