"""What both estimators share (kmeans_dask/_base.py): input kinds, results, scikit-learn tooling."""

from __future__ import annotations

import pickle

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kmeans_dask import KMeans, MiniBatchKMeans

ESTIMATORS = [KMeans, MiniBatchKMeans]


def blobs(n=300, d=3, seed=0):
    X, y = make_blobs(n, d, centers=3, cluster_std=0.5, random_state=seed)
    return X, y


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_numpy_in_numpy_out_and_dask_in_dask_out(Estimator):
    X, _ = blobs()
    km = Estimator(3, random_state=0).fit(X)
    assert type(km.labels_) is np.ndarray and km.labels_.dtype == np.int32
    for out in (km.predict(X), km.transform(X), km.fit_predict(X), km.fit_transform(X)):
        assert type(out) is np.ndarray
    Xd = da.from_array(X, chunks=100)
    kd = Estimator(3, random_state=0).fit(Xd)
    for out in (kd.labels_, kd.predict(Xd), kd.transform(Xd), kd.fit_predict(Xd)):
        assert isinstance(out, da.Array) and out.chunks[0] == Xd.chunks[0]
    # The same rows give the same model, whichever kind they came as.
    np.testing.assert_array_equal(kd.labels_.compute(), km.labels_)
    np.testing.assert_array_equal(kd.cluster_centers_, km.cluster_centers_)


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_integers_and_lists_become_float64_as_in_scikit_learn(Estimator):
    X, _ = blobs()
    Xi = np.round(X * 10).astype(np.int64)
    a = Estimator(3, random_state=0).fit(Xi)
    b = Estimator(3, random_state=0).fit(Xi.astype(np.float64))
    c = Estimator(3, random_state=0).fit(Xi.tolist())
    assert a.cluster_centers_.dtype == np.float64 and a.scale_ == 1.0
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.cluster_centers_, c.cluster_centers_)
    d = Estimator(3, random_state=0).fit(da.from_array(Xi, chunks=100))
    np.testing.assert_array_equal(d.cluster_centers_, b.cluster_centers_)


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_dataframe_feature_names(Estimator):
    X, _ = blobs()
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    km = Estimator(3, random_state=0).fit(df)
    assert km.feature_names_in_.tolist() == ["a", "b", "c"]
    name = Estimator.__name__.lower()
    assert km.get_feature_names_out().tolist() == [f"{name}{i}" for i in range(3)]
    with pytest.warns(UserWarning, match="X does not have valid feature names"):
        km.predict(X)
    out = km.set_output(transform="pandas").transform(df)
    assert list(out.columns) == [f"{name}{i}" for i in range(3)]


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_pickle_and_clone(Estimator):
    X, _ = blobs()
    km = Estimator(3, random_state=0).fit(X)
    back = pickle.loads(pickle.dumps(km))
    np.testing.assert_array_equal(back.predict(X), km.predict(X))
    assert back.inertia_ == km.inertia_
    fresh = clone(km)
    assert fresh.get_params() == km.get_params() and not hasattr(fresh, "cluster_centers_")


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_pipeline_and_grid_search(Estimator):
    X, y = blobs(n=400, d=4, seed=1)
    pipe = make_pipeline(StandardScaler(), Estimator(random_state=0))
    search = GridSearchCV(pipe, {f"{Estimator.__name__.lower()}__n_clusters": [2, 3, 8]}, cv=2)
    search.fit(X)
    # score is the negative inertia: more clusters always score higher.
    assert search.best_params_[f"{Estimator.__name__.lower()}__n_clusters"] == 8
    labels = search.best_estimator_.predict(X)
    assert labels.shape == (400,) and labels.max() == 7


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_given_and_callable_init(Estimator):
    X, _ = blobs()
    start = X[:3].copy()
    given = start.copy()
    km = Estimator(3, init=given, n_init=1).fit(X)
    np.testing.assert_array_equal(given, start)  # never changed
    np.testing.assert_array_equal(km.init_centers_, start)
    calls = []

    def first_rows(data, k, random_state):
        calls.append((np.shape(data), k, type(random_state).__name__))
        return np.asarray(data)[:k]

    Estimator(3, init=first_rows, n_init=2, random_state=0).fit(X)
    assert len(calls) == 2 and all(c[1] == 3 and c[2] == "RandomState" for c in calls)
    with pytest.raises(ValueError, match="does not match the number of clusters 3"):
        Estimator(3, init=lambda data, k, random_state: X[:2]).fit(X)


def test_verbose_prints_what_scikit_learn_prints(capsys):
    X, _ = blobs()
    KMeans(3, init="random", n_init=1, tol=0, random_state=0, verbose=1).fit(X)
    out = capsys.readouterr().out
    assert "Initialization complete" in out and "Iteration 0, inertia" in out
    assert "strict convergence" in out
    MiniBatchKMeans(3, batch_size=50, random_state=0, verbose=1).fit(X)
    out = capsys.readouterr().out
    assert "Minibatch step 1/" in out and "mean batch inertia" in out
    KMeans(3, verbose=0, random_state=0).fit(X)
    assert capsys.readouterr().out == ""
