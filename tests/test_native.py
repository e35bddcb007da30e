"""The integer ranking of uint8 rows (kmeans_dask._native) against the float32 path."""

from __future__ import annotations

import dask
import numpy as np
import pytest
from conftest import lloyd_step

from kmeans_dask import _kernels as K
from kmeans_dask import _native

needs_int8 = pytest.mark.skipif(not _native.available(),
                               reason=f"no integer ranking here: {_native.why_not()}")


def _exact(X, rows, centers, scale):
    x = X[rows].astype(np.float64) * scale
    return (centers ** 2).sum(1)[None, :] - 2.0 * x @ centers.T, (x * x).sum(1)


@needs_int8
@pytest.mark.parametrize("k,d", [(1, 784), (10, 784), (17, 100), (64, 784), (256, 784), (5, 3)])
def test_ranked_values_stay_within_their_error_bound(k, d):
    rng = np.random.default_rng(k + d)
    X = rng.integers(0, 256, (1000, d), dtype=np.uint8)
    scale = 1 / 255
    # Centres anywhere, not only where means of stored rows fall: negative,
    # beyond 1, and all but zero.
    centers = rng.normal(0.4, 0.6, (k, d))
    centers[0] *= 1e-6
    prep = _native.Prepared(centers, scale, d)
    rows = np.sort(rng.choice(len(X), 777, replace=False))  # gathered, not a whole tile
    g = np.full((rows.size, k), np.nan, dtype=np.float32)
    pos, best, second = _native.rank(X, rows, prep, g=g)
    exact, xsq = _exact(X, rows, centers, scale)
    err = prep.row_error(xsq)
    assert np.isfinite(g).all()
    assert (np.abs(g - exact) <= err[:, None] + 1e-6 * np.abs(exact)).all()
    assert (np.abs(best - exact[np.arange(rows.size), pos]) <= err).all()
    srt = np.sort(exact, axis=1)
    assert (np.abs(best - srt[:, 0]) <= err).all()
    if k > 1:
        assert (np.abs(second - srt[:, 1]) <= err).all()
    else:
        assert np.isinf(second).all()


@needs_int8
def test_labels_equal_the_float32_paths_on_real_rows(fashion_rows):
    X = fashion_rows[:7000].compute()
    scale = 1 / 255
    rng = np.random.default_rng(0)
    for k in (10, 64, 300):
        centers = X[rng.choice(len(X), k, replace=False)] * scale
        # Two copies of a centre: every row nearest to it is an exact tie,
        # which must go to the lower index, as the float32 rule sends it.
        centers[k - 1] = centers[3]
        got = K.predict_chunk(X, centers, scale=scale)
        with dask.config.set({"kmeans_dask.native": False}):
            want = K.predict_chunk(X, centers, scale=scale)
        np.testing.assert_array_equal(got, want)
        assert not (got == k - 1).any() and (got == 3).any()
        # And they are the nearest centres by |x - c|^2 in float64 (on a sample:
        # the differences take rows x centres x pixels).
        some = rng.choice(len(X), 300, replace=False)
        diff = X[some, None, :].astype(np.float64) * scale - centers[None, :, :]
        np.testing.assert_array_equal(got[some], np.einsum("ijk,ijk->ij", diff, diff).argmin(1))


@needs_int8
def test_native_passes_equal_the_bounded_float32_passes_bit_for_bit(fashion_rows):
    X = fashion_rows[:6000].compute()
    scale = 1 / 255
    sq = K.chunk_stats(X, scale=scale)["sqnorm"]
    centers = X[np.random.default_rng(1).choice(len(X), 40, replace=False)] * scale
    native, bounded = K.ChunkState(X, scale=scale), K.ChunkState(X, scale=scale)
    native_pairs = 0
    for i in range(10):
        got = K.bounded_lloyd_chunk(X, native, centers, scale=scale, sqnorm=sq)
        with dask.config.set({"kmeans_dask.native": False}):
            want = K.bounded_lloyd_chunk(X, bounded, centers, scale=scale, sqnorm=sq)
        # Whole rows: every one on the first pass, those the bounds leave open later.
        assert got["pairs"] == got["computed"] * 40
        assert got["computed"] == len(X) if i == 0 else got["computed"] <= len(X)
        native_pairs += got["pairs"]
        for key in ("sums", "counts", "raw_sums"):
            np.testing.assert_array_equal(got[key], want[key])
        assert got["inertia"] == want["inertia"] and got["changed"] == want["changed"]
        np.testing.assert_array_equal(native.labels, bounded.labels)
        centers = lloyd_step(got, centers)
    assert want["pairs"] < len(X) * 40  # the float32 passes used their bounds
    assert native_pairs < 0.9 * 10 * len(X) * 40  # and so did the integer ones
    assert got["computed"] < 0.8 * len(X)


