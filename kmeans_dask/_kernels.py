"""Kernels on one block of rows: no Dask, no Zarr, nothing above.

NumPy and BLAS do the arithmetic; the per-row loops NumPy cannot express
without many passes are compiled (:mod:`kmeans_dask._jit`).

Every function here takes one chunk of the data (``X`` of shape (m, d), dtype
uint8, float32 or float64, plus optional per-row weights) and returns small
results: per-centre sums and weights, labels, distances, a few sampled rows.
The Dask graphs that call them live in :mod:`kmeans_dask._passes`; the
engine that keeps a :class:`ChunkState` per chunk on the workers between
Lloyd iterations, in :mod:`kmeans_dask.engine`.

Design notes (why, not what):

* A chunk is never converted to float as a whole.  Rows are converted in
  blocks of ``block_rows`` into buffers allocated once per call and reused
  with ``out=`` arguments: Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_`` so a
  large temporary allocated per block goes back to the OS every time, which
  measurably slows a kernel inside a worker.
* Distances keep ``-2 x.c + |c|^2`` only; ``|x|^2`` does not change which
  centre is nearest.  One GEMM per block gives all cross terms.
* One nearest-centre rule for every kernel (:class:`_Nearest`): the float32
  ranking decides when its error bound allows, exact float64 distances
  settle near ties.  A label is a function of the row and the centres only,
  which is what lets :func:`bounded_lloyd_chunk` skip rows and still equal
  :func:`lloyd_chunk` bit for bit.
* Per-centre sums cost O(m d), not O(m k d).  For unweighted uint8 data they
  are exact integers (one compiled pass, any order), scaled once at the end;
  otherwise rows are visited in label order and each centre's segment is
  gathered and summed block by block.
* Inertia is not summed from float32 distances (which lose digits to
  cancellation): it is ``sum w|x|^2 - sum_j (2 c_j.S_j - W_j |c_j|^2)`` in
  float64, with the chunk's ``sum w|x|^2`` computed once per fit.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np
from threadpoolctl import ThreadpoolController

from kmeans_dask import _jit, _native

DEFAULT_BLOCK_ROWS = 256
# Up to this many centres, a ranking's best two per row are found by a
# compiled per-row loop (much faster there); beyond, by NumPy's reductions.
NARROW = 64


def warm_up(dtype) -> None:
    """Compile the bounded pass's loops for rows of ``dtype`` ahead of the first pass
    (and, for uint8 rows, build the integer-tile ranking where the CPU has it)."""
    _jit.warm_up(dtype, compute_dtype(dtype))
    if np.dtype(dtype) == np.uint8:
        _native.available()


@functools.lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
    # The compiled loops' GEMMs (Numba's np.dot) go through SciPy's BLAS, a
    # library of its own that is loaded only when they first run.  A controller
    # made before that would not see it, and those GEMMs would run on every
    # core beside the pass's other threads: load it first.
    import scipy.linalg.cython_blas  # noqa: F401

    return ThreadpoolController()


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter = None


@contextlib.contextmanager
def one_blas_thread():
    """A context in which BLAS runs on one thread, for loops that are either
    too thin to share or run on threads of their own.  The loaded libraries
    are looked up once per process (``threadpool_limits`` does it per call,
    milliseconds each).

    The limit is the process's, and contexts of several threads overlap (the
    workers of an in-process cluster): the first to enter sets it and the
    last to leave restores the original, which a limiter per context would
    not do (the second would save the first's limit and restore that).
    """
    global _blas_users, _blas_limiter
    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = _blas().limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


class Workspace:
    """Scratch arrays one thread's kernel calls reuse, and the centres their pass shares.

    Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_``, which also turns off
    glibc's adaptive mmap threshold: every array of more than 128 KiB a
    kernel allocates is then mapped afresh and page-faulted in, call after
    call, which costs a worker about a quarter of a bounded pass.  A
    workspace hands out views of buffers that only ever grow, so a thread's
    passes over many chunks allocate once.  One per thread: the views of
    one call must not be handed to another running at the same time.

    It also keeps what the last pass prepared from its centres (their
    groups, :class:`_Nearest`, moves and separations), so that the chunks
    of one pass, which share one centres array (``keep_centers``), prepare
    it once.
    """

    def __init__(self):
        self._buffers: dict = {}
        self._memo: dict = {}  # name -> (objects, key, value)

    def take(self, name: str, shape, dtype) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype``, valid until ``name`` is taken again."""
        shape = (shape,) if np.ndim(shape) == 0 else tuple(int(v) for v in shape)
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64))
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.size < size:
            # Grown with headroom: chunks of a pass differ a little in size.
            buf = np.empty(max(size, int(1.25 * (0 if buf is None else buf.size))), dtype=dtype)
            self._buffers[(name, dtype)] = buf
        return buf[:size].reshape(shape)

    def memo(self, name: str, objects: tuple, key, make):
        """``make()``, reused while the same ``objects`` (by identity) and ``key`` come back."""
        got = self._memo.get(name)
        if (got is None or len(got[0]) != len(objects) or got[1] != key
                or any(a is not b for a, b in zip(got[0], objects))):
            got = self._memo[name] = (objects, key, make())
        return got[2]


class Workspaces(threading.local):
    """One :class:`Workspace` per thread (``.work``), for the owner of a thread pool."""

    def __init__(self):
        self.work = Workspace()


def compute_dtype(dtype) -> np.dtype:
    """The floating type the kernels compute in for input of ``dtype``."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows divided by their Euclidean norm, in the compute dtype (zero rows stay zero).

    Spherical K-Means is Euclidean K-Means on these rows with unit centres:
    ``|x - c|^2 = 2 (1 - cos(x, c))`` when both have norm 1.
    """
    x = X.astype(compute_dtype(X.dtype))
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    norms[norms == 0] = 1.0
    x /= norms.astype(x.dtype)[:, None]
    return x


def unit_centers(centers: np.ndarray) -> np.ndarray:
    """Centres scaled to norm 1 (a zero centre, which no unit row can average to, stays)."""
    norms = np.linalg.norm(centers, axis=1, keepdims=True)
    return np.divide(centers, norms, out=np.array(centers, dtype=np.float64), where=norms > 0)


class _Blocks:
    """Row blocks of ``X`` converted to a float dtype into one reused buffer.

    With ``scale == 1`` a block is only cast (``np.copyto``, about twice as
    fast as a cast-and-multiply); kernels that can fold the scale into the
    centres instead do so.
    """

    def __init__(self, X: np.ndarray, scale: float, block_rows: int, dtype=None):
        self.X = X
        self.dtype = compute_dtype(X.dtype) if dtype is None else np.dtype(dtype)
        self.scale = self.dtype.type(scale)
        self.block_rows = max(1, int(block_rows))
        # Float input at scale 1 is used in place; anything else is converted.
        self.copy = X.dtype != self.dtype or scale != 1.0
        rows = min(self.block_rows, X.shape[0]) if self.copy else 0
        self.buf = np.empty((rows, X.shape[1]), dtype=self.dtype)

    def __iter__(self):
        m = self.X.shape[0]
        for start in range(0, m, self.block_rows):
            stop = min(start + self.block_rows, m)
            if not self.copy:
                x = self.X[start:stop]
            elif self.scale == 1:
                x = self.buf[: stop - start]
                np.copyto(x, self.X[start:stop], casting="unsafe")
            else:
                x = self.buf[: stop - start]
                np.multiply(self.X[start:stop], self.scale, out=x, casting="unsafe")
            yield start, stop, x


