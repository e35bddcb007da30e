"""The one Lloyd pass: per-chunk state kept on the workers, partials combined where they are.

Every Lloyd iteration, every score and the labels of a fit go through
:class:`Engine`, whatever the size of the data, the number of chunks, and
whether the rows are persisted in worker memory or streamed from their
source each pass.

* **State on the workers.**  A worker extension (:class:`ChunkStates`,
  registered once per cluster as a worker plugin, as ``distributed``'s
  shuffle keeps its state) holds a :class:`kmeans_dask._kernels.ChunkState`
  per chunk: labels and Yinyang bounds, about 24 bytes a row plus 4 per
  group of centres.  Persisted rows are never copied; streamed rows are read
  again each pass, and only their state stays.
* **One task per worker per iteration**, named ``kmeans-lloyd-<iteration>``
  and pinned to the worker holding its chunks, so the dashboard's task
  stream, progress bars and performance reports show every iteration.  The
  task runs the bounded kernel over its chunks (in parallel over the
  worker's threads) and adds their partials before anything travels: per
  iteration a worker sends one k x d partial, whatever its number of chunks.
  On up to ``kmeans_dask.peer-workers`` workers the workers send it to each
  other directly (:meth:`ChunkStates.share`), and each runs the loop's next
  step from the totals itself (:func:`worker_step`); on more, to the client.
* **Sums that do not depend on grouping.**  Every chunk's partial sums are
  rounded to a fixed grid, a power of two chosen from a bound on every
  possible total (total weight times the largest absolute value).  Multiples
  of that grid below 2**53 of it add exactly in float64, so the totals, and
  the centres, are the same bit for bit however the chunks are spread over
  workers and threads (pre-rounding, as in Demmel and Nguyen's reproducible
  summation).  The rounding changes a sum by at most 2**-53 of the bound, as
  one float64 rounding of the total would.  The inertia is computed once,
  from the totals (``sum w|x|^2 - 2 c.S + W |c|^2``).
* **Kept state equals fresh state.**  Labels depend only on the row and the
  centres (the kernels' shared nearest-centre rule), and bounds are relative
  to the centres they were made with, so a chunk whose state is missing
  (a new worker, a lost one, a chunk moved) or stale (it moved away and
  back) gives the same partial.  A worker lost during an iteration is
  handled by the scheduler: it recomputes lost row chunks from their source
  and reruns the task elsewhere with fresh state.

Without a ``distributed`` client the same pass runs in this process over a
thread pool (:class:`LocalEngine`).
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
import os
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import dask
import dask.array as da
import dask.local
from dask.core import flatten
import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from . import _kernels, config, dashboard

log = logging.getLogger(__name__)

EXTENSION = "kmeans-dask"
# A chunk's graph up to this size (pickled) is sent with its labels task; a
# larger one holds the rows themselves (rows from client memory).
SOURCE_BYTES = 64 * 1024
# Arguments of a pass larger than this travel as one key its tasks share.
SHARED_ARG_BYTES = 2**20
# Chained steps the client keeps submitted ahead of the one it reads, and
# submits at a time: enough to cover STEPS_AHEAD_SECONDS of steps (new ones
# take tens of milliseconds to reach the workers when the client and the
# scheduler share the workers' cores), few to drop after the end.
STEPS_AHEAD = 4
STEPS_AHEAD_MAX = 32
STEPS_AHEAD_SECONDS = 0.1
# The handler through which the workers of a chained loop send each other
# their partials, and how a worker waiting for one tells a slow peer from a
# lost one: it pings every PEER_POLL seconds, and gives the loop back to the
# client after PEER_STRIKES pings unanswered, or PEER_PATIENCE seconds in all
# (two fits sharing one-thread workers could otherwise wait on each other).
PEER_HANDLER = "kmeans_dask_part"
PEER_POLL = 1.0
PEER_STRIKES = 2
PEER_PATIENCE = 300.0


# --------------------------------------------------------------------- exact sums


def grid_for(bound: float) -> float:
    """The power of two ``g`` with ``bound < 2**52 g`` (0.0 when ``bound`` is 0).

    Multiples of ``g`` whose magnitudes stay below ``2**53 g`` add exactly in
    float64, in any order.
    """
    if not bound > 0:
        return 0.0
    if not math.isfinite(bound):
        raise ValueError(f"cannot bound sums of rows with non-finite values (bound {bound})")
    return math.ldexp(1.0, math.frexp(bound)[1] - 52)


def on_grid(values, grid: float):
    """``values`` rounded to the nearest multiple of ``grid`` (unchanged when it is 0)."""
    if not grid:
        return values
    if isinstance(values, np.ndarray):
        out = np.divide(values, grid)
        np.rint(out, out=out)
        out *= grid
        return out
    return float(round(values / grid) * grid)


def add_parts(parts: list) -> dict | None:
    """:func:`kmeans_dask._kernels.add` of the partials that exist (None if none do);
    exact for grid-rounded sums, so their order does not matter.  Integer sums
    that travelled narrowed (:func:`narrow`) are widened first."""
    parts = [_wide(p) for p in parts if p is not None]
    return _kernels.add(*parts) if parts else None


def narrow(part: dict) -> dict:
    """A worker's partial as it travels: exact integer sums as int32 where they fit,
    half the bytes of int64 (a worker's sums of uint8 rows fit up to 8.4M rows)."""
    raw = part.get("raw_sums")
    if raw is not None and raw.dtype == np.int64 and raw.size \
            and -2**31 <= raw.min() and raw.max() < 2**31:
        part = {**part, "raw_sums": raw.astype(np.int32)}
    return part


def _wide(part: dict) -> dict:
    raw = part.get("raw_sums")
    if raw is not None and raw.dtype != np.int64:
        part = {**part, "raw_sums": raw.astype(np.int64)}
    return part


@dataclass(frozen=True)
class PassSpec:
    """What every chunk's pass needs besides its rows and the centres.

    Parameters
    ----------
    run : str
        Names the per-chunk states of one fit on the workers.
    scale : float
        Multiplier applied to rows inside the kernels.
    block_rows : int
        Rows per block inside the kernel.
    sum_grid, count_grid : float
        Grids the per-chunk sums and weights are rounded to (:func:`grid_for`).
    keep_sums : bool
        Whether integer chunks keep their k x d sums between passes (and
        update them by the rows that changed centre).  Persisted rows do;
        streamed rows, whose workers hold only the per-row state, add their
        sums again each pass.
    """

    run: str
    scale: float
    block_rows: int
    sum_grid: float
    count_grid: float
    keep_sums: bool = True


def chunk_pass(X: np.ndarray, weights, state: _kernels.ChunkState, centers: np.ndarray,
               spec: PassSpec, *, keep_centers: bool = False,
               work: _kernels.Workspace | None = None) -> dict:
    """The bounded kernel on one chunk, its sums and weights rounded to the spec's
    grids (integer rows: their exact integer sums, ``raw_sums``).

    ``keep_centers``: the state may keep ``centers`` itself (float64, never
    changed afterwards) rather than a copy, so the chunks of one pass share one.
    ``work``: the calling thread's :class:`kmeans_dask._kernels.Workspace`.
    """
    out = _kernels.bounded_lloyd_chunk(X, state, centers, weights, scale=spec.scale,
                                       block_rows=spec.block_rows, keep_centers=keep_centers,
                                       keep_sums=spec.keep_sums, work=work)
    part = {"counts": on_grid(out["counts"], spec.count_grid), "rows": int(X.shape[0]),
            "computed": out["computed"], "pairs": out["pairs"], "changed": out["changed"]}
    if "raw_sums" in out:
        # Integers add exactly whatever the chunks: the totals, and so the
        # centres, do not depend on how the rows are cut into chunks either.
        part["raw_sums"] = out["raw_sums"]
    else:
        part["sums"] = on_grid(out["sums"], spec.sum_grid)
    return part


def pass_chunks(states: dict, chunks: list, centers: np.ndarray, spec: PassSpec,
                pool: ThreadPoolExecutor | None = None,
                workspaces: _kernels.Workspaces | None = None) -> dict | None:
    """:func:`chunk_pass` over ``chunks`` (``[(index, X, weights)]``), added together.

    ``X`` and ``weights`` are arrays, or :class:`Source` s read here (streamed
    rows).  ``states`` maps a chunk index to its kept state; a missing state,
    or one made for a chunk of another size, is made fresh.  Memory beyond
    the states is a few partials, whatever the number of chunks: they are
    added as they come (exactly, so in any order), and the states share one
    copy of the centres.  ``workspaces`` gives each thread the scratch
    arrays it reuses from chunk to chunk and pass to pass.
    """
    centers = np.array(centers, dtype=np.float64)
    workspaces = _kernels.Workspaces() if workspaces is None else workspaces

    def one(item):
        i, X, w = item
        X, w = load(X), load(w)
        st = states.get(i)
        if st is None or st.labels.shape[0] != X.shape[0]:
            st = _kernels.ChunkState(X, w, scale=spec.scale, block_rows=spec.block_rows)
            states[i] = st
        return chunk_pass(X, w, st, centers, spec, keep_centers=True, work=workspaces.work)

    def total(parts):
        out = None
        for part in parts:
            out = part if out is None else add_parts([out, part])
        return out

    if pool is None or len(chunks) < 2:
        return total(one(item) for item in chunks)
    # The pool's threads share the cores: BLAS threads of their own would
    # oversubscribe them.
    with _kernels.one_blas_thread():
        return total(pool.map(one, chunks))


def chunk_labels(X, state, centers: np.ndarray, spec: PassSpec) -> np.ndarray:
    """int32 labels of one chunk for ``centers``: from its state when the state's last
    pass used these very centres, else computed (the same rule, so the same labels)."""
    if state is not None and state.centers is not None and np.array_equal(state.centers, centers):
        return state.labels.astype(np.int32)
    return _kernels.predict_chunk(load(X), centers, scale=spec.scale, block_rows=spec.block_rows)


# --------------------------------------------------------------------- one Lloyd step


@dataclass(frozen=True)
class LoopSpec:
    """What turns a pass's totals into the next centres, wherever that is done.

    Parameters
    ----------
    max_iter : int
        The last iteration; the pass after it is the final one.
    tol : float
        Absolute tolerance on the centres' squared shift.
    project : callable, optional
        Maps every new set of centres (spherical K-Means scales them to norm 1).
    sqnorm : float
        ``sum w |x|^2`` over all rows (for the inertia from the totals).
    dtype : str
        The dtype the kernels round the centres to.
    """

    max_iter: int
    tol: float
    project: object
    sqnorm: float
    dtype: str


def finish(part: dict | None, centers: np.ndarray, spec: PassSpec, sqnorm: float,
           dtype) -> dict:
    """A pass's added partials as totals: float64 ``sums``, ``counts`` and the ``inertia``
    of ``centers`` (the centres the pass used)."""
    k, d = centers.shape
    if part is None:
        part = {"sums": np.zeros((k, d)), "counts": np.zeros(k), "rows": 0, "computed": 0,
                "pairs": 0, "changed": 0}
    part = dict(part)
    part.pop("worker", None)
    if "raw_sums" in part:
        part["sums"] = part.pop("raw_sums").astype(np.float64) * spec.scale
    part["inertia"] = _kernels._inertia(centers, dtype, part["sums"], part["counts"], sqnorm)
    return part


def next_centers(centers: np.ndarray, sums: np.ndarray, counts: np.ndarray, project=None):
    """The means of the clusters that have weight (the others keep their centre),
    mapped by ``project``; and their squared shift from ``centers``."""
    new = centers.copy()
    keep = counts > 0
    new[keep] = sums[keep] / counts[keep, None]
    if project is not None:
        new = project(new)
    return new, float(((new - centers) ** 2).sum())


def after_pass(part: dict, centers: np.ndarray, iteration: int, loop: LoopSpec,
               final: bool) -> dict:
    """What follows the pass of ``iteration`` with ``centers`` (``part``: its totals).

    * ``"end"``: that was the final pass; its ``inertia`` and ``centers``.
    * ``"halt"``: a cluster is empty.  Moving it needs the farthest rows, a
      pass of its own, which the loop's caller runs (``part`` and ``centers``
      are given for it).
    * ``"iteration"``: the iteration's record (``inertia``, ``center_shift``,
      ``changed``, ``skipped``), the next ``centers``, and whether the pass
      with them is the ``final`` one (converged, or ``max_iter`` reached).

    The one rule for every engine, and for every worker of a chained loop,
    each of which reaches the same centres from the same totals.
    """
    if final:
        return {"kind": "end", "iteration": iteration, "inertia": part["inertia"],
                "centers": centers}
    if not (part["counts"] > 0).all():
        return {"kind": "halt", "iteration": iteration, "part": part, "centers": centers}
    new, shift = next_centers(centers, part["sums"], part["counts"], loop.project)
    k = centers.shape[0]
    return {"kind": "iteration", "iteration": iteration, "inertia": float(part["inertia"]),
            "center_shift": shift, "relocated": 0, "changed": int(part["changed"]),
            # Near ties are ranked twice (float32, then exactly): clamp at 0.
            "skipped": max(0.0, 1.0 - part["pairs"] / max(1, part["rows"] * k)),
            "centers": new, "final": shift <= loop.tol or iteration >= loop.max_iter}


def seed_chunks(states: dict, chunks: list, candidates: np.ndarray, known: int, what: str,
                args: dict, spec: PassSpec, pool: ThreadPoolExecutor | None = None,
                workspaces: _kernels.Workspaces | None = None) -> dict:
    """One k-means|| step over ``chunks`` (``[(index, X, weights)]``), added together.

    Every chunk keeps, in ``states``, each row's squared distance to and index
    of its nearest candidate among the first ``known`` of ``candidates``
    (:func:`kmeans_dask._kernels.nearest_chunk`), and brings it up to date
    with the candidates added since, before it does ``what``:

    * ``"cost"``: the weighted sum of those distances, rounded to
      ``args["grid"]`` (:func:`grid_for`), so that it adds exactly;
    * ``"sample"``: the rows kept by k-means||'s oversampling
      (:func:`kmeans_dask._kernels.sample_chunk`, ``args`` its ``factor``,
      ``total`` and ``seed``), as ``[(chunk index, rows)]``;
    * ``"weights"``: the weight of the rows nearest to each candidate; with
      ``args["release"]`` the states are dropped afterwards (the seeding's last
      step: they would otherwise take 16 bytes a row through the whole fit).

    A missing state, or one of another seeding (``args["token"]``), is made
    from all ``known`` candidates at once: the nearest-centre rule gives the
    same distances and, on ties, the same (earlier) candidate, so a chunk
    moved to another worker gives the same result.
    """
    token = args["token"]
    workspaces = _kernels.Workspaces() if workspaces is None else workspaces

    def one(item):
        i, X, w = item
        X, w = load(X), load(w)
        st = states.get(("seed", i))
        if st is None or st["token"] != token or st["near"].shape[0] != X.shape[0]:
            st = {"token": token, "known": 0, "near": None}
        if st["known"] < known:
            near = _kernels.nearest_chunk(X, candidates[st["known"]:known], st["near"],
                                          offset=st["known"], scale=spec.scale,
                                          block_rows=spec.block_rows, work=workspaces.work)
            st = {"token": token, "known": known, "near": near}
            states[("seed", i)] = st
        dist = st["near"][:, 0]
        w = None if w is None else np.asarray(w, dtype=np.float64)
        if what == "cost":
            return {"cost": on_grid(float(dist.sum() if w is None else dist @ w), args["grid"])}
        if what == "sample":
            return {"rows": [(i, _kernels.sample_chunk(X, dist, w, factor=args["factor"],
                                                       total=args["total"],
                                                       seed=(*args["seed"], i),
                                                       scale=spec.scale))]}
        if what == "weights":
            counts = np.bincount(st["near"][:, 1].astype(np.intp), weights=w, minlength=known)
            if args.get("release"):
                states.pop(("seed", i), None)
            return {"weights": on_grid(counts.astype(np.float64), spec.count_grid)}
        raise ValueError(f"unknown seeding step {what!r}")

    if pool is None or len(chunks) < 2:
        return add_parts([one(item) for item in chunks])
    with _kernels.one_blas_thread():
        return add_parts(list(pool.map(one, chunks)))


class Source:
    """One chunk of a lazy Dask array, computed where it is needed.

    Wrapping the chunk's (culled) graph keeps ``distributed`` from computing
    it as a dependency: a streamed chunk is read inside the pass that uses
    it, one at a time, and dropped afterwards.
    """

    def __init__(self, block: da.Array):
        # Optimised alone, the block's graph holds only the tasks it needs.
        (self.block,) = dask.optimize(block)
        self.graph = dict(self.block.__dask_graph__())
        (self.key,) = flatten(self.block.__dask_keys__())

    def compute(self) -> np.ndarray:
        # The synchronous scheduler on the graph as it is: ``block.compute``
        # would optimise it again, which cost more than reading the chunk
        # (10,000 MNIST images: 10 ms that way, 5 ms this way), and holds the
        # GIL that whatever runs beside it needs.
        return np.asarray(dask.local.get_sync(self.graph, self.key))


def load(x):
    """The array of a chunk given as an array or a :class:`Source` (None stays None)."""
    return x.compute() if isinstance(x, Source) else x


# --------------------------------------------------------------------- worker side


class PeerLoop:
    """One chained Lloyd loop's state on one worker.

    The last passes this worker ran, and the partials of each step, from this
    worker and from the others, which send theirs straight here
    (:meth:`ChunkStates.receive`) rather than through the scheduler.
    """

    def __init__(self):
        self.cond = threading.Condition()
        self.parts: dict[int, dict[int, dict]] = {}
        # (iteration, centres, final) of the last two passes: the last one's the
        # next step needs, and the client can go on from either if a worker is lost.
        self.passes: deque = deque(maxlen=2)
        self.t = 0.0
        # Why the loop ended here: "end", "halt", "lost", "cancelled" (by the
        # client), or "unsent" (a peer refused this worker's partial).
        self.stopped = None

    def put(self, step: int, slot: int, part: dict) -> None:
        with self.cond:
            self.parts.setdefault(step, {})[slot] = part
            self.cond.notify_all()

    def stop(self, why: str) -> bool:
        """End the loop here for ``why``; False if it had ended already (a partial
        a peer refused does not end it: the next step reports that)."""
        with self.cond:
            if self.stopped not in (None, "unsent"):
                return False
            self.stopped = why
            self.parts.clear()
            self.cond.notify_all()
            return True


class ChunkStates(WorkerPlugin):
    """Per-chunk Lloyd states of every running fit, on one worker (a worker plugin).

    ``runs[run][chunk index]`` is a :class:`kmeans_dask._kernels.ChunkState`;
    ``loops[run, chain]`` a :class:`PeerLoop`.  Registered on the cluster by
    :class:`ClusterEngine`; tasks reach it through :func:`extension`, and the
    other workers' partials through the worker's ``kmeans_dask_part``
    handler, as ``distributed``'s shuffle receives its shards.
    """

    name = EXTENSION
    idempotent = True  # a second fit on the same cluster keeps the first's states

    def __init__(self):
        self.runs: dict[str, dict] = {}
        self.loops: dict[tuple, PeerLoop] = {}
        self.dropped: set = set()
        self.received = 0  # partials other workers sent here
        self.sent_bytes = 0  # array bytes of the partials sent to other workers
        self.threads = 1
        self.worker = None
        self._pool = None
        self._lock = None  # made on the worker: the plugin travels pickled
        self.workspaces = None  # per-thread scratch arrays, made on the worker too

    def setup(self, worker=None):
        self._lock = threading.Lock()
        self.workspaces = _kernels.Workspaces()
        if worker is not None:
            self.worker = worker
            self.threads = max(1, int(worker.state.nthreads))
            worker.handlers[PEER_HANDLER] = self.receive

    def teardown(self, worker=None):
        self.runs.clear()
        for loop in self.loops.values():
            loop.stop("cancelled")
        self.loops.clear()
        if worker is not None:
            worker.handlers.pop(PEER_HANDLER, None)
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def states(self, run: str) -> dict:
        with self._lock:
            return self.runs.setdefault(run, {})

    def loop(self, run: str, chain: int) -> PeerLoop:
        with self._lock:
            if run in self.dropped:  # a step or partial arriving after the fit
                gone = PeerLoop()
                gone.stopped = "cancelled"
                return gone
            return self.loops.setdefault((run, chain), PeerLoop())

    def drop(self, run: str) -> None:
        with self._lock:
            self.runs.pop(run, None)
            self.dropped.add(run)
            gone = [key for key in self.loops if key[0] == run]
            loops = [self.loops.pop(key) for key in gone]
        for loop in loops:
            loop.stop("cancelled")

    def pool(self):
        """Threads to pass several chunks at once (None on a one-thread worker).

        A task occupies one of the worker's threads; its chunks are passed
        over as many threads as the worker has, as the worker would run as
        many tasks.  NumPy and the compiled loops release the GIL.
        """
        if self.threads < 2:
            return None
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, "kmeans-pass")
        return self._pool

    async def receive(self, run: str, chain: int, step: int, slot: int, part) -> str:
        """Handler: another worker's partial of one step of a chained loop."""
        self.received += 1
        loop = self.loop(run, chain)
        if loop.stopped is None:
            loop.put(step, slot, part)
        return "OK"

    def share(self, run: str, chain: int, step: int, slot: int, part: dict,
              peers: list) -> None:
        """Keep this worker's partial of ``step`` and send it to every peer, without
        waiting: the peers' next steps wait for it, and this worker goes on."""
        import asyncio

        from distributed.protocol import to_serialize

        self.loop(run, chain).put(step, slot, part)
        if not peers:
            return
        payload = to_serialize(part)
        self.sent_bytes += len(peers) * sum(v.nbytes for v in part.values()
                                            if isinstance(v, np.ndarray))

        async def send(addr):
            try:
                reply = await self.worker.rpc(addr).kmeans_dask_part(
                    run=run, chain=chain, step=step, slot=slot, part=payload)
                if reply != "OK":  # a worker without the handler answers None
                    raise RuntimeError(f"it answered {reply!r}")
            except OSError as exc:  # a lost peer: the others' steps notice it
                log.info("could not send step %d's partial to %s: %s", step, addr, exc)
            except Exception as exc:
                # The peer answered but did not take it: this worker's next step
                # hands the loop to the client.
                log.warning("worker %s refused step %d's partial: %s", addr, step, exc)
                self.loop(run, chain).stop("unsent")

        for addr in peers:
            asyncio.run_coroutine_threadsafe(send(addr), self.worker.loop.asyncio_loop)

    def wait_parts(self, loop: PeerLoop, step: int, workers: list, slot: int) -> list | None:
        """Every worker's partial of ``step``, in slot order; None if the loop stopped
        or a worker that owes one is gone (it no longer answers)."""
        n = len(workers)
        with loop.cond:
            early = slot not in loop.parts.get(step, {}) and loop.stopped is None
        if early:
            # This worker's own step before is still running (a worker with
            # several threads starts the steps ahead at once): wait for it off
            # the worker's threads, with no patience, as it cannot be lost.
            from distributed import rejoin, secede

            secede()
            try:
                with loop.cond:
                    while slot not in loop.parts.get(step, {}) and loop.stopped is None:
                        loop.cond.wait(PEER_POLL)
            finally:
                rejoin()
        waited, strikes = 0.0, 0
        with loop.cond:
            while True:
                got = loop.parts.get(step, {})
                if loop.stopped is not None:
                    return None
                if len(got) == n:
                    del loop.parts[step]
                    return [got[j] for j in range(n)]
                if not loop.cond.wait(PEER_POLL):
                    waited += PEER_POLL
                    missing = [workers[j] for j in range(n) if j not in got]
                    loop.cond.release()
                    try:
                        alive = self._answer(missing)
                    finally:
                        loop.cond.acquire()
                    strikes = 0 if alive else strikes + 1
                    if strikes >= PEER_STRIKES or waited >= PEER_PATIENCE:
                        log.warning("step %d: no partial from %s after %.0f s; leaving the "
                                    "loop to the client", step, missing, waited)
                        return None

    def _answer(self, addrs: list) -> bool:
        """Whether every worker in ``addrs`` answers a ping within a second."""
        import asyncio

        async def ping():
            await asyncio.gather(*(asyncio.wait_for(self.worker.rpc(a).identity(), 1.0)
                                   for a in addrs))

        try:
            asyncio.run_coroutine_threadsafe(ping(), self.worker.loop.asyncio_loop).result(2.0)
            return True
        except Exception:
            return False


