"""What KMeans and MiniBatchKMeans share: input checks and the uses of a fitted model.

NumPy (or any array-like) input is checked as scikit-learn checks it
(``validate_data``: integers and booleans become float64, NaN and sparse
input are refused, feature names are recorded) and gives NumPy results;
Dask input stays lazy and gives Dask results.
"""

from __future__ import annotations

import math
import warnings

import dask.array as da
import numpy as np
from sklearn.base import (BaseEstimator, ClassNamePrefixFeaturesOutMixin, ClusterMixin,
                          TransformerMixin)
from sklearn.utils.validation import check_is_fitted, validate_data

from . import _params
from ._passes import ChunkedRows
from .engine import Engine

# Row types the kernels take as stored; other numbers become float64.
DTYPES = (np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.float64))
# About this many bytes per chunk of NumPy input.
CHUNK_BYTES = 8_000_000


class BaseKMeans(ClassNamePrefixFeaturesOutMixin, TransformerMixin, ClusterMixin, BaseEstimator):
    """Base of the K-Means estimators (not for direct use)."""

    _parameter_constraints: dict = {}
    # n_init="auto" for init="random" or a callable (scikit-learn's defaults).
    _default_n_init = 10

    def _validate_params(self):
        _params.check_params(self)

    # ------------------------------------------------------------------ inputs

    def _check_X(self, X, *, reset: bool) -> da.Array:
        """``X`` as a Dask array chunked by rows; records whether results should be NumPy."""
        if isinstance(X, da.Array):
            numpy = False
            X = _check_dask(X)
            if reset:
                self.n_features_in_ = X.shape[1]
            elif X.shape[1] != self.n_features_in_:
                raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} is "
                                 f"expecting {self.n_features_in_} features as input.")
        else:
            numpy = True
            X = validate_data(self, X, reset=reset, accept_sparse=False,
                              dtype=[np.float64, np.float32, np.uint8])
            X = da.from_array(X, chunks=(_default_rows(X), -1))
        if reset:
            self._numpy_output = numpy
        return X

    def _check_weights(self, sample_weight, X: da.Array):
        if sample_weight is None:
            return None
        if isinstance(sample_weight, da.Array):
            w = sample_weight
        else:
            w = np.asarray(sample_weight)
            if w.ndim == 0:
                w = np.full(X.shape[0], float(w))
        if w.shape != (X.shape[0],):
            raise ValueError(f"sample_weight must have shape ({X.shape[0]},), got {w.shape}")
        if not np.issubdtype(w.dtype, np.number) or np.issubdtype(w.dtype, np.complexfloating):
            raise ValueError(f"sample_weight must be numeric, got dtype {w.dtype}")
        w = w.astype(np.float64)
        if isinstance(w, da.Array):
            return w.rechunk((X.chunks[0],))
        return da.from_array(w, chunks=(X.chunks[0],))

    def _effective_scale(self, dtype) -> float:
        if self.scale == "auto":
            return 1.0 / 255.0 if np.dtype(dtype) == np.uint8 else 1.0
        return float(self.scale)

    def _check_n_samples(self, n: int) -> None:
        if n < self.n_clusters:
            raise ValueError(f"n_samples={n} should be >= n_clusters={self.n_clusters}.")

    def _resolve_n_init(self) -> int:
        """scikit-learn's rule for ``n_init``: "auto" is 1 except for random or callable init."""
        n_init = self.n_init
        if n_init == "auto":
            random = isinstance(self.init, str) and self.init == "random"
            n_init = self._default_n_init if random or callable(self.init) else 1
        if _params.ARRAY.accepts(self.init) and n_init != 1:
            warnings.warn(f"Explicit initial center position passed: performing only one init "
                          f"in {type(self).__name__} instead of n_init={n_init}.",
                          RuntimeWarning, stacklevel=3)
            n_init = 1
        self._n_init = n_init
        return n_init

    def _init_array(self, init, d: int) -> np.ndarray:
        """Given initial centres, checked and copied (the caller's array is never changed)."""
        centers = np.array(init, dtype=np.float64, copy=True)
        if centers.ndim != 2 or centers.shape[0] != self.n_clusters:
            raise ValueError(f"The shape of the initial centers {centers.shape} does not match "
                             f"the number of clusters {self.n_clusters}.")
        if centers.shape[1] != d:
            raise ValueError(f"The shape of the initial centers {centers.shape} does not match "
                             f"the number of features of the data {d}.")
        if not np.isfinite(centers).all():
            raise ValueError("the initial centers contain NaN or infinity")
        return centers

    def _called_init(self, X, rng) -> np.ndarray:
        """Centres from a callable ``init``, given ``X`` as the user passed it."""
        return self._init_array(self.init(X, self.n_clusters, random_state=rng), X.shape[1])

    def _cosine(self) -> bool:
        return getattr(self, "metric", "euclidean") == "cosine"

    @staticmethod
    def _unit(X: da.Array) -> da.Array:
        """Rows scaled to norm 1, chunk by chunk (spherical K-Means)."""
        from . import _kernels

        return X.map_blocks(_kernels.unit_rows, dtype=_kernels.compute_dtype(X.dtype))

    def _inertia_factor(self) -> float:
        # The engine sums |x - c|^2 = 2 (1 - cos) over unit rows and centres.
        return 0.5 if self._cosine() else 1.0

    def _output(self, array: da.Array):
        """A result in the input's kind: NumPy for NumPy input, lazy otherwise."""
        return array.compute() if self._numpy_output else array

    # ------------------------------------------------------------------ fitted model

    def _fitted_rows(self, X, sample_weight=None):
        check_is_fitted(self, "cluster_centers_")
        numpy = not isinstance(X, da.Array)
        X = self._check_X(X, reset=False)
        w = self._check_weights(sample_weight, X)
        if self._cosine():
            X = self._unit(X)
        return ChunkedRows(X, w, scale=self.scale_), numpy

    def predict(self, X):
        """Index of the nearest centre of every row.

        Returns a lazy Dask array chunked like ``X`` for Dask input, a NumPy
        array for other input.
        """
        rows, numpy = self._fitted_rows(X)
        out = rows.predict(self.cluster_centers_)
        return out.compute() if numpy else out

    def transform(self, X):
        """Euclidean distance of every row to every centre, shape (n_samples, n_clusters)
        (``1 - cos`` for ``metric="cosine"``)."""
        rows, numpy = self._fitted_rows(X)
        out = rows.transform(self.cluster_centers_)
        if self._cosine():
            out = out * out / 2  # 1 - cos from the distance between unit vectors
        return out.compute() if numpy else out

    def fit_predict(self, X, y=None, sample_weight=None):
        """Fit, then the label of every row (``labels_``)."""
        return self.fit(X, sample_weight=sample_weight).labels_

    def fit_transform(self, X, y=None, sample_weight=None):
        """Fit, then the distances of every row to every centre."""
        return self.fit(X, sample_weight=sample_weight).transform(X)

    def score(self, X, y=None, sample_weight=None) -> float:
        """Opposite of the inertia of ``X`` with the fitted centres."""
        from .kmeans import _check_stats

        rows, _ = self._fitted_rows(X, sample_weight)
        stats = rows.stats()
        _check_stats(stats, rows)
        engine = Engine.create(rows, stats, persisted=False)
        try:
            return -float(engine.lloyd(self.cluster_centers_)["inertia"]) * self._inertia_factor()
        finally:
            engine.close()

    @property
    def _n_features_out(self):
        # get_feature_names_out: one output per centre of transform.
        return self.cluster_centers_.shape[0]


def _check_dask(X: da.Array) -> da.Array:
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}")
    if any(math.isnan(c) for c in X.chunks[0]):
        raise ValueError("X has unknown chunk sizes; call X.compute_chunk_sizes() first")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X is empty: shape {X.shape}")
    dtype = np.dtype(X.dtype)
    if dtype not in DTYPES:
        if dtype.kind not in "biuf":
            raise ValueError(f"X has dtype {dtype}; expected numbers")
        X = X.astype(np.float64)
    if len(X.chunks[1]) != 1:
        raise ValueError(
            f"X is chunked along columns (column chunks {X.chunks[1]}); chunk it by rows "
            f"only, e.g. X.rechunk({{1: -1}})")
    return X


def _default_rows(X: np.ndarray) -> int:
    # At least two chunks when there is enough data, so two workers share it.
    per_row = max(1, X.shape[1] * X.dtype.itemsize)
    return max(1, min(max(1, CHUNK_BYTES // per_row), math.ceil(X.shape[0] / 2)))