def _prepared_centers(centers: np.ndarray, dtype: np.dtype, scale: float = 1.0):
    """``-2 scale c`` transposed for the GEMM on unscaled rows, and ``|c|^2``.

    Folding the scale into the centres lets the kernels cast raw rows
    without multiplying them: ``x_scaled . c = x_raw . (scale c)``.
    """
    c = np.asarray(centers, dtype=np.float64)
    neg2_t = np.ascontiguousarray((-2.0 * scale * c).T, dtype=dtype)
    sq = np.einsum("ij,ij->i", c, c).astype(dtype)
    return neg2_t, sq


class _Nearest:
    """The nearest-centre rule every kernel uses, prepared once per set of centres.

    A float32 GEMM (``-2 x.c + |c|^2``) ranks the centres.  Its error on a
    squared distance is at most ``E = kappa (2 xmax max_j |c_j|_1 + max_j |c_j|^2)``
    with ``kappa = 2 (d + 4) u`` (twice the worst case of a d-term dot
    product, u the unit roundoff, ``xmax`` the largest scaled |value|).
    When a row's two smallest values are within ``2 E`` the ranking cannot be
    trusted, and the candidates within ``2 E`` are compared again by their
    float64 distances, computed row by row.  The label therefore depends only
    on the row and the centres, never on which other rows share its block: a
    row gets the same label in a full pass, in a bounded pass that recomputes
    a few rows, and after a lost chunk is recomputed on another worker.
    """

    def __init__(self, centers: np.ndarray, dtype, scale: float, xmax: float, order=None,
                 work: Workspace | None = None):
        # ``order`` lists the centres in the order the ranked columns use (the
        # bounded kernel keeps centre groups contiguous); labels are always
        # returned as indices into ``centers``.  Scratch arrays come from ``work``.
        self.work = Workspace() if work is None else work
        centers = np.asarray(centers, dtype=np.float64)
        self.order = None if order is None else np.asarray(order, dtype=np.intp)
        self.c = centers if self.order is None else centers[self.order]
        k, d = self.c.shape
        self.dtype = np.dtype(dtype)
        self.scale = float(scale)
        self.neg2_t, self.csq = _prepared_centers(self.c, self.dtype, scale)
        self._neg2 = None
        self.kappa = (d + 4) * (np.finfo(self.dtype).eps / 2) * 1.01
        if k:
            l1 = float(np.abs(self.c).sum(axis=1).max())
            self.cmax2 = float(np.einsum("ij,ij->i", self.c, self.c).max())
        else:
            l1 = self.cmax2 = 0.0
        self.err = self.kappa * (2.0 * float(xmax) * l1 + self.cmax2) + 1e-300
        self.tiled = k <= TILED_MAX

    @property
    def neg2(self) -> np.ndarray:
        """``neg2_t`` as (k, d), C-contiguous: each centre's values side by side."""
        if self._neg2 is None:
            self._neg2 = np.ascontiguousarray(self.neg2_t.T)
        return self._neg2

    def row_error(self, xsq: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """A tighter ``E`` per row from its ``|x|^2`` (Cauchy-Schwarz instead of ``xmax``)."""
        # In place, one array: this runs on every row of every chunk each pass.
        out = np.multiply(xsq, 1 + 1e-9, out=out)
        np.sqrt(out, out=out)
        out *= 2.0 * self.kappa * np.sqrt(self.cmax2)
        out += self.kappa * self.cmax2 + 1e-300
        return np.minimum(out, self.err, out=out)

    def rank(self, X: np.ndarray, rows, g: np.ndarray) -> None:
        """Ranked values ``-2 x.c + |c|^2`` of the rows ``X[rows]`` into ``g``.

        ``rows`` is an index array or a slice of consecutive rows; the rows
        are read as stored and converted here.  Up to :data:`TILED_MAX`
        centres a compiled tiled loop ranks them, otherwise a GEMM.
        """
        if isinstance(rows, slice):
            if not self.tiled and X.dtype == self.dtype:
                np.dot(X[rows], self.neg2_t, out=g)  # float rows are ranked in place
                g += self.csq
                return
            rows = np.arange(rows.start, rows.stop)
        # The tiled loop converts four rows at a time, the GEMM a whole block.
        need = 4 if self.tiled else g.shape[0]
        x = self.work.take("nearest-rows", (need, self.c.shape[1]), self.dtype)
        if self.tiled:
            _jit.rank_rows(X, rows, self.neg2, self.csq, x, g)
        else:
            _jit.gather(X, rows, x)
            np.dot(x, self.neg2_t, out=g)
            g += self.csq

    def block(self, X: np.ndarray, start: int, stop: int, labels: np.ndarray) -> None:
        """Label the consecutive rows ``X[start:stop]`` into ``labels``."""
        g = self.work.take("nearest-block", (stop - start, self.c.shape[0]), self.dtype)
        self.rank(X, slice(start, stop), g)
        self.decide(g, X[start:stop], labels)

    def decide(self, g: np.ndarray, raw: np.ndarray, labels: np.ndarray,
               xsq=None, upper2=None, err=None) -> np.ndarray:
        """Labels from ranked values ``g`` (``-2 x.c + |c|^2``; ``inf`` where not computed).

        Centres left at ``inf`` must be provably farther than the nearest
        by more than ``4 E``.  ``err`` is ``E`` per row (default: the
        block-wide bound).  ``labels`` receives indices into the centres.

        Returns
        -------
        pos : the chosen columns of ``g``
        ranked : the columns the float32 ranking chose (``pos`` differs where
            an exact comparison overruled it)
        best, second : float64 smallest and second smallest ranked values
        """
        err = self.err if err is None else err
        b, k = g.shape
        if k <= NARROW:
            pos, best64, second = np.empty(b, dtype=np.intp), np.empty(b), np.empty(b)
            _jit.best_two(g, pos, best64, second)
        else:
            # NumPy's reductions are vectorised, which a per-row loop is not.
            pos = np.argmin(g, axis=1)
            at = pos[:, None]
            best = np.take_along_axis(g, at, axis=1)[:, 0]
            # The second smallest, without a (b, k) temporary: blank the best
            # out in place, take the minimum, put it back.
            np.put_along_axis(g, at, np.inf, axis=1)
            second = g.min(axis=1).astype(np.float64)
            np.put_along_axis(g, at, best[:, None], axis=1)
            best64 = best.astype(np.float64)
        if upper2 is not None:
            np.add(best64, xsq + err, out=upper2)
        amb = np.flatnonzero(second - best64 <= 2.0 * err)
        ranked = pos
        if amb.size:
            ranked = pos.copy()
            self._refine(g, raw, amb, best64, pos, upper2,
                         err if np.ndim(err) == 0 else err[amb])
        labels[:] = pos if self.order is None else self.order[pos]
        return pos, ranked, best64, second

    def _refine(self, g, raw, amb, best, pos, upper2, err):
        xs = np.ascontiguousarray(raw[amb])  # as stored: the few rows in a near tie
        cand, exact = _exact_nearest(g[amb], xs, best[amb], err, self.c, self.scale, self.work,
                                     index=self.order)
        pos[amb] = cand
        if upper2 is not None:
            upper2[amb] = exact * (1 + 1e-12) + 1e-300


def _exact_nearest(g, xs, best, err, centers, scale, work, index=None):
    """The nearest centre of each row of ``xs`` in a near tie, by exact float64 distances.

    ``g`` holds the rows' ranked values (one row each, a column per centre of
    ``centers``), ``best`` their smallest and ``err`` their ``E``.  The
    candidates are every column within ``2 E`` of the best: the true nearest
    centre is always among them.  Ties go to the lower centre index
    (``index[column]``, or the column).  Returns the chosen columns and their
    exact squared distances.
    """
    # Widened by a float32 ulp or so: the limit itself is rounded.
    limit = (best + 2.0 * err * 1.001 + np.abs(best) * 1e-6).astype(g.dtype)
    rows, cand = np.nonzero(g <= limit[:, None])
    exact = work.take("refine-exact", rows.size, np.float64)
    _jit.pair_sqdist(xs, rows, centers, cand, float(scale), exact)
    order = np.lexsort((cand if index is None else index[cand], exact, rows))
    sorted_rows = rows[order]
    first = np.flatnonzero(np.concatenate(([True], sorted_rows[1:] != sorted_rows[:-1])))
    pick = order[first]
    return cand[pick], exact[pick]


def _xmax(X: np.ndarray, scale: float) -> float:
    """Largest scaled absolute value a chunk can hold (its dtype's range for integers)."""
    if X.dtype.kind in "ui":
        info = np.iinfo(X.dtype)
        return max(abs(int(info.min)), int(info.max)) * abs(scale)
    if X.size == 0:
        return 0.0
    return max(abs(float(X.max())), abs(float(X.min()))) * abs(scale)


def _row_sqnorms(X: np.ndarray, scale: float, block_rows: int) -> np.ndarray:
    """Scaled ``|x|^2`` of every row, float64 (exact sums for integer rows)."""
    out = np.empty(X.shape[0], dtype=np.float64)
    if _is_exact(X):
        # The same exact sums as the float64 form below, without converting the rows.
        _jit.integer_sqnorms(X, out)
        out *= scale * scale
        return out
    wide = np.empty((min(block_rows, X.shape[0]), X.shape[1]), dtype=np.float64)
    for start in range(0, X.shape[0], block_rows):
        stop = min(start + block_rows, X.shape[0])
        f = wide[: stop - start]
        np.copyto(f, X[start:stop], casting="unsafe")
        np.einsum("ij,ij->i", f, f, out=out[start:stop])
    out *= scale * scale
    return out


def _native_prepared(c, scale, d, work, keep_centers=False):
    """The centres made ready for the integer ranking; with ``keep_centers`` made once
    per set of centres in ``work`` (the chunks of a pass share them)."""

    def prepare():
        return _native.Prepared(c, scale, d)

    return work.memo("native", (c,), (scale, d), prepare) if keep_centers else prepare()


# Above this many centres the first int8 level alone ranks (where the kernel
# allows, see kmeans_dask._native.rank): with one group of 16 centres the
# refinement costs what the second level saves.
ONE_LEVEL_MIN_K = 16


def _native_labels(X, centers, scale, xsq, labels, work, rows=None, prep=None, threads=1):
    """Labels of uint8 rows by the integer ranking (:mod:`kmeans_dask._native`).

    ``prep``: the centres as :func:`_native_prepared` makes them (made here
    if not given).  ``threads``: for :func:`kmeans_dask._native.rank`.
    ``rows``: the rows to label (an index array; ``labels`` and ``xsq`` are
    then theirs), or None for all.  Rows whose two best ranked values are
    within ``2 E`` of each other are settled by the exact comparison
    :class:`_Nearest` uses too (:func:`_exact_nearest`), so the labels are the
    ones the float32 path gives.

    Returns ``(best, second, err, settled)`` per row (the two smallest ranked
    values, their ``E``, and the positions of the rows the exact comparison
    or the float32 path settled), or None where the centres cannot be ranked
    on integers and the float32 path labelled every row.
    """
    m, d = X.shape
    c = np.asarray(centers, dtype=np.float64)
    if prep is None:
        prep = _native_prepared(c, scale, d, work)
    if not prep.usable:
        sub = X if rows is None else np.ascontiguousarray(X[rows])
        _float32_labels(sub, c, scale, BOUNDED_BLOCK_ROWS, labels, work)
        return None
    n = m if rows is None else rows.size
    out = (work.take("native-pos", n, np.int64), work.take("native-best", n, np.float64),
           work.take("native-second", n, np.float64))
    err = prep.row_error(xsq, out=work.take("native-err", n, np.float64))
    bounds = None
    if c.shape[0] > ONE_LEVEL_MIN_K:
        bounds = (prep.first_level_error(xsq, out=work.take("native-err1", n, np.float64)), err)
    pos, best, second = _native.rank(X, rows, prep, out=out, threads=threads, bounds=bounds)
    labels[:] = pos
    # A NaN gap (never expected from finite centres) goes to the exact rule too.
    amb = work.take("native-ties-rows", n, np.intp)
    amb = amb[:_jit.near_ties(best, second, err, amb)]
    settled = amb
    if amb.size == 0:
        return best, second, err, settled

    def where(i):  # positions among the ranked rows -> rows of X
        return i if rows is None else rows[i]

    # Their values against every centre, from the same kernel, and the exact
    # comparison of the candidates (no float32 copy of the centres to make).
    odd = ~np.isfinite(best[amb])
    if odd.any():  # no finite value to take candidates from: the float32 path's rule
        sub = np.empty(int(odd.sum()), dtype=labels.dtype)
        _float32_labels(np.ascontiguousarray(X[where(amb[odd])]), c, scale, BOUNDED_BLOCK_ROWS,
                        sub, work)
        labels[amb[odd]] = sub
        amb = amb[~odd]
        if amb.size == 0:
            return best, second, err, settled
    g = work.take("native-ties", (amb.size, c.shape[0]), np.float32)
    _native.rank(X, where(amb), prep, g=g, fold=False)
    xs = np.ascontiguousarray(X[where(amb)])
    labels[amb], _ = _exact_nearest(g, xs, best[amb], err[amb], c, scale, work)
    return best, second, err, settled


def _native_bounded(X, st: ChunkState, c, scale, work, keep_centers):
    """Hamerly's bounds around the integer ranking: re-rank only the rows they leave open.

    Each row keeps an upper bound on its distance to its centre and a lower
    bound on its distance to every other centre (``st.upper``,
    ``st.native_lower``), set from the ranked values less or plus their
    ``E``.  As the centres move, the upper bound grows by its centre's move
    and the lower bound shrinks by the largest move of another centre.  A row
    is left alone while the two squared bounds stay more than ``4 E`` apart
    (the margin the float32 path's bounds keep, so the shared rule would pick
    the same centre); every other row is ranked whole again.  Rows settled by
    the exact comparison get no bounds and are ranked every pass.

    Returns what :func:`_rank_open` returns, or None where the centres cannot
    be ranked on integers (the state is then reset for the float32 path).
    """
    m, d = X.shape
    k = c.shape[0]
    st.lower = None  # the float32 path's group bounds are not kept up to date here
    prep = _native_prepared(c, scale, d, work, keep_centers)
    if not prep.usable:
        st.reset()
        return None
    # Scratch from the workspace, filled in place: a pass over every row must not
    # map fresh arrays (see Workspace).
    todo = work.take("native-todo", m, np.intp)
    if st.centers is None or st.centers.shape != c.shape or st.native_lower is None:
        st.reset()
        st.native_lower = np.zeros(m)
        todo[:] = np.arange(m)
    else:
        last = st.centers
        move = (work.memo("move", (last, c), None, lambda: _movement(last, c))
                if keep_centers else _movement(last, c))
        top = int(np.argmax(move))
        runner = float(np.max(move[np.arange(k) != top])) if k > 1 else 0.0
        # The margin uses this pass's E, which the shared rule uses too.
        err = prep.row_error(st.xsq, out=work.take("native-row-error", m, np.float64))
        todo = todo[:_jit.hamerly_open(st.labels, st.upper, st.native_lower, move, top,
                                       float(move[top]), runner, err, todo)]
    old = st.labels[todo]
    lab = work.take("native-labels", todo.size, np.intp)
    xsq = np.take(st.xsq, todo, out=work.take("native-xsq", todo.size, np.float64))
    best, second, err, settled = _native_labels(X, c, scale, xsq, lab, work, rows=todo,
                                                prep=prep)
    st.labels[todo] = lab
    # Rounded outwards: a bound moved by too little would no longer be a bound.
    _jit.hamerly_set(todo, st.xsq, best, second, err, st.upper, st.native_lower)
    st.upper[todo[settled]] = np.inf
    st.native_lower[todo[settled]] = 0.0
    return todo, old, todo.size, todo.size * k


def _native_rows(X) -> bool:
    return (X.dtype == np.uint8 and X.shape[0] > 0 and 0 < X.shape[1] <= _native.MAX_D
            and _native.available())


def _float32_labels(X, centers, scale, step, labels, work=None):
    """Labels of every row by :class:`_Nearest`'s float32 ranking, ``step`` rows at a time."""
    near = _Nearest(centers, compute_dtype(X.dtype), scale, _xmax(X, scale), work=work)
    for start in range(0, X.shape[0], step):
        stop = min(start + step, X.shape[0])
        near.block(X, start, stop, labels[start:stop])


def _assign(X, centers, scale, block_rows, labels, min_dist=None, work=None, threads=1):
    """Fill ``labels`` (and, if given, ``min_dist`` = squared distance to the nearest centre);
    ``threads``: threads the integer ranking may use."""
    step = max(1, int(block_rows))
    if _native_rows(X):
        _native_labels(X, centers, scale, _row_sqnorms(X, scale, step), labels,
                       Workspace() if work is None else work, threads=threads)
    else:
        _float32_labels(X, centers, scale, step, labels, work)
    if min_dist is not None:
        # Exact float64 distances to the chosen centres, row by row.
        _jit.exact_sqdist(X, labels, np.asarray(centers, dtype=np.float64), float(scale),
                          min_dist)


def _check_chunk(X, weights):
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D block of rows, got shape {X.shape}")
    if weights is not None and weights.shape != (X.shape[0],):
        raise ValueError(f"weights of shape {weights.shape} do not match {X.shape[0]} rows")


def _check_finite(X):
    """Rows to label must be finite, as the rows to fit and score are (uint8 always is)."""
    if X.dtype.kind == "f" and X.size and not np.isfinite(X).all():
        first = int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0])
        raise ValueError(f"X contains NaN or infinity (row {first} of a chunk of {X.shape[0]})")


