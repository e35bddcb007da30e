"""Mini-batch K-Means (Sculley 2010) with scikit-learn's semantics, many steps per round trip.

The estimator :class:`MiniBatchKMeans` follows scikit-learn's
``MiniBatchKMeans``: per-centre learning rates from accumulated weights,
random reassignment of low-weight centres every ``10 * n_clusters`` rows,
early stopping on the exponentially weighted average of the batch inertia
(``max_no_improvement``) or on the centre change (``tol``), ``init_size``,
``n_init``, ``partial_fit`` and ``compute_labels``.

How a fit is organised:

* the client draws the global row indices of the next ``R`` batches from the
  seeded random state (uniform, or in proportion to ``sample_weight``), so
  the batches do not depend on how many workers there are, nor on how
  many batches travel together;
* one ``compute`` per round trip fetches those rows, as stored, by one task
  per worker (persisted rows) or per run of chunks (streamed rows) holding
  some of them (each distinct row travels once), or reads streamed rows in
  this process beside a LocalCluster it started; ``R`` is
  set by the ``kmeans_dask.minibatch-*`` keys (:mod:`kmeans_dask.config`):
  small rounds for persisted rows, few large ones for streamed rows, each
  of which reads the chunks it samples from;
* the first round also brings every chunk's statistics (for ``tol``, the
  checks of the data, and the final inertia) and the samples the
  initialisation (k-means++ by default) runs on; rows that take at most one
  round come all at once instead, and everything after runs here;
* the sequential updates run here: per step one GEMM in the kernels' float
  type and one compiled pass for the argmin and per-centre sums
  (:func:`kmeans_dask._jit.fold_batch`);
* labels and inertia over all rows come from one pass of the engine Lloyd
  uses (:mod:`kmeans_dask.engine`): on the workers, or here for rows that
  came whole; skipped with ``compute_labels=False``.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import uuid
import warnings

import dask
import dask.array as da
import numpy as np
from sklearn.utils import check_random_state

from . import _jit, _kernels, config
from ._base import BaseKMeans
from ._params import ARRAY, BOOLEAN, CALLABLE, NONE, RANDOM_STATE, VERBOSE, Number, Options
from ._passes import ChunkedRows, task, total_stats
from ._pools import shared_pool
from .engine import Engine, LocalEngine, Source, load
from .init import INITS
from .kmeans import KMeans, _check_stats, _memory_budget, _persist

log = logging.getLogger(__name__)

MINIBATCH_INITS = ("k-means++", "random", "k-means||")
# k-means++ on at most this many bytes of row products keeps them all.
GRAM_BYTES = 64 * 2**20
# Chunks read by one task of a streamed round: enough that the scheduler's
# and the workers' few milliseconds per task stay small beside the reads,
# few enough that a round has several tasks per thread to balance and that
# rows start coming back early.
STREAM_CHUNKS_PER_TASK = 16


class MiniBatchKMeans(BaseKMeans):
    """Mini-batch K-Means of a Dask array of rows, as scikit-learn's MiniBatchKMeans.

    A drop-in for scikit-learn's ``MiniBatchKMeans`` on dense input: NumPy
    input gives NumPy results, Dask input lazy Dask results; uint8 rows are
    scaled by 1/255 (``scale="auto"``; ``scale=1`` gives scikit-learn's
    behaviour).

    Parameters
    ----------
    n_clusters : int, default=8
    init : {"k-means++", "random", "k-means||"}, callable or array-like of shape (n_clusters, n_features), default="k-means++"
        k-means++ (scikit-learn's) or distinct random rows, both on
        ``init_size`` sampled rows; k-means|| over all chunks (costly: a few
        passes over the data); ``init(X, n_clusters, random_state=rng)`` on
        the sampled rows; or explicit centres in scaled units (copied).
    max_iter : int, default=100
        Maximum passes over the data: at most ``max_iter * n_samples // batch_size`` steps.
    batch_size : int, default=1024
        Rows per mini-batch.
    verbose : int, default=0
        Print every step's batch inertia and the convergence, as scikit-learn does.
    compute_labels : bool, default=True
        Compute ``labels_`` and ``inertia_`` over all rows after the fit (one
        distributed pass); otherwise ``inertia_`` is the smoothed batch
        inertia times the total weight, and ``labels_`` is not set.
    random_state : int, RandomState instance or None, default=None
    tol : float, default=0.0
        Stop when the sum of squared centre changes of a step is at most
        ``tol`` times the mean per-feature variance of the data (0 disables).
    max_no_improvement : int or None, default=10
        Stop after this many steps without improvement of the smoothed batch
        inertia; None disables it.
    init_size : int or None, default=None
        Rows sampled for the initialisation: ``3 * batch_size`` by default
        (``3 * n_clusters`` if that is fewer than ``n_clusters``).
    n_init : "auto" or int, default="auto"
        Initialisations tried (each on its own sample), the one with the
        lowest inertia on a validation sample of ``init_size`` rows kept.
        "auto": 3 for ``init="random"``, else 1.
    reassignment_ratio : float, default=0.01
        Every ``10 * n_clusters`` rows, centres whose accumulated weight is
        below this fraction of the largest are moved to random rows of the batch.
    scale : "auto" or float, default="auto"
        Multiplier applied to rows: 1/255 for uint8 images, 1 for float input.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
        float32 for uint8 or float32 input, float64 for float64 input.
    labels_ : ndarray or dask.array.Array of shape (n_samples,)
        int32: NumPy for NumPy input, lazy and chunked like ``X`` for Dask
        input (``fit``); a NumPy array of the block's labels after ``partial_fit``.
    inertia_ : float
    n_iter_ : int
        Passes over the data, rounded up.
    n_steps_ : int
        Mini-batch steps run.
    history_ : list of dict
        Per step: ``iteration``, ``inertia`` (of the batch, per row, with the
        centres the step started from), ``center_shift``, ``seconds``,
        ``relocated`` (centres reassigned).
    init_centers_ : ndarray of shape (n_clusters, n_features)
        float64 initial centres of the fit.
    scale_ : float
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Only for input with string column names (a DataFrame).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[1, 1], [1.5, 2], [8, 8], [8, 9]], dtype=np.float64)
    >>> km = MiniBatchKMeans(n_clusters=2, batch_size=4, random_state=0).fit(X)
    >>> sorted(np.round(km.cluster_centers_[:, 0]).tolist())
    [1.0, 8.0]
    """

    _parameter_constraints = {
        "n_clusters": [Number(1, integer=True)],
        "init": [Options(MINIBATCH_INITS), CALLABLE, ARRAY],
        "max_iter": [Number(1, integer=True)],
        "batch_size": [Number(1, integer=True)],
        "verbose": [VERBOSE],
        "compute_labels": [BOOLEAN],
        "random_state": [RANDOM_STATE],
        "tol": [Number(0)],
        "max_no_improvement": [Number(0, integer=True), NONE],
        "init_size": [Number(1, integer=True), NONE],
        "n_init": [Options(("auto",)), Number(1, integer=True)],
        "reassignment_ratio": [Number(0)],
        "scale": [Options(("auto",)), Number(0, strict=True)],
    }
    _default_n_init = 3

    def __init__(self, n_clusters=8, *, init="k-means++", max_iter=100, batch_size=1024,
                 verbose=0, compute_labels=True, random_state=None, tol=0.0,
                 max_no_improvement=10, init_size=None, n_init="auto", reassignment_ratio=0.01,
                 scale="auto"):
        self.n_clusters = n_clusters
        self.init = init
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.verbose = verbose
        self.compute_labels = compute_labels
        self.random_state = random_state
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.init_size = init_size
        self.n_init = n_init
        self.reassignment_ratio = reassignment_ratio
        self.scale = scale

    def _check_params_vs_input(self, n: int):
        """scikit-learn's ``_check_params_vs_input``: batch size, init size, n_init."""
        self._check_n_samples(n)
        self._batch_size = min(self.batch_size, n)
        init_size = self.init_size
        if init_size is None:
            init_size = 3 * self._batch_size
            if init_size < self.n_clusters:
                init_size = 3 * self.n_clusters
        elif init_size < self.n_clusters:
            warnings.warn(f"init_size={init_size} should be larger than n_clusters="
                          f"{self.n_clusters}. Setting it to min(3*n_clusters, n_samples)",
                          RuntimeWarning, stacklevel=3)
            init_size = 3 * self.n_clusters
        self._init_size = min(init_size, n)
        self._resolve_n_init()

    def _random_reassign(self) -> bool:
        """scikit-learn's rule: every ``10 * n_clusters`` rows, or when a centre has no weight."""
        self._n_since_last_reassign += self._batch_size
        if (self._counts == 0).any() or self._n_since_last_reassign >= 10 * self.n_clusters:
            self._n_since_last_reassign = 0
            return True
        return False

    # ------------------------------------------------------------------ fit

    def fit(self, X, y=None, sample_weight=None, *, callback=None):
        """Compute the centres from mini-batches of ``X``.

        Parameters
        ----------
        X : dask.array.Array or array-like of shape (n_samples, n_features)
            Rows chunked by rows only; uint8, float32 or float64.
        y : Ignored
        sample_weight : array-like or dask array of shape (n_samples,), default=None
            Non-negative weights: batches (and the initialisation sample) are
            drawn in proportion to them, as in scikit-learn; the final inertia
            is weighted.
        callback : callable, optional
            Called with each entry of ``history_`` as it is recorded.

        Returns
        -------
        self : MiniBatchKMeans
        """
        self._validate_params()
        X = self._check_X(X, reset=True)
        w = self._check_weights(sample_weight, X)
        n, d = X.shape
        init = self._init_array(self.init, d) if ARRAY.accepts(self.init) else self.init
        self._check_params_vs_input(n)
        scale = self._effective_scale(X.dtype)
        input_chunks = X.chunks[0]
        start = time.perf_counter()
        mode = _Fetcher.mode_for(X)
        source = X
        if mode == "persisted":
            # Kept in the input's chunks: merging them (as Lloyd does, for its many
            # passes) costs about what one final pass saves by having fewer.
            X, w = _persist(X, w)
        elif mode == "streamed":
            log.info("rows not persisted (%.0f MiB): streaming them from their source",
                     X.nbytes / 2**20)
        rows = ChunkedRows(X, w, scale=scale)
        fetch = _Fetcher(rows, mode)
        stats = fetch.load() if mode == "whole" else None
        if mode == "whole":
            weights = fetch.weights
        else:
            weights = None if w is None else np.asarray(w.compute(), dtype=np.float64)
        master = check_random_state(self.random_state)
        seeds = master.randint(np.iinfo(np.int32).max, size=3)
        sampler = _Sampler(n, weights, np.random.RandomState(seeds[0]))
        init_rng = np.random.RandomState(seeds[1])
        reassign_rng = np.random.RandomState(seeds[2])
        dtype = _kernels.compute_dtype(X.dtype)
        b = self._batch_size
        n_steps = max(1, (self.max_iter * n) // b)
        per_round = max(1, fetch.round_bytes // (b * d * X.dtype.itemsize))
        log.info("mini-batch K=%d on %d rows (%s): at most %d steps of %d rows (max_iter=%d "
                 "passes), %d per round trip", self.n_clusters, n, mode, n_steps, b,
                 self.max_iter, per_round)

        # First round trip: every chunk's statistics (unless all rows came at
        # once), the validation and init samples, and the first batches.
        sizes = []
        if not isinstance(init, np.ndarray) and init != "k-means||":
            sizes = [self._init_size] * (1 + self._n_init)
        first = min(per_round, n_steps)
        idx = [sampler.draw(s) for s in sizes] + [sampler.draw(first * b)]
        got, first_stats = fetch.first(np.concatenate(idx))
        stats = stats if stats is not None else first_stats
        _check_stats(stats, rows)
        total = float(stats["w"])
        mean_var = float(np.mean(stats["sumsq"] / n - (stats["sum"] / n) ** 2))
        self._tol = self.tol * mean_var
        offsets = np.cumsum([0] + [len(i) for i in idx])
        samples = [got.rows(offsets[j], offsets[j + 1]) for j in range(len(sizes))]
        def engine():
            # The engine's pass over the rows where they are (here when they came whole).
            if mode == "whole":
                return fetch.local_engine(stats, input_chunks)
            return Engine.create(rows, stats, persisted=mode == "persisted",
                                 source=source if mode == "persisted" else None)

        centers = self._initial_centers(init, rows, samples, init_rng, scale, dtype, engine)
        self.init_centers_ = centers.copy()
        batches = got.window(offsets[-2], first * b)

        self._counts = np.zeros(self.n_clusters, dtype=np.float64)
        self._n_since_last_reassign = 0
        converged = _EarlyStop(n=n, batch_size=b, tol=self._tol,
                               max_no_improvement=self.max_no_improvement, n_steps=n_steps,
                               verbose=self.verbose)
        history = []
        step, pos, drawn = 0, 0, first
        ones = np.ones(b)
        # One batch's buffers, reused by every step.
        work = _kernels.Workspace()
        threads = config.minibatch_threads()
        batch = np.empty((b, d), dtype=X.dtype)

        def prefetch():
            more = min(per_round, n_steps - drawn)
            return (fetch.submit(sampler.draw(more * b)), more) if more > 0 else None

        pending = prefetch()
        while step < n_steps:
            if pos == len(batches) // b:
                handle, more = pending
                batches = fetch.result(handle)
                drawn += more
                pos = 0
                pending = prefetch()
            t0 = time.perf_counter()
            xb = batches.rows(pos * b, (pos + 1) * b, out=batch)
            pos += 1
            reassign = self._random_reassign()
            inertia, shift, relocated = _step(xb, ones, centers, self._counts, scale,
                                              reassign_rng, reassign, self.reassignment_ratio,
                                              work, threads)
            record = {"iteration": step + 1, "inertia": inertia / b, "center_shift": shift,
                      "seconds": time.perf_counter() - t0, "relocated": relocated}
            history.append(record)
            if callback is not None:
                callback(record)
            if self.verbose:
                print(f"Minibatch step {step + 1}/{n_steps}: mean batch inertia: "
                      f"{inertia / b}")
            stop = converged(step, shift, inertia)
            step += 1
            if stop:
                break
        if pending is not None:
            fetch.cancel(pending[0])
        self._centers = centers
        self.cluster_centers_ = centers.astype(dtype)
        self.n_steps_ = step
        self.n_iter_ = int(math.ceil(step * b / n))
        self.history_ = history
        self.scale_ = scale
        self.n_features_in_ = d
        self._ewa_inertia = converged.ewa
        log.info("mini-batch K=%d: %d steps (%d round trips of up to %d batches), %.2f s",
                 self.n_clusters, step, fetch.calls, per_round, time.perf_counter() - start)
        if self.compute_labels:
            # The Lloyd pass of the engine: inertia from its exact totals, and the
            # labels it leaves on the workers.
            final = self.cluster_centers_.astype(np.float64)
            eng = engine()
            try:
                self.inertia_ = float(eng.lloyd(final, iteration=0)["inertia"])
                labels = eng.labels(final)
            finally:
                eng.close()
            if labels.chunks[0] != input_chunks:
                labels = labels.rechunk((input_chunks,))
            self.labels_ = self._output(labels)
        else:
            smoothed = converged.ewa if converged.ewa is not None else history[-1]["inertia"]
            self.inertia_ = float(smoothed * total)
        self.fit_seconds_ = time.perf_counter() - start
        log.info("mini-batch K=%d: inertia %.6g, %.2f s with the final pass", self.n_clusters,
                 self.inertia_, self.fit_seconds_)
        return self

    def _initial_centers(self, init, rows: ChunkedRows, samples, rng, scale, dtype, engine):
        """The best of ``n_init`` initialisations on their samples (scikit-learn's procedure).

        ``samples`` holds the validation rows then one sample per init, as
        fetched (the sample already reflects the weights, so each row counts once).
        """
        if isinstance(init, np.ndarray):
            return init.copy()
        if init == "k-means||":
            eng = engine()
            try:
                return INITS[init](rows, self.n_clusters, rng, engine=eng)
            finally:
                eng.close()
        valid = samples[0]
        best, best_inertia = None, None
        for sample in samples[1:]:
            sample = _scaled(sample, scale, dtype)
            if callable(init):
                centers = self._called_init(sample, rng)
            else:
                centers = _init_block(init, sample, None, self.n_clusters, rng)
            _, dist = _assign(valid, centers, scale)
            inertia = float(dist.sum())
            if best_inertia is None or inertia < best_inertia:
                best, best_inertia = centers, inertia
        return np.asarray(best, dtype=np.float64)

    # ------------------------------------------------------------------ partial_fit

    def partial_fit(self, X, y=None, sample_weight=None):
        """One mini-batch step on the block ``X`` (NumPy or Dask), as scikit-learn's.

        The first call initialises the centres from this block (``init`` on
        ``init_size`` of its rows); the per-centre weights, the reassignment
        counter and the random state are kept between calls.  With
        ``compute_labels`` the block's labels and inertia are set.

        Returns
        -------
        self : MiniBatchKMeans
        """
        fitted = hasattr(self, "cluster_centers_")
        if not fitted:
            self._validate_params()
        X = self._check_X(X, reset=not fitted)
        w = self._check_weights(sample_weight, X)
        block = np.asarray(X.compute())
        weights = np.ones(block.shape[0]) if w is None else np.asarray(w.compute())
        if not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("sample_weight has negative or NaN values")
        if block.dtype != np.uint8 and not np.isfinite(block).all():
            raise ValueError("X contains NaN or infinity")
        self._random_state = getattr(self, "_random_state", check_random_state(self.random_state))
        self.n_steps_ = getattr(self, "n_steps_", 0)
        if not fitted:
            n, d = block.shape
            init = self._init_array(self.init, d) if ARRAY.accepts(self.init) else self.init
            self._check_params_vs_input(n)
            self.scale_ = self._effective_scale(block.dtype)
            x = _scaled(block, self.scale_, _kernels.compute_dtype(block.dtype))
            if self._init_size < n:
                pick = self._random_state.randint(0, n, self._init_size)
                x_init, w_init = x[pick], weights[pick]
            else:
                x_init, w_init = x, weights
            if isinstance(init, str) and init == "k-means||":
                rows = ChunkedRows(da.from_array(x_init, chunks=(len(x_init), -1)),
                                   da.from_array(w_init, chunks=len(w_init)), scale=1.0)
                stats = total_stats([_kernels.chunk_stats(x_init, w_init)])
                eng = LocalEngine(rows, stats, persisted=True, arrays=[(x_init, w_init)])
                try:
                    self._centers = INITS[init](rows, self.n_clusters, self._random_state,
                                                engine=eng)
                finally:
                    eng.close()
            elif callable(init):
                self._centers = self._called_init(x_init, self._random_state)
            elif isinstance(init, str):
                self._centers = _init_block(init, x_init, w_init, self.n_clusters,
                                            self._random_state)
            else:
                self._centers = init.copy()
            self.init_centers_ = self._centers.copy()
            self._counts = np.zeros(self.n_clusters, dtype=np.float64)
            self._n_since_last_reassign = 0
            self.history_ = []
        elif self._centers.dtype != np.float64:
            self._centers = self._centers.astype(np.float64)
        dtype = _kernels.compute_dtype(block.dtype)
        t0 = time.perf_counter()
        reassign = self._random_reassign()
        inertia, shift, relocated = _step(block, weights, self._centers, self._counts,
                                          self.scale_, self._random_state, reassign,
                                          self.reassignment_ratio,
                                          threads=config.minibatch_threads())
        self.cluster_centers_ = self._centers.astype(dtype)
        self.n_steps_ += 1
        self.history_.append({"iteration": self.n_steps_, "inertia": inertia / block.shape[0],
                              "center_shift": shift, "seconds": time.perf_counter() - t0,
                              "relocated": relocated})
        if self.compute_labels:
            labels, dist = _assign(block, self.cluster_centers_, self.scale_)
            self.labels_ = labels.astype(np.int32)
            self.inertia_ = float(dist @ weights)
        return self


# ---------------------------------------------------------------------- helpers


class _Sampler:
    """Global row indices, uniform or in proportion to the weights, by inversion.

    Drawing by inversion of the cumulative weights means integer weights
    draw exactly the rows that repeating each row that many times would.
    """

    def __init__(self, n: int, weights, rng):
        self.n, self.rng = n, rng
        self.cum = None if weights is None else np.cumsum(weights)

    def draw(self, size: int) -> np.ndarray:
        u = self.rng.random_sample(size)
        if self.cum is None:
            idx = (u * self.n).astype(np.int64)
        else:
            idx = np.searchsorted(self.cum, u * self.cum[-1], side="right")
        return np.minimum(idx, self.n - 1).astype(np.int64)


class _Round:
    """Rows of one round trip: ``data[positions[i]]`` is the i-th row drawn."""

    def __init__(self, data: np.ndarray, positions: np.ndarray):
        self.data, self.positions = data, positions

    def __len__(self) -> int:
        return len(self.positions)

    def rows(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """The rows drawn ``lo`` to ``hi``, as stored (into ``out`` if given)."""
        if out is None:
            return self.data[self.positions[lo:hi]]
        # mode="clip": with "raise", NumPy buffers the output instead of writing to it.
        return np.take(self.data, self.positions[lo:hi], axis=0, out=out[:hi - lo], mode="clip")

    def window(self, lo: int, size: int) -> _Round:
        return _Round(self.data, self.positions[lo:lo + size])


def _take_chunks(Xs, ws, locals_, *, stats: bool, scale: float) -> dict:
    """Rows of some chunks, as stored, one chunk after another: those at
    ``locals_[j]`` of chunk ``j`` (all of them, and their weights, for None).
    With ``stats``, each chunk's :func:`_kernels.chunk_stats` too, while it
    is in memory."""
    rows, weights, out = [], [], {}
    for X, w, local in zip(Xs, ws, locals_):
        rows.append(np.asarray(X) if local is None else np.take(X, local, axis=0))
        if local is None and w is not None:
            weights.append(np.asarray(w))
    # One chunk's rows as they came (a concatenation would copy them).
    out["rows"] = rows[0] if len(rows) == 1 else np.concatenate(rows)
    if weights:
        out["weights"] = weights[0] if len(weights) == 1 else np.concatenate(weights)
    if stats:
        out["stats"] = [_kernels.chunk_stats(X, w, scale=scale) for X, w in zip(Xs, ws)]
    return out


class _Fetcher:
    """Sampled rows, as stored, brought here one round trip at a time.

    ``mode`` is where the rows are (:meth:`mode_for`):

    * ``"whole"``: rows of at most one round come here all at once, with
      every chunk's statistics (:meth:`load`, which reads them here beside a
      LocalCluster of this process); the rounds then index them
      here, and the final pass runs here too (fewer bytes than sampling the
      rows again, and no persisted copy on the workers);
    * ``"persisted"``: the rows are in worker memory; every round is one
      ``compute`` of one :func:`_take_chunks` task per worker, over the
      chunks it holds (each distinct row travels once), the first with
      every chunk's statistics;
    * ``"streamed"``: one task per run of chunks, which reads them from their
      source one at a time and keeps only the sampled rows (no whole chunk
      waits in worker memory), in few large rounds (each reads every chunk
      it samples from); the rows come here as each task ends
      (:class:`_StreamedRound`), so the workers hold only the tasks in flight.
      Beside a LocalCluster of this process the same runs are read here
      instead (:class:`_LocalRound`).

    With a ``distributed`` client, :meth:`submit` starts the transfer and
    returns at once, so the next round's rows travel while this round's
    steps run; :meth:`result` waits for them.  Without one, the rows are
    computed when submitted.
    """

    def __init__(self, rows: ChunkedRows, mode: str):
        from .cluster import active_client

        self.rows, self.mode = rows, mode
        self.calls = 0
        self.blocks = rows.X.to_delayed().ravel()
        self.wblocks = (rows.weights.to_delayed().ravel() if rows.weights is not None
                        else [None] * len(self.blocks))
        self.take = task(_take_chunks)
        self.client = active_client()
        self.round_bytes = config.get("minibatch-stream-round-bytes" if mode == "streamed"
                                      else "minibatch-round-bytes")
        self.local = self.weights = None
        self.groups = None
        self.sources = None
        self.here = None  # streamed rows: threads reading them here (0: the workers read)

    @staticmethod
    def mode_for(X: da.Array) -> str:
        if X.nbytes <= config.get("minibatch-round-bytes"):
            return "whole"
        budget = _memory_budget()
        return "persisted" if budget is None or X.nbytes <= 0.5 * budget else "streamed"

    def _compute(self, parts):
        self.calls += 1
        if self.client is not None:
            return self.client.compute(parts)
        return dask.compute(*parts)

    def _gather(self, parts) -> list:
        return self.client.gather(parts) if self.client is not None else list(parts)

    def _groups(self) -> list:
        """``[(worker or None, [chunk index, ...])]``: one task per group per round.

        Persisted rows on a cluster: one group per worker, of the chunks it
        holds (a round of 800 one-chunk tasks cost the scheduler more than
        the steps).  Otherwise one chunk per group (streamed: each task
        reads its chunk).
        """
        n = len(self.blocks)
        if self.mode != "persisted" or self.client is None:
            return [(None, [i]) for i in range(n)]
        from distributed import wait

        from .engine import _chunk_futures, chunk_owners

        futures = _chunk_futures(self.rows.X)
        wait(futures)  # where the chunks are is known once they are there
        plan: dict = {}
        for i, addr in enumerate(chunk_owners(self.client, futures, self.rows.row_chunks)):
            plan.setdefault(addr, []).append(i)
        return [(addr or None, idx) for addr, idx in sorted(plan.items())]

    def _submit(self, indices: np.ndarray, stats: bool):
        if self.groups is None:
            self.groups = self._groups()
        offsets = self.rows.offsets
        uniq, inverse = np.unique(indices, return_inverse=True)
        chunk_of = np.searchsorted(offsets, uniq, side="right") - 1
        bounds = np.searchsorted(chunk_of, np.arange(len(offsets)))
        if self.mode == "streamed" and self.client is not None:
            self.calls += 1
            # The rows land in the order of ``uniq``: drawn row i is at inverse[i].
            if self.sources is None:
                # Made once per fit: each culls the chunk's graph.
                X, W = self.rows.X, self.rows.weights
                self.sources = ([Source(X.blocks[i]) for i in range(X.numblocks[0])],
                                None if W is None else [Source(W.blocks[i])
                                                        for i in range(W.numblocks[0])])
            if self.here is None:
                self.here = self.threads_here()
            if self.here:
                # The first round has nothing to overlap with: every thread reads
                # it.  Later ones are read while the steps run; one thread keeps
                # up with them and leaves the steps a core.
                round_ = _LocalRound(shared_pool("kmeans-dask-read", self.here), self.rows,
                                     self.sources, uniq, bounds, stats,
                                     threads=self.here if stats else 1)
            else:
                round_ = _StreamedRound(self.client, self.rows, self.sources, uniq, bounds,
                                        stats)
            return round_, inverse.ravel(), None
        parts, order = [], []
        for addr, idx in self.groups:
            idx = [i for i in idx if bounds[i + 1] > bounds[i] or stats]
            if not idx:
                continue
            # int32 within a chunk: half the bytes of the round's graph.
            local = [(uniq[bounds[i]:bounds[i + 1]] - offsets[i]).astype(np.int32) for i in idx]
            with dask.annotate(**({"workers": [addr], "allow_other_workers": True}
                                  if addr else {})):
                parts.append(self.take([self.blocks[i] for i in idx],
                                       [self.wblocks[i] for i in idx], local,
                                       stats=stats, scale=self.rows.scale))
            order.append((idx, [np.arange(bounds[i], bounds[i + 1]) for i in idx]))
        # The parts come in group order; map each drawn row to where it lands.
        at = np.concatenate([r for _, ranges in order for r in ranges]) if order else np.zeros(0)
        where = np.empty(len(uniq), dtype=np.intp)
        where[at.astype(np.intp)] = np.arange(len(at))
        chunks = [i for idx, _ in order for i in idx]
        return self._compute(parts), where[inverse.ravel()], chunks

    def threads_here(self) -> int:
        """Threads this process reads the rows on, or 0 where the workers read them
        (``kmeans_dask.minibatch-read-here``; "auto": when every worker is on this
        machine).  Rows held on the workers are always read there."""
        from .cluster import local_threads

        if self.client is None or _holds_futures(self.rows.X, self.rows.weights):
            return 0
        choice = config.minibatch_read_here()
        if choice is False:
            return 0
        threads = local_threads(self.client)
        if threads is None and choice is True:
            threads = config.usable_cores()
        return int(threads or 0)

    def load(self) -> dict:
        """All rows (and weights) here, in one round trip; their statistics.

        Where :meth:`threads_here` says so, the rows are read here: the same
        files and cores, without the rows' trip from the workers' memory to
        this one, which costs as much as the read.
        """
        parts = [self.take([x], [w], [None], stats=True, scale=self.rows.scale)
                 for x, w in zip(self.blocks, self.wblocks)]
        threads = self.threads_here()
        if threads:
            self.calls += 1
            parts = dask.compute(*parts, scheduler="threads", num_workers=threads)
        else:
            parts = self._gather(self._compute(parts))
        self.local = np.concatenate([p["rows"] for p in parts])
        if self.rows.weights is not None:
            self.weights = np.concatenate([p["weights"] for p in parts])
        return total_stats([st for p in parts for st in p["stats"]])

    def first(self, indices: np.ndarray):
        """The first round's rows, and the statistics of all rows (None once loaded)."""
        if self.local is not None:
            return _Round(self.local, indices), None
        parts, positions, chunks = self._submit(indices, stats=True)
        if isinstance(parts, _ROUNDS):
            data, per_chunk = parts.wait()
            return _Round(data, positions), total_stats(per_chunk)
        parts = self._gather(parts)
        data = np.concatenate([p["rows"] for p in parts])
        per_chunk = dict(zip(chunks, (st for p in parts for st in p["stats"])))
        return _Round(data, positions), total_stats([per_chunk[i] for i in sorted(per_chunk)])

    def submit(self, indices: np.ndarray):
        if self.local is not None:
            return None, indices
        parts, positions, _ = self._submit(indices, stats=False)
        return parts, positions

    def result(self, handle) -> _Round:
        parts, positions = handle
        if parts is None:
            return _Round(self.local, positions)
        if isinstance(parts, _ROUNDS):
            return _Round(parts.wait()[0], positions)
        return _Round(np.concatenate([p["rows"] for p in self._gather(parts)]), positions)

    def cancel(self, handle) -> None:
        if handle is None or handle[0] is None or self.client is None:
            return
        if isinstance(handle[0], _ROUNDS):
            handle[0].cancel()
        else:
            self.client.cancel(handle[0])

    def local_engine(self, stats: dict, chunks: tuple) -> LocalEngine:
        """The engine's pass over the loaded rows, in this process, in ``chunks``."""
        cuts = np.cumsum((0,) + tuple(chunks))
        arrays = [(self.local[a:b], None if self.weights is None else self.weights[a:b])
                  for a, b in zip(cuts[:-1], cuts[1:])]
        X = _views([x for x, _ in arrays])
        w = None if self.weights is None else _views([w for _, w in arrays])
        rows = ChunkedRows(X, w, scale=self.rows.scale, block_rows=self.rows.block_rows)
        return LocalEngine(rows, stats, persisted=True, arrays=arrays)


class _StreamedRound:
    """One round of sampled rows read from their source, by one task per run of
    :data:`STREAM_CHUNKS_PER_TASK` chunks, each reading its chunks one at a
    time and keeping the sampled rows.

    A task per chunk cost the scheduler and the workers about 4 ms each on
    top of a 10 ms read (810 chunks of MNIST8M a round); a task per run keeps
    that to a few per cent.  The chunks are :class:`kmeans_dask.engine.Source`
    objects, read inside the task, so no whole chunk waits in worker memory.
    A thread here collects each task's rows as it ends into one array, in the
    order of ``uniq``: the workers hold only what is in flight, and nothing is
    concatenated.  :meth:`wait` returns that array and the per-chunk
    statistics (with ``stats``, in chunk order).
    """

    def __init__(self, client, rows: ChunkedRows, sources: tuple, uniq: np.ndarray,
                 bounds: np.ndarray, stats: bool):
        from distributed import as_completed

        offsets = rows.offsets
        xs, ws = sources
        name = f"kmeans-minibatch-rows-{uuid.uuid4().hex[:12]}"
        n = len(offsets) - 1
        wanted = [i for i in range(n) if stats or bounds[i + 1] > bounds[i]]
        futures, self._slot = [], {}
        for j in range(0, len(wanted), STREAM_CHUNKS_PER_TASK):
            run = wanted[j:j + STREAM_CHUNKS_PER_TASK]
            locals_ = [(uniq[bounds[i]:bounds[i + 1]] - offsets[i]).astype(np.int32) for i in run]
            futures.append(client.submit(
                _take_sources, [xs[i] for i in run], None if ws is None else [ws[i] for i in run],
                locals_, stats=stats, scale=rows.scale, width=rows.d, dtype=rows.X.dtype,
                key=(name, j), pure=False))
            self._slot[(name, j)] = run
        self.data = np.empty((len(uniq), rows.d), dtype=rows.X.dtype)
        self.stats: dict = {}
        self.error: BaseException | None = None
        self.futures = futures
        self._done = threading.Event()

        def collect():
            try:
                # In batches of what has ended: one hand-over per batch between
                # the client's event loop and this thread, not one per task.
                for batch in as_completed(self.futures, with_results=True).batches():
                    for future, part in batch:
                        run = self._slot[future.key]
                        lo, hi = int(bounds[run[0]]), int(bounds[run[-1] + 1])
                        self.data[lo:hi] = part["rows"]
                        if stats:
                            self.stats.update(zip(run, part["stats"]))
                        future.release()
            except BaseException as exc:  # re-raised by wait(), in the fit's thread
                self.error = exc
                # The error's traceback holds the failed future: let the scheduler
                # forget the round now rather than when the error is dropped.
                for future in self.futures:
                    future.release()
            finally:
                self._done.set()

        self._thread = threading.Thread(target=collect, name="kmeans-dask-round", daemon=True)
        self._thread.start()

    def wait(self):
        self._done.wait()
        self._thread.join()
        self.futures = []
        if self.error is not None:
            raise self.error
        return self.data, [self.stats[i] for i in sorted(self.stats)]

    def cancel(self) -> None:
        for future in self.futures:
            future.cancel()
        self._done.wait()
        self._thread.join()


class _LocalRound:
    """One round of sampled rows read here, beside a LocalCluster this process
    started: the same files and cores its workers would use, without the rows'
    trip from the workers to this process over TCP, which cost this process
    more than reading them (on MNIST8M, about 4.6 s of socket reads a round of
    2.1 GB, against about 3.5 s to read, check and decode all 810 chunks).

    The same runs of chunks as :class:`_StreamedRound`, on ``threads`` threads
    of ``pool``; each writes its rows straight into :attr:`data`.
    """

    def __init__(self, pool, rows: ChunkedRows, sources: tuple, uniq: np.ndarray,
                 bounds: np.ndarray, stats: bool, threads: int):
        from concurrent.futures import wait

        self._wait_all = wait
        offsets = rows.offsets
        xs, ws = sources
        n = len(offsets) - 1
        wanted = [i for i in range(n) if stats or bounds[i + 1] > bounds[i]]
        self.data = np.empty((len(uniq), rows.d), dtype=rows.X.dtype)
        self.stats: dict = {}
        self._stop = threading.Event()

        def read(chunks):
            try:
                for i in chunks:
                    if self._stop.is_set():
                        return
                    lo, hi = int(bounds[i]), int(bounds[i + 1])
                    st = _read_sampled(xs[i], None if ws is None else ws[i],
                                       uniq[lo:hi] - offsets[i], self.data[lo:hi],
                                       stats=stats, scale=rows.scale)
                    if stats:
                        self.stats[i] = st
            except BaseException:
                self._stop.set()  # the other threads need not read on
                raise

        threads = max(1, min(int(threads), len(wanted)))
        # Contiguous shares: each thread reads its chunks in file order.
        cuts = [len(wanted) * t // threads for t in range(threads + 1)]
        self.futures = [pool.submit(read, wanted[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]

    def wait(self):
        for f in self.futures:
            f.result()
        return self.data, [self.stats[i] for i in sorted(self.stats)]

    def cancel(self) -> None:
        self._stop.set()
        self._wait_all(self.futures)


# What a streamed round's handle is, read on the workers or here.
_ROUNDS = (_StreamedRound, _LocalRound)


def _read_sampled(src, wsrc, local: np.ndarray, out: np.ndarray, *, stats: bool,
                  scale: float):
    """Read one chunk (a :class:`kmeans_dask.engine.Source` or an array) and put its
    rows at ``local`` into ``out``; with ``stats``, return the chunk's
    :func:`_kernels.chunk_stats` (``wsrc``: its weights) while it is in memory."""
    X = load(src)
    # mode="clip": with "raise", NumPy buffers the output instead of writing to it.
    np.take(X, local, axis=0, out=out, mode="clip")
    if stats:
        return _kernels.chunk_stats(X, None if wsrc is None else load(wsrc), scale=scale)
    return None


def _take_sources(xs: list, ws, locals_: list, *, stats: bool, scale: float, width: int,
                  dtype) -> dict:
    """A task: the rows at ``locals_[j]`` of chunk ``xs[j]`` (read here and dropped
    before the next, :func:`_read_sampled`), one chunk after another, into one
    array of rows of ``width`` values; with ``stats``, each chunk's statistics."""
    rows = np.empty((sum(len(v) for v in locals_), width), dtype=dtype)
    out = {"rows": rows, "stats": []}
    at = 0
    for j, (src, local) in enumerate(zip(xs, locals_)):
        if not stats and len(local) == 0:
            continue
        st = _read_sampled(src, None if ws is None else ws[j], local, rows[at:at + len(local)],
                           stats=stats, scale=scale)
        at += len(local)
        if stats:
            out["stats"].append(st)
    return out


def _views(blocks: list) -> da.Array:
    """The row blocks ``blocks`` (views of the loaded rows) as one Dask array.

    ``da.from_array`` copies a NumPy array before slicing it: a second copy
    of every loaded row (0.1 s at 70,000 MNIST rows), where the engine is
    given the blocks and reads them in place.
    """
    name = f"loaded-rows-{uuid.uuid4().hex}"
    tail = (0,) * (blocks[0].ndim - 1)
    graph = {(name, i) + tail: b for i, b in enumerate(blocks)}
    chunks = (tuple(len(b) for b in blocks),) + tuple((s,) for s in blocks[0].shape[1:])
    return da.Array(graph, name, chunks=chunks, dtype=blocks[0].dtype)


def _holds_futures(*arrays) -> bool:
    """Whether any of the Dask ``arrays`` refers to results held on a cluster."""
    from distributed import Future

    for a in arrays:
        if a is None:
            continue
        for v in dict(a.__dask_graph__()).values():
            if isinstance(v, Future) or isinstance(getattr(v, "value", None), Future):
                return True
    return False


def _scaled(x: np.ndarray, scale: float, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    out = np.asarray(x, dtype=dtype)
    return out * dtype.type(scale) if scale != 1.0 else out


def _init_block(init: str, x: np.ndarray, w, k: int, rng) -> np.ndarray:
    """k-means++ or random init on the scaled rows ``x`` (float64 result)."""
    if init == "k-means++":
        return _kmeans_plusplus(x, k, rng, w)
    p = None if w is None else w / w.sum()
    return x[rng.choice(x.shape[0], size=k, replace=False, p=p)].astype(np.float64)


def _kmeans_plusplus(x: np.ndarray, k: int, rng, w=None) -> np.ndarray:
    """scikit-learn's greedy k-means++ (``_kmeans_plusplus``: the same draws from
    ``rng``, ``2 + log k`` local trials), with the candidates' distances as one
    GEMM in the rows' own dtype: scikit-learn computes float32 distances by
    upcasting in chunks, which costs more than the whole mini-batch fit."""
    m = x.shape[0]
    w = np.ones(m) if w is None else np.asarray(w, dtype=np.float64)
    trials = 2 + int(np.log(k))
    xsq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    centers = np.empty((k, x.shape[1]), dtype=np.float64)

    gram = None
    if k * trials >= m // 4 and m * m * x.itemsize <= GRAM_BYTES:
        # Most rows will be candidates: all their products in one full-speed
        # GEMM cost less than the thin ones for each centre.
        gram = x @ x.T

    def dist_to(ids):
        g = (gram[ids] if gram is not None else (x @ x[ids].T).T).astype(np.float64)
        return np.maximum(xsq[ids, None] + xsq[None, :] - 2.0 * g, 0.0)

    # (m, d) @ (d, t) on one thread: the product is too thin to share.
    with _kernels.one_blas_thread():
        first = rng.choice(m, p=w / w.sum())
        centers[0] = x[first]
        closest = dist_to(np.array([first]))[0]
        pot = closest @ w
        for c in range(1, k):
            rand = rng.uniform(size=trials) * pot
            cand = np.searchsorted(np.cumsum(w * closest, dtype=np.float64), rand)
            np.clip(cand, None, m - 1, out=cand)
            d = dist_to(cand)
            np.minimum(closest, d, out=d)
            pots = d @ w
            best = int(np.argmin(pots))
            pot, closest = pots[best], d[best]
            centers[c] = x[cand[best]]
    return centers


def _assign(x: np.ndarray, centers: np.ndarray, scale: float):
    """Nearest centre and squared distance (float64) of every row of ``scale * x``,
    as a step computes them (:func:`_fold`)."""
    labels, dist, _, _ = _fold(x, np.ones(len(x)), centers, scale)
    return labels, dist


def _fold(xb, weights, centers, scale, work: _kernels.Workspace | None = None, threads=1):
    """Labels, squared distances, raw weighted per-centre sums and weights of the
    rows ``xb`` (as stored) against ``centers`` (float64, scaled units):
    :func:`kmeans_dask._kernels.fold_batch`."""
    return _kernels.fold_batch(xb, weights, centers, scale=scale, work=work, threads=threads)


def _step(xb, weights, centers, counts, scale, rng, reassign, ratio, work=None, threads=1):
    """One of scikit-learn's ``_mini_batch_step`` on the raw rows ``xb``; updates
    ``centers`` (float64, scaled units) and ``counts`` in place.

    Returns the batch's weighted inertia (with the centres before the
    update), the sum of squared centre changes, and the number of centres
    reassigned.
    """
    m = len(xb)
    _, dist, sums, wsum = _fold(xb, weights, centers, scale, work, threads)
    inertia = float(dist @ weights)
    shift = _jit.update_centers(centers, counts, sums, wsum, float(scale))
    relocated = 0
    if reassign and ratio > 0:
        low = counts < ratio * counts.max()
        if low.sum() > 0.5 * m:
            low[np.argsort(counts)[int(0.5 * m):]] = False
        relocated = int(low.sum())
        if relocated:
            pick = rng.choice(m, replace=False, size=relocated)
            old = centers[low]
            centers[low] = np.asarray(xb[pick], dtype=np.float64) * scale
            moved = centers[low] - old
            shift += float(np.einsum("ij,ij->", moved, moved))
            log.debug("reassigned %d centre(s) with low counts", relocated)
        counts[low] = np.min(counts[~low])
    return inertia, shift, relocated


class _EarlyStop:
    """scikit-learn's ``_mini_batch_convergence``: a small centre change (``tol``, absolute)
    or ``max_no_improvement`` steps without a lower smoothed batch inertia."""

    def __init__(self, *, n: int, batch_size: int, tol: float, max_no_improvement, n_steps: int,
                 verbose=0):
        self.batch_size, self.tol, self.max_no_improvement = batch_size, tol, max_no_improvement
        self.n_steps, self.verbose = n_steps, verbose
        self.alpha = min(batch_size * 2.0 / (n + 1), 1.0)
        self.ewa = self.min = None
        self.no_improvement = 0

    def __call__(self, step: int, shift: float, batch_inertia: float) -> bool:
        """After step ``step`` (from 0) with this centre change and summed batch inertia."""
        batch_inertia /= self.batch_size
        if step == 0:
            return False
        self.ewa = (batch_inertia if self.ewa is None
                    else self.ewa * (1 - self.alpha) + batch_inertia * self.alpha)
        if self.tol > 0.0 and shift <= self.tol:
            log.info("mini-batch converged at step %d: centre change %.3g", step + 1, shift)
            if self.verbose:
                print(f"Converged (small centers change) at step {step + 1}/{self.n_steps}")
            return True
        if self.min is None or self.ewa < self.min:
            self.no_improvement = 0
            self.min = self.ewa
        else:
            self.no_improvement += 1
        if self.max_no_improvement is not None and self.no_improvement >= self.max_no_improvement:
            log.info("mini-batch stopped at step %d: no improvement of the smoothed inertia in "
                     "%d steps", step + 1, self.no_improvement)
            if self.verbose:
                print(f"Converged (lack of improvement in inertia) at step "
                      f"{step + 1}/{self.n_steps}")
            return True
        return False


def make_estimator(params: dict):
    """A KMeans, or a MiniBatchKMeans for ``algorithm="minibatch"``, from job parameters
    (``features`` is the fit's, applied before: :func:`kmeans_dask.workflows.fit_store`)."""
    params = dict(params)
    params.pop("features", None)
    if params.get("algorithm") == "minibatch":
        params.pop("algorithm")
        return MiniBatchKMeans(**params)
    return KMeans(**params)
