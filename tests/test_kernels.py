"""The NumPy kernels on one block, checked against plain brute force (no Dask)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import lloyd_step

from kmeans_dask import _kernels as K


def brute(X, centers, weights, scale):
    Xf = X.astype(np.float64) * scale
    c = centers.astype(K.compute_dtype(X.dtype)).astype(np.float64)
    d2 = ((Xf[:, None, :] - c[None]) ** 2).sum(-1)
    labels = d2.argmin(1)
    w = np.ones(len(X)) if weights is None else weights
    sums = np.zeros_like(c)
    np.add.at(sums, labels, Xf * w[:, None])
    counts = np.bincount(labels, weights=w, minlength=len(c))
    return labels, sums, counts, float((d2.min(1) * w).sum())


@pytest.fixture
def rng():
    return np.random.default_rng(42)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("block_rows", [1, 7, 256, 10_000])
def test_lloyd_chunk_matches_brute_force(rng, dtype, weighted, block_rows):
    X = rng.integers(0, 256, (300, 20)).astype(dtype)
    scale = 1 / 255 if dtype == np.uint8 else 1.0
    centers = X[rng.choice(300, 6, replace=False)].astype(np.float64) * scale + 0.01
    w = rng.random(300) * 3 if weighted else None
    labels, sums, counts, inertia = brute(X, centers, w, scale)
    sq = K.chunk_stats(X, w, scale=scale)["sqnorm"]
    out = K.lloyd_chunk(X, centers, w, scale=scale, sqnorm=sq, block_rows=block_rows)
    np.testing.assert_allclose(out["sums"], sums, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(out["counts"], counts, rtol=1e-12)
    assert out["inertia"] == pytest.approx(inertia, rel=1e-9)
    np.testing.assert_array_equal(K.predict_chunk(X, centers, scale=scale, block_rows=block_rows), labels)


def test_unweighted_uint8_sums_are_exact(rng):
    X = rng.integers(0, 256, (5000, 30), dtype=np.uint8)
    centers = rng.random((4, 30))
    out = K.lloyd_chunk(X, centers, scale=1.0)
    labels = K.predict_chunk(X, centers)
    for j in range(4):
        assert np.array_equal(out["sums"][j], X[labels == j].sum(axis=0).astype(np.float64))


def test_inertia_on_a_hand_computed_case():
    X = np.array([[0, 0], [0, 2], [10, 10], [10, 12]], dtype=np.float64)
    centers = np.array([[0.0, 1.0], [10.0, 11.0]])
    sq = K.chunk_stats(X)["sqnorm"]
    assert sq == 0 + 4 + 200 + 244
    out = K.lloyd_chunk(X, centers, sqnorm=sq)
    assert out["inertia"] == 4.0
    assert out["counts"].tolist() == [2.0, 2.0]


def test_empty_and_single_row_chunks():
    centers = np.eye(3)
    out = K.lloyd_chunk(np.empty((0, 3), np.uint8), centers)
    assert out["sums"].shape == (3, 3) and out["counts"].sum() == 0 and out["inertia"] == 0
    assert K.predict_chunk(np.empty((0, 3)), centers).shape == (0,)
    one = K.lloyd_chunk(np.array([[0, 0, 1.0]]), centers, sqnorm=1.0)
    assert one["counts"].tolist() == [0, 0, 1] and one["inertia"] == 0
    assert K.chunk_stats(np.empty((0, 3)))["n"] == 0


def test_chunk_stats(rng):
    X = rng.integers(0, 256, (50, 8), dtype=np.uint8)
    w = rng.random(50)
    st = K.chunk_stats(X, w, scale=0.5, block_rows=7)
    Xf = X * 0.5
    np.testing.assert_allclose(st["sum"], Xf.sum(0))
    np.testing.assert_allclose(st["sumsq"], (Xf ** 2).sum(0))
    assert st["sqnorm"] == pytest.approx(float(((Xf ** 2).sum(1) * w).sum()))
    assert st["w"] == pytest.approx(w.sum()) and st["bad"] == 0 and st["negative"] == 0


def test_chunk_stats_counts_bad_values_and_negative_weights():
    X = np.array([[1.0, np.nan], [np.inf, 2.0], [0.0, 0.0]])
    st = K.chunk_stats(X, np.array([1.0, -1.0, np.nan]))
    assert st["bad"] == 2 and st["negative"] == 2


def test_transform_chunk(rng):
    X = rng.random((40, 5))
    centers = rng.random((3, 5))
    d = np.sqrt(((X[:, None] - centers[None]) ** 2).sum(-1))
    np.testing.assert_allclose(K.transform_chunk(X, centers, block_rows=9), d, rtol=1e-10)


def test_nearest_chunk_folds_rounds_of_centres(rng):
    X = rng.integers(0, 256, (40, 5), dtype=np.uint8)
    centers = rng.random((7, 5))
    Xf = X / 255
    c32 = centers.astype(np.float32).astype(np.float64)
    d = ((Xf[:, None] - c32[None]) ** 2).sum(-1)
    # All seven at once, and in rounds of 3 + 1 + 3 numbered by offset: the same answer.
    whole = K.nearest_chunk(X, centers, scale=1 / 255, block_rows=16)
    near = K.nearest_chunk(X, centers[:3], scale=1 / 255)
    near = K.nearest_chunk(X, centers[3:4], near, offset=3, scale=1 / 255)
    near = K.nearest_chunk(X, centers[4:], near, offset=4, scale=1 / 255, block_rows=7)
    for got in (whole, near):
        np.testing.assert_allclose(got[:, 0], d.min(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got[:, 1], d.argmin(1))
    # A tie keeps the earlier centre.
    same = K.nearest_chunk(X, centers[:1], K.nearest_chunk(X, centers[:1]), offset=5)
    assert (same[:, 1] == 0).all()
    assert K.nearest_chunk(X[:0], centers).shape == (0, 2)


def test_farthest_rows_and_merge_break_ties_by_index():
    X = np.array([[0.0], [5.0], [-5.0], [1.0]])
    centers = np.array([[0.0]])
    a = K.farthest_chunk(X[:2], centers, 2, offset=0)
    b = K.farthest_chunk(X[2:], centers, 2, offset=2)
    merged = K.merge_farthest(a, b, n=2)
    assert merged["index"].tolist() == [1, 2]  # equal distances 25: lower index first
    assert merged["dist"].tolist() == [25.0, 25.0]
    np.testing.assert_array_equal(merged["rows"], [[5.0], [-5.0]])
    zero_w = K.farthest_chunk(X, centers, 1, np.array([1.0, 0.0, 1.0, 1.0]))
    assert zero_w["index"].tolist() == [2]  # a weightless row cannot seed a cluster


def test_sample_chunk_is_seeded_and_respects_probability(rng):
    X = rng.random((1000, 3))
    d = rng.random(1000)
    a = K.sample_chunk(X, d, None, factor=50, total=d.sum(), seed=(1, 2, 3))
    b = K.sample_chunk(X, d, None, factor=50, total=d.sum(), seed=(1, 2, 3))
    np.testing.assert_array_equal(a, b)
    assert 20 < len(a) < 90
    everything = K.sample_chunk(X, d, None, factor=1e9, total=d.sum(), seed=(0,))
    assert len(everything) == 1000
    assert len(K.sample_chunk(X, np.zeros(1000), None, factor=5, total=0.0, seed=(0,))) == 0


def test_add_combines_in_order():
    a = {"sums": np.ones((2, 2)), "counts": np.array([1.0, 2.0]), "inertia": 1.5}
    b = {"sums": np.ones((2, 2)), "counts": np.array([3.0, 0.0]), "inertia": 2.0}
    out = K.add(a, b, a)
    assert out["counts"].tolist() == [5.0, 4.0] and out["inertia"] == 5.0
    assert a["sums"][0, 0] == 1.0  # inputs untouched


def test_chunk_with_wrong_weights_shape():
    with pytest.raises(ValueError, match=r"weights of shape \(2,\) do not match 3 rows"):
        K.lloyd_chunk(np.zeros((3, 2)), np.zeros((1, 2)), np.ones(2))


# ---------------------------------------------------------------- the nearest-centre rule


def exact_labels(X, centers, scale):
    Xf = X.astype(np.float64) * scale
    d2 = ((Xf[:, None, :] - np.asarray(centers, np.float64)[None]) ** 2).sum(-1)
    return d2.argmin(1), np.sort(d2, axis=1)


def test_near_ties_are_settled_by_exact_distances_whatever_the_block(rng):
    # Rows halfway between two centres, nudged by less than float32 can rank:
    # the label must be the exact nearest, the same in any block layout.
    d = 64
    centers = rng.random((2, d))
    mid = (centers[0] + centers[1]) / 2
    axis = (centers[1] - centers[0]) / np.linalg.norm(centers[1] - centers[0])
    eps = np.array([-3e-7, -1e-9, 1e-9, 3e-7, 0.0] * 20)
    X = mid + eps[:, None] * axis
    want, _ = exact_labels(X, centers, 1.0)
    X32 = X.astype(np.float32)
    want32, _ = exact_labels(X32, centers, 1.0)
    for block_rows in (1, 3, 64, 256):
        got = K.predict_chunk(X32, centers, block_rows=block_rows)
        np.testing.assert_array_equal(got, want32)
    # Float64 rows: exact ties (eps == 0) are settled at the last bit, which
    # two float64 formulas may round differently; the rest must be exact,
    # and all must agree between block layouts.
    got = [K.predict_chunk(X, centers, block_rows=b) for b in (1, 5, 100)]
    np.testing.assert_array_equal(got[0][eps != 0], want[eps != 0])
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_array_equal(got[0], got[2])


@pytest.mark.t10k
def test_labels_are_exact_nearest_on_real_images(fashion_rows):
    X = fashion_rows[:3000].compute()
    centers = X[::300][:10] / 255.0 + 0.001
    want, sorted_d2 = exact_labels(X, centers, 1 / 255)
    got = K.predict_chunk(X, centers, scale=1 / 255)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_fold_batch_labels_distances_and_sums(rng, dtype):
    """A mini-batch step's pass: exact nearest centre and distance, weighted raw sums."""
    X = rng.integers(0, 256, (97, 13)).astype(dtype)
    C = rng.random((5, 13))
    w = rng.integers(1, 4, 97).astype(np.float64)
    labels, dist, sums, wsum = K.fold_batch(X, w, C, scale=1 / 255)
    want, sorted_d2 = exact_labels(X, C, 1 / 255)
    np.testing.assert_array_equal(labels, want)
    np.testing.assert_allclose(dist, sorted_d2[:, 0], rtol=1e-12, atol=1e-12)
    for j in range(5):
        np.testing.assert_array_equal(sums[j], (X[labels == j] * w[labels == j, None]).sum(0))
        assert wsum[j] == w[labels == j].sum()


