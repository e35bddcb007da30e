"""Passes over the distributed rows: one task per chunk, a fixed-order tree on top.

A :class:`ChunkedRows` wraps the rows (and optional weights) as Dask arrays
chunked by rows.  Each method builds a small graph calling one kernel of
:mod:`kmeans_dask._kernels` per chunk, combines the partial results with a
tree of fan-in ``split_every`` whose shape depends only on the number of
chunks (so results are bit-for-bit reproducible whatever the number of
workers), and computes it with the active Dask scheduler: a
``distributed.Client`` if one is set, else Dask's threads.

The per-chunk Delayed handles are built once per fit; per pass only the few
small task objects and the broadcast centres are new.
"""

from __future__ import annotations

import functools
import uuid

import dask
import dask.array as da
import numpy as np
from dask import delayed

from . import _kernels, config


def task(fn):
    """A Delayed wrapper of ``fn`` named after it, made once.

    ``delayed(fn)`` would tokenize ``fn`` (cloudpickling it) on every call,
    client time paid again by every pass.
    """
    try:
        return _TASKS[fn]
    except KeyError:
        name = f"{getattr(fn, '__module__', 'fn')}.{getattr(fn, '__qualname__', id(fn))}-{id(fn)}"
        _TASKS[fn] = delayed(fn, pure=True, name=name)
        return _TASKS[fn]


_TASKS: dict = {}


def total_stats(parts: list) -> dict:
    """Every chunk's :func:`_kernels.chunk_stats`, in chunk order, combined.

    Returns the totals plus ``bad_chunk``/``negative_chunk``: the index of
    the first chunk holding a non-finite value or a negative weight.
    """
    raw = [p.get("raw") for p in parts]
    total = _kernels.add(*[{k: v for k, v in p.items() if k != "raw"} for p in parts])
    if all(r is not None for r in raw):
        # Integer rows: totals from the exact integer sums, scaled once, so the
        # same on any grouping of the rows into chunks.
        scale = raw[0]["scale"]
        total["sum"] = sum(r["sum"] for r in raw) * scale
        total["sumsq"] = sum(r["sumsq"] for r in raw) * scale ** 2
        if all(r["sqnorm"] is not None for r in raw):
            total["sqnorm"] = float(sum(r["sqnorm"] for r in raw)) * scale ** 2
    total["absmax"] = max(p["absmax"] for p in parts)
    total["bad_chunk"] = next((i for i, p in enumerate(parts) if p["bad"]), None)
    total["negative_chunk"] = next((i for i, p in enumerate(parts) if p["negative"]), None)
    return total


