"""The K-Means estimator: validation and the Lloyd loop (mini-batch: minibatch.py).

Follows scikit-learn's conventions: parameters stored unchanged in
``__init__`` and checked in ``fit``; learned state in trailing-underscore
attributes.  The Lloyd passes run in :mod:`kmeans_dask.engine` (state on the
workers), one-time passes in :mod:`kmeans_dask._passes` (graphs), and the
arithmetic in :mod:`kmeans_dask._kernels` (NumPy per chunk); this module only
decides what to compute next from k x d numbers.  Tuning knobs that do not
change results are ``dask.config`` keys (:mod:`kmeans_dask.config`).
"""

from __future__ import annotations

import logging
import math
import numbers
import time
import warnings

import dask.array as da
import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state

from . import _kernels, config, store
from ._passes import ChunkedRows
from .engine import Engine
from .cluster import active_client, worker_info
from .init import INITS

log = logging.getLogger(__name__)

ALGORITHMS = ("lloyd",)
DTYPES = (np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.float64))


class KMeans(ClusterMixin, BaseEstimator):
    """K-Means clustering of a Dask array of rows, computed where the chunks live.

    Parameters
    ----------
    n_clusters : int, default=8
        Number of centres.
    init : {"k-means||", "k-means++", "random"} or array-like of shape (n_clusters, n_features), default="k-means||"
        How to choose the initial centres: k-means|| over all chunks
        (Bahmani et al. 2012), greedy k-means++ on a sample, distinct random
        rows, or explicit centres in scaled units (see ``scale``).
    n_init : int, default=1
        Number of initialisations; the run with the lowest inertia is kept.
    max_iter : int, default=300
        Maximum Lloyd iterations.
    tol : float, default=1e-4
        Convergence tolerance on the sum of squared centre shifts, relative to
        the mean per-feature variance of the data (scikit-learn's definition).
        ``tol=0`` iterates until the centres stop moving.
    algorithm : {"lloyd"}, default="lloyd"
        The only one; mini-batch K-Means is :class:`kmeans_dask.MiniBatchKMeans`.
    random_state : int, RandomState instance or None, default=None
    scale : "auto" or float, default="auto"
        Multiplier applied to rows inside the kernels: 1/255 for uint8 images
        (so pixels are in [0, 1]), 1 for float input.
    oversampling_factor : float, default=2.0
        k-means||: expected candidates per round, as a multiple of n_clusters.
    init_rounds : int, default=5
        k-means||: oversampling rounds.
    persist : {"auto", True, False}, default="auto"
        Keep the rows in worker memory between passes ("auto": when they take
        at most half the cluster's memory); otherwise every pass reads them
        again from their source (for example a Zarr store).

    Notes
    -----
    Every Lloyd iteration is one task per worker (``kmeans-lloyd`` on the
    dashboard) over the chunks that worker holds, with each chunk's labels
    and Yinyang bounds kept on it between iterations
    (:mod:`kmeans_dask.engine`).  Results are the same bit for bit on any
    number of workers.  How rows are cut into work is set by ``dask.config``
    keys (:mod:`kmeans_dask.config`), not by parameters.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
        float32 for uint8 or float32 input, float64 for float64 input.
    labels_ : dask.array.Array of shape (n_samples,)
        int32 label of every row, lazy and chunked like ``X``.
    inertia_ : float
        Sum of (weighted) squared distances of the rows to their nearest
        final centre.
    n_iter_ : int
        Lloyd iterations run.
    n_steps_ : int
        Equal to ``n_iter_`` (named as MiniBatchKMeans's steps).
    history_ : list of dict
        Per iteration: ``inertia`` (with the centres the iteration started
        from), ``center_shift``, ``seconds``, ``relocated`` (empty clusters
        moved), ``changed`` (rows that changed centre) and ``skipped`` (the
        share of row-centre distances the bounds made unnecessary).
    init_centers_ : ndarray of shape (n_clusters, n_features)
        The initial centres of the kept run (float64).
    scale_ : float
        The scale applied to rows.
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[1, 1], [1.5, 2], [8, 8], [8, 9]], dtype=np.float64)
    >>> km = KMeans(n_clusters=2, init="k-means++", random_state=0).fit(X)
    >>> sorted(km.cluster_centers_[:, 0].tolist())
    [1.25, 8.0]
    >>> km.labels_.compute().tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
    True
    """

    def __init__(self, n_clusters=8, *, init="k-means||", n_init=1, max_iter=300, tol=1e-4,
                 algorithm="lloyd", random_state=None, scale="auto",
                 oversampling_factor=2.0, init_rounds=5, persist="auto"):
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.algorithm = algorithm
        self.random_state = random_state
        self.scale = scale
        self.oversampling_factor = oversampling_factor
        self.init_rounds = init_rounds
        self.persist = persist

    # ------------------------------------------------------------------ validation

    def _validate_params(self):
        def integer(name, low, allow_none=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        def real(name, low, strict=False):
            value = getattr(self, name)
            if (not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value)
                    or value < low or (strict and value == low)):
                op = ">" if strict else ">="
                raise ValueError(f"{name} must be a number {op} {low}, got {value!r}")

        integer("n_clusters", 1)
        integer("n_init", 1)
        integer("max_iter", 1)
        integer("init_rounds", 0)
        real("tol", 0.0)
        real("oversampling_factor", 0.0, strict=True)
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if isinstance(self.init, str):
            if self.init not in INITS:
                raise ValueError(f"init must be one of {sorted(INITS)} or an array of shape "
                                 f"(n_clusters, n_features), got {self.init!r}")
        if self.scale != "auto":
            real("scale", 0.0, strict=True)
        if self.persist not in ("auto", True, False):
            raise ValueError(f"persist must be 'auto', True or False, got {self.persist!r}")

    def _check_X(self, X, *, fitting: bool) -> da.Array:
        if isinstance(X, da.Array):
            pass
        elif hasattr(X, "__array__"):
            X = np.asarray(X)
            if X.ndim == 2 and X.size:
                X = da.from_array(X, chunks=(_default_rows(X), -1))
        else:
            raise TypeError(f"X must be a dask or numpy array, got {type(X).__name__}")
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}")
        if X.shape[0] == 0 or X.shape[1] == 0:
            raise ValueError(f"X is empty: shape {X.shape}")
        if np.dtype(X.dtype) not in DTYPES:
            raise ValueError(f"X has dtype {X.dtype}; expected uint8, float32 or float64")
        if len(X.chunks[1]) != 1:
            raise ValueError(
                f"X is chunked along columns (column chunks {X.chunks[1]}); chunk it by rows "
                f"only, e.g. X.rechunk({{1: -1}})")
        if any(math.isnan(c) for c in X.chunks[0]):
            raise ValueError("X has unknown chunk sizes; call X.compute_chunk_sizes() first")
        if not fitting and X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but this KMeans was fitted with "
                             f"{self.n_features_in_}")
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

    def _rows(self, X, w, scale) -> ChunkedRows:
        return ChunkedRows(X, w, scale=scale)

    # ------------------------------------------------------------------ fit

    def fit(self, X, y=None, sample_weight=None, *, callback=None, checkpoint=None, resume=None):
        """Compute K-Means clustering.

        Parameters
        ----------
        X : dask.array.Array or array-like of shape (n_samples, n_features)
            Rows chunked by rows only; uint8, float32 or float64.
        y : Ignored
        sample_weight : array-like or dask array of shape (n_samples,), default=None
            Non-negative weight of every row.
        callback : callable, optional
            Called with each entry of ``history_`` as it is recorded (for
            progress bars).
        checkpoint : callable, optional
            Lloyd only: called after every iteration with the state needed to
            resume, a dict with ``iteration``, ``centers`` (the updated
            centres), ``init`` and ``history``.
        resume : dict, optional
            A state passed to ``checkpoint`` earlier: the fit skips the
            initialisation and continues from it, ending exactly where an
            uninterrupted fit would (Lloyd with ``n_init=1`` only).

        Returns
        -------
        self : KMeans
        """
        self._validate_params()
        X = self._check_X(X, fitting=True)
        w = self._check_weights(sample_weight, X)
        n, d = X.shape
        if self.n_clusters > n:
            raise ValueError(f"n_clusters={self.n_clusters} must be <= n_samples={n}")
        init = self.init
        if not isinstance(init, str):
            init = np.asarray(init, dtype=np.float64)
            if init.shape != (self.n_clusters, d):
                raise ValueError(f"init array has shape {init.shape}, expected "
                                 f"(n_clusters, n_features) = ({self.n_clusters}, {d})")
            if not np.isfinite(init).all():
                raise ValueError("init array contains NaN or infinity")
        if resume is not None:
            if self.n_init != 1:
                raise ValueError(f"resume needs n_init=1, got n_init={self.n_init}")
            if np.shape(resume["centers"]) != (self.n_clusters, d):
                raise ValueError(f"resume centres have shape {np.shape(resume['centers'])}, "
                                 f"expected ({self.n_clusters}, {d})")
        scale = self._effective_scale(X.dtype)
        input_chunks = X.chunks[0]
        persisted = self._should_persist(X)
        source = None
        if persisted:
            source, w = _regroup(X, w, config.get("task-bytes"))
            X, w = _persist(source, w)
        else:
            # Streamed from its source each pass: keep the source's chunks, so a task
            # holds one chunk at a time and nothing waits in memory to be merged.
            log.info("rows not persisted (%.0f MiB): streaming them each pass", X.nbytes / 2**20)
        rows = self._rows(X, w, scale)
        start = time.perf_counter()
        stats = rows.stats()
        _check_stats(stats, rows)
        mean_var = float(np.mean(stats["sumsq"] / n - (stats["sum"] / n) ** 2))
        self._tol = self.tol * mean_var
        rng = check_random_state(self.random_state)
        engine = Engine.create(rows, stats, persisted=persisted, source=source)
        try:
            best = self._best_run(init, rows, engine, rng, callback, checkpoint, resume)
            # The final pass left every chunk's labels for the kept centres in its
            # state (for the last run; another run's are computed again).
            labels = engine.labels(best["centers"])
        finally:
            engine.close()
        dtype = _kernels.compute_dtype(X.dtype)
        self.cluster_centers_ = best["centers"].astype(dtype)
        self.init_centers_ = best["init"]
        self.inertia_ = float(best["inertia"])
        self.n_iter_ = best["n_iter"]
        self.n_steps_ = best["n_steps"]
        self.history_ = best["history"]
        self.scale_ = scale
        self.n_features_in_ = d
        self.labels_ = labels if labels.chunks[0] == input_chunks else labels.rechunk((input_chunks,))
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def _best_run(self, init, rows: ChunkedRows, engine, rng, callback, checkpoint, resume) -> dict:
        """``n_init`` runs from their initial centres; the one with the lowest inertia."""
        best = None
        for run in range(self.n_init):
            t0 = time.perf_counter()
            if resume is not None:
                centers = np.asarray(resume["init"], dtype=np.float64)
                log.info("resuming after iteration %d", len(resume["history"]))
            elif isinstance(init, str):
                centers = self._initial_centers(init, rows, rng)
                log.info("init %s (run %d/%d): %.2f s", init, run + 1, self.n_init,
                         time.perf_counter() - t0)
            else:
                centers = init.copy()
            result = _lloyd(self, rows, engine, centers, callback, checkpoint, resume)
            log.info("run %d/%d: inertia %.6g after %d iterations", run + 1, self.n_init,
                     result["inertia"], result["n_iter"])
            result["init"] = np.asarray(centers, dtype=np.float64)
            if best is None or result["inertia"] < best["inertia"]:
                best = result
        return best

    def _initial_centers(self, init: str, rows: ChunkedRows, rng) -> np.ndarray:
        if init == "k-means||":
            return INITS[init](rows, self.n_clusters, rng,
                               oversampling_factor=self.oversampling_factor,
                               rounds=self.init_rounds)
        return INITS[init](rows, self.n_clusters, rng)

    def _should_persist(self, X: da.Array) -> bool:
        if self.persist != "auto":
            return bool(self.persist)
        budget = _memory_budget()
        return budget is None or X.nbytes <= 0.5 * budget

    # ------------------------------------------------------------------ use

    def _fitted_rows(self, X, sample_weight=None) -> ChunkedRows:
        if not hasattr(self, "cluster_centers_"):
            raise ValueError("this KMeans is not fitted yet; call fit first")
        X = self._check_X(X, fitting=False)
        w = self._check_weights(sample_weight, X)
        return self._rows(X, w, self.scale_)

    def predict(self, X):
        """Index of the nearest centre of every row.

        Returns a lazy Dask array chunked like ``X`` for Dask input, a NumPy
        array for NumPy input.
        """
        out = self._fitted_rows(X).predict(self.cluster_centers_)
        return out if isinstance(X, da.Array) else out.compute()

    def transform(self, X):
        """Euclidean distance of every row to every centre, shape (n_samples, n_clusters)."""
        out = self._fitted_rows(X).transform(self.cluster_centers_)
        return out if isinstance(X, da.Array) else out.compute()

    def fit_predict(self, X, y=None, sample_weight=None):
        return self.fit(X, sample_weight=sample_weight).labels_

    def fit_transform(self, X, y=None, sample_weight=None):
        return self.fit(X, sample_weight=sample_weight).transform(X)

    def score(self, X, y=None, sample_weight=None) -> float:
        """Opposite of the inertia of ``X`` with the fitted centres."""
        rows = self._fitted_rows(X, sample_weight)
        stats = rows.stats()
        _check_stats(stats, rows)
        engine = Engine.create(rows, stats, persisted=False)
        try:
            return -float(engine.lloyd(self.cluster_centers_)["inertia"])
        finally:
            engine.close()


