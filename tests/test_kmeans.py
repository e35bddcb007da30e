"""The estimator on Dask's threaded scheduler: correctness against scikit-learn, errors."""

from __future__ import annotations

import logging

import dask.array as da
import numpy as np
import pytest
from sklearn.cluster import KMeans as SKKMeans
from sklearn.exceptions import NotFittedError
from sklearn.metrics import v_measure_score

from kmeans_dask import KMeans


def blobs(seed=0):
    rng = np.random.default_rng(seed)
    X = np.vstack([rng.normal((1, 1), 1, (100, 2)), rng.normal((5, 5), 1, (100, 2))])
    return X, np.repeat([0, 1], 100)


@pytest.mark.parametrize("init", ["random", "k-means++", "k-means||"])
def test_two_blobs_are_recovered(init):
    X, truth = blobs()
    km = KMeans(2, init=init, random_state=0)
    km.fit(da.from_array(X, chunks=30))
    centers = km.cluster_centers_[np.argsort(km.cluster_centers_[:, 0])]
    np.testing.assert_allclose(centers, [[1, 1], [5, 5]], atol=0.35)
    assert v_measure_score(truth, km.labels_.compute()) > 0.8
    assert km.labels_.chunks == ((30,) * 6 + (20,),)


@pytest.mark.t10k
def test_same_init_agrees_with_scikit_learn_on_fashion_mnist(fashion_rows, fashion_float):
    rng = np.random.default_rng(1)
    init = fashion_float[rng.choice(len(fashion_float), 10, replace=False)]
    ours = KMeans(10, init=init, max_iter=20, tol=0).fit(fashion_rows)
    ref = SKKMeans(10, init=init, n_init=1, max_iter=20, tol=0, algorithm="lloyd").fit(fashion_float)
    agree = (ours.labels_.compute() == ref.labels_).mean()
    assert agree >= 0.999, agree
    assert ours.inertia_ == pytest.approx(ref.inertia_, rel=1e-5)
    assert ours.n_iter_ == 20 and len(ours.history_) == 20
    np.testing.assert_allclose(ours.cluster_centers_, ref.cluster_centers_, atol=1e-3)
    assert ours.cluster_centers_.dtype == np.float32


@pytest.fixture(scope="module")
def sklearn_best_k10(fashion_float):
    """scikit-learn's best inertia of 3 k-means++ inits, run to convergence."""
    return SKKMeans(10, n_init=3, random_state=0).fit(fashion_float).inertia_


@pytest.mark.parametrize("init", ["random", "k-means++", "k-means||"])
def test_every_init_converges_close_to_scikit_learn(fashion_rows, sklearn_best_k10, init):
    km = KMeans(10, init=init, n_init=3, random_state=0).fit(fashion_rows)
    assert km.inertia_ <= 1.02 * sklearn_best_k10, (km.inertia_, sklearn_best_k10)
    assert km.n_iter_ < 300
    assert len(np.unique(km.cluster_centers_, axis=0)) == 10


def test_minibatch_on_fashion_mnist_is_close_to_lloyd(fashion_rows, sklearn_best_k10):
    from kmeans_dask import MiniBatchKMeans

    km = MiniBatchKMeans(10, batch_size=2048, random_state=0).fit(fashion_rows)
    assert km.inertia_ <= 1.05 * sklearn_best_k10
    assert km.n_steps_ == len(km.history_) and km.n_steps_ < 100 * 70000 // 2048
    again = MiniBatchKMeans(10, batch_size=2048, random_state=0).fit(fashion_rows)
    np.testing.assert_array_equal(km.cluster_centers_, again.cluster_centers_)


def test_same_seed_same_result():
    X, _ = blobs(3)
    a = KMeans(3, random_state=7).fit(da.from_array(X, chunks=37))
    b = KMeans(3, random_state=7).fit(da.from_array(X, chunks=37))
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.inertia_ == b.inertia_


