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
