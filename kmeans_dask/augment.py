"""Infinite-MNIST-style data: a data store grown to N rows by elastic deformations.

The train split of the output holds the source's ``n0`` train rows first, then
deformations of them: row ``i >= n0`` is a deformation of source row
``(i - n0) mod n0``.  The test split is the source's, untouched.

One deformation (Simard et al. 2003; Loosli, Canu and Bottou 2007):

1. two random fields ``u_y``, ``u_x`` of 28 x 28 values uniform in (-1, 1);
2. each smoothed by a Gaussian of standard deviation ``sigma`` pixels
   (``scipy.ndimage.gaussian_filter``, mode ``"reflect"``) and scaled by
   ``alpha``: the displacement field ``d = alpha * G(u)``, in pixels;
3. a translation ``t`` uniform in [-max_shift, max_shift] on each axis;
4. the output pixel (r, c) is the source image sampled at
   ``(r + d_y + t_y, c + d_x + t_x)`` by bilinear interpolation (zero outside
   the image, as ``scipy.ndimage.map_coordinates(order=1, mode="constant")``),
   rounded, clipped to 0-255 and stored as uint8.

Reproducibility: a row's deformation is a function of its row index and the
seed only.  Its random numbers are the 393 64-bit draws at position
``393 * i`` of one PCG64 stream (``numpy.random.PCG64(SeedSequence(seed))``,
reached with ``advance``), so any chunk can be computed alone, on any worker,
and the bytes do not depend on the chunking or on the number of workers.
The smoothing is done with integer-valued float64 products (16-bit noise,
the Gaussian kernel in 16-bit fixed point) whose sums stay below 2**49, so
they are exact whatever order BLAS adds them in; everything after it is
elementwise IEEE arithmetic.  So a row should be bit-for-bit the same on any
machine with the same NumPy bit generator, not only on every worker of one
machine (only the latter is tested).

Nothing here knows the store layout: :mod:`kmeans_dask.store` reads the
source rows and writes the output.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import store
from .errors import ConfigError, StoreError

log = logging.getLogger(__name__)

SIDE = 28
N_PIXELS = SIDE * SIDE
#: 64-bit draws per row: 392 hold the two fields' 1,568 16-bit noise values, one the translation.
NOISE_DRAWS = 2 * N_PIXELS // 4
DRAWS_PER_ROW = NOISE_DRAWS + 1
FILTER_BITS = 16  # the Gaussian kernel in 16-bit fixed point
NOISE_BITS = 16
FILTER_MODE = "reflect"
#: Rows deformed at once inside a task: temporaries stay a few MiB whatever the chunk.
BLOCK_ROWS = 512
_PAD = SIDE + 3  # padded image side: one zero row/column before, two after (bilinear neighbours)


@dataclass(frozen=True)
class Deformation:
    """Parameters of the elastic deformation (see the module docstring).

    Parameters
    ----------
    alpha : float, default=20.0
        Field strength: the factor, in pixels, applied to the smoothed
        uniform field.  With ``sigma=4`` the smoothed field's standard
        deviation is about 0.05, so the displacement's RMS is about
        ``0.05 * alpha`` pixels (1 pixel at the default; Simard et al. used
        34, which breaks some strokes).  0 leaves only the translation.
    sigma : float, default=4.0
        Smoothness: standard deviation, in pixels, of the Gaussian that
        smooths the field (larger: smoother, weaker fields for a given alpha).
    max_shift : float, default=1.0
        Largest translation on each axis, in pixels.
    """

    alpha: float = 20.0
    sigma: float = 4.0
    max_shift: float = 1.0

    def __post_init__(self):
        limits = {"alpha": (0.0, 100.0), "sigma": (0.5, 28.0), "max_shift": (0.0, 4.0)}
        for name, (lo, hi) in limits.items():
            value = getattr(self, name)
            number = isinstance(value, (int, float, np.integer, np.floating))
            if isinstance(value, bool) or not number or not lo <= value <= hi:  # NaN too
                raise ConfigError(f"{name} must be a number from {lo:g} to {hi:g} pixels, "
                                  f"got {value!r}")
            object.__setattr__(self, name, float(value))

    def record(self) -> dict:
        """The parameters and the method, as stored in the output's attributes."""
        return {**asdict(self),
                "field": "uniform(-1, 1) per pixel, Gaussian-smoothed (sd sigma), times alpha",
                "filter_mode": FILTER_MODE, "filter_bits": FILTER_BITS, "noise_bits": NOISE_BITS,
                "translation": "uniform in [-max_shift, max_shift] on each axis",
                "interpolation": "bilinear, zero outside the image",
                "rounding": "round half to even, clipped to 0-255"}


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