def test_inertia_is_squared_and_matches_predict_and_score():
    X, _ = blobs(1)
    dX = da.from_array(X, chunks=64)
    km = KMeans(2, random_state=0, max_iter=2).fit(dX)  # stops at max_iter: inertia must still be right
    labels = km.predict(X)
    np.testing.assert_array_equal(labels, km.labels_.compute())
    d2 = ((X - km.cluster_centers_[labels]) ** 2).sum()
    assert km.inertia_ == pytest.approx(d2, rel=1e-12)
    assert km.score(dX) == pytest.approx(-d2, rel=1e-12)
    dist = km.transform(X)
    assert dist.shape == (200, 2)
    np.testing.assert_allclose(dist.min(1) ** 2, ((X - km.cluster_centers_[labels]) ** 2).sum(1))
    assert isinstance(km.predict(dX), da.Array)


def test_lloyd_history_never_increases_and_converges_by_tol():
    X, _ = blobs(2)
    km = KMeans(4, init="random", random_state=0, tol=1e-4).fit(X)
    inertias = [h["inertia"] for h in km.history_]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(inertias, inertias[1:]))
    assert km.history_[-1]["center_shift"] <= km._tol
    assert set(km.history_[0]) == {"iteration", "inertia", "center_shift", "seconds", "relocated",
                                   "changed", "skipped"}
    assert km.history_[0]["changed"] > 0 and 0 <= km.history_[-1]["skipped"] <= 1
    exact = KMeans(4, init="random", random_state=0, tol=0, max_iter=3).fit(X)
    assert exact.n_iter_ == 3


def test_integer_weights_equal_repeated_rows():
    X, _ = blobs(4)
    w = np.random.default_rng(0).integers(0, 4, 200)
    init = X[[0, 150, 30]]
    weighted = KMeans(3, init=init, tol=0, max_iter=30).fit(da.from_array(X, chunks=50), sample_weight=w)
    repeated = KMeans(3, init=init, tol=0, max_iter=30).fit(np.repeat(X, w, axis=0))
    np.testing.assert_allclose(weighted.cluster_centers_, repeated.cluster_centers_, rtol=1e-10)
    assert weighted.inertia_ == pytest.approx(repeated.inertia_, rel=1e-10)


def test_weighted_inits_never_pick_weightless_rows():
    X, _ = blobs(5)
    w = np.zeros(200)
    w[:100] = 1.0  # only the first blob carries weight
    for init in ("random", "k-means++", "k-means||"):
        km = KMeans(2, init=init, random_state=1, max_iter=1).fit(X, sample_weight=w)
        assert np.all(km.cluster_centers_ < 4), init


def test_empty_cluster_is_relocated_to_the_farthest_row(caplog):
    X, _ = blobs(6)
    init = np.array([[1.0, 1.0], [5.0, 5.0], [100.0, 100.0]])
    with caplog.at_level(logging.INFO, logger="kmeans_dask"):
        km = KMeans(3, init=init, max_iter=1, tol=0).fit(da.from_array(X, chunks=40))
    assert km.history_[0]["relocated"] == 1
    assert "relocated 1 empty cluster(s) [2]" in caplog.text
    assert np.all(np.abs(km.cluster_centers_) < 20)
    assert len(np.unique(km.cluster_centers_, axis=0)) == 3
    assert np.bincount(km.labels_.compute(), minlength=3).min() > 0


def test_empty_and_tiny_chunks_are_handled():
    X, _ = blobs(7)
    dX = da.concatenate([da.from_array(X[:1], chunks=(1, 2)), da.zeros((0, 2), chunks=((0,), (2,))),
                         da.from_array(X[1:], chunks=(199, 2))])
    km = KMeans(2, random_state=0).fit(dX)
    assert km.labels_.shape == (200,)
    ref = KMeans(2, random_state=0).fit(X)
    assert km.inertia_ == pytest.approx(ref.inertia_, rel=1e-6)


def test_uint8_input_is_scaled_and_float32_centres():
    X = np.repeat(np.array([[0, 0], [255, 255]], dtype=np.uint8), 10, axis=0)
    km = KMeans(2, random_state=0).fit(X)
    assert km.scale_ == 1 / 255 and km.cluster_centers_.dtype == np.float32
    assert sorted(km.cluster_centers_[:, 0].tolist()) == [0.0, 1.0]
    assert KMeans(2, scale=1.0, random_state=0).fit(X).cluster_centers_.max() == 255