def extension() -> ChunkStates:
    """This worker's :class:`ChunkStates`."""
    from distributed import get_worker

    worker = get_worker()
    ext = worker.plugins.get(EXTENSION)
    if ext is None:
        raise RuntimeError(f"worker {worker.address} has no {EXTENSION!r} plugin; the fit "
                           f"registers it, so this worker joined in an unusual way")
    return ext


def worker_pass(spec: PassSpec, centers: np.ndarray, indices: list, rows: list,
                weights: list | None, publish: tuple = ()) -> dict:
    """A task: the pass over one worker's chunks (arrays, or :class:`Source` s when streamed).

    ``publish``: the K-Means page's messages about the iteration before, sent
    from here so that the client sends the scheduler one message per iteration.

    BLAS runs on one thread here, as a task's worker thread stands for one
    core (Dask's nanny sets ``OMP_NUM_THREADS=1`` for the same reason): a
    worker started without the nanny would otherwise run BLAS on every core,
    against the other workers' passes on the same cores.
    """
    from distributed import get_worker

    for msg in publish:
        get_worker().log_event(dashboard.TOPIC, msg)
    ext = extension()
    weights = weights if weights is not None else [None] * len(indices)
    if not len(rows) == len(weights) == len(indices):
        raise RuntimeError(f"pass of {len(indices)} chunks given {len(rows)} row and "
                           f"{len(weights)} weight chunks")
    with _kernels.one_blas_thread():
        part = pass_chunks(ext.states(spec.run), list(zip(indices, rows, weights)), centers,
                           spec, ext.pool(), ext.workspaces)
    return {**narrow(part), "worker": get_worker().address}


