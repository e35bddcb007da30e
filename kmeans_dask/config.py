"""Tuning knobs, as ``dask.config`` keys under ``kmeans_dask``.

They choose how the work is cut, not what is computed.  ``block-rows``
orders float additions within a block, which can move the last bits of the
sums of float or weighted rows.  ``task-bytes`` sets the row chunks of
persisted data; k-means|| draws its candidates chunk by chunk, so a
different value can give a different initialisation, and float or weighted
rows are summed on a grid per chunk, which the chunking can move in the last
bits.  ``split-every`` orders the additions of float partials in the
one-time reductions (the statistics and the farthest rows), which can move
their last bits; k-means||'s costs are summed on a grid, in any order.
Unweighted uint8 rows are summed as exact integers, so for them neither the
blocks nor the chunks change an iteration from given initial centres.  For a given setting, fits are bit-for-bit reproducible on any
number of workers.  Set them as any Dask
option::

    import dask
    with dask.config.set({"kmeans_dask.block-rows": 512}):
        KMeans(10).fit(X)

or in a Dask YAML file, or through ``DASK_KMEANS_DASK__BLOCK_ROWS=512``.

Keys
----
persist : "auto", true or false, default "auto"
    Keep the rows in worker memory between Lloyd passes.  "auto": when
    they take at most half the cluster's memory (and always without a
    cluster); otherwise every pass reads them again from their source (a
    Zarr store, say), keeping only each row's label and bounds on the
    workers.  Results do not depend on it.
task-bytes : int, default 33554432 (32 MiB)
    Persisted rows whose chunks are smaller than this are merged into
    chunks of about this size before the fit: each chunk is one unit of
    work and state on a worker, and fewer, larger chunks cost less to
    schedule.  Streamed rows keep their source's chunks.
block-rows : int, default 256
    Rows converted to float and multiplied at a time inside a kernel (kept
    in cache while their distances, argmin and sums are computed).
split-every : int, default 8
    Fan-in of the trees that combine one-time per-chunk results (statistics,
    the farthest rows).
peer-workers : int, default 4
    Up to this many workers, the Lloyd loop runs on the workers: each sends
    its k x d partial sums straight to each other worker, every worker adds
    them all, reaches the same next centres and starts its next pass, with
    neither the scheduler nor the client in between.  On more workers, each
    worker sends one partial per iteration to the client, which sends the
    centres back: fewer bytes, one round trip more per iteration.  0 always
    goes through the client.  Results do not depend on it.
minibatch-round-bytes : int, default 268435456 (256 MiB)
    Sampled rows :class:`~kmeans_dask.MiniBatchKMeans` brings to the client
    per round trip from persisted rows (their batches' steps run there; a
    round trip costs the cores the steps need, so rounds are large).  Rows
    of at most this size are brought over whole, once (read in the client
    itself when it started the LocalCluster it uses).
minibatch-stream-round-bytes : int, default 2147483648 (2 GiB)
    The same for streamed rows: every round reads every chunk it samples
    from (at 8.1M MNIST rows, one pass of steps takes 3 rounds of 2 GiB or
    6 of 1 GiB, and the fit 61 s or 79 s), so rounds are few and large.
    The rows come to the client as each chunk's task ends, so the workers
    hold only the tasks in flight; the client holds up to two rounds (the
    one its steps use and the next).

minibatch-read-here : "auto", true or false, default "auto"
    Who reads the rows :class:`~kmeans_dask.MiniBatchKMeans` brings whole
    or streams in rounds: the client itself (true), or the workers, which
    send them (false).  "auto" reads in the client when its cluster's
    workers all run on this machine (a LocalCluster it started, or
    ``dask worker`` processes at this machine's addresses): the same files
    and cores, without the rows' trip over TCP, which costs the client more
    than reading them.  Elsewhere the workers read, near the data.

minibatch-threads : int, default 1
    Threads a mini-batch step ranks its batch on, where uint8 rows are
    ranked by the integer kernel (the steps run in the client, while the
    workers wait or read the next round).  0: the cores this process may
    use.  One is the default: a batch of 1,024 rows ranks in about 1 ms,
    about what handing half of it to a second thread and back costs, and
    the workers reading the next round want the other core.

native : true or false, default true
    Rank uint8 rows on the CPU's integer dot-product units (Intel AMX tiles,
    else AVX-512 VNNI) where it has them (:mod:`kmeans_dask._native`): whole
    rows, within Hamerly's bounds, several times faster than the float32
    GEMM.  False, or a CPU or system without either or without a C compiler,
    takes the float32 path.  Both give the same labels, so results do not
    depend on it.  Read where the pass runs: on a cluster, the workers'
    setting counts.

store-codec : "lz4" or "zstd", default "lz4"
    How data stores written from now on (``ingest``, ``augment``) compress
    their rows.  LZ4 decodes about four times as fast, which every load and
    every streamed pass pays; Zstandard's files are smaller (MNIST's rows
    take 0.21 of their size against LZ4's 0.32; Fashion-MNIST's 0.56 against
    0.68), which matters more where the store is read over a network.
    Stores of either kind are read alike.

The mini-batch keys change no result: the batches are drawn from one
random stream, whatever the rounds they travel in.
"""

