"""Compiled per-row loops (Numba) of the bounded Lloyd pass.

The distances are still ranked by BLAS GEMMs (``np.dot`` called from the
compiled loop), one per block of rows and group of centres: a GEMM reuses
every loaded centre value for many rows, which no per-row dot product can
(those are bound by cache bandwidth).  What is
compiled is the bookkeeping around those GEMMs, which is per row and per
group, and which NumPy could only do in many whole-array passes over a
mostly empty (rows x centres) matrix plus one call per block and group:
moving the bounds, Hamerly's tightening of the upper bound, deciding which
groups each row must rank, folding the ranked values into per-row and
per-group minima, and writing the new labels and bounds.

The rule is the one of :class:`kmeans_dask._kernels._Nearest`: ranked
values ``-2 x.c + |c|^2`` in the compute dtype, an error bound ``E`` per
row, and a row whose two best values are within ``2 E`` is not decided
here but handed back to the caller, which settles it with the shared
exact comparison.  So the labels are the ones a full pass gives.

Numba is a dependency of dask-ml, so it adds nothing to install;
``cache=True`` keeps the machine code on disk, so each machine compiles
once rather than each worker process.
"""

from __future__ import annotations

import numba
import numpy as np

# Reassociation lets LLVM vectorise the one dot product here (the error
# bound E holds for any summation order).  No nnan/ninf: bounds may be inf.
_FASTMATH = {"reassoc", "contract"}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@numba.njit(nogil=True, cache=True)
def _threshold(u, e):
    """The distance beyond which a centre cannot be the one the rule picks.

    ``u`` bounds the distance to some centre from above.  A centre farther
    than the result is farther in squared distance by more than ``4 E``, so
    its ranked value exceeds that centre's by more than ``2 E``: neither the
    ranking nor the exact comparison of near ties would pick it.
    """
    # low^2 - u^2 > 4E  <=>  low > sqrt(u^2 + 4E), rounded up.
    return np.sqrt(u * u + 4.0 * e) * (1 + 1e-12)


@numba.njit(nogil=True, cache=True)
def _down(bound):
    """A float64 distance bound as a float32 that is not larger."""
    if bound < np.inf:
        return min(bound * (1 - 1e-6), _FLOAT32_MAX)
    return bound


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
def filter_rows(X, neg2, csq, pos_of, move, drift, sep, labels, upper, lower, xsq, err,
                rows, own):
    """Move every row's bounds with the centres; find the rows they leave open.

    ``upper`` grows by the row's centre's move and ``lower`` shrinks by
    each group's largest move (``drift``, float32 rounded up, subtracted
    and rounded down).  A row whose bounds still prove its centre is the
    nearest, by the ``4 E`` margin, is done.  Otherwise Hamerly's step:
    rank the row against its own centre, tighten ``upper`` with it and test
    again.  The rows still open are written to ``rows``, their own ranked
    value to ``own``.

    Returns
    -------
    n_looked : int
        Rows that were ranked against their own centre.
    n_open : int
        Rows left open (the first ``n_open`` of ``rows``).
    """
    m, d = X.shape
    t = lower.shape[1]
    xf = np.empty(d, dtype=neg2.dtype)
    n_looked = 0
    n_open = 0
    for i in range(m):
        a = pos_of[labels[i]]
        u = upper[i] + move[a]
        e = err[i]
        nearest_group = np.inf
        for G in range(t):
            v = np.float32(lower[i, G] - drift[G])
            v = np.nextafter(v, np.float32(-np.inf))
            lower[i, G] = v
            nearest_group = min(nearest_group, np.float64(v))
        low = max(nearest_group, sep[a] - u)
        if low > _threshold(u, e):
            upper[i] = u
            continue
        n_looked += 1
        s = neg2[a, 0] - neg2[a, 0]
        for q in range(d):
            xf[q] = X[i, q]
        for q in range(d):
            s += xf[q] * neg2[a, q]
        ga = np.float64(s + csq[a])
        u = min(u, np.sqrt(max(ga + xsq[i] + e, 0.0)))
        upper[i] = u
        if max(nearest_group, sep[a] - u) > _threshold(u, e):
            continue
        rows[n_open] = i
        own[n_open] = ga
        n_open += 1
    return n_looked, n_open