def worker_seed(spec: PassSpec, candidates: np.ndarray, known: int, what: str, args: dict,
                indices: list, rows: list, weights: list | None) -> dict:
    """A task: one k-means|| step (:func:`seed_chunks`) over one worker's chunks."""
    from distributed import get_worker

    ext = extension()
    weights = weights if weights is not None else [None] * len(indices)
    with _kernels.one_blas_thread():
        part = seed_chunks(ext.states(spec.run), list(zip(indices, rows, weights)), candidates,
                           known, what, args, spec, ext.pool(), ext.workspaces) or {}
    part["worker"] = get_worker().address
    return part


def worker_labels(spec: PassSpec, centers: np.ndarray, indices: list, rows: list) -> list:
    """A task: the labels of chunks ``indices`` (``rows`` their sources), from their
    states on this worker where it has them."""
    states = extension().states(spec.run)
    return [chunk_labels(X, states.get(i), centers, spec) for i, X in zip(indices, rows)]


def hold(value):
    """A task returning its argument: keeps a small object on a chosen worker."""
    return value


def worker_step(spec: PassSpec, loop: LoopSpec, chain: int, slot: int, workers: list,
                indices: list, rows: list, weights: list | None, *, iteration: int,
                start: dict | None = None, publish: tuple = (), page: dict | None = None,
                want_centers: bool = False, chunks_pass=None) -> dict:
    """A task: step ``iteration`` of a chained Lloyd loop, on one worker's chunks.

    ``workers[j]`` runs slot ``j`` of every step (the lead is slot 0).  The
    steps of a loop do not depend on each other in the graph: each worker
    runs them in order, and each step waits for every worker's partial of the
    step before, which the workers send each other directly
    (:meth:`ChunkStates.share`).  This step adds them, applies
    :func:`after_pass` to the totals, as every worker does, and runs the pass
    with the next centres.  Neither the scheduler nor the client stands
    between two passes; the client reads each step's record as it comes.
    ``start`` (the first step): the centres and whether their pass is the
    final one.  Once the loop has ended, halted or lost a worker, a step
    does nothing.  ``page``: the K-Means page's run, size and start time,
    where the lead shows each record.  ``chunks_pass``: what passes the
    chunks, :func:`pass_chunks` by default (the benchmark times the
    orchestration alone with one that does no work).
    """
    from distributed import get_worker

    worker = get_worker()
    ext = extension()
    state = ext.loop(spec.run, chain)
    lead = slot == 0
    for msg in publish:
        worker.log_event(dashboard.TOPIC, msg)
    out = None
    if start is not None:
        centers, final, state.t = start["centers"], start["final"], time.time()
    else:
        parts = (ext.wait_parts(state, iteration - 1, workers, slot)
                 if state.stopped is None else None)
        if parts is None:
            if not state.stop("lost"):
                return {"stop": True, "out": None, "worker": worker.address}
            # The client goes on from the passes this worker knows.
            return {"stop": True, "worker": worker.address,
                    "out": {"kind": "lost", "passes": list(state.passes)}}
        _, before, was_final = state.passes[-1]
        part = finish(add_parts(parts), before, spec, loop.sqnorm, loop.dtype)
        out = after_pass(part, before, iteration - 1, loop, was_final)
        if out["kind"] != "iteration":
            state.stop(out["kind"])
            return {"stop": True, "out": out if lead else None, "worker": worker.address}
        centers, final = out.pop("centers"), out["final"]
        now = time.time()
        out["seconds"], state.t = now - state.t, now
        if lead and page is not None:
            record = {**out, "elapsed": now - page["t0"]}
            worker.log_event(dashboard.TOPIC, dashboard.iteration_message(
                page["run"], record, centers, n_rows=page["n_rows"], max_iter=page["max_iter"]))
            out["published"] = True
        if want_centers:
            out["centers"] = centers
    state.passes.append((iteration, centers, final))
    weights = weights if weights is not None else [None] * len(indices)
    with _kernels.one_blas_thread():
        part = (chunks_pass or pass_chunks)(ext.states(spec.run),
                                            list(zip(indices, rows, weights)), centers, spec,
                                            ext.pool(), ext.workspaces)
    ext.share(spec.run, chain, iteration, slot, narrow(part),
              [addr for j, addr in enumerate(workers) if j != slot])
    return {"stop": False, "out": out if lead else None, "worker": worker.address}