@pytest.mark.t10k
@pytest.mark.parametrize("k", [10, 256])
def test_fold_batch_is_the_same_on_the_integer_tiles_and_in_float32(fashion_rows, k):
    """A step's labels and sums do not depend on which ranking runs: the integer
    tiles where the CPU has them, or the float32 GEMM (``kmeans_dask.native``)."""
    import dask

    X = fashion_rows[:1024].compute()
    C = X[np.random.default_rng(k).choice(1024, k, replace=False)] / 255.0
    C[1::2] = C[::2][: len(C[1::2])] + 1e-7  # pairs of centres in near ties
    w = np.ones(len(X))
    got = []
    for native in (True, False):
        with dask.config.set({"kmeans_dask.native": native}):
            got.append([a.copy() for a in K.fold_batch(X, w, C, scale=1 / 255,
                                                       work=K.Workspace())])
    (l1, d1, s1, w1), (l2, d2, s2, w2) = got
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_allclose(d1, d2, rtol=1e-12)
    want = np.concatenate([exact_labels(X[i:i + 64], C, 1 / 255)[0] for i in range(0, 1024, 64)])
    np.testing.assert_array_equal(l1, want)


# ---------------------------------------------------------------- bounded Lloyd


@pytest.mark.parametrize("k", [10, 40])
def test_bounded_pass_equals_the_plain_pass_bit_for_bit(fashion_rows, k, float32_ranking):
    X = fashion_rows[:6000].compute()
    scale = 1 / 255
    sq = K.chunk_stats(X, scale=scale)["sqnorm"]
    centers = X[np.random.default_rng(0).choice(len(X), k, replace=False)] * scale
    state = K.ChunkState(X, scale=scale)
    pairs = []
    for _ in range(12):
        got = K.bounded_lloyd_chunk(X, state, centers, scale=scale, sqnorm=sq)
        want = K.lloyd_chunk(X, centers, scale=scale, sqnorm=sq)
        np.testing.assert_array_equal(got["sums"], want["sums"])
        np.testing.assert_array_equal(got["counts"], want["counts"])
        assert got["inertia"] == want["inertia"]
        np.testing.assert_array_equal(state.labels, K.predict_chunk(X, centers, scale=scale))
        pairs.append(got["pairs"])
        centers = lloyd_step(got, centers)
    assert pairs[0] == len(X) * k
    # The bounds must actually spare work once the centres settle.
    assert pairs[-1] < 0.5 * len(X) * k, pairs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_bounded_pass_on_float_and_weighted_rows(rng, dtype, weighted):
    X = np.concatenate([rng.normal(loc, 1.0, (400, 8)) for loc in (0, 4, 8)]).astype(dtype)
    w = rng.random(len(X)) * 2 if weighted else None
    sq = K.chunk_stats(X, w)["sqnorm"]
    centers = X[[0, 1, 2, 3, 4]].astype(np.float64)
    state = K.ChunkState(X, w)
    for i in range(8):
        got = K.bounded_lloyd_chunk(X, state, centers, w, sqnorm=sq)
        want = K.lloyd_chunk(X, centers, w, sqnorm=sq)
        np.testing.assert_array_equal(got["sums"], want["sums"])
        np.testing.assert_array_equal(got["counts"], want["counts"])
        assert got["inertia"] == want["inertia"]
        centers = lloyd_step(got, centers)