@numba.njit(nogil=True, cache=True)
def open_groups(rows, own, pos_of, group_of_pos, labels, upper, lower, err, need,
                best, second, pick):
    """Which groups each row must rank, and the row's minima seeded.

    ``need[r, G]`` is set where the row's bound for group G does not rule
    the group out.  Where the row's own group is ruled out, its own ranked
    value ``own[r]`` seeds ``best``; otherwise the GEMM of that group will
    rank the own centre with the others.  Returns the number of open
    (row, group) pairs.
    """
    t = lower.shape[1]
    total = 0
    for r in range(rows.shape[0]):
        i = rows[r]
        threshold = _threshold(upper[i], err[i])
        for G in range(t):
            opened = np.float64(lower[i, G]) <= threshold
            need[r, G] = opened
            total += opened
        a = pos_of[labels[i]]
        second[r] = np.inf
        if need[r, group_of_pos[a]]:
            best[r] = np.inf
            pick[r] = -1
        else:
            best[r] = own[r]
            pick[r] = a
    return total


# Ranked values are never NaN (rows and centres are checked finite), so a
# minimum may be reassociated and vectorised.
@numba.njit(nogil=True, cache=True, fastmath={"nnan", "nsz"})
def _row_min(a, i):
    m = a[i, 0]
    for j in range(1, a.shape[1]):
        m = min(m, a[i, j])
    return m


@numba.njit(nogil=True, cache=True)
def _two_smallest(a, i):
    """In row ``i`` of ``a``: the first position of the smallest value, it, and the second smallest.

    What ``np.argmin`` and a minimum over the other positions give; the
    values are returned as float64.  Branch-free minima, then the first
    position holding the smallest.
    """
    m1 = _row_min(a, i)
    p = 0
    last = a.shape[1] - 1
    while p < last and a[i, p] != m1:
        p += 1
    m2 = np.inf
    for j in range(a.shape[1]):
        v = np.float64(a[i, j]) if j != p else np.inf
        m2 = min(m2, v)
    return p, np.float64(m1), m2


@numba.njit(nogil=True, cache=True)
def group_minima(g, pos, bounds, out):
    """``out[r, G]``: the smallest of ``g[r, bounds[G]:bounds[G + 1]]`` leaving out column ``pos[r]``.

    The lower bound of each group a full ranking gives a row, its own centre
    left out (``inf`` for a group holding only that centre).
    """
    t = bounds.shape[0] - 1
    for r in range(g.shape[0]):
        p = pos[r]
        for G in range(t):
            m = np.inf
            for j in range(bounds[G], bounds[G + 1]):
                v = np.float64(g[r, j])
                if j != p and v < m:
                    m = v
            out[r, G] = m


@numba.njit(nogil=True, cache=True)
def best_two(g, pos, best, second):
    """:func:`_two_smallest` of every row of ``g``.

    For narrow rankings (few centres) several times faster than NumPy's
    argmin and minimum, whose per-row set-up dominates there.
    """
    for i in range(g.shape[0]):
        pos[i], best[i], second[i] = _two_smallest(g, i)


@numba.njit(nogil=True, cache=True)
def gather(X, rows, out):
    """``out[r] = X[rows[r]]`` converted to ``out``'s dtype, in one pass without a temporary."""
    d = X.shape[1]
    for r in range(rows.shape[0]):
        i = rows[r]
        for q in range(d):
            out[r, q] = X[i, q]


