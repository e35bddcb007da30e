"""Thread pools made once per process and shared by name.

A pool per purpose (the integer ranking's row shares, the mini-batch rounds
read in the client), so that work of one kind never queues behind the other.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

_lock = threading.Lock()
_pools: dict[str, tuple[ThreadPoolExecutor, int]] = {}


def shared_pool(name: str, threads: int) -> ThreadPoolExecutor:
    """The pool called ``name``, with at least ``threads`` threads (a larger one
    replaces a smaller one; the old one ends its work and goes)."""
    with _lock:
        pool, size = _pools.get(name, (None, 0))
        if size < threads:
            if pool is not None:
                pool.shutdown(wait=False)
            pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
            _pools[name] = (pool, threads)
        return pool