def chunk_stats(X: np.ndarray, weights=None, *, scale: float = 1.0,
                block_rows: int = DEFAULT_BLOCK_ROWS) -> dict:
    """One-time statistics of a chunk, combined across chunks by addition.

    Returns
    -------
    dict
        ``n`` rows, ``w`` total weight, ``sum`` and ``sumsq`` (d,) unweighted
        per-feature sums of x and x^2 (for the tolerance, as scikit-learn
        scales it by the unweighted variance), ``sqnorm`` the weighted
        ``sum w |x|^2`` (for inertia), ``absmax`` the largest scaled
        ``|x|`` (bounds every sum, :mod:`kmeans_dask.engine`), and ``bad`` the number of non-finite
        values (float input only) and ``negative`` the number of negative
        weights.  Integer rows also give ``raw``: the exact integer sums
        (and, unweighted, ``sum |x|^2``) with the scale.
    """
    _check_chunk(X, weights)
    m, d = X.shape
    out = {"n": m, "w": 0.0, "sum": np.zeros(d), "sumsq": np.zeros(d), "sqnorm": 0.0,
           "absmax": 0.0, "bad": 0, "negative": 0}
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        out["negative"] = int(np.count_nonzero(~(weights >= 0)))
        out["w"] = float(weights.sum())
    else:
        out["w"] = float(m)
    if m == 0:
        if X.dtype.kind == "u":
            out["raw"] = {"sum": np.zeros(d, dtype=np.int64), "sumsq": np.zeros(d, dtype=np.int64),
                          "scale": float(scale), "sqnorm": 0 if weights is None else None}
        return out
    if X.dtype.kind == "f":
        out["bad"] = int(m * d - np.count_nonzero(np.isfinite(X)))
        if out["bad"]:
            return out
    if X.dtype.kind == "u":
        # Integer sums in one pass, kept exact in ``raw`` too, so that totals
        # over any grouping of the rows into chunks are the same
        # (:func:`kmeans_dask._passes.total_stats`).
        col_sum, col_sumsq = np.zeros(d, dtype=np.int64), np.zeros(d, dtype=np.int64)
        sqnorm, top = _jit.integer_stats(X, np.zeros(0) if weights is None else weights,
                                         col_sum, col_sumsq)
        out["sum"] = col_sum * float(scale)
        out["sumsq"] = col_sumsq * float(scale) ** 2
        out["sqnorm"] = sqnorm * float(scale) ** 2
        out["absmax"] = float(top) * abs(scale)
        out["raw"] = {"sum": col_sum, "sumsq": col_sumsq, "scale": float(scale),
                      "sqnorm": int(sqnorm) if weights is None else None}
        return out
    out["absmax"] = float(np.abs(X).max() if X.dtype.kind == "f" else X.max()) * abs(scale)
    sq = np.empty((min(block_rows, m), d), dtype=np.float64)
    # float64 throughout: these sums must agree with the exact per-centre sums.
    for start, stop, x in _Blocks(X, scale, block_rows, np.float64):
        s = sq[: stop - start]
        np.multiply(x, x, out=s, casting="unsafe")
        out["sum"] += x.sum(axis=0, dtype=np.float64)
        out["sumsq"] += s.sum(axis=0)
        rows = s.sum(axis=1)
        out["sqnorm"] += float(rows @ weights[start:stop]) if weights is not None else float(rows.sum())
    return out


