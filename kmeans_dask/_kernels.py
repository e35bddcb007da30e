"""NumPy kernels on one block of rows: no Dask, no Zarr, nothing above.

Every function here takes one chunk of the data (``X`` of shape (m, d), dtype
uint8, float32 or float64, plus optional per-row weights) and returns small
results: per-centre sums and weights, labels, distances, a few sampled rows.
The Dask graph that calls them lives in :mod:`kmeans_dask._passes`.

Design notes (why, not what):

* A chunk is never converted to float as a whole.  Rows are converted in
  blocks of ``block_rows`` into buffers allocated once per call and reused
  with ``out=`` arguments: Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_`` so a
  large temporary allocated per block goes back to the OS every time, which
  measurably slows a kernel inside a worker.
* Distances keep ``-2 x.c + |c|^2`` only; ``|x|^2`` does not change which
  centre is nearest.  One GEMM per block gives all cross terms.
* Per-centre sums cost O(m d), not O(m k d): rows are visited in label order
  and each centre's segment is gathered and summed block by block.  For
  unweighted uint8 data the sums are exact integers, scaled once at the end.
* Inertia is not summed from float32 distances (which lose digits to
  cancellation): it is ``sum w|x|^2 - sum_j (2 c_j.S_j - W_j |c_j|^2)`` in
  float64, with the chunk's ``sum w|x|^2`` computed once per fit.
"""

from __future__ import annotations

import numpy as np

DEFAULT_BLOCK_ROWS = 256


