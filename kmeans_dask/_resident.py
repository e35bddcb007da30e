"""Lloyd iterations driven through worker-resident actors.

When the rows are persisted on a ``distributed`` cluster, each worker gets
one :class:`ChunkActor` holding references to the row chunks already in its
memory (nothing is copied) and a :class:`kmeans_dask._kernels.ChunkState`
per chunk, kept between iterations.  An iteration is one direct call per
worker carrying the centres, instead of a task graph through the scheduler:
measured on 2 cores, about 4 ms of round trip against about 20 ms for two
tasks, which is most of a K = 10 iteration.  The kept state lets
:func:`kmeans_dask._kernels.bounded_lloyd_chunk` skip the rows whose centre
provably did not change.

Results are those of the task path bit for bit: every chunk returns its own
partial, and the client adds the partials in chunk order with the same tree
(:func:`kmeans_dask._passes.combine_in_order`).  A worker lost between or
during calls is handled by rebuilding the actors from the persisted chunks
(the scheduler recomputes lost ones from their source) with fresh states,
and repeating the call; fresh and kept states give the same answer.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _kernels
from ._passes import combine_in_order

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
# Seconds a rebuild waits for lost row chunks to be recomputed before placing
# their actor without them.
HOLDER_WAIT = 60.0
# resident="auto" is used up to this many row chunks (each returns a k x d
# partial to the client every iteration).
MAX_CHUNKS = 32


class ChunkActor:
    """Row chunks of one worker and their Lloyd state (a ``distributed`` actor).

    Parameters
    ----------
    indices : list of int
        Global chunk indices of the chunks given, in order.
    *blocks : ndarray
        The chunks, then (if ``weighted``) their weights, in the same order.
    scale, block_rows : as for the kernels
    sqnorms : list of float
        Each chunk's ``sum w |x|^2``.

    Notes
    -----
    A worker runs all its actors' calls in one thread, so a worker with
    several threads (``dask worker``'s default: one process, a thread per
    core) would pass its chunks one after the other.  The actor keeps a pool
    of as many threads as the worker has (at most one per chunk) and passes
    its chunks in parallel; NumPy releases the GIL in the heavy parts.
    """

    def __init__(self, indices, *blocks, weighted=False, scale=1.0, block_rows=256, sqnorms=()):
        n = len(indices)
        self.indices = list(indices)
        self.X = list(blocks[:n])
        self.w = list(blocks[n:]) if weighted else [None] * n
        self.scale = scale
        self.block_rows = block_rows
        self.sqnorms = list(sqnorms)
        self.states = [_kernels.ChunkState(x, w, scale=scale, block_rows=block_rows)
                       for x, w in zip(self.X, self.w)]
        # Compiled loops are loaded (or compiled, once per machine) now, not
        # inside the first timed iteration.
        for dtype in {x.dtype for x in self.X}:
            _kernels.warm_up(dtype)
        threads = min(_worker_threads(), n)
        self._pool = ThreadPoolExecutor(threads, "kmeans-resident") if threads > 1 else None

    def _pass(self, j, centers):
        return self.indices[j], _kernels.bounded_lloyd_chunk(
            self.X[j], self.states[j], centers, self.w[j], scale=self.scale,
            sqnorm=self.sqnorms[j], block_rows=self.block_rows)

    def lloyd(self, centers):
        """One assignment pass of every chunk held; ``[(chunk index, partial)]``."""
        if self._pool is None:
            return [self._pass(j, centers) for j in range(len(self.X))]
        return list(self._pool.map(lambda j: self._pass(j, centers), range(len(self.X))))

    def __del__(self):
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)


def _worker_threads() -> int:
    """Threads of the worker this runs on (1 outside a worker)."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return 1