@numba.njit(nogil=True, fastmath=_FASTMATH, cache=True)
def rank_rows(X, rows, neg2, csq, tile, g):
    """``g[r] = X[rows[r]] . neg2.T + csq``: a narrow ranking, converted while it is ranked.

    For a few centres BLAS runs far below its speed (a GEMM 10 columns
    wide), and the rows must first be converted in a separate pass.  Here
    four rows at a time are converted into ``tile`` (4, d) while in cache,
    and ranked two centres at a time: eight sums, each centre value loaded
    once for four rows.  The sums run in any order (``reassoc``), which
    the nearest-centre rule's error bound allows for.
    """
    k, d = neg2.shape
    n = rows.shape[0]
    for r0 in range(0, n, 4):
        h = min(4, n - r0)
        gather(X, rows[r0:r0 + h], tile[:h])
        tile[h:] = 0
        b0, b1, b2, b3 = tile[0], tile[1], tile[2], tile[3]
        for j in range(0, k, 2):
            j1 = min(j + 1, k - 1)  # an odd last centre is ranked twice
            c0, c1 = neg2[j], neg2[j1]
            z = csq[j] - csq[j]  # zero in the compute dtype (csq[j] * 0 would be float64)
            a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = z
            for q in range(d):
                u, v = c0[q], c1[q]
                a00 += b0[q] * u
                a01 += b0[q] * v
                a10 += b1[q] * u
                a11 += b1[q] * v
                a20 += b2[q] * u
                a21 += b2[q] * v
                a30 += b3[q] * u
                a31 += b3[q] * v
            _put(g, r0, h, j, j1, csq, a00, a01, a10, a11, a20, a21, a30, a31)


@numba.njit(nogil=True, cache=True, inline="always")
def _put(g, r0, h, j, j1, csq, a00, a01, a10, a11, a20, a21, a30, a31):
    g[r0, j] = a00 + csq[j]
    g[r0, j1] = a01 + csq[j1]
    if h > 1:
        g[r0 + 1, j] = a10 + csq[j]
        g[r0 + 1, j1] = a11 + csq[j1]
    if h > 2:
        g[r0 + 2, j] = a20 + csq[j]
        g[r0 + 2, j1] = a21 + csq[j1]
    if h > 3:
        g[r0 + 3, j] = a30 + csq[j]
        g[r0 + 3, j1] = a31 + csq[j1]


@numba.njit(nogil=True, cache=True)
def add_rows(X, rows, labels, out, sign):
    """``out[labels[r]] += sign * X[rows[r]]`` with integer rows and sums: exact in any order."""
    d = X.shape[1]
    for r in range(rows.shape[0]):
        i = rows[r]
        target = out[labels[r]]
        if sign > 0:
            for q in range(d):
                target[q] += X[i, q]
        else:
            for q in range(d):
                target[q] -= X[i, q]


@numba.njit(nogil=True, cache=True)
def rank_groups(X, rows, need, neg2, csq, starts, sub, cross,
                best, second, pick, g_first, g_pick, g_second):
    """Rank the open rows against their open groups, one GEMM per block and group.

    The open rows are taken a block at a time; for each group, the rows of
    the block that need it are converted from ``X`` straight into ``sub``,
    side by side, and multiplied with the group's centres by BLAS.  (Reading
    a stored uint8 row again costs less than copying it out of a converted
    block, and rows that need no group are never converted.)  Each ranked
    value (``|c|^2`` added in the compute dtype, as a full pass does) is
    folded into the row's best and second value over all groups and, per
    group, into its two smallest values and the first one's position.
    Returns the number of distances ranked.
    """
    n = rows.shape[0]
    t = starts.shape[0] - 1
    step = sub.shape[0]
    which = np.empty(step, dtype=np.int64)
    picked = np.empty(step, dtype=rows.dtype)
    pairs = 0
    for b0 in range(0, n, step):
        nb = min(step, n - b0)
        for G in range(t):
            lo = starts[G]
            w = starts[G + 1] - lo
            cnt = 0
            for r in range(nb):
                if need[b0 + r, G]:
                    which[cnt] = r
                    picked[cnt] = rows[b0 + r]
                    cnt += 1
            if cnt == 0:
                continue
            xs = sub[:cnt]
            gather(X, picked[:cnt], xs)
            out = cross[: cnt * w].reshape((cnt, w))
            np.dot(xs, neg2[lo:lo + w].T, out)
            pairs += cnt * w
            for c in range(cnt):
                for q in range(w):
                    out[c, q] += csq[lo + q]  # in the compute dtype, as a full pass adds it
                m1pos, m1, m2 = _two_smallest(out, c)
                row = b0 + which[c]
                if m1 < best[row]:
                    second[row] = min(best[row], m2)
                    best[row] = m1
                    pick[row] = lo + m1pos
                elif m1 < second[row]:
                    second[row] = m1
                g_first[row, G] = m1
                g_second[row, G] = m2
                g_pick[row, G] = lo + m1pos
    return pairs