from __future__ import annotations

import dask

DEFAULTS = {"persist": "auto", "native": True, "minibatch-read-here": "auto", "store-codec": "lz4", "task-bytes": 32 * 2**20,
            "block-rows": 256, "split-every": 8, "peer-workers": 4, "minibatch-round-bytes": 256 * 2**20,
            "minibatch-stream-round-bytes": 2 * 2**30, "minibatch-threads": 1}
MINIMUM = {"task-bytes": 1, "block-rows": 1, "split-every": 2, "peer-workers": 0,
           "minibatch-round-bytes": 1,
           "minibatch-stream-round-bytes": 1, "minibatch-threads": 0}

dask.config.update_defaults({"kmeans_dask": dict(DEFAULTS)})


def _auto_or_bool(key: str):
    """``kmeans_dask.<key>``: "auto", True or False (also from YAML or environment text)."""
    value = dask.config.get(f"kmeans_dask.{key}", "auto")
    text = str(value).strip().lower()
    if text in ("auto", "true", "false"):
        return "auto" if text == "auto" else text == "true"
    raise ValueError(f"dask config kmeans_dask.{key} must be 'auto', true or false, "
                     f"got {value!r}")


def persist():
    """``kmeans_dask.persist``: "auto", True or False."""
    return _auto_or_bool("persist")


CODECS = ("lz4", "zstd")


def store_codec() -> str:
    """``kmeans_dask.store-codec``: one of :data:`CODECS`."""
    value = dask.config.get("kmeans_dask.store-codec", DEFAULTS["store-codec"])
    text = str(value).strip().lower()
    if text not in CODECS:
        raise ValueError(f"dask config kmeans_dask.store-codec must be one of {list(CODECS)}, "
                         f"got {value!r}")
    return text


def get(key: str) -> int:
    """The value of ``kmeans_dask.<key>``, checked to be an integer at its minimum or above."""
    value = dask.config.get(f"kmeans_dask.{key}", DEFAULTS[key])
    number = None
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            number = int(value)
        except ValueError:
            pass
    if number is None or number < MINIMUM[key]:
        raise ValueError(f"dask config kmeans_dask.{key} must be an integer >= {MINIMUM[key]}, "
                         f"got {value!r}")
    return number


def minibatch_read_here():
    """``kmeans_dask.minibatch-read-here``: "auto", True or False."""
    return _auto_or_bool("minibatch-read-here")


def usable_cores() -> int:
    """The cores this process may run on."""
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, int(n or 1))


def minibatch_threads() -> int:
    """``kmeans_dask.minibatch-threads``, 0 resolved to :func:`usable_cores`."""
    n = get("minibatch-threads")
    return usable_cores() if n == 0 else n