class ResidentRows:
    """Drives :class:`ChunkActor` s over persisted rows.

    Parameters
    ----------
    client : distributed.Client
    rows : kmeans_dask._passes.ChunkedRows
        Rows whose Dask arrays are persisted on ``client``'s cluster, with
        ``chunk_sqnorm`` already computed.
    actor_class : type, default=ChunkActor
        The benchmark passes one whose passes do no work, to time the
        orchestration alone.
    """

    def __init__(self, client, rows, actor_class=None):
        self.client = client
        self.rows = rows
        self.actor_class = ChunkActor if actor_class is None else actor_class
        self.blocks = _chunk_futures(rows.X)
        self.wblocks = _chunk_futures(rows.weights) if rows.weights is not None else None
        self.actors = []
        self.rebuilds = 0
        self._build()

    def _holders(self) -> dict:
        """``who_has`` of the row chunks once every chunk has a holder.

        Just after a worker dies, the futures of its chunks can still look
        finished here while the scheduler, which has already removed the
        worker, lists no holder for them and is recomputing them.  Waiting
        for the holders keeps each actor next to its chunks; after
        :data:`HOLDER_WAIT` seconds the chunks without one are placed
        wherever the scheduler likes.
        """
        from distributed import wait

        deadline = time.monotonic() + HOLDER_WAIT
        logged = False
        while True:
            wait(self.blocks + (self.wblocks or []))
            who = self.client.who_has(self.blocks)
            missing = sum(not who.get(f.key) for f in self.blocks)
            if not missing or time.monotonic() > deadline:
                return who
            if not logged:
                log.info("waiting for %d row chunk(s) lost with a worker to be recomputed",
                         missing)
                logged = True
            time.sleep(0.05)

    def _build(self) -> None:
        self.close()
        who = self._holders()
        by_worker: dict[str, list[int]] = {}
        for i, fut in enumerate(self.blocks):
            holders = sorted(who.get(fut.key, ()))
            by_worker.setdefault(holders[0] if holders else "", []).append(i)
        rows = self.rows
        futures = []
        for address, idx in sorted(by_worker.items()):
            args = [self.blocks[i] for i in idx]
            if self.wblocks is not None:
                args += [self.wblocks[i] for i in idx]
            futures.append(self.client.submit(
                self.actor_class, idx, *args, weighted=self.wblocks is not None, scale=rows.scale,
                block_rows=rows.block_rows, sqnorms=[rows.chunk_sqnorm[i] for i in idx],
                actor=True, workers=[address] if address else None,
                allow_other_workers=bool(address),
                key=f"kmeans-resident-{uuid.uuid4().hex}"))
        self._futures = futures
        self.actors = [f.result() for f in futures]

    def lloyd(self, centers: np.ndarray) -> dict:
        """Like :meth:`ChunkedRows.lloyd`, plus ``computed``/``changed`` row counts."""
        centers = np.asarray(centers, dtype=np.float64)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                calls = [a.lloyd(centers) for a in self.actors]
                got = [pair for call in calls for pair in call.result()]
                break
            except (ValueError, TypeError, MemoryError):
                raise
            except Exception as exc:  # a lost worker surfaces as OSError, RuntimeError, ...
                if attempt == MAX_ATTEMPTS:
                    raise
                log.warning("lost a worker during an iteration (%s: %s); rebuilding the "
                            "resident state and repeating it", type(exc).__name__, exc)
                self.rebuilds += 1
                self._build()
        parts = [part for _, part in sorted(got, key=lambda pair: pair[0])]
        return combine_in_order(parts, _kernels.add, self.rows.split_every)

    def close(self) -> None:
        for f in getattr(self, "_futures", []):
            f.release()
        self._futures = []
        self.actors = []


def _chunk_futures(x) -> list:
    """The futures of a persisted Dask array's row chunks, in chunk order."""
    from distributed import futures_of

    by_key = {f.key: f for f in futures_of(x)}
    # Chunked by rows only: one key per row chunk ([[k0], [k1], ...] for 2-D).
    keys = [k[0] if isinstance(k, list) else k for k in x.__dask_keys__()]
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ValueError(f"rows are not persisted on the cluster (chunk {missing[0]} has no future)")
    return [by_key[k] for k in keys]