def _bad(**kw):
    X = da.from_array(np.random.default_rng(0).random((20, 3)), chunks=10)
    return X, kw


@pytest.mark.parametrize(
    "params, X, weight, message",
    [
        ({"n_clusters": 0}, None, None, "The 'n_clusters' parameter of KMeans must be an int >= 1; got 0"),
        ({"n_clusters": 21}, None, None, "n_samples=20 should be >= n_clusters=21."),
        ({"n_clusters": 2.5}, None, None, "The 'n_clusters' parameter of KMeans must be an int >= 1; got 2.5"),
        ({"init": "kmeans"}, None, None, "The 'init' parameter of KMeans must be one of 'random', 'k-means++', 'k-means||' or a callable or an array-like; got 'kmeans'"),
        ({"init": np.zeros((2, 3))}, None, None, "The shape of the initial centers (2, 3) does not match the number of clusters 3."),
        ({"init": np.zeros((3, 2))}, None, None, "The shape of the initial centers (3, 2) does not match the number of features of the data 3."),
        ({"algorithm": "elkan"}, None, None, "The 'algorithm' parameter of KMeans must be one of 'lloyd'; got 'elkan'"),
        ({"max_iter": 0}, None, None, "The 'max_iter' parameter of KMeans must be an int >= 1; got 0"),
        ({"tol": -1}, None, None, "The 'tol' parameter of KMeans must be a float >= 0; got -1"),
        ({"n_init": "best"}, None, None, "The 'n_init' parameter of KMeans must be one of 'auto' or an int >= 1; got 'best'"),
        ({"verbose": -1}, None, None, "The 'verbose' parameter of KMeans must be a bool or an int >= 0; got -1"),
        ({"random_state": "x"}, None, None, "The 'random_state' parameter of KMeans must be None, an int or a numpy RandomState; got 'x'"),
        ({}, da.from_array(np.array([[1.0, np.nan, 0]] * 20), chunks=10), None, "X contains NaN or infinity (first in rows 0-19)"),
        ({}, da.from_array(np.array([[1.0, 0, 0]] * 10 + [[1.0, np.inf, 0]] * 10), chunks=10), None, "X contains NaN or infinity (first in rows 0-19)"),
        ({}, np.array([[1.0, np.nan, 0]] * 20), None, "Input X contains NaN."),
        ({}, np.array([[1.0, np.inf, 0]] * 20), None, "Input X contains infinity"),
        ({}, da.from_array(np.array([["a", "b", "c"]] * 20)), None, "X has dtype <U1; expected numbers"),
        ({}, np.zeros((0, 3)), None, "Found array with 0 sample(s) (shape=(0, 3)) while a minimum of 1 is required by KMeans."),
        ({}, da.zeros((0, 3)), None, "X is empty: shape (0, 3)"),
        ({}, np.zeros(20), None, "Expected 2D array, got 1D array instead"),
        ({}, da.zeros(20), None, "X must be 2-D (n_samples, n_features), got shape (20,)"),
        ({}, da.zeros((20, 4), chunks=(10, 2)), None, "X is chunked along columns (column chunks (2, 2)); chunk it by rows only"),
        ({}, None, -np.ones(20), "sample_weight has negative or NaN values (first in rows 0-19)"),
        ({}, None, np.zeros(20), "sample_weight sums to zero: no row carries weight"),
        ({}, None, np.ones(19), "sample_weight must have shape (20,), got (19,)"),
    ],
)
def test_bad_parameters_and_data_raise_clear_errors(params, X, weight, message):
    if X is None:
        X = da.from_array(np.random.default_rng(0).random((20, 3)), chunks=10)
    km = KMeans(**{"n_clusters": 3, "random_state": 0, **params})
    with pytest.raises(ValueError) as err:
        km.fit(X, sample_weight=weight)
    assert str(err.value).startswith(message), str(err.value)