# --------------------------------------------------------------------- client side


class Engine:
    """Lloyd passes over ``rows``, and the labels they leave in the per-chunk states.

    Parameters
    ----------
    rows : kmeans_dask._passes.ChunkedRows
        The rows (persisted or lazy), with their statistics already computed.
    stats : dict
        Totals from :meth:`ChunkedRows.stats`: ``w``, ``absmax``, ``sqnorm``.
    persisted : bool
        Whether the rows' Dask arrays are persisted (else each pass reads them).
    source : dask.array.Array, optional
        Persisted rows: the same rows before ``persist`` (same chunks), which
        the labels fall back to if they must be computed again after the
        persisted chunks are gone (a worker lost after the fit).
    """

    def __init__(self, rows, stats: dict, *, persisted: bool, source=None):
        self.rows = rows
        self.source = source
        self.persisted = persisted
        self.sqnorm = float(stats["sqnorm"])
        self.dtype = _kernels.compute_dtype(rows.X.dtype)
        self.spec = PassSpec(run=uuid.uuid4().hex, scale=rows.scale, block_rows=rows.block_rows,
                             sum_grid=grid_for(float(stats["w"]) * float(stats["absmax"])),
                             count_grid=grid_for(float(stats["w"])), keep_sums=persisted)
        self.iteration = 0
        self.passes = 0
        self.seeds = 0
        # k-means||'s costs: no row is farther than 2 sqrt(d) absmax from a candidate.
        d = rows.X.shape[1]
        self.cost_grid = grid_for(4.0 * d * float(stats["absmax"]) ** 2 * float(stats["w"]))

    @staticmethod
    def create(rows, stats: dict, *, persisted: bool, source=None) -> Engine:
        """A :class:`ClusterEngine` with a ``distributed`` client, else a :class:`LocalEngine`."""
        from .cluster import active_client

        client = active_client()
        if client is None:
            return LocalEngine(rows, stats, persisted=persisted, source=source)
        return ClusterEngine(client, rows, stats, persisted=persisted, source=source)

    def _finish(self, part: dict | None, centers: np.ndarray) -> dict:
        self.passes += 1
        return finish(part, centers, self.spec, self.sqnorm, self.dtype)

    def loop_spec(self, max_iter: int, tol: float, project=None) -> LoopSpec:
        return LoopSpec(max_iter=int(max_iter), tol=float(tol), project=project,
                        sqnorm=self.sqnorm, dtype=np.dtype(self.dtype).str)

    def iterate(self, centers: np.ndarray, first: int, *, max_iter: int, tol: float,
                project=None, final: bool = False, want_centers: bool = False):
        """Lloyd steps from ``centers``, whose pass is iteration ``first``.

        Yields :func:`after_pass` results in order: one record per iteration
        (with its ``seconds``, and the ``centers`` it reached, here always),
        then an ``"end"`` (the final pass's inertia and centres) or a
        ``"halt"`` (an empty cluster, for the caller to move).  ``final``:
        the pass with ``centers`` is already the final one.
        ``want_centers``: every record must carry its centres (engines that
        keep them off the client send them only then).
        """
        loop = self.loop_spec(max_iter, tol, project)
        iteration = first
        while True:
            t0 = time.perf_counter()
            out = after_pass(self.lloyd(centers, iteration), centers, iteration, loop, final)
            if out["kind"] != "iteration":
                yield out
                return
            out["seconds"] = time.perf_counter() - t0
            self.publish(out, out["centers"], max_iter)
            yield out
            centers, final, iteration = out["centers"], out["final"], iteration + 1

    def lloyd(self, centers: np.ndarray, iteration: int | None = None) -> dict:
        """Assign every row to ``centers``.

        Returns ``sums`` (k, d) and ``counts`` (k,) over all rows, ``inertia``,
        and the row counts ``computed`` (rows whose distances were looked at),
        ``pairs`` (row-centre distances ranked) and ``changed`` (rows that
        changed centre).
        """
        centers = np.ascontiguousarray(centers, dtype=np.float64)
        self.iteration = self.iteration + 1 if iteration is None else iteration
        return self._finish(self._pass(centers), centers)

    def seed(self, candidates: np.ndarray, what: str, **args):
        """One k-means|| step over all chunks (:func:`seed_chunks`), the rows' nearest
        candidates kept where the chunks are; ``args["token"]`` names the seeding.

        Returns the cost (a float), the sampled rows (an array) or the
        candidates' weights (an array), as ``what`` asks.
        """
        candidates = np.ascontiguousarray(candidates, dtype=np.float64)
        if what == "cost":
            args["grid"] = self.cost_grid
        self.seeds += 1
        part = self._seed(candidates, len(candidates), what, args) or {}
        part.pop("worker", None)
        if what == "sample":
            got = sorted(part.get("rows", []), key=lambda item: item[0])
            d = candidates.shape[1]
            return np.concatenate([r for _, r in got]) if got else np.empty((0, d))
        if what == "weights":
            return part.get("weights", np.zeros(len(candidates)))
        return float(part.get("cost", 0.0))

    def publish(self, record: dict, centers: np.ndarray, max_iter: int) -> None:
        """Show an iteration's record on the cluster's K-Means page (nothing without one)."""

    def close(self) -> None:
        """Forget the per-chunk states."""