@needs_int8
def test_a_state_can_switch_between_the_two_rankings(fashion_rows):
    X = fashion_rows[:3000].compute()
    scale = 1 / 255
    centers = X[:20] * scale
    state = K.ChunkState(X, scale=scale)
    for i in range(6):
        with dask.config.set({"kmeans_dask.native": i % 2 == 0}):
            got = K.bounded_lloyd_chunk(X, state, centers, scale=scale)
        want = K.lloyd_chunk(X, centers, scale=scale)
        np.testing.assert_array_equal(got["sums"], want["sums"])
        np.testing.assert_array_equal(state.labels, K.predict_chunk(X, centers, scale=scale))
        centers = lloyd_step(got, centers)


def test_the_config_key_turns_it_off():
    with dask.config.set({"kmeans_dask.native": False}):
        assert not _native.available()
        assert "kmeans_dask.native" in _native.why_not()
    with dask.config.set({"kmeans_dask.native": "maybe"}):
        with pytest.raises(ValueError, match="kmeans_dask.native"):
            _native.available()


def test_float_rows_are_refused():
    prep = _native.Prepared(np.zeros((2, 4)), 1.0, 4)
    with pytest.raises(TypeError, match="uint8"):
        _native.rank(np.zeros((3, 4), dtype=np.float32), None, prep)


def test_without_a_compiler_the_float32_path_runs(monkeypatch, tmp_path):
    # A machine where the C source cannot be built: the reason is kept, and the
    # passes take the float32 path with the same labels.
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setattr(_native, "_cpu_kernels", lambda: ["avx512-vnni"])
    monkeypatch.setattr(_native, "_library_path", lambda: tmp_path / "_int8_rank-test.so")
    monkeypatch.setenv("CC", "false")
    assert not _native.available()
    assert "could not build _int8_rank.c: false exited with 1" in _native.why_not()
    assert not (tmp_path / "_int8_rank-test.so").exists()  # nothing half-written is kept
    assert list(tmp_path.iterdir()) == []
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (500, 20), dtype=np.uint8)
    centers = X[:7] / 255
    with dask.config.set({"kmeans_dask.native": False}):
        want = K.predict_chunk(X, centers, scale=1 / 255)
    np.testing.assert_array_equal(K.predict_chunk(X, centers, scale=1 / 255), want)


@needs_int8
def test_rows_too_wide_for_exact_int32_sums_take_the_float32_path():
    # 255 x 127 per column: past MAX_D columns the integer sums would wrap.
    d = _native.MAX_D + 1000
    X = np.full((2, d), 255, np.uint8)
    X[1] = 200
    centers = np.stack([np.full(d, 1.0), np.full(d, 0.5), np.full(d, 0.8)])
    assert K.predict_chunk(X, centers, scale=1 / 255).tolist() == [0, 2]


@needs_int8
def test_a_float32_pass_after_a_native_one_does_not_reuse_old_bounds(fashion_rows):
    X = fashion_rows[:3000].compute()
    scale = 1 / 255
    rng = np.random.default_rng(4)
    centers = X[rng.choice(len(X), 40, replace=False)] * scale
    state = K.ChunkState(X, scale=scale)
    for native in (False, True, False, False, True, False):
        with dask.config.set({"kmeans_dask.native": native}):
            got = K.bounded_lloyd_chunk(X, state, centers, scale=scale)
        want = K.lloyd_chunk(X, centers, scale=scale)
        np.testing.assert_array_equal(got["counts"], want["counts"])
        np.testing.assert_array_equal(got["sums"], want["sums"])
        # Centres moved well away each time, as a stale bound would not survive.
        centers = lloyd_step(got, centers) + rng.normal(0, 0.02, centers.shape)


@needs_int8
# The float32 path warns as |c|^2 of such centres overflows its float32 copy.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_extreme_centres_and_odd_views_give_the_float32_labels():
    rng = np.random.default_rng(5)
    X = rng.integers(0, 256, (64, 30), dtype=np.uint8)
    for centers in (np.stack([np.full(30, 3e19), np.full(30, 2e19)]),
                    np.stack([np.full(30, -1e19), np.full(30, 2e19)]),
                    rng.normal(0, 1, (5, 30))):
        for rows in (X, X[::-1], X[:, ::1][::2], np.broadcast_to(X[0], (7, 30)), X[0][None]):
            got = K.predict_chunk(rows, centers, scale=1 / 255)
            with dask.config.set({"kmeans_dask.native": False}):
                want = K.predict_chunk(rows, centers, scale=1 / 255)
            np.testing.assert_array_equal(got, want)