@numba.njit(nogil=True, cache=True)
def settle(rows, own, need, best, second, pick, g_first, g_pick, g_second, pos_of,
           group_of_pos, order, labels, upper, lower, xsq, err, flagged):
    """New labels and bounds of the open rows; near ties are handed back.

    A row whose two best ranked values are within ``2 E`` is written to
    ``flagged`` and left as it was.  Returns how many were.
    """
    t = lower.shape[1]
    n_flagged = 0
    for r in range(rows.shape[0]):
        i = rows[r]
        e = err[i]
        xs = xsq[i]
        if second[r] - best[r] <= 2.0 * e:
            flagged[n_flagged] = i
            n_flagged += 1
            continue
        p = pick[r]
        a = pos_of[labels[i]]
        labels[i] = order[p]
        upper[i] = np.sqrt(best[r] + xs + e)
        for G in range(t):
            if not need[r, G]:
                continue
            v = g_second[r, G] if g_pick[r, G] == p else g_first[r, G]
            bound = np.sqrt(max(v + xs - e, 0.0)) if v < np.inf else np.inf
            lower[i, G] = _down(bound)
        ga = group_of_pos[a]
        if p != a and not need[r, ga]:
            # The old centre now belongs to the "others" of its group.
            bound = _down(np.sqrt(max(own[r] + xs - e, 0.0)))
            if bound < lower[i, ga]:
                lower[i, ga] = bound
    return n_flagged


@numba.njit(nogil=True, cache=True)
def exact_sqdist(X, labels, centers, scale, out):
    """``out[i] = |scale X[i] - centers[labels[i]]|^2`` in float64, summed left to right.

    One pass over the rows with no temporary: the NumPy form (convert a
    block, gather its centres, subtract, square, sum) made four and cost
    most of a k-means|| round.  No reassociation: the sum's order, and so
    its value, is the same on every machine.
    """
    d = X.shape[1]
    for i in range(X.shape[0]):
        c = centers[labels[i]]
        acc = 0.0
        for q in range(d):
            v = X[i, q] * scale - c[q]
            acc += v * v
        out[i] = acc


@numba.njit(nogil=True, cache=True)
def pair_sqdist(xs, rows, centers, cand, scale, out):
    """``out[p] = |scale xs[rows[p]] - centers[cand[p]]|^2`` in float64, summed left
    to right, for the (row, centre) pairs a near tie leaves to compare exactly.

    No temporary per pair (the NumPy form gathered both sides of every pair,
    then subtracted, squared and summed them), and no reassociation, as in
    :func:`exact_sqdist`.
    """
    d = xs.shape[1]
    for p in range(rows.shape[0]):
        x = xs[rows[p]]
        c = centers[cand[p]]
        acc = 0.0
        for q in range(d):
            v = x[q] * scale - c[q]
            acc += v * v
        out[p] = acc


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
def fold_batch(X, g, csq, weights, scale, labels, dist, sums, wsum):
    """The per-row half of a mini-batch step, one pass over the batch's rows.

    ``g`` holds ``X . (scale c).T`` from BLAS.  For every row: its nearest
    centre by ``|c|^2 - 2 g`` (the rule of a full pass), its squared
    distance ``scale^2 |x|^2 + |c|^2 - 2 g`` (float64, at least 0), and its
    weighted raw values added to that centre's ``sums`` and its weight to
    ``wsum``.  ``|x|^2`` and the sums are float64 of the stored values, so
    uint8 rows with integer weights add up exactly in any order.
    """
    k = g.shape[1]
    d = X.shape[1]
    s2 = scale * scale
    for i in range(X.shape[0]):
        best = 0
        value = csq[0] - 2 * g[i, 0]
        for j in range(1, k):
            v = csq[j] - 2 * g[i, j]
            if v < value:
                value, best = v, j
        labels[i] = best
        w = weights[i]
        target = sums[best]
        acc = 0.0
        for q in range(d):
            x = np.float64(X[i, q])
            acc += x * x
            target[q] += w * x
        dist[i] = max(acc * s2 + np.float64(value), 0.0)
        wsum[best] += w


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
def fold_labelled(X, labels, centers, weights, scale, dist, sums, wsum):
    """The per-row half of a mini-batch step once its rows are labelled.

    For every row: its squared distance to its centre, ``|scale x - c|^2``
    in float64, and its weighted raw values added to that centre's ``sums``
    and its weight to ``wsum``.  The distance feeds only the batch inertia,
    so its sum may be reassociated (vectorised: a left-to-right sum is a
    chain of dependent adds, and cost more than the rest of the step's pass).
    The sums are float64 of the stored values, so uint8 rows with integer
    weights add up exactly in any order.
    """
    d = X.shape[1]
    for i in range(X.shape[0]):
        j = labels[i]
        c = centers[j]
        w = weights[i]
        target = sums[j]
        acc = 0.0
        for q in range(d):
            x = np.float64(X[i, q])
            v = x * scale - c[q]
            acc += v * v
            target[q] += w * x
        dist[i] = acc
        wsum[j] += w