class LocalEngine(Engine):
    """The pass in this process, over a thread pool (no ``distributed`` client,
    or rows that are here already: ``arrays``, a list of ``(X, weights)``
    NumPy chunks of ``rows``)."""

    def __init__(self, rows, stats, *, persisted, source=None, arrays=None):
        super().__init__(rows, stats, persisted=persisted, source=source)
        X = rows.X.to_delayed().ravel()
        W = rows.weights.to_delayed().ravel() if rows.weights is not None else [None] * len(X)
        if arrays is not None:
            # The rows' chunks, already in this process.
            X, W = [x for x, _ in arrays], [w for _, w in arrays]
        elif persisted:
            got = dask.compute(*X, *[w for w in W if w is not None])
            X, W = got[:len(X)], (got[len(X):] or [None] * len(X))
        else:
            X = [Source(rows.X.blocks[i]) for i in range(len(X))]
            if rows.weights is not None:
                W = [Source(rows.weights.blocks[i]) for i in range(len(X))]
        self.chunks = [(i, x, w) for i, (x, w) in enumerate(zip(X, W))]
        self.states: dict = {}
        self.workspaces = _kernels.Workspaces()
        threads = min(os.cpu_count() or 1, len(self.chunks))
        self.pool = ThreadPoolExecutor(threads, "kmeans-pass") if threads > 1 else None

    def _pass(self, centers):
        return pass_chunks(self.states, self.chunks, centers, self.spec, self.pool,
                           self.workspaces)

    def _seed(self, candidates, known, what, args):
        return seed_chunks(self.states, self.chunks, candidates, known, what, args, self.spec,
                           self.pool, self.workspaces)

    def labels(self, centers: np.ndarray) -> da.Array:
        """Lazy int32 labels, chunked like the rows, for ``centers`` (the last pass's)."""
        centers = np.ascontiguousarray(centers, dtype=np.float64)
        parts = [chunk_labels(x, self.states.get(i), centers, self.spec)
                 for i, x, _ in self.chunks]
        return da.from_array(np.concatenate(parts), chunks=(self.rows.row_chunks,))

    def close(self) -> None:
        self.states = {}
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None