def test_a_library_others_can_write_is_not_loaded(monkeypatch, tmp_path):
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setattr(_native, "_cpu_kernels", lambda: ["avx512-vnni"])
    shared = tmp_path / "shared"
    shared.mkdir()
    planted = shared / "_int8_rank-test.so"
    planted.write_bytes(b"not a library")
    shared.chmod(0o777)
    monkeypatch.setattr(_native, "_library_path", lambda: planted)
    assert not _native.available()
    assert "other users" in _native.why_not()


@needs_int8
def test_the_built_library_is_readable_by_others(monkeypatch, tmp_path):
    monkeypatch.setattr(_native, "_state", {})
    target = tmp_path / "cache" / "_int8_rank-test.so"
    monkeypatch.setattr(_native, "_library_path", lambda: target)
    assert _native.available(), _native.why_not()
    assert target.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in target.parent.iterdir()] == [target.name]


@needs_int8
def test_rows_shared_out_between_threads_rank_alike(fashion_rows):
    # A mini-batch step ranks its batch on several threads: each row's values,
    # and so the labels, must not depend on how the rows were shared out.
    X = fashion_rows[:3000].compute()
    rng = np.random.default_rng(6)
    prep = _native.Prepared(X[rng.choice(len(X), 37, replace=False)] / 255, 1 / 255, X.shape[1])
    rows = np.sort(rng.choice(len(X), 2001, replace=False))
    for idx in (None, rows):
        n = len(X) if idx is None else idx.size
        one, many = (np.empty((n, 37), np.float32) for _ in range(2))
        want = _native.rank(X, idx, prep, g=one)
        got = _native.rank(X, idx, prep, g=many, threads=3)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(many, one)
    with dask.config.set({"kmeans_dask.minibatch-threads": 3}):
        from kmeans_dask import config
        assert config.minibatch_threads() == 3
    with dask.config.set({"kmeans_dask.minibatch-threads": -1}), \
            pytest.raises(ValueError, match="minibatch-threads"):
        config.minibatch_threads()


@needs_int8
@pytest.mark.parametrize("k,d", [(17, 100), (37, 784), (64, 30), (256, 784), (300, 129)])
def test_the_one_level_ranking_keeps_the_two_level_answer_and_valid_bounds(k, d):
    """kd_vnni_rank1: ranked by the first level, refined by the second only where
    the first cannot rule a centre out.  Its best column and value are the
    two-level kernel's wherever that one is sure (outside 2 E of a tie), its
    second value is never above the two-level one, and ``second - E`` still
    bounds every other centre's exact value from below."""
    rng = np.random.default_rng(k * d)
    # Rows near the centres, as in a fit, and random ones far from all of them.
    centers = rng.uniform(0, 1, (k, d))
    near = np.clip(centers[rng.integers(0, k, 1500)] * 255 + rng.normal(0, 40, (1500, d)), 0, 255)
    X = np.vstack([near.astype(np.uint8), rng.integers(0, 256, (500, d), dtype=np.uint8)])
    scale = 1 / 255
    prep = _native.Prepared(centers, scale, d)
    if prep.lrow is None:
        pytest.skip(f"the {_native.kernel()} kernel has no one-level ranking")
    rows = np.sort(rng.choice(len(X), 1777, replace=False))
    exact, xsq = _exact(X, rows, centers, scale)
    err, err1 = prep.row_error(xsq), prep.first_level_error(xsq)
    assert (err1 > err).all()
    pos2, best2, second2 = _native.rank(X, rows, prep)
    pos1, best1, second1 = _native.rank(X, rows, prep, bounds=(err1, err))
    sure = second2 - best2 > 2 * err
    assert sure.mean() > 0.5  # the comparison means something
    np.testing.assert_array_equal(pos1[sure], pos2[sure])
    np.testing.assert_array_equal(best1[sure], best2[sure])
    assert (second1 <= second2).all()
    at = np.arange(rows.size)
    assert (np.abs(best1 - exact[at, pos1]) <= err).all()
    others = exact.copy()
    others[at, pos1] = np.inf
    assert (others.min(1) >= second1 - err).all()
    # Where the two differ, the row is within 2 E of a tie for the caller to settle.
    differ = pos1 != pos2
    assert (second1[differ] - best1[differ] <= 2 * err[differ]).all()
    # Shared out between threads, the same values.
    got = _native.rank(X, rows, prep, bounds=(err1, err), threads=2)
    for a, b in zip(got, (pos1, best1, second1)):
        np.testing.assert_array_equal(a, b)