@pytest.mark.t10k
def test_a_fresh_state_gives_the_same_answer_as_a_kept_one(fashion_rows, float32_ranking):
    X = fashion_rows[:4000].compute()
    scale = 1 / 255
    centers = X[:20] * scale
    kept = K.ChunkState(X, scale=scale)
    for _ in range(5):
        part = K.bounded_lloyd_chunk(X, kept, centers, scale=scale)
        centers = lloyd_step(part, centers)
    again = K.bounded_lloyd_chunk(X, kept, centers, scale=scale)
    fresh = K.bounded_lloyd_chunk(X, K.ChunkState(X, scale=scale), centers, scale=scale)
    assert again["pairs"] < fresh["pairs"] == len(X) * len(centers)
    np.testing.assert_array_equal(again["sums"], fresh["sums"])
    np.testing.assert_array_equal(again["counts"], fresh["counts"])
    assert again["inertia"] == fresh["inertia"]


def test_group_centers_partitions_every_centre(rng):
    c = rng.random((50, 6))
    order, starts, group_of = K.group_centers(c, 5)
    assert sorted(order.tolist()) == list(range(50))
    assert starts[0] == 0 and len(starts) == len(set(group_of.tolist())) <= 5
    # Centres are listed group by group.
    assert (np.diff(group_of[order]) >= 0).all()
    one = K.group_centers(c, 1)
    assert one[1].tolist() == [0] and (one[2] == 0).all()