class ClusterEngine(Engine):
    """The pass as one task per worker on a ``distributed`` cluster."""

    # What each pass task runs, and each chained step's pass (the benchmark
    # times the orchestration alone with ones that do no work).
    task = staticmethod(worker_pass)
    chunks_pass = None

    def __init__(self, client, rows, stats, *, persisted, source=None):
        super().__init__(rows, stats, persisted=persisted, source=source)
        self.client = client
        client.register_plugin(ChunkStates(), name=EXTENSION)
        self.page = dashboard.register(client)
        self._started = time.perf_counter()
        self._outbox: list = []
        self._held: list = []
        self.tag = self.spec.run[:8]
        n = rows.nchunks
        if persisted:
            self.blocks = _chunk_futures(rows.X)
            self.wblocks = _chunk_futures(rows.weights) if rows.weights is not None else None
        else:
            self.blocks = [Source(rows.X.blocks[i]) for i in range(n)]
            self.wblocks = ([Source(rows.weights.blocks[i]) for i in range(n)]
                            if rows.weights is not None else None)
        self.replans = 0
        self.chains = 0
        self._plan()

    # ------------------------------------------------------------------ placement

    def _workers(self) -> dict:
        from .cluster import worker_info

        return {addr: max(1, int(info.get("nthreads", 1)))
                for addr, info in worker_info(self.client).items()}

    def _plan(self) -> None:
        """Which worker passes which chunks: where persisted chunks live, else
        contiguous runs of chunks shared out by the workers' threads."""
        n = self.rows.nchunks
        if self.persisted:
            owner = chunk_owners(self.client, self.blocks, self.rows.row_chunks)
        else:
            workers = sorted(self._workers().items())
            if not workers:
                raise RuntimeError("the cluster has no workers")
            total = sum(t for _, t in workers)
            cuts = np.cumsum([0] + [t for _, t in workers]) * n / total
            owner = [workers[int(np.searchsorted(cuts, i, side="right") - 1)][0]
                     for i in range(n)]
        plan: dict[str, list[int]] = {}
        for i, addr in enumerate(owner):
            plan.setdefault(addr, []).append(i)
        self.plan = sorted(plan.items())
        if not self.persisted:
            # The chunks' sources travel once, to a small task on their worker that
            # every pass then depends on (the scheduler can recompute it elsewhere).
            self.sources = [
                self.client.submit(hold, [self.blocks[i] for i in idx], pure=False,
                                   key=f"kmeans-sources-{self.tag}-{self.replans}-{j}",
                                   workers=[addr] if addr else None, allow_other_workers=True)
                for j, (addr, idx) in enumerate(self.plan)]
            self.wsources = (None if self.wblocks is None else [
                self.client.submit(hold, [self.wblocks[i] for i in idx], pure=False,
                                   key=f"kmeans-wsources-{self.tag}-{self.replans}-{j}",
                                   workers=[addr] if addr else None, allow_other_workers=True)
                for j, (addr, idx) in enumerate(self.plan)])

    def _args(self, j: int, idx: list) -> tuple:
        if not self.persisted:
            return self.sources[j], (self.wsources[j] if self.wsources else None)
        return ([self.blocks[i] for i in idx],
                None if self.wblocks is None else [self.wblocks[i] for i in idx])

    # ------------------------------------------------------------------ passes

    def _pass(self, centers):
        # Readable on the dashboard as kmeans-lloyd; unique per pass and per fit.
        name = f"kmeans-lloyd-{self.iteration}-{self.tag}-{self.passes}"
        return self._run(name, self.task, (centers,), publish=True)

    def iterate(self, centers, first, *, max_iter, tol, project=None, final=False,
                want_centers=False):
        """:meth:`Engine.iterate`; on up to ``kmeans_dask.peer-workers`` workers, as a
        chained loop (:func:`worker_step`): every step is a task per worker, and
        each worker starts its next pass as soon as the others' partials reach
        it, from them directly.  The client submits steps ahead in batches and
        reads the records as they come, off the loop's path.  If a worker is
        lost, the loop goes on through the client from the first iteration
        whose record the caller lacks."""
        if len(self.plan) > config.get("peer-workers") or "" in dict(self.plan):
            yield from super().iterate(centers, first, max_iter=max_iter, tol=tol,
                                       project=project, final=final,
                                       want_centers=want_centers)
            return
        loop = self.loop_spec(max_iter, tol, project)
        self.chains += 1
        start = {"centers": np.ascontiguousarray(centers, dtype=np.float64), "final": final}
        page = None
        if self.page:
            page = {"run": self.spec.run, "n_rows": self.rows.n, "max_iter": max_iter,
                    "t0": time.time() - (time.perf_counter() - self._started)}
        steps: dict[int, list] = {}
        records: dict[int, dict] = {}
        # Never past the last possible step: the one after the final pass.
        last = max(first, max_iter) + 2

        ahead = STEPS_AHEAD

        def submit():
            begin = max(steps, default=first - 1) + 1
            stop = min(begin + ahead, last + 1)
            if begin < stop:
                steps.update(self._steps(range(begin, stop), first, start, loop,
                                         want_centers, page))

        submit()
        ended = False
        yielded = first - 1  # the last iteration whose record the caller has
        try:
            # Step i's record is the iteration before's.
            for iteration in itertools.count(first + 1):
                ready = records.get(iteration)
                lost = (self._wait_step(iteration, steps, records)
                        if ready is None or ready["out"] is None else None)
                if lost is None and records[iteration]["out"]["kind"] == "lost":
                    lost = records.pop(iteration)["out"]
                for it in [it for it in steps if it < iteration]:
                    del steps[it]
                if lost is not None:
                    self.replans += 1
                    self._cancel(steps)
                    # Free the steps still waiting (for a worker that is alive
                    # but whose steps were cancelled).
                    self._stop_loop()
                    ended = True
                    # Go on from the latest pass known up to the first record the
                    # caller lacks (records it has are not given twice).
                    known = {it: (c, f) for it, c, f in lost["passes"]}
                    known.setdefault(first, (start["centers"], start["final"]))
                    at = max(it for it in known if it <= yielded + 1)
                    log.info("a worker was lost during the loop; placing the passes again, "
                             "through the client from iteration %d", at)
                    self._plan()
                    for out in super().iterate(known[at][0], at, max_iter=max_iter, tol=tol,
                                               project=project, final=known[at][1],
                                               want_centers=want_centers):
                        if out["kind"] == "iteration" and out["iteration"] <= yielded:
                            continue
                        yield out
                    return
                self.passes += 1
                out = records.pop(iteration)["out"]
                if out["kind"] != "iteration":
                    ended = True
                    yield out
                    return
                self.iteration = yielded = out["iteration"]
                yield out
                # Enough steps ahead to cover the time new ones take to arrive.
                ahead = min(STEPS_AHEAD_MAX, max(STEPS_AHEAD, math.ceil(
                    STEPS_AHEAD_SECONDS / max(out["seconds"], 1e-3))))
                if max(steps) - iteration < ahead:
                    submit()
        finally:
            # Steps submitted beyond the end do nothing; released, they are dropped.
            try:
                self._cancel(steps)
            except Exception as exc:  # a closed client: the error that got here matters
                log.debug("could not cancel the loop's steps: %s", exc)
            if not ended:
                # Left early (an error, or the caller stopped reading): a step still
                # running would wait for partials that will not come.
                self._stop_loop()

    def _stop_loop(self) -> None:
        """Tell every worker that the current chained loop is over."""
        try:
            self.client.run(_end_loop, self.spec.run, self.chains, on_error="ignore")
        except Exception as exc:
            log.debug("could not stop loop %d of run %s: %s", self.chains, self.spec.run, exc)

    def _steps(self, iterations, first, start, loop, want_centers, page) -> dict:
        """Submit chained steps, in one graph: a :func:`worker_step` per worker and
        step, pinned to it (a step cannot run elsewhere: it waits for the
        partials sent to it), and in order on each worker (the earlier step
        has the higher priority)."""
        step = dask.delayed(worker_step, pure=False)
        workers = [addr for addr, _ in self.plan]
        tasks, names = [], []
        for iteration in iterations:
            name = f"kmeans-lloyd-{iteration}-{self.tag}-{self.chains}"
            for j, (addr, idx) in enumerate(self.plan):
                extra = {"start": start} if iteration == first else {}
                if self.chunks_pass is not None:
                    extra["chunks_pass"] = self.chunks_pass
                if j == 0 and self._outbox:
                    extra["publish"] = tuple(self._outbox)
                    self._outbox = []
                with dask.annotate(workers=[addr], allow_other_workers=False,
                                   priority=-iteration):
                    tasks.append(step(self.spec, loop, self.chains, j, workers, idx,
                                      *self._args(j, idx), iteration=iteration, page=page,
                                      want_centers=want_centers and j == 0,
                                      dask_key_name=(name, j), **extra))
                names.append(iteration)
        futures = self._gather(tasks, submit_only=True)
        out: dict[int, list] = {}
        for iteration, f in zip(names, futures):
            out.setdefault(iteration, []).append(f)
        return out

    def _wait_step(self, iteration: int, steps: dict, records: dict) -> dict | None:
        """Wait for the lead's task of step ``iteration`` and put the results of it
        and of the lead's next tasks that are done in ``records``; or, if a
        worker was lost, return the ``"lost"`` record of the step that missed
        its partials.  A task whose worker is gone never finishes; a worker
        that waited for its partial reports the loss."""
        from distributed import wait

        seen: set = set()  # tasks whose result was read, and was no loss
        silent = 0
        while True:
            try:
                wait(steps[iteration][:1], timeout=PEER_POLL)
            except TimeoutError:
                if not set(self._workers()) & {addr for addr, _ in self.plan}:
                    # No worker of the loop is left to report: go on from its start.
                    return {"kind": "lost", "passes": []}
            for it in (it for it in sorted(steps) if it >= iteration):
                got = self._result(steps[it][0])
                if got is None:
                    break
                records[it] = got
                if got["out"] is None or got["out"]["kind"] == "lost":
                    break
            ready = records.get(iteration)
            if ready is not None and ready["out"] is not None:
                return None  # the caller tells a record from a loss
            for it in sorted(steps):
                for f in steps[it]:
                    if f.key in seen:
                        continue
                    got = self._result(f)
                    if got is not None:
                        seen.add(f.key)
                        if got["out"] is not None and got["out"]["kind"] == "lost":
                            return got["out"]
            if ready is not None:
                # The lead stopped without a record: some worker must report why.
                silent += 1
                if silent * PEER_POLL > 60:
                    raise RuntimeError(f"step {iteration} of the loop ended without a "
                                       f"record and no worker reported a loss")
                time.sleep(PEER_POLL)

    def _result(self, future):
        """A step task's result; None if it has not finished, or cannot be fetched
        within a poll (it finished on a worker that is gone with it)."""
        if not future.done():
            return None
        try:
            return future.result(timeout=PEER_POLL)
        except TimeoutError:
            return None

    def _cancel(self, steps: dict) -> None:
        futures = [f for fs in steps.values() for f in fs]
        steps.clear()
        if futures:
            self.client.cancel(futures)

    def _seed(self, candidates, known, what, args):
        name = f"kmeans-init-{what}-{self.tag}-{self.seeds}"
        return self._run(name, worker_seed, (candidates, known, what, args))

    def _run(self, name: str, fn, head: tuple, publish: bool = False):
        """``fn(spec, *head, chunk indices, rows, weights)`` on every worker, over the
        chunks it holds; the partials added."""
        futures = self._gather(self._tasks(name, fn, head, publish), submit_only=True)
        # The client batches what it sends the scheduler: a message sent just
        # before a submission holds it back by the batching interval.  So the
        # last pass's results are released just after this one is submitted.
        self._held = futures
        parts = self._gather(futures)
        if any(p["worker"] != addr for p, (addr, _) in zip(parts, self.plan)):
            # A worker was lost or added: the next pass follows the chunks.
            self.replans += 1
            log.info("chunks moved between workers; placing the passes again")
            self._plan()
        return add_parts(parts)

    def _gather(self, items: list, submit_only: bool = False) -> list:
        """Submit delayed ``items`` (``submit_only``: their futures), or gather futures."""
        try:
            if submit_only:
                return self.client.compute(items, optimize_graph=False)
            return self.client.gather(items)
        except ValueError as exc:
            if self.client.status in ("running", "connecting"):
                raise
            # A client that lost its scheduler refuses new work with a ValueError
            # ("No global client found"); say what happened, as a lost connection.
            raise ConnectionError(f"the client is {self.client.status}: {exc}") from exc

    def _tasks(self, name: str, fn, head: tuple, publish: bool) -> list:
        """A pass's tasks, one per worker, pinned to it by annotation.

        Submitted together: the client batches what it sends to the scheduler,
        and a second ``submit`` straight after a first would wait for the
        batching interval (10 ms).
        """
        fn = dask.delayed(fn, pure=False)
        # A large array (k-means||'s candidates: megabytes at MNIST8M's size)
        # goes into the graph once, as its own key, rather than once per task.
        head = tuple(dask.delayed(a, name=f"{name}-arg-{i}", traverse=False)
                     if isinstance(a, np.ndarray) and a.nbytes > SHARED_ARG_BYTES else a
                     for i, a in enumerate(head))
        tasks = []
        for j, (addr, idx) in enumerate(self.plan):
            pin = {"workers": [addr], "allow_other_workers": True} if addr else {}
            # The page's messages ride with the first task (see worker_pass).
            extra = ({"publish": tuple(self._outbox)}
                     if publish and j == 0 and self._outbox else {})
            with dask.annotate(**pin):
                tasks.append(fn(self.spec, *head, idx, *self._args(j, idx),
                                dask_key_name=(name, j), **extra))
        if publish:
            self._outbox = []
        return tasks

    def labels(self, centers: np.ndarray) -> da.Array:
        """int32 labels, chunked like the rows, for ``centers`` (the last pass's).

        One task per worker, over the chunks whose states it holds; they are
        computed now, so the states can be dropped afterwards.  (A task per
        chunk cost the scheduler about 2 ms each: 1.5 s for MNIST8M's 810.)
        """
        from distributed import wait

        centers = np.ascontiguousarray(centers, dtype=np.float64)
        # A task, not scattered data, so that a lost copy can be made again.
        c = self.client.submit(hold, centers, key=f"kmeans-centres-{self.tag}", pure=False)
        futures, where = [], {}
        for j, (addr, idx) in enumerate(self.plan):
            futures.append(self.client.submit(
                worker_labels, self.spec, c, list(idx), [self._label_source(i) for i in idx],
                key=(f"kmeans-labels-{self.tag}", j), workers=[addr] if addr else None,
                allow_other_workers=True, pure=False))
            where.update((i, (j, at)) for at, i in enumerate(idx))
        wait(futures)
        parts = []
        for i, m in enumerate(self.rows.row_chunks):
            j, at = where[i]
            part = dask.delayed(operator.getitem, pure=True)(futures[j], at)
            parts.append(da.from_delayed(part, shape=(m,), dtype=np.int32))
        return da.concatenate(parts) if len(parts) > 1 else parts[0]

    def publish(self, record: dict, centers: np.ndarray, max_iter: int) -> None:
        """Queue the record for the K-Means page; it travels with the next pass."""
        if self.page:
            record = {**record, "elapsed": time.perf_counter() - self._started}
            self._outbox.append(dashboard.iteration_message(
                self.spec.run, record, centers, n_rows=self.rows.n, max_iter=max_iter))

    def _label_source(self, i: int):
        """What chunk ``i``'s labels task recomputes from if its result is lost.

        Not the persisted chunk, whose lineage ends when the fit releases it,
        but the chunk's own graph (a read from a store, say) when that is
        small.  Rows that came from client memory have no such graph.
        """
        if not self.persisted:
            return self.blocks[i]
        if self.source is not None:
            if not hasattr(self, "_cheap_source"):
                import pickle

                first = Source(self.source.blocks[0])
                self._cheap_source = len(pickle.dumps(first)) <= SOURCE_BYTES
            if self._cheap_source:
                return Source(self.source.blocks[i])
        return self.blocks[i]

    def close(self) -> None:
        for msg in self._outbox:
            dashboard.send(self.client, msg)
        self._outbox, self._held = [], []
        try:
            self.client.run(_drop_run, self.spec.run)
        except Exception as exc:  # the states go with the cluster anyway
            log.debug("could not drop the states of run %s: %s", self.spec.run, exc)
        for name in ("sources", "wsources"):
            for f in getattr(self, name, None) or []:
                f.release()