@numba.njit(nogil=True, cache=True)
def update_centers(centers, counts, sums, wsum, scale):
    """Sculley's update with per-centre learning rates, in place; returns the
    sum of squared centre changes.

    A centre with batch weight ``v`` and raw sums ``S`` moves to
    ``(c n + scale S) / (n + v)`` and its count ``n`` grows by ``v``.
    """
    shift = 0.0
    d = centers.shape[1]
    for j in range(centers.shape[0]):
        v = wsum[j]
        if v > 0:
            n = counts[j]
            inv = 1.0 / (n + v)
            c = centers[j]
            t = sums[j]
            for q in range(d):
                new = (c[q] * n + t[q] * scale) * inv
                delta = new - c[q]
                shift += delta * delta
                c[q] = new
            counts[j] = n + v
    return shift


@numba.njit(nogil=True, cache=True)
def integer_stats(X, weights, col_sum, col_sumsq):
    """Per-feature sums of x and x^2 of integer rows, added into ``col_sum`` and
    ``col_sumsq`` (int64, exact), and ``(sum w |x|^2, max x)``.

    ``weights`` is empty for unit weights.  One pass over the rows, in
    integers: the float form converts every block first.
    """
    d = X.shape[1]
    sqnorm = 0.0
    top = 0
    weighted = weights.shape[0] > 0
    for i in range(X.shape[0]):
        row = 0
        for q in range(d):
            x = np.int64(X[i, q])
            col_sum[q] += x
            col_sumsq[q] += x * x
            row += x * x
            if x > top:
                top = x
        sqnorm += np.float64(row) * weights[i] if weighted else np.float64(row)
    return sqnorm, top


@numba.njit(nogil=True, cache=True)
def integer_sqnorms(X, out):
    """``out[i] = |X[i]|^2`` of integer rows, summed exactly in int64 (float64 result)."""
    d = X.shape[1]
    for i in range(X.shape[0]):
        row = 0
        for q in range(d):
            x = np.int64(X[i, q])
            row += x * x
        out[i] = np.float64(row)


@numba.njit(nogil=True, cache=True)
def hamerly_open(labels, upper, lower, move, top, first, runner, err, todo):
    """Move Hamerly's bounds with the centres and list the rows they leave open.

    A row's upper bound grows by its centre's move, its lower bound shrinks
    by the largest move of another centre (``runner`` for the rows of centre
    ``top``, which moved most, ``first`` for the others).  A row stays closed
    while its bounds are more than ``4 E`` apart in squared distance.
    Writes the open rows into ``todo``; returns their number.  One loop, no
    temporaries: this runs over every row of every chunk each pass.
    """
    n = 0
    for i in range(labels.shape[0]):
        a = labels[i]
        u = upper[i] + move[a]
        low = lower[i] - (runner if a == top else first)
        upper[i] = u
        lower[i] = low
        if not (low > u and low * low - u * u > 4.0 * err[i]):
            todo[n] = i
            n += 1
    return n