def test_workspace_reuses_and_grows_its_buffers():
    work = K.Workspace()
    a = work.take("x", (4, 3), np.float32)
    assert a.shape == (4, 3) and a.dtype == np.float32
    b = work.take("x", 6, np.float32)
    assert np.shares_memory(a, b)  # smaller: the same buffer
    c = work.take("x", (10, 3), np.float32)
    assert c.shape == (10, 3) and not np.shares_memory(a, c)  # grown
    assert not np.shares_memory(c, work.take("x", 5, np.float64))  # dtypes apart
    assert not np.shares_memory(c, work.take("y", 5, np.float32))  # names apart


def test_workspace_memo_follows_the_objects_by_identity():
    work = K.Workspace()
    made = []

    def make():
        made.append(1)
        return len(made)

    c = np.zeros((3, 2))
    assert work.memo("m", (c,), 1, make) == 1
    assert work.memo("m", (c,), 1, make) == 1  # same object and key: kept
    assert work.memo("m", (c.copy(),), 1, make) == 2  # equal but another object
    assert work.memo("m", (c,), 2, make) == 3  # another key


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_one_workspace_over_many_chunks_and_passes_changes_nothing(rng, dtype):
    # A thread's workspace is shared by every chunk it passes: buffers and
    # prepared centres carried from one chunk or pass to the next must not
    # change a result, bit for bit.
    scale = 1 / 255 if dtype == np.uint8 else 1.0
    chunks = [rng.integers(0, 256, (m, 12)).astype(dtype) for m in (500, 130, 777)]
    centers = chunks[0][:40].astype(np.float64) * scale  # 40 centres: 2 groups
    shared = K.Workspace()
    kept = [K.ChunkState(X, scale=scale) for X in chunks]
    alone = [K.ChunkState(X, scale=scale) for X in chunks]
    for _ in range(6):
        c = np.array(centers)  # one object per pass, shared by its chunks
        got = [K.bounded_lloyd_chunk(X, st, c, scale=scale, keep_centers=True, work=shared)
               for X, st in zip(chunks, kept)]
        want = [K.bounded_lloyd_chunk(X, st, centers, scale=scale)
                for X, st in zip(chunks, alone)]
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g["sums"], w["sums"])
            np.testing.assert_array_equal(g["counts"], w["counts"])
            assert g["pairs"] == w["pairs"] and g["changed"] == w["changed"]
        for a, b in zip(kept, alone):
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_array_equal(a.upper, b.upper)
            np.testing.assert_array_equal(a.lower, b.lower)
        total = K.add(*want)
        centers = lloyd_step(total, centers)


