"""Principal-component features (kmeans_dask/features.py)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from sklearn.decomposition import PCA

from kmeans_dask import features


def test_parse():
    assert features.parse(None) is None and features.parse("none") is None
    assert features.parse("pca:50") == 50
    for bad in ("pca", "pca:0", "pca:x", "hog"):
        with pytest.raises(ValueError, match="--features must be 'none' or 'pca:N'"):
            features.parse(bad)


@pytest.mark.t10k
def test_components_match_scikit_learn_and_map_back(fashion_rows):
    X = fashion_rows[:5000]
    Xf = np.asarray(X.compute(), dtype=np.float64) / 255
    f = features.PCAFeatures(20, scale=1 / 255).fit(X)
    ref = PCA(20, svd_solver="full").fit(Xf)
    # The leading components as scikit-learn's (up to sign); the last few of a randomized
    # SVD mix among themselves, but the subspace keeps the same variance.
    overlap = np.abs(f.components_[:15].astype(np.float64) @ ref.components_[:15].T)
    assert overlap.max(axis=1).min() > 0.98
    assert f.explained_variance_ratio_ == pytest.approx(ref.explained_variance_ratio_.sum(),
                                                       rel=0.01)
    Z = f.transform(X)
    assert isinstance(Z, da.Array) and Z.shape == (len(Xf), 20) and Z.dtype == np.float32
    assert Z.chunks[0] == X.chunks[0]
    back = f.inverse_transform(Z.compute())
    err = ((back - Xf) ** 2).sum() / ((Xf - Xf.mean(0)) ** 2).sum()
    assert err == pytest.approx(1 - f.explained_variance_ratio_, abs=0.01)
    g = features.PCAFeatures.from_arrays(**f.to_arrays(), scale=1 / 255)
    np.testing.assert_allclose(g.transform(X[:100]).compute(), Z[:100].compute(), rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(ValueError, match="N <= min"):
        features.PCAFeatures(1000).fit(X[:500])


def test_a_result_fitted_on_components_applies_them_when_loaded(test_sources, tmp_path):
    from kmeans_dask import datasets, load, store, workflows

    sources = {"test": datasets.resolve_split("mnist", "test", test_sources, download=False)}
    data = store.open_data(store.ingest("mnist", tmp_path, sources).path, "test")
    params = {"algorithm": "lloyd", "n_clusters": 10, "random_state": 0, "init": "k-means++",
              "max_iter": 30, "tol": 1e-4, "n_init": "auto", "features": "pca:30"}
    model, path = workflows.fit_store(data, tmp_path / "pca.zarr", params, with_report=False)
    back = load(path)
    assert isinstance(back, features.FeatureKMeans) and back.n_features_in_ == 784
    assert back.cluster_centers_.shape == (10, 30) and back.pixel_centers_.shape == (10, 784)
    stored = np.asarray(back.labels_.compute())
    images = data.images
    # Predicting the fitted rows from pixels gives the stored labels, NumPy or Dask.
    np.testing.assert_array_equal(back.predict(images).compute(), stored)
    np.testing.assert_array_equal(back.predict(np.asarray(images[:500].compute())), stored[:500])
    assert -back.score(images) == pytest.approx(back.inertia_, rel=1e-5)
    # The centres in pixels are the means of their rows' projections, mapped back (up to
    # the last iteration's move: the fit stopped by tol).
    X = np.asarray(images.compute(), dtype=np.float64) / 255
    c0 = X[stored == 0].mean(axis=0)
    P = back.features.components_.astype(np.float64)
    expected = (c0 - back.features.mean_) @ P.T @ P + back.features.mean_
    np.testing.assert_allclose(back.pixel_centers_[0], expected, atol=0.01)
    report = workflows.evaluate_result(path, "test", out_dir=tmp_path / "eval")
    assert 0.3 < report["accuracy"] <= 1
    with pytest.raises(ValueError, match="--features must be 'none' or 'pca:N'"):
        workflows.fit_store(data, tmp_path / "bad.zarr", {**params, "features": "pca"},
                            with_report=False)