def _levels(parts: list, split_every: int, combine_group) -> list:
    """Replace ``parts`` by ``combine_group(group, level, index)`` over consecutive
    groups of ``split_every`` until at most ``split_every`` remain.

    The grouping is by position only, so the order of additions is fixed by
    the chunk index, whoever computes them.
    """
    if split_every < 2:
        raise ValueError(f"split_every must be >= 2, got {split_every}")
    level = 0
    while len(parts) > split_every:
        parts = [combine_group(parts[i:i + split_every], level, i // split_every)
                 for i in range(0, len(parts), split_every)]
        level += 1
    return parts


def tree_reduce(parts: list, combine, split_every: int, name: str) -> list:
    """The levels of :func:`_levels` as tasks; returns the top level (at most
    ``split_every`` parts).

    The top level (at most ``split_every`` k x d partials) is combined by
    :func:`reduce_on_client` after the gather, which saves a task and a
    worker-to-worker transfer per pass; the arithmetic is the same as a root
    task's.
    """
    return _levels(parts, split_every, lambda group, level, i: task(combine)(
        *group, dask_key_name=(f"{name}-combine-{level}", i)))


def combine_in_order(parts: list, combine, split_every: int):
    """:func:`reduce_on_client`'s additions, on partials already here (in chunk order)."""
    return combine(*_levels(parts, split_every, lambda group, level, i: combine(*group)))


def reduce_on_client(parts: list, combine, split_every: int, name: str):
    """Compute the tree of :func:`tree_reduce` and combine its top level here."""
    top = dask.compute(*tree_reduce(parts, combine, split_every, name))
    return combine(*top)


class ChunkedRows:
    """Rows (n, d) and optional weights (n,) as Dask arrays with the same row chunks.

    Parameters
    ----------
    X : dask.array.Array
        Chunked by rows only.
    weights : dask.array.Array or None
    scale : float
        Multiplier applied to rows inside the kernels.
    block_rows, split_every : int, optional
        Rows per block inside a kernel, and fan-in of the reduction trees;
        by default the ``kmeans_dask.block-rows`` and ``kmeans_dask.split-every``
        config values (:mod:`kmeans_dask.config`).
    """

    def __init__(self, X: da.Array, weights, *, scale: float, block_rows: int | None = None,
                 split_every: int | None = None):
        self.X = X
        self.weights = weights
        self.scale = float(scale)
        self.block_rows = int(block_rows or config.get("block-rows"))
        self.split_every = int(split_every or config.get("split-every"))
        self.n, self.d = X.shape
        self.row_chunks = X.chunks[0]
        self.offsets = np.concatenate([[0], np.cumsum(self.row_chunks)]).astype(np.int64)
        self._blocks = list(X.to_delayed().ravel())
        self._wblocks = (list(weights.to_delayed().ravel()) if weights is not None
                         else [None] * len(self._blocks))
        self.chunk_sqnorm = None  # per-chunk sum w|x|^2, set by stats()

    @property
    def nchunks(self) -> int:
        return len(self._blocks)

    def _kw(self) -> dict:
        return {"scale": self.scale, "block_rows": self.block_rows}

    @staticmethod
    def _broadcast(array: np.ndarray, name: str):
        # One key for the centres: shipped once per worker, not once per task.
        return delayed(np.asarray(array), name=f"{name}-centres", traverse=False)

    # ------------------------------------------------------------------ passes

    def stats(self) -> dict:
        """One pass of :func:`_kernels.chunk_stats`, as :func:`total_stats`;
        keeps each chunk's ``sqnorm``."""
        name = f"kmeans-stats-{uuid.uuid4().hex}"
        tasks = [
            task(_kernels.chunk_stats)(b, w, dask_key_name=(name, i), **self._kw())
            for i, (b, w) in enumerate(zip(self._blocks, self._wblocks))
        ]
        parts = dask.compute(*tasks)
        self.chunk_sqnorm = [p["sqnorm"] for p in parts]
        return total_stats(parts)

    def farthest(self, centers: np.ndarray, n: int) -> dict:
        """The ``n`` rows farthest from their nearest centre, over all chunks."""
        name = f"kmeans-farthest-{uuid.uuid4().hex}"
        c = self._broadcast(centers, name)
        parts = [
            task(_kernels.farthest_chunk)(
                b, c, n, w, offset=int(self.offsets[i]), dask_key_name=(name, i), **self._kw())
            for i, (b, w) in enumerate(zip(self._blocks, self._wblocks))
        ]

        merge = functools.partial(_kernels.merge_farthest, n=n)
        return reduce_on_client(parts, merge, self.split_every, name)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows at global ``indices`` (scaled, float64), in the order given."""
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices, kind="stable")
        got = self.X[indices[order]].compute()
        out = np.empty((len(indices), self.d), dtype=np.float64)
        out[order] = np.asarray(got, dtype=np.float64) * self.scale
        return out

    def predict(self, centers: np.ndarray) -> da.Array:
        """Lazy int32 labels aligned with the row chunks."""
        c = self._broadcast(centers, f"kmeans-predict-{uuid.uuid4().hex}")
        return self.X.map_blocks(_kernels.predict_chunk, c, drop_axis=1, dtype=np.int32,
                                 **self._kw())

    def transform(self, centers: np.ndarray) -> da.Array:
        """Lazy (n, k) distances to every centre."""
        c = self._broadcast(centers, f"kmeans-transform-{uuid.uuid4().hex}")
        k = centers.shape[0]
        return self.X.map_blocks(_kernels.transform_chunk, c, chunks=(self.row_chunks, (k,)),
                                 dtype=_kernels.compute_dtype(self.X.dtype), **self._kw())