def lloyd_chunk(X: np.ndarray, centers: np.ndarray, weights=None, *, scale: float = 1.0,
                sqnorm: float = 0.0, block_rows: int = DEFAULT_BLOCK_ROWS) -> dict:
    """Assign the rows of one chunk and return its partial sums, weights and inertia.

    Parameters
    ----------
    X : ndarray of shape (m, d)
        uint8, float32 or float64 rows.
    centers : ndarray of shape (k, d)
        Current centres, in scaled units.
    weights : ndarray of shape (m,), optional
        Sample weights; 1 for every row when None.
    scale : float, default=1.0
        Multiplier applied to rows as they are converted (1/255 for images).
    sqnorm : float, default=0.0
        ``sum w |x|^2`` of this chunk (from :func:`chunk_stats`); the returned
        inertia is only meaningful when it is given.
    block_rows : int, default=1024
        Rows converted and multiplied at a time.

    Returns
    -------
    dict
        ``sums`` (k, d) float64 weighted sums of rows per nearest centre,
        ``counts`` (k,) float64 weights per centre, ``inertia`` float sum of
        weighted squared distances to the nearest centre.

    Examples
    --------
    >>> X = np.array([[0, 0], [0, 2], [10, 10]], dtype=np.float64)
    >>> out = lloyd_chunk(X, np.array([[0.0, 1.0], [10.0, 10.0]]), sqnorm=204.0)
    >>> out["counts"].tolist(), out["sums"].tolist(), out["inertia"]
    ([2.0, 1.0], [[0.0, 2.0], [10.0, 10.0]], 2.0)
    """
    _check_chunk(X, weights)
    m, d = X.shape
    k = centers.shape[0]
    sums = np.zeros((k, d), dtype=np.float64)
    counts = np.zeros(k, dtype=np.float64)
    if m == 0:
        return {"sums": sums, "counts": counts, "inertia": 0.0}
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
    labels = np.empty(m, dtype=np.intp)
    _assign(X, centers, scale, block_rows, labels)
    _accumulate(X, labels, weights, scale, block_rows, sums, counts)
    return {"sums": sums, "counts": counts,
            "inertia": _inertia(centers, compute_dtype(X.dtype), sums, counts, sqnorm)}