@numba.njit(nogil=True, cache=True)
def hamerly_set(todo, xsq, best, second, err, upper, lower):
    """Hamerly's bounds of the ranked rows ``todo`` from their best and second ranked
    values and ``E``, rounded outwards (distances, from squared ones)."""
    for j in range(todo.shape[0]):
        i = todo[j]
        up = xsq[i] + best[j] + err[j]
        low = xsq[i] + second[j] - err[j]
        upper[i] = np.sqrt(up if up > 0.0 else 0.0) * (1.0 + 1e-12)
        lower[i] = np.sqrt(low) * (1.0 - 1e-12) if low > 0.0 else 0.0


@numba.njit(nogil=True, cache=True)
def near_ties(best, second, err, out):
    """Positions whose two best ranked values are not more than ``2 E`` apart (NaN
    included) into ``out``; returns their number."""
    n = 0
    for i in range(best.shape[0]):
        if not (second[i] - best[i] > 2.0 * err[i]):
            out[n] = i
            n += 1
    return n


def warm_up(x_dtype, compute_dtype) -> None:
    """Compile (or load from the cache) every loop here for rows of ``x_dtype``.

    Called where a chunk's state is first made (on its worker), so that the first
    iteration timed is not the one that compiles.  The arguments are empty
    but of the types :mod:`kmeans_dask._kernels` passes.
    """
    f = np.dtype(compute_dtype)
    X = np.zeros((0, 2), dtype=x_dtype)
    ints = np.zeros(1, dtype=np.intp)
    f64 = np.zeros(1)
    vec, mat = np.zeros(1, dtype=f), np.zeros((1, 2), dtype=f)
    lower = np.zeros((0, 1), dtype=np.float32)
    rows, none = np.zeros(0, dtype=np.intp), np.zeros(0)
    filter_rows(X, mat, vec, ints, f64, np.zeros(1, dtype=np.float32), f64, rows, none, lower,
                none, none, rows, none)
    need = np.zeros((0, 1), dtype=np.bool_)
    firsts, picks = np.zeros((0, 1), dtype=f), np.zeros((0, 1), dtype=np.int32)
    open_groups(rows, none, ints, ints, rows, none, lower, none, need, none, none, rows)
    rank_groups(X, rows, need, mat, vec, np.zeros(2, dtype=np.intp), mat, vec,
                none, none, rows, firsts, picks, firsts)
    settle(rows, none, need, none, none, rows, firsts, picks, firsts, ints, ints, ints, rows,
           none, lower, none, none, np.zeros(0, dtype=np.int64))
    best_two(mat, ints, f64, f64)
    group_minima(mat, ints, np.zeros(2, dtype=np.intp), np.zeros((1, 1)))
    gather(X, rows, mat[:0])
    rank_rows(X, rows, mat, vec, np.zeros((4, 2), dtype=f), mat[:0])
    if X.dtype.kind in "ui":
        add_rows(X, rows, rows, np.zeros((1, 2), dtype=np.int64), 1)
    exact_sqdist(X, rows, np.zeros((1, 2)), 1.0, none)
    pair_sqdist(X, rows, np.zeros((1, 2)), rows, 1.0, none)
    fold_batch(X, mat[:0], vec, none, 1.0, rows, none, np.zeros((1, 2)), f64)
    fold_labelled(X, rows, np.zeros((1, 2)), none, 1.0, none, np.zeros((1, 2)), f64)
    update_centers(np.zeros((1, 2)), f64, np.zeros((1, 2)), f64, 1.0)
    hamerly_open(ints, f64, f64, f64, 0, 0.0, 0.0, f64, ints)
    hamerly_set(rows, none, none, none, none, f64, f64)
    near_ties(none, none, none, ints)
    if X.dtype.kind == "u":
        integer_stats(X, none, np.zeros(2, dtype=np.int64), np.zeros(2, dtype=np.int64))
        integer_sqnorms(X, none)