@lru_cache(maxsize=16)
def smoothing_matrix(sigma: float) -> np.ndarray:
    """The 28 x 28 Gaussian filter along one axis as a matrix, in 16-bit fixed point.

    ``G @ v`` is ``gaussian_filter1d(v, sigma, mode="reflect") * 2**16`` up to
    the rounding of the kernel.  Integer valued, float64, read-only.
    """
    from scipy.ndimage import gaussian_filter1d

    g = gaussian_filter1d(np.eye(SIDE), sigma, axis=0, mode=FILTER_MODE)
    q = np.rint(g * 2.0**FILTER_BITS)
    q.setflags(write=False)
    return q


def _draws(seed: int, first_row: int, n: int) -> np.ndarray:
    """The (n, DRAWS_PER_ROW) uint64 draws of rows first_row .. first_row + n - 1."""
    bits = np.random.PCG64(np.random.SeedSequence(seed))
    bits.advance(first_row * DRAWS_PER_ROW)
    return bits.random_raw(n * DRAWS_PER_ROW).reshape(n, DRAWS_PER_ROW)


class _Buffers:
    """Work arrays for up to ``rows`` rows, reused block after block.

    Every step writes into these instead of allocating: Dask's workers run with
    ``MALLOC_TRIM_THRESHOLD_`` set, so a fresh multi-MiB temporary per step
    would cost a round of page faults each time.
    """

    def __init__(self, rows: int):
        if rows * _PAD * _PAD >= 2**24:  # the float32 gather index must stay exact
            raise ValueError(f"at most {2**24 // (_PAD * _PAD) - 1} rows at a time, got {rows}")
        self.rows = rows
        self.noise = np.empty((rows, 2, SIDE, SIDE), np.float64)
        self.along = np.empty_like(self.noise)
        self.smooth = np.empty_like(self.noise)
        self.d = np.empty((rows, 2, SIDE, SIDE), np.float32)
        self.padded = np.zeros((rows, _PAD, _PAD), np.float32)
        self.work = np.empty((6, rows, SIDE, SIDE), np.float32)
        self.index = np.empty((rows, SIDE, SIDE), np.intp)
        # Flat index of each row's first image pixel in the padded buffer.
        first = np.arange(rows, dtype=np.float32) * (_PAD * _PAD) + (_PAD + 1)
        self.offset = first[:, None, None]

    def view(self, n: int) -> dict:
        return {"noise": self.noise[:n], "along": self.along[:n], "smooth": self.smooth[:n],
                "d": self.d[:n], "padded": self.padded[:n], "work": self.work[:, :n],
                "index": self.index[:n], "offset": self.offset[:n]}