def _inertia(centers, dtype, sums, counts, sqnorm) -> float:
    """``sum w|x - c|^2`` from the per-centre sums: ``sqnorm - 2 c.S + W |c|^2``.

    With the centres as the kernels used them (rounded to ``dtype``).
    """
    c = np.asarray(centers, dtype=dtype).astype(np.float64)
    cross = np.einsum("ij,ij->", c, sums)
    # Rounding can leave a tiny negative total where every row sits on its centre.
    return max(0.0, float(sqnorm - 2.0 * cross + float(counts @ np.einsum("ij,ij->i", c, c))))


def _accumulate(X, labels, weights, scale, block_rows, sums, counts):
    """Add every row into ``sums[label]``: O(m d) work, never O(m k d).

    Unweighted integer rows are summed exactly in int64, row by row in a
    compiled loop, and scaled once at the end.  Float or weighted rows are
    visited in label order, so each centre's rows form one segment; a
    segment is gathered block by block into a reused buffer and summed along
    rows.  (``np.add.reduceat`` over axis 0 and ``np.add.at`` are both
    several times slower here.)
    """
    k = sums.shape[0]
    counts += np.bincount(labels, weights=weights, minlength=k)
    exact = weights is None and _is_exact(X)
    if exact:
        raw = np.zeros(sums.shape, dtype=np.int64)
        _segment_sums(X, np.arange(X.shape[0]), labels, raw, None, 1.0, block_rows)
        sums += raw
        if scale != 1.0:
            sums *= scale
    else:
        _segment_sums(X, np.arange(X.shape[0]), labels, sums, weights, scale, block_rows)


def _is_exact(X) -> bool:
    return X.dtype.kind in "ui" and X.dtype.itemsize == 1


def _segment_sums(X, rows, labels, out, weights, scale, block_rows, sign=1):
    """``out[labels[i]] += sign * w x`` for the rows ``rows`` of ``X``.

    ``out`` int64 sums raw integer rows exactly (unweighted uint8); float64
    ``out`` sums ``scale * w * x``.
    """
    m, d = rows.size, X.shape[1]
    if m == 0:
        return
    if out.dtype.kind == "i":
        # Integer sums are exact in any order: one compiled pass, no sort.
        _jit.add_rows(X, rows, labels, out, sign)
        return
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    cuts = np.flatnonzero(np.diff(sorted_labels)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [m]])
    step = min(block_rows, m)
    gathered = np.empty((step, d), dtype=X.dtype)
    wide = np.empty((step, d), dtype=np.float64)
    acc = np.empty(d, dtype=np.float64)
    for a, e in zip(starts, ends):
        target = out[sorted_labels[a]]
        for lo in range(a, e, step):
            hi = min(lo + step, e)
            idx = rows[order[lo:hi]]
            g = np.take(X, idx, axis=0, out=gathered[: hi - lo], mode="clip")
            f = wide[: hi - lo]
            np.multiply(g, scale, out=f, casting="unsafe")
            if weights is not None:
                f *= weights[idx, None]
            f.sum(axis=0, out=acc)
            if sign > 0:
                target += acc
            else:
                target -= acc


class ChunkState:
    """What one chunk remembers between Lloyd iterations.

    Yinyang K-Means' bounds (Ding et al. 2015; Hamerly's when there is one
    group): the centres are split into ``t`` groups once, and every row keeps
    an upper bound on its distance to its centre and, per group, a lower
    bound on its distance to every other centre of that group.  The bounds
    stay valid as centres move (upper grows by its centre's move, a group's
    lower bounds shrink by the group's largest move).  A row is recomputed
    only against the groups its bounds cannot rule out, and not at all when
    they rule out every group, or once its own centre's distance (Hamerly's
    tightening) lets them.  Ruled out means by a margin of ``4 E``
    (see :class:`_Nearest`), so the shared nearest-centre rule would pick the
    same centre: a kept state and a fresh one give the same labels.
    Unweighted uint8 rows also keep exact integer per-centre sums, updated
    by the rows that change centre only.

    Memory per row: 24 bytes plus 4 per group (one group per 16 centres, at
    most 16 groups: 88 bytes at K = 256, 11 % of a 784-pixel uint8 image),
    plus k x d integer sums per chunk where they are kept (``keep_sums``).
    uint8 rows ranked by the integer kernel keep Hamerly's bounds instead
    (:func:`_native_bounded`): 32 bytes per row whatever K.
    """

    def __init__(self, X: np.ndarray, weights=None, *, scale: float = 1.0,
                 block_rows: int = DEFAULT_BLOCK_ROWS):
        _check_chunk(X, weights)
        m = X.shape[0]
        self.labels = np.full(m, -1, dtype=np.intp)
        self.upper = np.full(m, np.inf)
        self.lower = None  # (m, t) float32, made with the groups
        self.native_lower = None  # (m,) float64, Hamerly's bound of the integer ranking
        self.xsq = _row_sqnorms(X, scale, block_rows) if m else np.zeros(0)
        self.xmax = _xmax(X, scale)
        self.exact = weights is None and _is_exact(X)
        self.centers = None
        self.order = self.starts = self.group_of = None
        self.raw_sums = None
        self.counts = None

    def reset(self) -> None:
        self.labels[:] = -1
        self.upper[:] = np.inf
        self.lower = None
        self.native_lower = None
        self.centers = self.raw_sums = self.counts = None
        self.order = self.starts = self.group_of = None


