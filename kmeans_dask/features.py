"""Feature extraction before K-Means: principal components computed on the workers.

``PCAFeatures`` centres the rows and takes the leading right singular
vectors with dask's randomized ``da.linalg.svd_compressed`` (Halko et al.),
so only (N, d) numbers come back; ``transform`` then projects every chunk
where it lives.  Centres found in feature space map back to pixels with
``inverse_transform`` (for the centroid pictures).
"""

from __future__ import annotations

import re

import dask
import dask.array as da
import numpy as np

# Power iterations of the randomized SVD: enough for the leading components of
# image data, whose spectrum decays slowly.
POWER_ITERATIONS = 3
_SPEC = re.compile(r"^pca:(\d+)$")


def parse(spec: str | None) -> int | None:
    """``"pca:N"`` -> N, ``"none"``/None -> None; anything else is refused."""
    if spec is None or spec == "none":
        return None
    m = _SPEC.match(str(spec))
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"--features must be 'none' or 'pca:N' with N >= 1, got {spec!r}")
    return int(m.group(1))


def _project(block: np.ndarray, scale: float, mean: np.ndarray, components: np.ndarray):
    x = block.astype(np.float32)
    if scale != 1.0:
        x *= np.float32(scale)
    x -= mean
    return x @ components.T


class PCAFeatures:
    """The first ``n_components`` principal components of rows scaled by ``scale``.

    Attributes (after :meth:`fit`): ``mean_`` (d,) and ``components_``
    (n_components, d), float32; ``explained_variance_ratio_`` (float).
    """

    def __init__(self, n_components: int, *, scale: float = 1.0, random_state: int = 0):
        self.n_components = n_components
        self.scale = scale
        self.random_state = random_state

    def fit(self, X: da.Array) -> PCAFeatures:
        n, d = X.shape
        if not 1 <= self.n_components <= min(n, d):
            raise ValueError(f"pca:{self.n_components} needs 1 <= N <= min(rows, features) = "
                             f"{min(n, d)}")
        Xf = X.astype(np.float32) * np.float32(self.scale)
        mean = Xf.mean(axis=0, dtype=np.float64).astype(np.float32).compute()
        centred = Xf - mean
        _, s, v = da.linalg.svd_compressed(centred, k=self.n_components,
                                           n_power_iter=POWER_ITERATIONS,
                                           seed=self.random_state, compute=False)
        total = (centred.astype(np.float64) ** 2).sum()
        s, v, total = dask.compute(s, v, total)
        self.mean_ = mean
        self.components_ = np.ascontiguousarray(v, dtype=np.float32)
        self.explained_variance_ratio_ = float((np.asarray(s, np.float64) ** 2).sum() / total)
        return self

    def transform(self, X: da.Array) -> da.Array:
        """(n, n_components) float32 features, chunked like ``X``'s rows."""
        if X.shape[1] != self.components_.shape[1]:
            raise ValueError(f"X has {X.shape[1]} features, the PCA was fitted on "
                             f"{self.components_.shape[1]}")
        return X.map_blocks(_project, self.scale, self.mean_, self.components_,
                            chunks=(X.chunks[0], (self.n_components,)), dtype=np.float32)

    def inverse_transform(self, Z: np.ndarray) -> np.ndarray:
        """Rows of feature space back in the scaled pixel space."""
        return np.asarray(Z, dtype=np.float32) @ self.components_ + self.mean_

    def to_arrays(self) -> dict:
        return {"mean": self.mean_, "components": self.components_}

    @classmethod
    def from_arrays(cls, mean, components, *, scale: float) -> PCAFeatures:
        out = cls(int(np.shape(components)[0]), scale=scale)
        out.mean_ = np.asarray(mean, dtype=np.float32)
        out.components_ = np.asarray(components, dtype=np.float32)
        return out


class FeatureKMeans:
    """A fitted K-Means on features, used with rows as stored.

    ``predict``, ``transform`` and ``score`` take the original rows (NumPy
    or Dask) and apply ``features`` first; ``pixel_centers_`` are the centres
    mapped back to the rows' scaled space (for pictures).  Every other
    attribute is the K-Means model's.
    """

    def __init__(self, features: PCAFeatures, model):
        self.features, self.model = features, model

    def __getattr__(self, name):
        if name in ("features", "model"):
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def n_features_in_(self) -> int:
        return int(self.features.components_.shape[1])

    @property
    def pixel_centers_(self) -> np.ndarray:
        return self.features.inverse_transform(self.model.cluster_centers_)

    def _features(self, X):
        numpy = not isinstance(X, da.Array)
        if numpy:
            X = np.asarray(X)
            X = da.from_array(X, chunks=(max(1, min(len(X), 10_000)), -1))
        Z = self.features.transform(X)
        return Z.compute() if numpy else Z

    def predict(self, X):
        return self.model.predict(self._features(X))

    def transform(self, X):
        return self.model.transform(self._features(X))

    def score(self, X, y=None, sample_weight=None) -> float:
        return self.model.score(self._features(X), sample_weight=sample_weight)