def _end_loop(run: str, chain: int, dask_worker=None) -> None:
    ext = dask_worker.plugins.get(EXTENSION) if dask_worker is not None else None
    if ext is not None:
        ext.loop(run, chain).stop("cancelled")


def _drop_run(run: str, dask_worker=None) -> None:
    ext = dask_worker.plugins.get(EXTENSION) if dask_worker is not None else None
    if ext is not None:
        ext.drop(run)


def chunk_owners(client, futures: list, rows: tuple) -> list:
    """The worker that works on each persisted chunk (``""`` if none holds it).

    A chunk held by several workers goes to the one with the fewest rows so
    far (the first one would give them all to one worker).
    """
    who = client.who_has(futures)
    load: dict = {}
    owner = []
    for f, n in zip(futures, rows):
        holders = sorted(who.get(f.key, ())) or [""]
        addr = min(holders, key=lambda a: (load.get(a, 0), a))
        load[addr] = load.get(addr, 0) + n
        owner.append(addr)
    return owner


def _chunk_futures(x) -> list:
    """The futures of a persisted Dask array's row chunks, in chunk order."""
    from distributed import futures_of

    by_key = {f.key: f for f in futures_of(x)}
    keys = [k[0] if isinstance(k, list) else k for k in x.__dask_keys__()]
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ValueError(f"rows are not persisted on the cluster (chunk {missing[0]} has no future)")
    return [by_key[k] for k in keys]
