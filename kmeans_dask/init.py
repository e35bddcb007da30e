"""Initial centres: random rows, k-means++ on a sample, and k-means|| over all chunks.

Each function takes a :class:`~kmeans_dask._passes.ChunkedRows`, the number of
centres and a :class:`numpy.random.RandomState`, and returns a float64
(k, d) array in scaled units.  Only sampled rows and k x d centres reach the
client.
"""

from __future__ import annotations

import logging
import uuid
import warnings

import numpy as np
from sklearn.cluster import kmeans_plusplus
from sklearn.exceptions import ConvergenceWarning

from ._passes import ChunkedRows

log = logging.getLogger(__name__)

KMEANSPP_MIN_SAMPLE = 10_000


def _weights_on_client(rows: ChunkedRows):
    # n floats, not n x d: acceptable to gather for weighted sampling.
    return None if rows.weights is None else np.asarray(rows.weights.compute(), dtype=np.float64)


def _choice(n: int, size: int, rng, weights=None) -> np.ndarray:
    # Always with probabilities (as scikit-learn draws): unit weights then draw
    # exactly what no weights do.
    if weights is None:
        weights = np.ones(n)
    positive = np.count_nonzero(weights > 0)
    if positive < size:
        raise ValueError(f"only {positive} rows have a positive sample_weight; {size} needed")
    return rng.choice(n, size=size, replace=False, p=weights / weights.sum())


def init_random(rows: ChunkedRows, k: int, rng) -> np.ndarray:
    """``k`` distinct rows drawn uniformly (or in proportion to their weights)."""
    idx = _choice(rows.n, k, rng, _weights_on_client(rows))
    return rows.take(idx)


def init_kmeanspp(rows: ChunkedRows, k: int, rng, sample_size: int | None = None) -> np.ndarray:
    """Greedy k-means++ (scikit-learn's) on a uniform sample of the rows.

    The sample has ``max(10000, 20 k)`` rows by default (all rows if fewer);
    sample weights go with their rows.
    """
    m = sample_size or max(KMEANSPP_MIN_SAMPLE, 20 * k)
    m = min(max(m, k), rows.n)
    idx = np.sort(rng.choice(rows.n, size=m, replace=False)) if m < rows.n else np.arange(rows.n)
    sample = rows.take(idx)
    w = None if rows.weights is None else np.asarray(rows.weights[idx].compute(), np.float64)
    centers, _ = kmeans_plusplus(sample, k, sample_weight=w,
                                 random_state=rng.randint(np.iinfo(np.int32).max))
    return centers


def init_kmeans_parallel(rows: ChunkedRows, k: int, rng, *, oversampling_factor: float = 2.0,
                         rounds: int = 5, engine=None) -> np.ndarray:
    """k-means|| (Bahmani et al., 2012).

    One centre is drawn at random; then for ``rounds`` passes every row is
    kept independently with probability ``min(1, l w d^2 / phi)``, where
    ``l = oversampling_factor * k`` and ``phi`` is the current weighted cost.
    The candidates are weighted by the weight of the rows nearest to each,
    and reduced to ``k`` centres by weighted k-means++ followed by a weighted
    Lloyd refinement on the candidates alone (both scikit-learn's).

    The rounds run on ``engine`` (:class:`kmeans_dask.engine.Engine`; one
    over ``rows`` is made if not given): every row's nearest candidate is
    kept with its chunk, where the chunk lives, and brought up to date with
    each round's new candidates only.  A round is two tasks per worker (the
    oversampling, then the new cost); only the sampled rows, the candidates
    and one number per worker travel.
    """
    from sklearn.cluster import KMeans as _LocalKMeans

    from .engine import Engine

    own = engine is None
    if own:
        engine = Engine.create(rows, rows.stats(), persisted=False)
    try:
        first = _choice(rows.n, 1, rng, _weights_on_client(rows))
        candidates = rows.take(first)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        token = f"{seed}-{uuid.uuid4().hex[:8]}"
        factor = oversampling_factor * k
        phi = engine.seed(candidates, "cost", token=token)
        for r in range(rounds):
            if phi <= 0:
                break
            new = engine.seed(candidates, "sample", token=token, factor=factor, total=phi,
                              seed=(seed, r))
            log.debug("k-means|| round %d: cost %.6g, %d new candidates", r, phi, len(new))
            if len(new) == 0:
                continue
            candidates = np.vstack([candidates, new])
            phi = engine.seed(candidates, "cost", token=token)
        cand_w = np.asarray(engine.seed(candidates, "weights", token=token, release=True),
                            dtype=np.float64)
    finally:
        if own:
            engine.close()
    n_pos = int(np.count_nonzero(cand_w > 0))
    if n_pos < k:
        # Too few distinct candidates (tiny or degenerate data): top up with random rows.
        extra = rows.take(rng.choice(rows.n, size=k - n_pos, replace=False))
        keep = cand_w > 0
        candidates = np.vstack([candidates[keep], extra])
        cand_w = np.concatenate([cand_w[keep], np.ones(len(extra))])
    log.info("k-means||: %d candidates after %d rounds", len(candidates), rounds)
    local_seed = int(rng.randint(np.iinfo(np.int32).max))
    centers, _ = kmeans_plusplus(candidates, k, sample_weight=cand_w, random_state=local_seed)
    refined = _LocalKMeans(n_clusters=k, init=centers, n_init=1, random_state=local_seed)
    with warnings.catch_warnings():
        # Too few distinct candidates: the fit itself says so once, about the rows.
        warnings.simplefilter("ignore", ConvergenceWarning)
        refined.fit(candidates, sample_weight=cand_w)
    return refined.cluster_centers_.astype(np.float64)


INITS = {
    "random": init_random,
    "k-means++": init_kmeanspp,
    "k-means||": init_kmeans_parallel,
}