MAX_GROUPS = 16
# Centres per group aimed at: smaller groups let the bounds rule out more
# distances, but every group costs each row a bound of its own (at 32 groups,
# a fifth of a 784-byte row).
GROUP_SIZE = 16
BOUNDED_BLOCK_ROWS = 1024
# Up to this many centres the dense ranking is _jit.rank_rows rather than a
# GEMM: BLAS runs a product only a few columns wide slowly, and from about 16
# centres on it wins again.
TILED_MAX = 16
# Open rows taken at a time by the group-by-group ranking: their stored rows
# (196 KiB of uint8 MNIST) stay in a core's L2 cache while each group converts
# the ones that need it, and the GEMMs they feed are tall enough for BLAS to
# run near its speed (on 64 rows a 16-column GEMM runs at about half of it).
GROUP_BLOCK_ROWS = 256
# Above this share of (row, group) pairs left open by the bounds, the open rows
# are ranked by one GEMM against all centres instead of group by group.
DENSE_SHARE = 0.5


def group_centers(c: np.ndarray, t: int, iters: int = 5):
    """Split centres into at most ``t`` groups of nearby centres (a small Lloyd on them).

    Deterministic.  Returns ``order`` (centres ordered group by group),
    ``starts`` (first position of each non-empty group) and ``group_of``
    (group of each centre).
    """
    k = c.shape[0]
    t = max(1, min(t, k))
    if t == 1:
        return np.arange(k), np.array([0]), np.zeros(k, dtype=np.intp)
    seeds = c[np.linspace(0, k - 1, t).round().astype(np.intp)].copy()
    csq = np.einsum("ij,ij->i", c, c)
    for _ in range(iters):
        d2 = csq[:, None] - 2.0 * c @ seeds.T + np.einsum("ij,ij->i", seeds, seeds)
        g = d2.argmin(axis=1)
        for j in range(t):
            sel = g == j
            if sel.any():
                seeds[j] = c[sel].mean(axis=0)
    _, g = np.unique(g, return_inverse=True)
    order = np.argsort(g, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(g[order]) != 0])
    return order, starts, g.astype(np.intp)