def _noise(draws: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Integer-valued float64 (n, 2, 28, 28) noise, odd values in [-65535, 65535]."""
    n = len(draws)
    # Little-endian 16-bit words of each draw, whatever the machine's byte order.
    words = np.ascontiguousarray(draws[:, :NOISE_DRAWS]).astype("<u8", copy=False).view("<u2")
    out = np.empty((n, 2, SIDE, SIDE), np.float64) if out is None else out
    np.copyto(out, words.reshape(n, 2, SIDE, SIDE))
    out *= 2.0
    out -= 2.0**NOISE_BITS - 1
    return out


def _shift(draws: np.ndarray, max_shift: float) -> np.ndarray:
    """Translations (n, 2) float32 (t_y, t_x) in [-max_shift, max_shift], from each
    row's last draw (its low and high 32 bits)."""
    last = draws[:, NOISE_DRAWS]
    halves = np.stack([last & np.uint64(0xFFFFFFFF), last >> np.uint64(32)], axis=1)
    return (((halves.astype(np.float64) + 0.5) * 2.0**-31 - 1.0) * max_shift).astype(np.float32)


def smooth(noise: np.ndarray, sigma: float, *, along=None, out=None) -> np.ndarray:
    """``G u G^T`` for every 28 x 28 plane of integer-valued ``noise``; exact in float64.

    ``G`` is :func:`smoothing_matrix`.  Every product and partial sum is an
    integer below 2**49, which float64 holds exactly, so the result does not
    depend on how BLAS blocks or orders the sums.
    """
    g = smoothing_matrix(sigma)
    along = np.empty_like(noise) if along is None else along
    out = np.empty_like(noise) if out is None else out
    # Along columns: one GEMM over every row of every plane; then along rows, plane by plane.
    np.matmul(noise.reshape(-1, SIDE), g.T, out=along.reshape(-1, SIDE))
    np.matmul(g, along.reshape(-1, SIDE, SIDE), out=out.reshape(-1, SIDE, SIDE))
    return out


def _fields(draws: np.ndarray, deformation: Deformation, buf: dict):
    noise = _noise(draws, buf["noise"])
    both = smooth(noise, deformation.sigma, along=buf["along"], out=buf["smooth"])
    scale = deformation.alpha * 2.0 ** -(NOISE_BITS + 2 * FILTER_BITS)
    np.multiply(both, scale, out=buf["d"], casting="same_kind")
    return buf["d"], _shift(draws, deformation.max_shift)


def fields(first_row: int, n: int, seed: int, deformation: Deformation):
    """Displacements of rows first_row .. first_row + n - 1, in pixels.

    Returns ``(d, t)``: ``d`` (n, 2, 28, 28) float32, the smooth fields
    (``d[:, 0]`` along rows, ``d[:, 1]`` along columns), and ``t`` (n, 2)
    float32, the translations (rows, columns).
    """
    buf = _Buffers(n).view(n)
    d, t = _fields(_draws(seed, first_row, n), deformation, buf)
    return d.copy(), t


_GRID = np.arange(SIDE, dtype=np.float32)


def _resample(images: np.ndarray, d: np.ndarray, t: np.ndarray, buf: dict) -> np.ndarray:
    """Bilinear resampling of (n, 784) uint8 images at grid + d + t; (n, 784) uint8 out.

    Every step is elementwise float32 arithmetic (the flat gather index too,
    exact below 2**24), so a pixel's value never depends on the other rows.
    """
    n = len(images)
    padded = buf["padded"]  # zero borders: one row/column before the image, two after
    padded[:, 1:SIDE + 1, 1:SIDE + 1] = images.reshape(n, SIDE, SIDE)
    flat = padded.reshape(-1)
    fy, fx, by, bx, e, f = buf["work"]
    for axis, grid, pos, whole in ((0, _GRID[:, None], fy, by), (1, _GRID[None, :], fx, bx)):
        np.add(d[:, axis], t[:, axis, None, None], out=pos)
        pos += grid
        # Past -1 or 28 every neighbour is padding; clipping keeps the gather in bounds.
        np.clip(pos, -1.0, float(SIDE), out=pos)
        np.floor(pos, out=whole)
        pos -= whole  # the fraction (exact)
    # Flat index of the top-left neighbour (+1 row and column for the padding).
    by *= _PAD
    by += bx
    by += buf["offset"]
    index = buf["index"]
    np.copyto(index, by, casting="unsafe")
    a, b = by, bx  # reused
    flat.take(index, out=a, mode="clip")  # top left
    flat[1:].take(index, out=b, mode="clip")  # top right
    b -= a
    b *= fx
    a += b  # the top row, interpolated along x
    flat[_PAD:].take(index, out=e, mode="clip")  # bottom left
    flat[_PAD + 1:].take(index, out=f, mode="clip")  # bottom right
    f -= e
    f *= fx
    e += f  # the bottom row
    e -= a
    e *= fy
    a += e
    np.rint(a, out=a)
    np.clip(a, 0.0, 255.0, out=a)
    return a.reshape(n, N_PIXELS).astype(np.uint8)


def deform(images: np.ndarray, first_row: int, seed: int, deformation: Deformation,
           block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """Deform ``images`` (n, 784) uint8; row k gets the deformation of row index first_row + k.

    Computed ``block_rows`` rows at a time in reused buffers; the result does
    not depend on ``block_rows``.

    Parameters
    ----------
    images : ndarray of shape (n, 784), uint8
    first_row : int
        The row index of ``images[0]`` in the augmented split.
    seed : int
    deformation : Deformation
    block_rows : int, default=512

    Returns
    -------
    ndarray of shape (n, 784), uint8

    Examples
    --------
    >>> import numpy as np
    >>> images = np.zeros((3, 784), np.uint8)
    >>> images[:, 28 * 10:28 * 18] = 200                  # a bar across rows 10-17
    >>> out = deform(images, 60_000, 0, Deformation())
    >>> out.shape, out.dtype
    ((3, 784), dtype('uint8'))
    >>> bool((out != images).any())                      # moved
    True
    >>> bool((deform(images[1:], 60_001, 0, Deformation()) == out[1:]).all())  # row by row
    True
    """
    images = np.asarray(images)
    if images.ndim != 2 or images.shape[1] != N_PIXELS or images.dtype != np.uint8:
        raise ValueError(f"expected (n, {N_PIXELS}) uint8 images, got {images.shape} "
                         f"{images.dtype}")
    out = np.empty_like(images)
    buffers = _Buffers(max(1, min(block_rows, len(images))))
    bits = np.random.PCG64(np.random.SeedSequence(seed))
    bits.advance(first_row * DRAWS_PER_ROW)
    for lo in range(0, len(images), buffers.rows):
        hi = min(lo + buffers.rows, len(images))
        buf = buffers.view(hi - lo)
        draws = bits.random_raw((hi - lo) * DRAWS_PER_ROW).reshape(hi - lo, DRAWS_PER_ROW)
        d, t = _fields(draws, deformation, buf)
        out[lo:hi] = _resample(images[lo:hi], d, t, buf)
    return out


# --------------------------------------------------------------------------- one output chunk


def source_rows(rows: np.ndarray | range, n0: int) -> np.ndarray:
    """The source train row of each output row: ``i`` below ``n0``, else ``(i - n0) mod n0``."""
    rows = np.asarray(rows, dtype=np.int64)
    return np.where(rows < n0, rows, (rows - n0) % n0)


def _read(source: str, name: str, index: np.ndarray, n0: int) -> np.ndarray:
    """Rows ``index`` of the source's train array ``name``, reading only the runs they
    fall in (at most two for a chunk shorter than ``n0``; the whole array otherwise)."""
    if len(index) >= n0:
        return store.read_rows(source, "train", name, 0, n0)[index]
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    runs = np.split(index, breaks)
    return np.concatenate([store.read_rows(source, "train", name, int(r[0]), int(r[-1]) + 1)
                           for r in runs])


def make_images(source: str, n0: int, start: int, stop: int, seed: int,
                deformation: Deformation) -> np.ndarray:
    """Task body: rows ``start``..``stop`` of the augmented train images, (n, 784) uint8.

    Reads only the source rows the chunk needs (:func:`kmeans_dask.store.read_rows`,
    each chunk checked against its CRC-32C), so memory is bounded by the chunk.
    """
    images = _read(source, "images", source_rows(range(start, stop), n0), n0)
    first = min(max(start, n0), stop)  # the first deformed row
    if first < stop:
        images[first - start:] = deform(images[first - start:], first, seed, deformation)
    return images


def make_labels(source: str, n0: int, start: int, stop: int) -> np.ndarray:
    """Task body: rows ``start``..``stop`` of the augmented train labels: their sources'."""
    return _read(source, "labels", source_rows(range(start, stop), n0), n0)


def make_chunk(source: str, n0: int, start: int, stop: int, seed: int,
               deformation: Deformation) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start``..``stop`` of the augmented train split, ``(images, labels)``,
    computed alone (what the tasks of :func:`train_arrays` compute)."""
    return (make_images(source, n0, start, stop, seed, deformation),
            make_labels(source, n0, start, stop))


# --------------------------------------------------------------------------- the store


METHOD_VERSION = 1  # bump whenever the bytes a (seed, parameters) pair gives change
GENERATOR = (f"numpy PCG64(SeedSequence(seed)); row i uses the {DRAWS_PER_ROW} 64-bit draws "
             f"from position {DRAWS_PER_ROW} * i")


@dataclass(frozen=True)
class Plan:
    """An augmentation, checked and ready to run (see :func:`prepare`)."""

    source: Path  # absolute
    out: Path  # absolute
    dataset: str
    rows: int
    n0: int  # the source's train rows
    test_rows: int | None  # the source's test rows (None: no test split)
    seed: int
    chunk_rows: int
    deformation: Deformation
    record: dict  # the root attribute "augment" of the output
    overwrite: bool
    up_to_date: bool  # the output already holds exactly this


@dataclass(frozen=True)
class Report:
    path: Path
    splits: dict  # split -> rows
    deformed: int  # rows that are deformations
    skipped: bool  # already up to date
    seconds: float


def _source_record(split) -> dict:
    keep = {k: split.attrs[k] for k in ("payload_sha256",) if k in split.attrs}
    return {"n_rows": int(split.images.shape[0]), "fingerprint": split.fingerprint,
            "chunk_crc32c": split.attrs["chunk_crc32c"], **keep}


def existing_record(path) -> dict | None:
    """The ``augment`` root attribute of the data store at ``path``; None when there is
    no readable data store there or it was not written by :func:`run`."""
    if store.output_kind(path) != store.DATA_FORMAT:
        return None
    try:
        split = store.list_splits(path)[0]
        attrs = store.open_data(path, split).store_attrs
    except (StoreError, IndexError):
        return None
    record = attrs.get("augment")
    return record if isinstance(record, dict) else None


def prepare(data, out, rows: int, *, seed: int = 0, chunk_rows: int | None = None,
            deformation: Deformation | None = None, overwrite: bool = False) -> Plan:
    """Check every argument against the source and the output; no Dask work.

    Raises
    ------
    StoreError
        ``data`` is missing or not a data store, or has no train split; ``out``
        exists and ``overwrite`` is false (unless it already holds exactly this
        augmentation: then ``Plan.up_to_date``); ``out`` is, contains or lies
        inside ``data``.
    ConfigError
        ``rows`` below the source's train rows, a bad ``seed``, ``chunk_rows``
        or deformation parameter.
    """
    deformation = Deformation() if deformation is None else deformation
    if not isinstance(deformation, Deformation):
        raise ConfigError(f"deformation must be a Deformation, got {deformation!r}")
    seed = check_seed(seed)
    chunk_rows = store.DEFAULT_CHUNK_ROWS if chunk_rows is None else chunk_rows
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) \
            or chunk_rows < 1:
        raise ConfigError(f"--chunk-rows must be a positive integer, got {chunk_rows!r}")
    source = store.absolute(data)
    splits = store.list_splits(source)  # StoreError: missing, not a data store
    if "train" not in splits:
        raise StoreError(f"{source}: no train split to augment (it holds {splits})")
    train = store.open_data(source, "train")
    test = store.open_data(source, "test") if "test" in splits else None
    n0 = int(train.images.shape[0])
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < n0:
        raise ConfigError(f"--rows must be an integer of at least {n0}, the train rows of "
                          f"{source}; got {rows!r}")
    record = {
        "source": {"path": str(source), "dataset": train.store_attrs["dataset"],
                   "splits": {s.split: _source_record(s) for s in (train, test) if s}},
        "rows": int(rows),
        "originals": n0,
        "seed": seed,
        "chunk_rows": int(chunk_rows),
        "deformation": deformation.record(),
        "generator": GENERATOR,
        "method_version": METHOD_VERSION,
    }
    final = store.absolute(out)
    have = None if overwrite else existing_record(final)
    up_to_date = have == record
    if have is not None and not up_to_date:
        differ = sorted(k for k in set(have) | set(record) if have.get(k) != record.get(k))
        raise store.exists_error(final, f"and holds another augmentation "
                                        f"({', '.join(differ)} differ)")
    if not up_to_date:
        store.check_output(final, store.DATA_FORMAT, overwrite=overwrite, inputs=[source])
    return Plan(source=source, out=final, dataset=train.store_attrs["dataset"], rows=int(rows),
                n0=n0, test_rows=None if test is None else int(test.images.shape[0]), seed=seed,
                chunk_rows=int(chunk_rows), deformation=deformation, record=record,
                overwrite=overwrite, up_to_date=up_to_date)


def train_arrays(plan: Plan):
    """The augmented train split as lazy ``(images, labels)`` Dask arrays, chunked by
    ``plan.chunk_rows``: per chunk one task deforms the images (:func:`make_images`)
    and one small task reads the labels (:func:`make_labels`).

    The two are separate tasks, not one task returning both: Dask optimises each
    array's graph on its own when the chunks are handed over (``to_delayed``), and a
    shared task would be fused into both and run twice.
    """
    import dask.array as da
    from dask.base import tokenize

    step = plan.chunk_rows
    bounds = [(a, min(a + step, plan.rows)) for a in range(0, plan.rows, step)]
    token = tokenize(plan.record)
    img, lab = f"augment-images-{token}", f"augment-labels-{token}"
    source = plan.source
    deformation, seed, n0 = plan.deformation, plan.seed, plan.n0
    images = da.Array({(img, i, 0): (make_images, source, n0, a, b, seed, deformation)
                       for i, (a, b) in enumerate(bounds)},
                      img, (tuple(b - a for a, b in bounds), (N_PIXELS,)), dtype=np.uint8,
                      meta=np.empty((0, 0), np.uint8))
    labels = da.Array({(lab, i): (make_labels, source, n0, a, b)
                       for i, (a, b) in enumerate(bounds)},
                      lab, (tuple(b - a for a, b in bounds),), dtype=np.uint8,
                      meta=np.empty((0,), np.uint8))
    return images, labels


_WRITTEN_BY_STORE = ("split", "n_rows", "chunk_crc32c")


def run(plan: Plan, progress=None) -> Report:
    """Write the augmented store of ``plan`` on the active Dask cluster (one task per
    output chunk, atomically); nothing to do when ``plan.up_to_date``.

    ``progress(done, total)`` is called as chunks are written.
    """
    import time

    started = time.perf_counter()
    splits = {"train": plan.rows}
    if plan.test_rows is not None:
        splits["test"] = plan.test_rows
    if plan.up_to_date:
        store.verify_data(plan.out)  # a damaged chunk is an error naming it, not "up to date"
        log.info("%s already holds this augmentation; nothing to do", plan.out)
        return Report(plan.out, splits, plan.rows - plan.n0, True, 0.0)
    images, labels = train_arrays(plan)
    data = {"train": store.SplitData(images=images, labels=labels, attrs={
        "source": f"{plan.source}/train: rows 0-{plan.n0 - 1} copied, the rest deformed",
        "originals": plan.n0})}
    if plan.test_rows is not None:
        test = store.open_data(plan.source, "test")
        kept = {k: v for k, v in test.attrs.items() if k not in _WRITTEN_BY_STORE}
        data["test"] = store.SplitData(images=test.images, labels=test.labels, attrs=kept)
    log.info("augmenting %s train to %d rows (%d deformed) in chunks of %d rows", plan.source,
             plan.rows, plan.rows - plan.n0, plan.chunk_rows)
    path = store.write_data(plan.out, dataset=plan.dataset, splits=data,
                            attrs={"chunk_rows": plan.chunk_rows, "augment": plan.record},
                            overwrite=plan.overwrite, inputs=[plan.source], progress=progress)
    seconds = time.perf_counter() - started
    log.info("wrote %s in %.1f s", path, seconds)
    return Report(path, splits, plan.rows - plan.n0, False, seconds)


def augment(data, out, rows: int, *, seed: int = 0, chunk_rows: int | None = None,
            deformation: Deformation | None = None, overwrite: bool = False,
            progress=None) -> Report:
    """:func:`prepare` then :func:`run`: grow ``data``'s train split to ``rows`` rows in ``out``."""
    return run(prepare(data, out, rows, seed=seed, chunk_rows=chunk_rows,
                       deformation=deformation, overwrite=overwrite), progress)


# --------------------------------------------------------------------------- a picture


def samples(data, *, seed: int = 0, deformation: Deformation | None = None, n: int = 5,
            per_row: int = 8):
    """A few originals and their deformations, for :func:`kmeans_dask.plots.deformation_grid`.

    The originals are the first train rows of ``n`` different classes; row
    ``r``'s deformations are rows ``n0 * j + r`` (j = 1 .. per_row) of any
    augmented store of ``data`` with this seed and parameters (computed here).

    Returns ``(originals (n, 784), deformed (n, per_row, 784), titles)``.
    """
    deformation = Deformation() if deformation is None else deformation
    train = store.open_data(data, "train")
    n0 = int(train.images.shape[0])
    head = min(n0, 2000)
    labels = train.labels[:head].compute()
    picks = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)][:n]
    originals = train.images[:head].compute()[picks]
    deformed = np.stack([
        np.concatenate([deform(originals[k:k + 1], n0 * j + r, seed, deformation)
                        for j in range(1, per_row + 1)])
        for k, r in enumerate(picks)])
    names = train.class_names
    return originals, deformed, [names[labels[r]] for r in picks]