def test_predict_before_fit_and_wrong_width():
    with pytest.raises(NotFittedError, match="This KMeans instance is not fitted yet"):
        KMeans(2).predict(np.zeros((3, 2)))
    km = KMeans(2, random_state=0).fit(blobs()[0])
    for X in (np.zeros((3, 3)), da.zeros((3, 3))):
        with pytest.raises(ValueError, match="X has 3 features, but KMeans is expecting 2 features"):
            km.predict(X)


def test_n_init_keeps_the_best_run():
    X, _ = blobs(8)
    X = np.vstack([X, X + [10, 0]])
    single = KMeans(4, init="random", n_init=1, random_state=3).fit(X)
    multi = KMeans(4, init="random", n_init=5, random_state=3).fit(X)
    assert multi.inertia_ <= single.inertia_


def test_get_params_round_trip():
    km = KMeans(5, init="random", tol=0.1)
    assert km.get_params()["n_clusters"] == 5 and km.get_params()["init"] == "random"
    assert "n_clusters=5" in repr(km) and repr(km).startswith("KMeans(")


def _spherical_reference(X, init, max_iter=100):
    """Spherical K-Means by brute force: argmax cosine, then normalised means."""
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    c = init / np.linalg.norm(init, axis=1, keepdims=True)
    labels = None
    for _ in range(max_iter):
        new_labels = (Xn @ c.T).argmax(axis=1)
        if labels is not None and (new_labels == labels).all():
            break
        labels = new_labels
        sums = np.stack([Xn[labels == j].sum(axis=0) for j in range(len(c))])
        c = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    inertia = float((1 - (Xn * c[labels]).sum(axis=1)).sum())
    return c, labels, inertia


def test_cosine_is_spherical_kmeans():
    rng = np.random.default_rng(3)
    # Directions matter, lengths do not: three cones of rows with random lengths.
    axes = np.eye(6)[:3] + 0.2
    X = np.vstack([a * rng.uniform(0.5, 20, (200, 1)) + rng.normal(0, 0.8, (200, 6))
                   for a in axes])
    init = X[[0, 250, 450]] * 3.0
    ref_c, ref_labels, ref_inertia = _spherical_reference(X, init)
    km = KMeans(3, init=init, metric="cosine", tol=0, max_iter=100).fit(X)
    np.testing.assert_array_equal(km.labels_, ref_labels)
    np.testing.assert_allclose(km.cluster_centers_, ref_c, atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(km.cluster_centers_, axis=1), 1.0)
    assert km.inertia_ == pytest.approx(ref_inertia, rel=1e-9)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(km.transform(X), 1 - Xn @ ref_c.T, atol=1e-9)
    assert km.score(X) == pytest.approx(-ref_inertia, rel=1e-9)
    # Scaling a row does not move it.
    np.testing.assert_array_equal(km.predict(X * rng.uniform(0.1, 10, (len(X), 1))), ref_labels)


@pytest.mark.t10k
def test_cosine_same_on_one_and_two_workers(fashion_rows):
    from distributed import Client, LocalCluster

    results = []
    for n_workers in (1, 2):
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=False,
                          protocol="tcp://", host="127.0.0.1", dashboard_address=None) as cluster, \
                Client(cluster):
            km = KMeans(10, metric="cosine", random_state=0, max_iter=10, tol=0).fit(fashion_rows)
            results.append((km.cluster_centers_, km.inertia_, km.labels_.compute()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
    np.testing.assert_array_equal(results[0][2], results[1][2])


def test_jobs_take_metric_cosine_for_lloyd_only():
    import argparse

    from kmeans_dask import _cli

    parser = argparse.ArgumentParser()
    _cli.add_model_options(parser)
    params = _cli.model_params(parser.parse_args(["--k", "5", "--metric", "cosine"]))
    assert params["metric"] == "cosine"
    assert "metric" not in _cli.model_params(parser.parse_args(["--k", "5"]))
    with pytest.raises(ValueError, match="--metric cosine is a Lloyd option"):
        _cli.model_params(parser.parse_args(["--k", "5", "--metric", "cosine",
                                             "--algorithm", "minibatch"]))