def _movement(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    # Rounded up: a bound moved by too little would no longer be a bound.
    return np.sqrt(np.einsum("ij,ij->i", new - old, new - old)) * (1 + 1e-9)


def _separation(c: np.ndarray) -> np.ndarray:
    """Distance from each centre to the nearest other one, rounded down."""
    k = c.shape[0]
    if k < 2:
        return np.full(k, np.inf)
    sq = np.einsum("ij,ij->i", c, c)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (c @ c.T)
    np.fill_diagonal(d2, np.inf)
    slack = 1e-9 * (float(sq.max()) + 1e-300)
    return np.sqrt(np.maximum(d2.min(axis=1) - slack, 0.0))


def _down32(values: np.ndarray) -> np.ndarray:
    """float64 lower bounds stored as float32 without rounding up."""
    out = values.astype(np.float32)
    return np.nextafter(out, np.float32(-np.inf), out=out)


def _rank_open(X, st: ChunkState, near: _Nearest, err, move, sep, work: Workspace):
    """Move the bounds with the centres and re-decide the rows they leave open.

    Rows the bounds cannot settle are ranked against their own centre
    first (Hamerly's tightening, which settles many).  The rest are ranked
    group by group, only against the groups their bounds leave open: for
    each group one GEMM over the rows that need it.  Near ties go to
    :func:`_rank_all`, which applies the shared exact comparison.

    Returns
    -------
    rows : the rows that may have changed centre
    old : their labels before
    looked : rows whose distances were looked at
    pairs : distances ranked
    """
    m, d = X.shape
    k = near.c.shape[0]
    t = st.starts.size
    pos_of = np.empty(k, dtype=np.intp)
    pos_of[st.order] = np.arange(k)
    group_of_pos = st.group_of[st.order]
    drift = np.maximum.reduceat(move[st.order], st.starts).astype(np.float32)
    drift = np.nextafter(drift, np.float32(np.inf))
    neg2 = near.neg2  # (k, d): one group's centres are contiguous
    bounds = np.r_[st.starts, k]
    rows = work.take("open-rows", m, np.intp)
    own = work.take("open-own", m, np.float64)
    looked, n = _jit.filter_rows(X, neg2, near.csq, pos_of,
                                 move[st.order], drift, sep[st.order], st.labels, st.upper,
                                 st.lower, st.xsq, err, rows, own)
    rows, own = rows[:n], own[:n]
    old = st.labels[rows]
    pairs = looked
    need = work.take("need", (n, t), np.bool_)
    best, second = work.take("best", n, np.float64), work.take("second", n, np.float64)
    pick = work.take("pick", n, np.intp)
    n_open = _jit.open_groups(rows, own, pos_of, group_of_pos, st.labels, st.upper, st.lower,
                              err, need, best, second, pick)
    if n_open >= DENSE_SHARE * need.size:
        # Early iterations: most groups are open anyway, one GEMM over all centres.
        return rows, old, looked, pairs + _rank_all(X, rows, st, near, err, work)
    # Ranked values are float32 (or float64 input's float64) and stored as such.
    g_first = work.take("g-first", (n, t), near.dtype)
    g_second = work.take("g-second", (n, t), near.dtype)
    g_pick = work.take("g-pick", (n, t), np.int32)
    step = max(1, min(GROUP_BLOCK_ROWS, n))
    sub = work.take("sub", (step, d), near.dtype)
    cross = work.take("cross", step * int(np.diff(bounds).max()), near.dtype)
    pairs += _jit.rank_groups(X, rows, need, neg2, near.csq, bounds, sub, cross,
                              best, second, pick, g_first, g_pick, g_second)
    flagged = work.take("flagged", n, np.int64)
    n_flagged = _jit.settle(rows, own, need, best, second, pick, g_first, g_pick, g_second,
                            pos_of, group_of_pos, st.order, st.labels, st.upper, st.lower,
                            st.xsq, err, flagged)
    return rows, old, looked, pairs + _rank_all(X, flagged[:n_flagged], st, near, err, work)


class _Picked:
    """The rows ``X[idx]`` as stored, read only where indexed (the few near ties)."""

    def __init__(self, X: np.ndarray, idx: np.ndarray):
        self.X, self.idx = X, idx

    def __getitem__(self, which):
        return self.X[self.idx[which]]


def _rank_all(X, rows, st: ChunkState, near: _Nearest, err, work: Workspace) -> int:
    """Rank ``rows`` against every centre, block by block, and renew their bounds.

    Returns the number of (row, centre) distances ranked.
    """
    k = near.c.shape[0]
    if rows.size == 0:
        return 0
    step = max(1, min(BOUNDED_BLOCK_ROWS, rows.size))
    bounds = np.r_[st.starts, k]
    g = work.take("rank-all", (step, k), near.dtype)
    lab = work.take("rank-all-labels", step, np.intp)
    up2 = work.take("rank-all-upper", step, np.float64)
    for lo in range(0, rows.size, step):
        n = min(step, rows.size - lo)
        idx = rows[lo:lo + n]
        gb = g[:n]
        near.rank(X, idx, gb)
        e_idx, xsq_idx = err[idx], st.xsq[idx]
        pos, ranked_pos, best, second = near.decide(gb, _Picked(X, idx), lab[:n], xsq_idx,
                                                    up2[:n], e_idx)
        st.labels[idx] = lab[:n]
        st.upper[idx] = np.sqrt(up2[:n])
        # New lower bounds per group, the row's own centre left out.
        slack = xsq_idx - e_idx
        if st.starts.size == 1:
            # One group: the nearest other centre is the runner-up of the
            # ranking, or its winner where an exact comparison overruled it.
            glow = np.where(pos == ranked_pos, second, best) + slack
            st.lower[idx, 0] = _down32(np.sqrt(np.maximum(glow, 0.0, out=glow), out=glow))
        else:
            glow = work.take("rank-all-lower", (n, st.starts.size), np.float64)
            _jit.group_minima(gb, pos, bounds, glow)
            glow += slack[:, None]
            st.lower[idx] = _down32(np.sqrt(np.maximum(glow, 0.0, out=glow), out=glow))
    return rows.size * k


def bounded_lloyd_chunk(X: np.ndarray, state: ChunkState, centers: np.ndarray, weights=None, *,
                        scale: float = 1.0, sqnorm: float = 0.0,
                        block_rows: int = DEFAULT_BLOCK_ROWS, keep_centers: bool = False,
                        keep_sums: bool = True, work: Workspace | None = None) -> dict:
    """:func:`lloyd_chunk` with the bounds of ``state`` kept between calls.

    Returns what :func:`lloyd_chunk` returns for the same centres, bit for
    bit, plus ``computed`` (rows whose distances were looked at),
    ``pairs`` (row-centre distances ranked) and ``changed`` (rows that
    changed centre).  A fresh or reset ``state`` ranks every row against
    every centre.  With ``keep_centers`` the state keeps ``centers`` (float64,
    which the caller then never changes) instead of a copy.  Unweighted
    integer rows also give ``raw_sums``, the exact int64 sums of the stored
    values; with ``keep_sums`` the state keeps them (k x d per chunk) and
    later passes update them by the rows that changed centre, without it
    they are added again from all rows.  ``work``: the calling thread's
    :class:`Workspace` (a fresh one if not given), which also holds the
    prepared centres a pass's chunks share with ``keep_centers``.
    """
    _check_chunk(X, weights)
    work = Workspace() if work is None else work
    m, d = X.shape
    c = np.asarray(centers, dtype=np.float64)
    k = c.shape[0]
    dtype = compute_dtype(X.dtype)
    st = state
    # uint8 rows on the integer ranking: whole rows, where Hamerly's bounds
    # leave them open (its cost per row leaves too little for Yinyang's
    # group-by-group ranking to save).
    ranked = _native_bounded(X, st, c, scale, work, keep_centers) if _native_rows(X) else None
    if ranked is not None:
        todo, old, looked, pairs = ranked
    else:
        st.native_lower = None
        if st.centers is None or st.centers.shape != c.shape or m == 0 or st.lower is None:
            st.reset()
            t = min(MAX_GROUPS, k // GROUP_SIZE)
            if keep_centers:
                # The chunks of a pass share these centres: group them once.
                st.order, st.starts, st.group_of = work.memo("groups", (c,), t,
                                                             lambda: group_centers(c, t))
            else:
                st.order, st.starts, st.group_of = group_centers(c, t)
            st.lower = np.zeros((m, st.starts.size), dtype=np.float32)

        def nearest():
            return _Nearest(c, dtype, scale, st.xmax, order=st.order, work=work)

        if keep_centers:
            near = work.memo("nearest", (c, st.order), (dtype, scale, st.xmax), nearest)
        else:
            near = nearest()
        err = near.row_error(st.xsq, out=work.take("row-error", m, np.float64))
        if st.centers is None:
            todo = np.arange(m)
            old = st.labels.copy()
            pairs = _rank_all(X, todo, st, near, err, work)
            looked = m
        else:
            last = st.centers
            if keep_centers:
                move = work.memo("move", (last, c), None, lambda: _movement(last, c))
                sep = work.memo("separation", (c,), None, lambda: _separation(c))
            else:
                move, sep = _movement(last, c), _separation(c)
            todo, old, looked, pairs = _rank_open(X, st, near, err, move, sep, work)
    st.centers = c if keep_centers and c is centers else c.copy()
    moved = st.labels[todo] != old
    changed = todo[moved]
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
    if st.exact:
        if st.raw_sums is None or not keep_sums:
            st.raw_sums = np.zeros((k, d), dtype=np.int64)
            _segment_sums(X, np.arange(m), st.labels, st.raw_sums, None, 1.0, block_rows)
            st.counts = np.bincount(st.labels, minlength=k).astype(np.float64)
        elif changed.size:
            was = old[moved]
            _segment_sums(X, changed, st.labels[changed], st.raw_sums, None, 1.0, block_rows)
            _segment_sums(X, changed, was, st.raw_sums, None, 1.0, block_rows, sign=-1)
            st.counts += np.bincount(st.labels[changed], minlength=k)
            st.counts -= np.bincount(was, minlength=k)
        sums = st.raw_sums.astype(np.float64)
        if scale != 1.0:
            sums *= scale
        counts = st.counts.copy()
    else:
        sums = np.zeros((k, d), dtype=np.float64)
        counts = np.zeros(k, dtype=np.float64)
        if m:
            _accumulate(X, st.labels, weights, scale, block_rows, sums, counts)
    inertia = _inertia(c, dtype, sums, counts, sqnorm) if m else 0.0
    out = {"sums": sums, "counts": counts, "inertia": inertia,
           "computed": int(looked), "pairs": int(pairs), "changed": int(changed.size)}
    if st.exact:
        out["raw_sums"] = st.raw_sums if not keep_sums else st.raw_sums.copy()
        if not keep_sums:
            st.raw_sums = st.counts = None
    return out


def predict_chunk(X: np.ndarray, centers: np.ndarray, *, scale: float = 1.0,
                  block_rows: int = DEFAULT_BLOCK_ROWS) -> np.ndarray:
    """Index of the nearest centre of every row, as int32."""
    _check_chunk(X, None)
    _check_finite(X)
    labels = np.empty(X.shape[0], dtype=np.intp)
    if X.shape[0]:
        _assign(X, centers, scale, block_rows, labels)
    return labels.astype(np.int32)


def nearest_chunk(X: np.ndarray, centers: np.ndarray, near: np.ndarray | None = None, *,
                  offset: int = 0, scale: float = 1.0, block_rows: int = DEFAULT_BLOCK_ROWS,
                  work: Workspace | None = None) -> np.ndarray:
    """Squared distance to, and index of, the nearest centre of every row.

    Returns an (m, 2) float64 array: column 0 the squared distance, column 1
    the centre's index plus ``offset``.  Given ``near``, an earlier result for
    the same rows, each row keeps the closer of the two (the earlier one on a
    tie), so k-means|| can add candidates round by round and know every row's
    nearest candidate at the end without ranking them all again.  ``work``:
    the calling thread's :class:`Workspace`.
    """
    _check_chunk(X, None)
    m = X.shape[0]
    labels = np.empty(m, dtype=np.intp)
    out = np.empty((m, 2), dtype=np.float64)
    if m:
        dist = np.empty(m, dtype=np.float64)
        _assign(X, centers, scale, block_rows, labels, dist, work=work)
        out[:, 0] = dist
        out[:, 1] = labels + offset
    if near is not None:
        keep = near[:, 0] <= out[:, 0]
        out[keep] = near[keep]
    return out


def fold_batch(X: np.ndarray, weights: np.ndarray, centers: np.ndarray, *, scale: float = 1.0,
               work: Workspace | None = None, threads: int = 1):
    """One mini-batch step's pass over its rows ``X`` (as stored).

    Labels by the rule every pass uses (so a step labels a row as a full
    pass would, on the integer tiles or in float32 alike), the exact float64
    squared distance of each row to its centre, and the weighted raw
    per-centre sums and weights, for :func:`_jit.update_centers`.

    Returns
    -------
    labels : (m,) intp
    dist : (m,) float64
    sums : (k, d) float64, of the stored values
    wsum : (k,) float64
    With ``work``, the first three are that workspace's arrays, overwritten
    by the next call (a fit's steps make thousands, all of one size).
    ``threads``: threads the integer ranking may share the rows out to.
    """
    _check_chunk(X, weights)
    work = Workspace() if work is None else work
    centers = np.asarray(centers, dtype=np.float64)
    k, d = centers.shape
    m = X.shape[0]
    labels = work.take("fold-labels", m, np.intp)
    dist = work.take("fold-dist", m, np.float64)
    sums = work.take("fold-sums", (k, d), np.float64)
    sums.fill(0.0)
    wsum = np.zeros(k)
    if m:
        _assign(X, centers, scale, BOUNDED_BLOCK_ROWS, labels, work=work, threads=threads)
        _jit.fold_labelled(X, labels, centers, np.asarray(weights, dtype=np.float64),
                           float(scale), dist, sums, wsum)
    return labels, dist, sums, wsum


def transform_chunk(X: np.ndarray, centers: np.ndarray, *, scale: float = 1.0,
                    block_rows: int = DEFAULT_BLOCK_ROWS) -> np.ndarray:
    """Euclidean distance of every row to every centre, (m, k) in the compute dtype."""
    _check_chunk(X, None)
    _check_finite(X)
    dtype = compute_dtype(X.dtype)
    neg2_t, csq = _prepared_centers(centers, dtype, scale)
    c = np.asarray(centers, dtype=np.float64)
    # |x|^2 - 2 x.c + |c|^2 loses the small distances to cancellation (a row on
    # a centre would be sqrt(eps |x|^2) away): pairs this close are computed
    # again as |x - c|^2 in float64.
    close = 1e3 * np.finfo(dtype).eps
    out = np.empty((X.shape[0], c.shape[0]), dtype=dtype)
    for start, stop, x in _Blocks(X, 1.0, block_rows):
        g = out[start:stop]
        np.dot(x, neg2_t, out=g)
        g += csq
        xsq = np.einsum("ij,ij->i", x, x, dtype=np.float64) * (scale * scale)
        g += xsq.astype(dtype)[:, None]
        rows, cols = np.nonzero(g <= close * (xsq[:, None] + csq[None, :]))
        for lo in range(0, rows.size, 4096):
            i, j = rows[lo:lo + 4096], cols[lo:lo + 4096]
            diff = x[i].astype(np.float64) * scale - c[j]
            g[i, j] = np.einsum("ij,ij->i", diff, diff)
        np.maximum(g, 0, out=g)
        np.sqrt(g, out=g)
    return out


def farthest_chunk(X: np.ndarray, centers: np.ndarray, n: int, weights=None, *,
                   offset: int = 0, scale: float = 1.0,
                   block_rows: int = DEFAULT_BLOCK_ROWS) -> dict:
    """The ``n`` rows farthest from their nearest centre (for empty-cluster relocation).

    Returns
    -------
    dict
        ``dist`` (p,) squared distances, descending; ``index`` (p,) global
        row indices (``offset`` + local); ``label`` (p,) their current
        centre; ``weight`` (p,); ``rows`` (p, d) float64 scaled rows;
        with p = min(n, m).  Ties are broken by the lower row index so the
        choice does not depend on how chunks are scheduled.
    """
    _check_chunk(X, weights)
    m = X.shape[0]
    labels = np.empty(m, dtype=np.intp)
    dist = np.empty(m, dtype=np.float64)
    if m:
        _assign(X, centers, scale, block_rows, labels, dist)
    if weights is not None:
        # A row of weight zero cannot seed a cluster: it would stay empty.
        dist = np.where(np.asarray(weights) > 0, dist, -np.inf)
    p = min(n, m)
    pick = np.lexsort((np.arange(m), -dist))[:p]
    rows = np.asarray(X[pick], dtype=np.float64) * scale
    w = np.ones(p) if weights is None else np.asarray(weights, dtype=np.float64)[pick]
    return {"dist": dist[pick], "index": pick + offset, "label": labels[pick], "weight": w,
            "rows": rows}


def merge_farthest(*parts: dict, n: int) -> dict:
    """Keep the ``n`` farthest rows of several :func:`farthest_chunk` results."""
    cat = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    pick = np.lexsort((cat["index"], -cat["dist"]))[:n]
    return {key: value[pick] for key, value in cat.items()}


def sample_chunk(X: np.ndarray, min_dist: np.ndarray, weights, *, factor: float, total: float,
                 seed, scale: float = 1.0) -> np.ndarray:
    """k-means|| oversampling: keep each row with probability min(1, factor w d^2 / total).

    ``seed`` is a sequence (fit seed, round, chunk index), so the draw of a
    chunk does not depend on which worker runs it.
    """
    rng = np.random.default_rng(seed)
    score = min_dist if weights is None else min_dist * np.asarray(weights, dtype=np.float64)
    prob = np.minimum(1.0, factor * score / total) if total > 0 else np.zeros_like(score)
    keep = np.flatnonzero(rng.random(X.shape[0]) < prob)
    return np.asarray(X[keep], dtype=np.float64) * scale


def add(*parts: dict) -> dict:
    """Combine partial results by adding them key by key, in the order given."""
    out = {}
    for key, value in parts[0].items():
        total = value.copy() if isinstance(value, np.ndarray) else value
        for p in parts[1:]:
            total = total + p[key]
        out[key] = total
    return out
