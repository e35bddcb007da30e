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
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state

from . import _kernels, _params, config, store
from ._base import BaseKMeans
from ._params import ARRAY, CALLABLE, RANDOM_STATE, VERBOSE, Number, Options
from ._passes import ChunkedRows
from .engine import Engine, next_centers
from .cluster import active_client, worker_info
from .init import INITS

log = logging.getLogger(__name__)

ALGORITHMS = ("lloyd",)
METRICS = ("euclidean", "cosine")


class KMeans(BaseKMeans):
    """K-Means clustering of a Dask array of rows, computed where the chunks live.

    A drop-in for scikit-learn's ``KMeans`` on dense input: NumPy input
    gives NumPy results, Dask input lazy Dask results.  One difference is
    deliberate: uint8 rows (images) are scaled by 1/255 inside the kernels
    (``scale="auto"``); ``scale=1`` gives scikit-learn's behaviour.

    Parameters
    ----------
    n_clusters : int, default=8
        Number of centres.
    init : {"k-means||", "k-means++", "random"}, callable or array-like of shape (n_clusters, n_features), default="k-means||"
        How to choose the initial centres: k-means|| over all chunks
        (Bahmani et al. 2012), greedy k-means++ on a sample, distinct random
        rows, ``init(X, n_clusters, random_state=rng)`` returning centres, or
        explicit centres (in scaled units, see ``scale``; copied, never changed).
    n_init : "auto" or int, default="auto"
        Number of initialisations; the run with the lowest inertia is kept.
        "auto" is 10 for ``init="random"`` or a callable, else 1.
    max_iter : int, default=300
        Maximum Lloyd iterations.
    tol : float, default=1e-4
        Convergence tolerance on the sum of squared centre shifts, relative to
        the mean per-feature variance of the data (scikit-learn's definition).
        ``tol=0`` iterates until the centres stop moving.
    verbose : int, default=0
        Print the initialisation, every iteration's inertia and the
        convergence, as scikit-learn does.
    random_state : int, RandomState instance or None, default=None
    algorithm : {"lloyd"}, default="lloyd"
        The only one (Lloyd with Yinyang bounds); mini-batch K-Means is
        :class:`kmeans_dask.MiniBatchKMeans`.
    scale : "auto" or float, default="auto"
        Multiplier applied to rows inside the kernels: 1/255 for uint8 images
        (so pixels are in [0, 1]), 1 for other input.
    oversampling_factor : float, default=2.0
        k-means||: expected candidates per round, as a multiple of n_clusters.
    init_rounds : int, default=5
        k-means||: oversampling rounds.
    metric : {"euclidean", "cosine"}, default="euclidean"
        "cosine" is spherical K-Means (Spark's and FAISS's definition): rows
        are compared by cosine similarity and each centre is the mean of
        its rows scaled to norm 1.  It runs as the same engine on rows
        scaled to norm 1, where ``|x - c|^2 = 2 (1 - cos(x, c))``, so the
        bounds stay valid.  ``inertia_`` is then ``sum w (1 - cos(x, c))``,
        ``transform`` gives ``1 - cos`` and ``cluster_centers_`` have norm 1.
        All-zero rows count as orthogonal to every centre.

    Notes
    -----
    Every Lloyd iteration is one task per worker (``kmeans-lloyd`` on the
    dashboard) over the chunks that worker holds, with each chunk's labels
    and bounds kept on it between iterations (:mod:`kmeans_dask.engine`).
    Results are the same bit for bit on any number of workers.  Whether rows
    stay in worker memory and how they are cut into work are ``dask.config``
    keys (:mod:`kmeans_dask.config`), not parameters.  Without a Dask
    client, the same passes run in this process.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
        float32 for uint8 or float32 input, float64 otherwise.
    labels_ : ndarray or dask.array.Array of shape (n_samples,)
        int32 label of every row: NumPy for NumPy input, lazy and chunked
        like ``X`` for Dask input.
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
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Only for input with string column names (a DataFrame).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[1, 1], [1.5, 2], [8, 8], [8, 9]], dtype=np.float64)
    >>> km = KMeans(n_clusters=2, init="k-means++", random_state=0).fit(X)
    >>> sorted(km.cluster_centers_[:, 0].tolist())
    [1.25, 8.0]
    >>> km.labels_.tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
    True
    """

    _parameter_constraints = {
        "n_clusters": [Number(1, integer=True)],
        "init": [Options(tuple(INITS)), CALLABLE, ARRAY],
        "n_init": [Options(("auto",)), Number(1, integer=True)],
        "max_iter": [Number(1, integer=True)],
        "tol": [Number(0)],
        "verbose": [VERBOSE],
        "random_state": [RANDOM_STATE],
        "algorithm": [Options(ALGORITHMS)],
        "scale": [Options(("auto",)), Number(0, strict=True)],
        "oversampling_factor": [Number(0, strict=True)],
        "init_rounds": [Number(0, integer=True)],
        "metric": [Options(METRICS)],
    }

    def __init__(self, n_clusters=8, *, init="k-means||", n_init="auto", max_iter=300, tol=1e-4,
                 verbose=0, random_state=None, algorithm="lloyd", scale="auto",
                 oversampling_factor=2.0, init_rounds=5, metric="euclidean"):
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.verbose = verbose
        self.random_state = random_state
        self.algorithm = algorithm
        self.scale = scale
        self.oversampling_factor = oversampling_factor
        self.init_rounds = init_rounds
        self.metric = metric

    # ------------------------------------------------------------------ fit

    def fit(self, X, y=None, sample_weight=None, *, callback=None, checkpoint=None, resume=None):
        """Compute K-Means clustering.

        Parameters
        ----------
        X : dask.array.Array or array-like of shape (n_samples, n_features)
            Rows; a Dask array is chunked by rows only.  uint8, float32 and
            float64 are used as stored; other numbers become float64.
        y : Ignored
        sample_weight : array-like or dask array of shape (n_samples,), default=None
            Non-negative weight of every row.
        callback : callable, optional
            Called with each entry of ``history_`` as it is recorded (for
            progress bars).
        checkpoint : callable, optional
            Called after every iteration with the state needed to resume, a
            dict with ``iteration``, ``centers`` (the updated centres),
            ``init`` and ``history``.
        resume : dict, optional
            A state passed to ``checkpoint`` earlier: the fit skips the
            initialisation and continues from it, ending exactly where an
            uninterrupted fit would (``n_init=1`` only).

        Returns
        -------
        self : KMeans
        """
        self._validate_params()
        given = X
        X = self._check_X(X, reset=True)
        w = self._check_weights(sample_weight, X)
        n, d = X.shape
        self._check_n_samples(n)
        n_init = self._resolve_n_init()
        init = self.init
        if _params.ARRAY.accepts(init):
            init = self._init_array(init, d)
        if resume is not None:
            if n_init != 1:
                raise ValueError(f"resume needs n_init=1, got n_init={self.n_init}")
            if np.shape(resume["centers"]) != (self.n_clusters, d):
                raise ValueError(f"resume centres have shape {np.shape(resume['centers'])}, "
                                 f"expected ({self.n_clusters}, {d})")
        input_chunks = X.chunks[0]
        project = None
        if self.metric == "cosine":
            X, project = self._unit(X), _kernels.unit_centers
            if isinstance(init, np.ndarray):
                init = project(init)
        scale = self._effective_scale(X.dtype)
        persisted = _should_persist(X)
        source = None
        if persisted:
            source, w = _regroup(X, w, config.get("task-bytes"))
            X, w = _persist(source, w)
        else:
            # Streamed from its source each pass: keep the source's chunks, so a task
            # holds one chunk at a time and nothing waits in memory to be merged.
            log.info("rows not persisted (%.0f MiB): streaming them each pass", X.nbytes / 2**20)
        rows = ChunkedRows(X, w, scale=scale)
        start = time.perf_counter()
        stats = rows.stats()
        _check_stats(stats, rows)
        mean_var = float(np.mean(stats["sumsq"] / n - (stats["sum"] / n) ** 2))
        tol = self._tol = self.tol * mean_var
        rng = check_random_state(self.random_state)
        engine = Engine.create(rows, stats, persisted=persisted, source=source)
        try:
            best = None
            for run in range(n_init):
                if resume is not None:
                    centers = np.asarray(resume["init"], dtype=np.float64)
                    log.info("resuming after iteration %d", len(resume["history"]))
                else:
                    centers = self._initial_centers(init, given, rows, rng, run, n_init,
                                                    engine)
                    if project is not None:
                        centers = project(centers)
                if self.verbose:
                    print("Initialization complete")
                result = lloyd(rows, engine, centers, max_iter=self.max_iter, tol=tol,
                               verbose=self.verbose, callback=callback, checkpoint=checkpoint,
                               resume=resume, project=project)
                log.info("run %d/%d: inertia %.6g after %d iterations", run + 1, n_init,
                         result["inertia"], result["n_iter"])
                result["init"] = centers
                if best is None or result["inertia"] < best["inertia"]:
                    best = result
            # The final pass left every chunk's labels for the kept centres in its
            # state (for the last run; another run's are computed again).
            labels = engine.labels(best["centers"])
        finally:
            engine.close()
        distinct = self.n_clusters - best["stuck"]
        if best["stuck"]:
            warnings.warn(f"Number of distinct clusters ({distinct}) found smaller than "
                          f"n_clusters ({self.n_clusters}). Possibly due to duplicate points "
                          f"in X.", ConvergenceWarning, stacklevel=2)
        dtype = _kernels.compute_dtype(X.dtype)
        self.cluster_centers_ = best["centers"].astype(dtype)
        self.init_centers_ = best["init"]
        self.inertia_ = float(best["inertia"]) * self._inertia_factor()
        self.n_iter_ = best["n_iter"]
        self.n_steps_ = best["n_iter"]
        self.history_ = best["history"]
        self.scale_ = scale
        if labels.chunks[0] != input_chunks:
            labels = labels.rechunk((input_chunks,))
        self.labels_ = self._output(labels)
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def _initial_centers(self, init, given, rows: ChunkedRows, rng, run: int, n_init: int,
                         engine=None):
        t0 = time.perf_counter()
        if isinstance(init, np.ndarray):
            return init.copy()
        if callable(init):
            return self._called_init(given, rng)
        if init == "k-means||":
            centers = INITS[init](rows, self.n_clusters, rng,
                                  oversampling_factor=self.oversampling_factor,
                                  rounds=self.init_rounds, engine=engine)
        else:
            centers = INITS[init](rows, self.n_clusters, rng)
        log.info("init %s (run %d/%d): %.2f s", init, run + 1, n_init, time.perf_counter() - t0)
        return np.asarray(centers, dtype=np.float64)