def compute_dtype(dtype) -> np.dtype:
    """The floating type the kernels compute in for input of ``dtype``."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


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


def _assign(X, centers, scale, block_rows, labels, min_dist=None):
    """Fill ``labels`` (and, if given, ``min_dist`` = squared distance to the nearest centre)."""
    blocks = _Blocks(X, 1.0, block_rows)
    neg2_t, csq = _prepared_centers(centers, blocks.dtype, scale)
    k = centers.shape[0]
    dots = np.empty((min(blocks.block_rows, X.shape[0]), k), dtype=blocks.dtype)
    for start, stop, x in blocks:
        g = dots[: stop - start]
        np.dot(x, neg2_t, out=g)
        g += csq
        np.argmin(g, axis=1, out=labels[start:stop])
        if min_dist is not None:
            best = np.take_along_axis(g, labels[start:stop, None], axis=1)[:, 0]
            xsq = np.einsum("ij,ij->i", x, x, dtype=np.float64) * (scale * scale)
            np.maximum(best + xsq, 0.0, out=min_dist[start:stop])


def _check_chunk(X, weights):
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D block of rows, got shape {X.shape}")
    if weights is not None and weights.shape != (X.shape[0],):
        raise ValueError(f"weights of shape {weights.shape} do not match {X.shape[0]} rows")


def chunk_stats(X: np.ndarray, weights=None, *, scale: float = 1.0,
                block_rows: int = DEFAULT_BLOCK_ROWS) -> dict:
    """One-time statistics of a chunk, combined across chunks by addition.

    Returns
    -------
    dict
        ``n`` rows, ``w`` total weight, ``sum`` and ``sumsq`` (d,) unweighted
        per-feature sums of x and x^2 (for the tolerance, as scikit-learn
        scales it by the unweighted variance), ``sqnorm`` the weighted
        ``sum w |x|^2`` (for inertia), and ``bad`` the number of non-finite
        values (float input only) and ``negative`` the number of negative
        weights.
    """
    _check_chunk(X, weights)
    m, d = X.shape
    out = {"n": m, "w": 0.0, "sum": np.zeros(d), "sumsq": np.zeros(d), "sqnorm": 0.0,
           "bad": 0, "negative": 0}
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        out["negative"] = int(np.count_nonzero(~(weights >= 0)))
        out["w"] = float(weights.sum())
    else:
        out["w"] = float(m)
    if m == 0:
        return out
    if X.dtype.kind == "f":
        out["bad"] = int(m * d - np.count_nonzero(np.isfinite(X)))
        if out["bad"]:
            return out
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
    c = np.asarray(centers, dtype=compute_dtype(X.dtype)).astype(np.float64)
    cross = np.einsum("ij,ij->", c, sums)
    inertia = sqnorm - 2.0 * cross + float(counts @ np.einsum("ij,ij->i", c, c))
    return {"sums": sums, "counts": counts, "inertia": float(inertia)}


def _accumulate(X, labels, weights, scale, block_rows, sums, counts):
    """Add every row into ``sums[label]``: O(m d) work, never O(m k d).

    Rows are visited in label order, so each centre's rows form one segment;
    a segment is gathered block by block into a reused buffer and summed
    along rows.  (``np.add.reduceat`` over axis 0 and ``np.add.at`` are both
    several times slower here.)  Unweighted integer rows are summed exactly
    in uint32 and scaled once at the end.
    """
    m, d = X.shape
    k = sums.shape[0]
    counts += np.bincount(labels, weights=weights, minlength=k)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    bounds = np.flatnonzero(np.diff(sorted_labels)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [m]])
    exact = weights is None and X.dtype.kind in "ui" and X.dtype.itemsize == 1
    step = min(block_rows, m, 1 << 24)  # uint32 cannot overflow: 2^24 * 255 < 2^32
    gathered = np.empty((step, d), dtype=X.dtype)
    if exact:
        acc = np.empty(d, dtype=np.uint32)
    else:
        wide = np.empty((step, d), dtype=np.float64)
        acc = np.empty(d, dtype=np.float64)
    for a, e in zip(starts, ends):
        target = sums[sorted_labels[a]]
        for lo in range(a, e, step):
            hi = min(lo + step, e)
            idx = order[lo:hi]
            g = np.take(X, idx, axis=0, out=gathered[: hi - lo], mode="clip")
            if exact:
                np.add.reduce(g, axis=0, dtype=np.uint32, out=acc)
            else:
                f = wide[: hi - lo]
                np.multiply(g, scale, out=f, casting="unsafe")
                if weights is not None:
                    f *= weights[idx, None]
                f.sum(axis=0, out=acc)
            target += acc
    if exact and scale != 1.0:
        sums *= scale


def batch_chunk(X: np.ndarray, rows: np.ndarray, centers: np.ndarray, weights=None, *,
                scale: float = 1.0, block_rows: int = DEFAULT_BLOCK_ROWS) -> dict:
    """:func:`lloyd_chunk` on the rows ``rows`` of this chunk only (a mini-batch's share).

    ``rows`` may repeat (batches are drawn with replacement); the inertia
    returned is that of the sampled rows.
    """
    sub = np.take(X, rows, axis=0)
    w = None if weights is None else np.asarray(weights)[rows]
    sqnorm = chunk_stats(sub, w, scale=scale, block_rows=block_rows)["sqnorm"]
    return lloyd_chunk(sub, centers, w, scale=scale, sqnorm=sqnorm, block_rows=block_rows)


def predict_chunk(X: np.ndarray, centers: np.ndarray, *, scale: float = 1.0,
                  block_rows: int = DEFAULT_BLOCK_ROWS) -> np.ndarray:
    """Index of the nearest centre of every row, as int32."""
    _check_chunk(X, None)
    labels = np.empty(X.shape[0], dtype=np.intp)
    if X.shape[0]:
        _assign(X, centers, scale, block_rows, labels)
    return labels.astype(np.int32)


def min_sqdist_chunk(X: np.ndarray, centers: np.ndarray, *, scale: float = 1.0,
                     block_rows: int = DEFAULT_BLOCK_ROWS) -> np.ndarray:
    """Squared distance of every row to its nearest centre (float64, (m,))."""
    _check_chunk(X, None)
    labels = np.empty(X.shape[0], dtype=np.intp)
    dist = np.empty(X.shape[0], dtype=np.float64)
    if X.shape[0]:
        _assign(X, centers, scale, block_rows, labels, dist)
    return dist


def transform_chunk(X: np.ndarray, centers: np.ndarray, *, scale: float = 1.0,
                    block_rows: int = DEFAULT_BLOCK_ROWS) -> np.ndarray:
    """Euclidean distance of every row to every centre, (m, k) in the compute dtype."""
    _check_chunk(X, None)
    dtype = compute_dtype(X.dtype)
    neg2_t, csq = _prepared_centers(centers, dtype, scale)
    out = np.empty((X.shape[0], centers.shape[0]), dtype=dtype)
    for start, stop, x in _Blocks(X, 1.0, block_rows):
        g = out[start:stop]
        np.dot(x, neg2_t, out=g)
        g += csq
        g += (np.einsum("ij,ij->i", x, x, dtype=np.float64) * (scale * scale)).astype(dtype)[:, None]
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