def test_one_blas_thread_contexts_of_several_threads_restore_the_original(monkeypatch):
    """Overlapping contexts (the workers of an in-process cluster): the limit is set
    once, when the first opens, and the original restored once, when the last
    closes, whichever thread that is.  The controller records what it is asked
    (OpenBLAS itself honours limits from other threads only in some states)."""
    import threading

    calls = []

    class Limiter:
        def restore_original_limits(self):
            calls.append("restore")

    class Controller:
        def limit(self, *, limits, user_api):
            calls.append(("limit", limits, user_api))
            return Limiter()

    monkeypatch.setattr(K, "_blas", Controller)
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    during = []

    def first():
        with K.one_blas_thread():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with K.one_blas_thread():
            second_in.set()
            first_out.wait(10)
            during.append(list(calls))  # the first has left; this one is still open

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert during == [[("limit", 1, "blas")]]
    assert calls == [("limit", 1, "blas"), "restore"]
    with K.one_blas_thread():  # and again from the start
        pass
    assert calls[2:] == [("limit", 1, "blas"), "restore"]


_FRESH_PROCESS_BLAS = """
import json, numpy as np
from threadpoolctl import threadpool_info
from kmeans_dask import _kernels as K
rng = np.random.default_rng(0)
X = rng.integers(0, 256, (3000, 64), dtype=np.uint8)
with K.one_blas_thread():
    # The first pass in this process: its group-by-group GEMMs load SciPy's BLAS.
    st, work = K.ChunkState(X), K.Workspace()
    for c in (X[:64], X[64:128], X[64:128] + 1.0):
        K.bounded_lloyd_chunk(X, st, c.astype(np.float64), work=work)
    inside = [(i["filepath"], i["num_threads"]) for i in threadpool_info()
              if i["user_api"] == "blas"]
print(json.dumps(inside))
"""


def test_one_blas_thread_limits_the_blas_the_compiled_loops_load():
    """In a fresh process (nothing loaded yet, no thread variables set, as a
    ``dask worker --no-nanny`` starts), every BLAS library is held to one
    thread inside the context, SciPy's too, which the compiled loops' GEMMs
    load only when they first run."""
    import json
    import os
    import subprocess
    import sys

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: BLAS runs on one thread anyway, nothing to limit")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_BLAS], env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    inside = json.loads(out.strip().splitlines()[-1])
    # NumPy's OpenBLAS is also named libscipy_openblas*: tell them by their folder.
    assert any("scipy.libs" in path for path, _ in inside), inside
    assert all(n == 1 for _, n in inside), inside
