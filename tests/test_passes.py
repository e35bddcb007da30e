"""The reduction tree: the same additions in the same order, as tasks or on partials at hand."""

from __future__ import annotations

import dask
import numpy as np
import pytest
from dask import delayed

from kmeans_dask import _kernels
from kmeans_dask._passes import combine_in_order, reduce_on_client, tree_reduce


@pytest.mark.parametrize("n", [1, 3, 8, 9, 20, 70])
def test_partials_at_hand_are_added_like_the_task_tree(n):
    rng = np.random.default_rng(n)
    # Values of very different sizes, so a different order of additions
    # would round differently.
    parts = [{"sums": rng.random((3, 4)) * 10.0 ** rng.integers(-8, 8), "inertia": float(rng.random())}
             for _ in range(n)]
    tasks = [delayed(p, traverse=False) for p in parts]
    want = reduce_on_client(tasks, _kernels.add, 4, "t")
    got = combine_in_order(parts, _kernels.add, 4)
    np.testing.assert_array_equal(got["sums"], want["sums"])
    assert got["inertia"] == want["inertia"]
    assert len(tree_reduce(tasks, _kernels.add, 4, "t")) <= 4


def test_split_every_below_two_is_refused():
    with pytest.raises(ValueError, match="split_every must be >= 2, got 1"):
        combine_in_order([{"a": 1.0}] * 3, _kernels.add, 1)
    assert dask.compute(*tree_reduce([delayed(1.0)] * 2, max, 2, "x")) == (1.0, 1.0)
