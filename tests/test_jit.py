"""The compiled loops of the bounded pass (kmeans_dask._jit), through the kernel that uses them."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import lloyd_step

from kmeans_dask import _jit
from kmeans_dask import _kernels as K

LOOPS = ("filter_rows", "open_groups", "rank_groups", "settle", "rank_rows")


@pytest.fixture
def calls(monkeypatch):
    """Count the calls the bounded kernel makes to each compiled loop (and the rows flagged)."""
    counts = dict.fromkeys(LOOPS, 0)
    counts["flagged"] = 0
    for name in LOOPS:
        loop = getattr(_jit, name)

        def counted(*args, _loop=loop, _name=name):
            counts[_name] += 1
            out = _loop(*args)
            if _name == "settle":
                counts["flagged"] += out
            return out

        monkeypatch.setattr(_jit, name, counted)
    return counts


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_warm_up_compiles_every_loop_the_pass_uses(dtype, float32_ranking):
    K.warm_up(dtype)
    loops = [getattr(_jit, name) for name in LOOPS]
    compiled = [len(loop.signatures) for loop in loops]
    assert all(n >= 1 for n in compiled)
    rng = np.random.default_rng(3)
    X = np.concatenate([rng.normal(loc, 3.0, (300, 12)) for loc in range(0, 200, 25)])
    X = np.clip(X, 0, 255).astype(dtype)
    scale = 1 / 255 if dtype == np.uint8 else 1.0
    centers = X[rng.choice(len(X), 40, replace=False)].astype(np.float64) * scale
    # 40 centres are ranked group by group, 10 by the tiled loop.
    for k in (40, 10):
        state, ck = K.ChunkState(X, scale=scale), centers[:k]
        for _ in range(6):
            ck = lloyd_step(K.bounded_lloyd_chunk(X, state, ck, scale=scale), ck)
    # Nothing new was compiled inside the passes.
    assert [len(loop.signatures) for loop in loops] == compiled


def _bounded_alongside_full_passes(X, k, seed, iterations=10):
    """Bounded passes on real rows, each checked bit for bit against a full pass."""
    scale = 1 / 255
    centers = X[np.random.default_rng(seed).choice(len(X), k, replace=False)] * scale
    state = K.ChunkState(X, scale=scale)
    for _ in range(iterations):
        got = K.bounded_lloyd_chunk(X, state, centers, scale=scale)
        want = K.lloyd_chunk(X, centers, scale=scale)
        np.testing.assert_array_equal(got["sums"], want["sums"])
        np.testing.assert_array_equal(got["counts"], want["counts"])
        assert got["inertia"] == want["inertia"]
        np.testing.assert_array_equal(state.labels, K.predict_chunk(X, centers, scale=scale))
        centers = lloyd_step(got, centers)
    return state, got


@pytest.mark.t10k
def test_group_by_group_ranking_is_used_and_equals_a_full_pass(fashion_rows, calls,
                                                               float32_ranking):
    X = fashion_rows[:5000].compute()
    state, got = _bounded_alongside_full_passes(X, 64, seed=1)
    # 64 centres make 4 groups; once the centres settle the rows are ranked
    # group by group, not against all 64.
    assert state.starts.size == 4
    assert calls["rank_groups"] >= 3 and calls["settle"] == calls["rank_groups"]
    assert got["pairs"] < 0.5 * len(X) * 64


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_ties_in_the_group_ranking_go_to_the_lower_centre(dtype, calls):
    # Rows halfway between centres 0 and 1 (first coordinate 1, the centres'
    # 0 and 2) are exactly as far from both, however the centres shift in
    # the other coordinates.  62 more centres, far away, fill three more
    # groups, so the tied rows need one group in four: the group ranking.
    rng = np.random.default_rng(7)
    ties = np.column_stack([np.ones(200), rng.normal(0, 1, (200, 3))])
    near0 = np.column_stack([rng.normal(-0.5, 0.2, 200), rng.normal(0, 1, (200, 3))])
    far = rng.normal(0, 1, (62, 4)) + np.repeat(np.eye(4)[1:] * 80, [21, 21, 20], axis=0)
    X = np.concatenate([ties, near0, far[:, None, :].repeat(5, axis=1).reshape(-1, 4)])
    X = X.astype(dtype)
    centers = np.concatenate([[[0.0, 0, 0, 0], [2.0, 0, 0, 0]], far])
    state = K.ChunkState(X)
    for i in range(8):
        shift = np.zeros(4)
        shift[1:] = 0.01 * i
        moved = centers + shift
        K.bounded_lloyd_chunk(X, state, moved)
        np.testing.assert_array_equal(state.labels, K.predict_chunk(X, moved))
        assert (state.labels[:200] == 0).all()
    assert state.starts.size == 4
    # The tied rows were handed back by the group ranking, every iteration.
    assert calls["settle"] >= 1 and calls["flagged"] >= 200 * calls["settle"]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 3, 10, 16])
def test_tiled_ranking_stays_within_the_rule_bound(dtype, k):
    rng = np.random.default_rng(k)
    X = rng.integers(0, 256, (1027, 784)).astype(dtype)  # not a whole number of tiles
    scale = 1 / 255 if dtype == np.uint8 else 1.0
    centers = X[rng.choice(len(X), k, replace=False)].astype(np.float64) * scale
    near = K._Nearest(centers, K.compute_dtype(dtype), scale, K._xmax(X, scale))
    rows = np.sort(rng.choice(len(X), 1001, replace=False))
    got = np.full((rows.size, k), np.nan, dtype=near.dtype)
    _jit.rank_rows(X, rows, near.neg2, near.csq, np.empty((4, 784), dtype=near.dtype), got)
    x = X[rows].astype(near.dtype)
    want = x @ near.neg2_t + near.csq
    exact = (X[rows].astype(np.float64) * scale) @ (-2.0 * centers.T) + (centers ** 2).sum(1)
    assert np.isfinite(got).all()
    # Both rankings stay within the error E the nearest-centre rule allows for.
    assert np.abs(got - exact).max() <= near.err
    assert np.abs(want - exact).max() <= near.err


@pytest.mark.t10k
def test_tiled_ranking_is_used_for_few_centres_and_equals_a_full_pass(fashion_rows, calls,
                                                                      float32_ranking):
    _bounded_alongside_full_passes(fashion_rows[:5000].compute(), 10, seed=2)
    assert calls["rank_rows"] >= 1