# ---------------------------------------------------------------------- helpers


def _default_rows(X: np.ndarray) -> int:
    # About 8 MB per chunk, at least two chunks when there is enough data.
    per_row = max(1, X.shape[1] * X.dtype.itemsize)
    return max(1, min(max(1, 8_000_000 // per_row), math.ceil(X.shape[0] / 2)))


def _regroup(X: da.Array, w, task_bytes: int):
    """Merge small row chunks into chunks of about ``task_bytes``.

    The grouping depends only on the data's shape, never on the cluster.
    """
    n = X.shape[0]
    task_rows = max(1, task_bytes // max(1, X.shape[1] * X.dtype.itemsize))
    if max(X.chunks[0]) >= task_rows or len(X.chunks[0]) == 1:
        return X, w
    groups = math.ceil(n / task_rows)
    size = math.ceil(n / groups)
    X = X.rechunk({0: size, 1: -1})
    return X, (None if w is None else w.rechunk((X.chunks[0],)))


def _memory_budget():
    """Total memory limit of the current distributed cluster's workers, or None."""
    client = active_client()
    if client is None:
        return None
    total = sum(w.get("memory_limit") or 0 for w in worker_info(client).values())
    return total or None


def _persist(X, w):
    if w is None:
        return X.persist(), None
    import dask

    return dask.persist(X, w)


def _check_stats(stats: dict, rows: ChunkedRows) -> None:
    if stats["bad_chunk"] is not None:
        i = stats["bad_chunk"]
        raise ValueError(f"X contains NaN or infinity (first in rows {rows.offsets[i]}-"
                         f"{rows.offsets[i + 1] - 1})")
    if stats["negative_chunk"] is not None:
        i = stats["negative_chunk"]
        raise ValueError(f"sample_weight has negative or NaN values (first in rows "
                         f"{rows.offsets[i]}-{rows.offsets[i + 1] - 1})")
    if not stats["w"] > 0:
        raise ValueError("sample_weight sums to zero: no row carries weight")


def _new_centers(rows: ChunkedRows, centers: np.ndarray, part: dict):
    """Divide sums by weights after moving each empty cluster to a far row.

    As in scikit-learn, an empty cluster takes one of the rows farthest from
    their current centre, and that row's weight leaves its old cluster; a
    centre never falls to the origin.  Only rows off their centre can seed
    a cluster: the third value returned is the number of empty clusters
    left because every row already sits on a centre (fewer distinct rows
    than clusters).
    """
    sums, counts = part["sums"].copy(), part["counts"].copy()
    empty = np.flatnonzero(counts <= 0)
    stuck = 0
    if empty.size:
        far = rows.farthest(centers, empty.size)
        off = far["dist"] > 0
        stuck = int(empty.size - off.sum())
        empty = empty[:int(off.sum())]
        far = {key: value[off] for key, value in far.items()}
    if empty.size:
        for j, row, weight, old in zip(empty, far["rows"], far["weight"], far["label"]):
            sums[old] -= weight * row
            counts[old] -= weight
            sums[j] = weight * row
            counts[j] = weight
        log.info("relocated %d empty cluster(s) %s to the farthest rows %s", empty.size,
                 empty.tolist(), far["index"].tolist())
    new = centers.copy()
    keep = counts > 0
    new[keep] = sums[keep] / counts[keep, None]
    return new, int(empty.size), stuck


def _lloyd(est: KMeans, rows: ChunkedRows, engine: Engine, init, callback, checkpoint=None,
           resume=None) -> dict:
    """Lloyd iterations from ``init``; ``engine`` runs the passes, ``rows`` the rare others.

    The last pass, with the final centres, gives the inertia and leaves the
    labels in the engine's per-chunk states.
    """
    centers = np.asarray(init, dtype=np.float64)
    history = []
    if resume is not None:
        centers = np.asarray(resume["centers"], dtype=np.float64)
        history = [dict(h) for h in resume["history"]]
    n_iter = len(history)
    done = bool(history) and history[-1]["center_shift"] <= est._tol
    for n_iter in range(len(history) + 1, est.max_iter + 1 if not done else 0):
        t0 = time.perf_counter()
        part = engine.lloyd(centers, n_iter)
        new, relocated, stuck = _new_centers(rows, centers, part)
        shift = float(((new - centers) ** 2).sum())
        record = {"iteration": n_iter, "inertia": float(part["inertia"]), "center_shift": shift,
                  "seconds": time.perf_counter() - t0, "relocated": relocated,
                  "changed": int(part["changed"]),
                  # Near ties are ranked twice (float32, then exactly): clamp at 0.
                  "skipped": max(0.0, 1.0 - part["pairs"] / max(1, part["rows"] * len(centers)))}
        history.append(record)
        log.debug("iteration %d: inertia %.6g, shift %.3g, rows recomputed %s", n_iter,
                  record["inertia"], shift, part.get("computed", "all"))
        if callback is not None:
            callback(record)
        engine.publish(record, new, est.max_iter)
        centers = new
        if checkpoint is not None:
            checkpoint({"iteration": n_iter, "centers": centers, "init": init, "history": history})
        if stuck:
            # Nothing can fill the empty clusters: more iterations would change nothing.
            warnings.warn(f"Number of distinct clusters ({est.n_clusters - stuck}) found smaller "
                          f"than n_clusters ({est.n_clusters}). Possibly due to duplicate points "
                          f"in X.", ConvergenceWarning, stacklevel=3)
            break
        if shift <= est._tol:
            break
    n_iter = len(history)
    # Inertia of the final centres, as scikit-learn reports it.
    inertia = float(engine.lloyd(centers, n_iter + 1)["inertia"])
    return {"centers": centers, "inertia": inertia, "n_iter": n_iter, "n_steps": n_iter,
            "history": history}


# ---------------------------------------------------------------------- persistence


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("kmeans-dask", "dask", "distributed", "numpy", "zarr", "scikit-learn", "dask-ml"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _json_params(model: KMeans) -> dict:
    params = model.get_params()
    if not isinstance(params["init"], str):
        params["init"] = "array"
    if not (params["random_state"] is None or isinstance(params["random_state"], numbers.Integral)):
        params["random_state"] = repr(params["random_state"])
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}


def save(model: KMeans, path, *, data: dict | None = None, extra: dict | None = None,
         overwrite: bool = False, inputs=()):
    """Write a fitted model, its labels and its run record to a result store.

    The labels are written chunk by chunk by the workers; the store is
    created under a temporary name and renamed into place when complete.

    Parameters
    ----------
    model : KMeans
        A fitted estimator.
    path : path-like
        The result store (``RESULT.zarr``).
    data : dict, optional
        What was clustered (store path, split, checksums); kept in the
        attributes so evaluation can find the true labels.
    extra : dict, optional
        More JSON-serialisable attributes (elapsed time, ...).
    overwrite : bool, default=False
        Replace an earlier result store at ``path`` (nothing else).
    inputs : sequence of path-like
        Stores the fit read: ``path`` must not be or contain them.

    Returns
    -------
    pathlib.Path
    """
    if not hasattr(model, "cluster_centers_"):
        raise ValueError("this KMeans is not fitted yet; call fit first")
    record = {
        "params": _json_params(model),
        "inertia": model.inertia_,
        "n_iter": int(model.n_iter_),
        "n_steps": int(model.n_steps_),
        "history": model.history_,
        "scale": model.scale_,
        "n_features": int(model.n_features_in_),
        "data": data or {},
        "versions": _versions(),
        **(extra or {}),
    }
    return store.write_result(path, model.cluster_centers_, model.labels_, record,
                              init=model.init_centers_, overwrite=overwrite, inputs=inputs)


def load(path) -> KMeans:
    """A fitted :class:`KMeans` from a result store (no pickle: arrays and JSON only).

    ``labels_`` is the stored label array (lazy); ``predict``, ``transform``
    and ``score`` work as after ``fit``.

    Raises
    ------
    kmeans_dask.errors.StoreError
        The store is missing or fails its schema check.
    """
    return from_result(store.read_result(path))


def from_result(result: store.Result) -> KMeans:
    """A fitted :class:`KMeans` from a result store already read by :func:`store.read_result`."""
    attrs = result.attrs
    params = dict(attrs["params"])
    if params.get("init") == "array":
        params["init"] = result.init
    if isinstance(params.get("random_state"), str):
        params["random_state"] = None
    known = KMeans().get_params()
    model = KMeans(**{k: v for k, v in params.items() if k in known})
    model.cluster_centers_ = result.centroids
    model.init_centers_ = result.init
    model.labels_ = result.labels
    model.inertia_ = float(attrs["inertia"])
    model.n_iter_ = int(attrs["n_iter"])
    model.n_steps_ = int(attrs.get("n_steps", attrs["n_iter"]))
    model.history_ = list(attrs["history"])
    model.scale_ = float(attrs["scale"])
    model.n_features_in_ = int(attrs["n_features"])
    return model