# ---------------------------------------------------------------------- helpers


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


def _should_persist(X: da.Array) -> bool:
    """Keep the rows in worker memory: ``kmeans_dask.persist``, by default when they
    take at most half the cluster's memory (always without a cluster)."""
    setting = config.persist()
    if setting != "auto":
        return setting
    budget = _memory_budget()
    return budget is None or X.nbytes <= 0.5 * budget


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


def _relocated(rows: ChunkedRows, centers: np.ndarray, part: dict):
    """The sums and weights after moving each empty cluster to a far row.

    As in scikit-learn, an empty cluster takes one of the rows farthest from
    their current centre, and that row's weight leaves its old cluster; a
    centre never falls to the origin.  Only rows off their centre can seed
    a cluster: the last value returned is the number of empty clusters
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
    return sums, counts, int(empty.size), stuck


RECORD = ("iteration", "inertia", "center_shift", "seconds", "relocated", "changed", "skipped")


def lloyd(rows: ChunkedRows, engine: Engine, init, *, max_iter: int, tol: float, verbose=0,
          callback=None, checkpoint=None, resume=None, project=None) -> dict:
    """Lloyd iterations from ``init``, scikit-learn's ``_kmeans_single_lloyd`` for this engine.

    ``engine`` runs the iterations (:meth:`Engine.iterate`), ``rows`` the
    rare other passes (the farthest rows for an empty cluster, after which
    the engine's iterations start again from the moved centres); ``tol`` is
    absolute (already scaled by the data's variance).  The final pass, with
    the final centres, gives the inertia and leaves the labels in the
    engine's per-chunk states.  ``stuck`` in the result counts the clusters
    left empty because every row sits on a centre (fewer distinct rows than
    clusters).  ``project`` maps every new set of centres (spherical K-Means
    scales them to norm 1).
    """
    centers = np.asarray(init, dtype=np.float64)
    history = []
    if resume is not None:
        centers = np.asarray(resume["centers"], dtype=np.float64)
        history = [dict(h) for h in resume["history"]]
    stuck = 0
    final = bool(history) and (history[-1]["center_shift"] <= tol or len(history) >= max_iter)
    while True:
        t0 = time.perf_counter()
        for out in engine.iterate(centers, len(history) + 1, max_iter=max_iter, tol=tol,
                                  project=project, final=final,
                                  want_centers=checkpoint is not None):
            if out["kind"] == "end":
                # Inertia of the final centres, as scikit-learn reports it.
                return {"centers": out["centers"], "inertia": float(out["inertia"]),
                        "n_iter": len(history), "history": history, "stuck": stuck}
            if out["kind"] == "halt":
                sums, counts, relocated, stuck = _relocated(rows, out["centers"], out["part"])
                new, shift = next_centers(out["centers"], sums, counts, project)
                part, k = out["part"], len(new)
                out = {"iteration": out["iteration"], "inertia": float(part["inertia"]),
                       "center_shift": shift, "seconds": time.perf_counter() - t0,
                       "relocated": relocated, "changed": int(part["changed"]),
                       "skipped": max(0.0, 1.0 - part["pairs"] / max(1, part["rows"] * k)),
                       # Nothing can fill clusters left empty: more iterations would
                       # change nothing.
                       "centers": new, "final": bool(stuck) or shift <= tol
                       or out["iteration"] >= max_iter, "kind": "halt"}
                engine.publish(out, new, max_iter)
            record = {key: out[key] for key in RECORD}
            history.append(record)
            log.debug("iteration %d: inertia %.6g, shift %.3g", record["iteration"],
                      record["inertia"], record["center_shift"])
            if verbose:
                print(f"Iteration {record['iteration'] - 1}, inertia {record['inertia']}.")
                if out["final"] and record["center_shift"] <= tol:
                    shift = record["center_shift"]
                    print(f"Converged at iteration {record['iteration'] - 1}: strict convergence."
                          if shift == 0 else
                          f"Converged at iteration {record['iteration'] - 1}: center shift "
                          f"{shift} within tolerance {tol}.")
            if callback is not None:
                callback(record)
            if checkpoint is not None:
                checkpoint({"iteration": record["iteration"], "centers": out["centers"],
                            "init": init, "history": history})
            if out["kind"] == "halt":
                centers, final = out["centers"], out["final"]
                break
            t0 = time.perf_counter()
        else:
            raise RuntimeError("the engine's iterations stopped without a final pass")


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
         overwrite: bool = False, inputs=(), features: dict | None = None):
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
    features : dict, optional
        The feature transform the model was fitted after (``mean``,
        ``components``, ``scale``, ``explained_variance_ratio``), kept beside
        the centroids so that :func:`load` applies it again.

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
                              init=model.init_centers_, overwrite=overwrite, inputs=inputs,
                              features=features)


def load(path) -> KMeans:
    """A fitted :class:`KMeans` from a result store (no pickle: arrays and JSON only).

    ``labels_`` is the stored label array (lazy); ``predict``, ``transform``
    and ``score`` work as after ``fit``.  A result fitted on features
    (``--features pca:N``) comes back as a
    :class:`kmeans_dask.features.FeatureKMeans`, which applies them.

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
    if result.features is not None:
        from .features import FeatureKMeans, PCAFeatures

        f = result.features
        return FeatureKMeans(PCAFeatures.from_arrays(f["mean"], f["components"],
                                                     scale=f["scale"]), model)
    return model
