"""Integer ranking of uint8 rows (Intel AMX tiles or AVX-512 VNNI), where the CPU has it.

The nearest-centre rule of :class:`kmeans_dask._kernels._Nearest` needs
ranked values ``v_j = |c_j|^2 - 2 x.c_j`` with a known error bound; the
label itself is always settled by the exact comparison of near ties.  For
unweighted-or-not uint8 rows, this module ranks them with the CPU's int8
dot products (``_int8_rank.c``: AMX's tiles, else AVX-512 VNNI) instead of a
float32 GEMM:

- each centre, in stored units ``w = c / scale``, is held as two int8 levels
  ``w ~ a h + b l`` (``a`` and ``b`` per centre), so ``x.w = a (x.h) + b (x.l)
  + x.e`` where both products are exact int32 sums;
- the error of a ranked value is then ``2 |x.e| <= 2 |x| |e|`` (``|x|`` scaled),
  computed per row from ``|x|^2`` and the largest ``|e_j|``, a bound as tight
  as the float32 GEMM's (see :meth:`Prepared.row_error`), plus the float32
  rounding of the combination.

The labels are therefore the ones the float32 path gives, bit for bit; only
the time differs (an AMX tile multiply does 16,384 multiply-adds, a VNNI
instruction 64, against a float32 FMA's 16).  The two kernels give the same
values, bit for bit (the same exact sums, combined alike).  The C
source is compiled once per machine into the package's ``__pycache__`` (or
the user's cache directory, ``$XDG_CACHE_HOME`` or ``~/.cache``, where that
cannot be written) by the C compiler (``$CC``, else ``cc``), and loaded only
from where no other user can write.  Without a compiler, without AMX or
AVX-512 VNNI, with
the ``kmeans_dask.native`` key false, for rows of more than :data:`MAX_D`
columns, or for centres so large that their float32 coefficients overflow,
the float32 path runs; :func:`why_not` says which.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import dask
import numpy as np

from ._pools import shared_pool

_SOURCE = Path(__file__).with_name("_int8_rank.c")
# No CPU-specific flags: each kernel carries its instruction set as a target
# attribute, so one build loads anywhere and only what the CPU has is called.
_FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp-simd"]
_lock = threading.Lock()
_state: dict = {}

# The unit roundoff of float32, in which the kernel combines the products.
_U32 = float(np.finfo(np.float32).eps) / 2


# The kernels, fastest first, and the CPU flags each needs.
_KERNELS = {"amx": {"amx_tile", "amx_int8", "avx512f", "avx512dq"},
            "avx512-vnni": {"avx512f", "avx512dq", "avx512bw", "avx512_vnni"}}


def _cpu_kernels() -> list[str]:
    """The kernels this CPU can run, fastest first."""
    if sys.platform != "linux":
        return []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("flags")), []))
    return [name for name, need in _KERNELS.items() if need <= flags]


def _library_path() -> Path:
    """Where this machine's build lives: the package's ``__pycache__`` where it can be
    written, otherwise the user's cache directory (never a directory others can write)."""
    tag = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:16]
    name = f"_int8_rank-{tag}.so"
    here = _SOURCE.parent / "__pycache__"
    try:
        here.mkdir(exist_ok=True)
        if os.access(here, os.W_OK):
            return here / name
    except OSError:
        pass
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kmeans-dask"
    return cache / name


def _trusted(path: Path) -> bool:
    """Whether ``path`` and its directory belong to this user (or root) and no one
    else can write them: a library loaded from there runs in this process."""
    for p in (path, path.parent):
        st = p.stat()
        if st.st_uid not in (os.getuid(), 0) or st.st_mode & 0o022:
            return False
    return True


# At most this many columns: the int32 sums of 255 x 127 per column stay exact.
MAX_D = (2**31 - 1) // (255 * 127)


def _build(path: Path) -> None:
    """Compile the source to ``path``, atomically (other processes may build it too)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        cc = shlex.split(os.environ.get("CC") or "cc")
        done = subprocess.run([*cc, *_FLAGS, str(_SOURCE), "-o", tmp],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise OSError(f"{' '.join(cc)} exited with {done.returncode}: "
                          f"{done.stderr.strip()[-500:]}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users of the cache out
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load():
    """The loaded library, its ``rank`` and ``kernel`` set, or the reason it cannot be
    used (a string)."""
    kernels = _cpu_kernels()
    if not kernels:
        return "the CPU has neither AMX int8 tiles nor AVX-512 VNNI"
    try:
        path = _library_path()
        if not path.exists():
            _build(path)
        if not _trusted(path):
            return f"{path} or its directory can be written by other users; not loaded"
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not build {_SOURCE.name}: {exc}"
    if kernels[0] == "amx" and lib.kd_amx_init() != 0:
        kernels = kernels[1:]  # the OS refused the tile state
        if not kernels:
            return "the kernel refused the AMX tile state"
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.kd_amx_rank, lib.kd_vnni_rank):
        fn.restype = ctypes.c_int
        fn.argtypes = [p, i64, p, i64, i64, p, i64, i64, p, p, p, i64, p, i64, p, p, p]
    lib.kd_vnni_rank1.restype = ctypes.c_int
    lib.kd_vnni_rank1.argtypes = [p, i64, p, i64, i64, p, i64, i64, p, p, p, i64, p, p, p, p, p, p]
    lib.kd_int8_levels.restype = ctypes.c_int
    lib.kd_int8_levels.argtypes = [p, i64, i64, ctypes.c_double, p, i64, p, p, p, p, p, p, p]
    lib.rank = lib.kd_amx_rank if kernels[0] == "amx" else lib.kd_vnni_rank
    # AMX's tiles make the second level nearly free; on VNNI it costs as much
    # as the first, so the first alone ranks and the second only refines.
    lib.rank1 = None if kernels[0] == "amx" else lib.kd_vnni_rank1
    lib.kernel = kernels[0]
    return lib


def _library():
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _load()
        return _state["lib"]


def kernel() -> str | None:
    """The kernel uint8 rows are ranked with here (``"amx"`` or ``"avx512-vnni"``), or
    None where they are not (see :func:`why_not`)."""
    return _library().kernel if available() else None


def available() -> bool:
    """Whether uint8 rows are ranked here (``kmeans_dask.native`` true and the CPU able)."""
    if not _enabled():
        return False
    return not isinstance(_library(), str)


def why_not() -> str | None:
    """Why :func:`available` is false, or None."""
    if not _enabled():
        return "the dask config key kmeans_dask.native is false"
    lib = _library()
    return lib if isinstance(lib, str) else None


def _enabled() -> bool:
    value = dask.config.get("kmeans_dask.native", True)
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ValueError(f"dask config kmeans_dask.native must be true or false, got {value!r}")
    return text == "true"


class Prepared:
    """Centres made ready for :func:`rank`: their int8 tiles and coefficients.

    ``centers`` (k, d) in scaled units (``scale`` times the stored values).
    """

    def __init__(self, centers: np.ndarray, scale: float, d: int):
        c = np.ascontiguousarray(centers, dtype=np.float64)
        if c.ndim != 2 or c.shape[1] != d:
            raise ValueError(f"centres of shape {c.shape} for rows of {d} columns")
        lib = _library()
        if isinstance(lib, str):
            raise RuntimeError(f"the integer ranking is not available: {lib}")
        k = c.shape[0]
        self.k, self.d = k, d
        self.kb = max(1, -(-d // 64))
        self.np = max(1, -(-k // 16))
        kp = self.np * 16
        self.packed = np.zeros((self.np, 2, self.kb, 16, 16, 4), dtype=np.int8)
        a, b, e1, e2, h2, l2 = (np.empty(k) for _ in range(6))
        # The second level row by row, for the one-level ranking's refinement.
        self.lrow = (np.zeros((k, self.kb * 64), dtype=np.int8) if lib.rank1 is not None
                     else None)
        code = lib.kd_int8_levels(c.ctypes.data, k, d, float(scale),
                                  self.packed.ctypes.data, self.kb, a.ctypes.data,
                                  b.ctypes.data, e2.ctypes.data, h2.ctypes.data,
                                  l2.ctypes.data, e1.ctypes.data,
                                  None if self.lrow is None else self.lrow.ctypes.data)
        if code != 0:
            raise MemoryError("the integer kernel could not allocate its buffers")
        # x.c = scale^2 (X.w) for stored rows X and stored-unit centres w; the
        # kernel combines the two products in float32.
        self.ch = np.zeros(kp, dtype=np.float32)
        self.cl = np.zeros(kp, dtype=np.float32)
        csq = np.einsum("ij,ij->i", c, c)
        self.csq = np.full(kp, np.inf, dtype=np.float32)
        with np.errstate(over="ignore"):  # overflowing centres are not usable, below
            self.ch[:k] = -2.0 * scale * scale * a
            self.cl[:k] = -2.0 * scale * scale * b
            self.csq[:k] = csq
        # The error x.c - scale^2 (a X.h + b X.l) = scale^2 X.e, at most |x| scale |e|.
        s = abs(scale)
        self.emax = s * float(np.sqrt(e2.max())) if k else 0.0
        # What the first level alone leaves: x.c - scale^2 a X.h = scale^2 X.(b l + e).
        self.emax1 = s * float(np.sqrt(e1.max())) if k else 0.0
        self.cmax2 = float(csq.max()) if k else 0.0
        # Centres so large that float32 coefficients or |c|^2 overflow cannot be
        # ranked here (the float32 path ranks them in its own way).
        self.usable = bool(np.isfinite(self.ch).all() and np.isfinite(self.cl).all()
                           and self.cmax2 < 1e37 and d <= MAX_D)
        # Largest |x.c_h| / |x| and |x.c_l| / |x| (the levels' norms, scaled):
        # the float32 terms' magnitudes, which their rounding scales with.
        self.levels = (s * float(np.sqrt(a * a * h2).max() + np.sqrt(b * b * l2).max())
                       if k else 0.0)

    def row_error(self, xsq: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``E`` per row: a bound on the error of each of the row's ranked values
        (into ``out`` when given: it runs over every row of a chunk each pass)."""
        return self._error(xsq, self.emax, out)

    def first_level_error(self, xsq: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Like :meth:`row_error`, for the values of the first level alone
        (``csq + ch (x.h)``), which the one-level ranking rules centres out with."""
        return self._error(xsq, self.emax1, out)

    def _error(self, xsq, emax: float, out):
        # The quantisation (with margin), 2 |x| emax, and the float32 rounding
        # of the coefficients, the products converted and the two fused adds:
        # a few units of roundoff of the largest magnitude the terms reach,
        # 6 u (cmax2 + 2 |x| levels).
        xn = np.multiply(xsq, 1 + 1e-9, out=out)
        np.sqrt(xn, out=xn)
        xn *= 2.0 * emax * 1.01 + 12 * _U32 * self.levels
        xn += 6 * _U32 * self.cmax2 + 1e-30
        return xn


def rank(X: np.ndarray, rows, prep: Prepared, *, g: np.ndarray | None = None,
         fold: bool = True, out=None, threads: int = 1, bounds=None):
    """Ranked values of ``X[rows]`` (``rows`` an index array, or None for all rows).

    Returns ``(pos, best, second)`` (the best column, the smallest and second
    smallest value per row, float64) when ``fold``, into ``out`` when given
    (int64, float64, float64 arrays of the rows' length); writes the float32
    values into ``g`` (rows x k, C order) when given.  ``threads``: rows are
    shared out between up to this many threads (each row's values do not
    depend on it).

    ``bounds``: the rows' ``(first_level_error, row_error)`` (float64 arrays
    of the rows' length).  Given, and where the kernel has it (VNNI, not
    AMX), the first level alone ranks and only centres it cannot rule out
    get their full value (``kd_vnni_rank1``): ``pos`` and ``best`` are then
    the full values' smallest among those, and ``second`` may be lower than
    the second smallest full value (never higher), so that ``second - E``
    still bounds every other centre and a row where the two kernels could
    differ is within ``2 E`` of a tie.
    """
    lib = _library()
    if X.dtype != np.uint8:
        raise TypeError(f"the native ranking takes uint8 rows, got {X.dtype}")
    if X.ndim != 2 or X.strides[1] != 1 or X.strides[0] < X.shape[1]:
        X = np.array(X, copy=True, order="C")  # broadcast, reversed or strided views
    if not prep.usable:
        raise ValueError("these centres cannot be ranked on integer tiles (Prepared.usable)")
    if rows is not None:
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        n = rows.size
    else:
        n = X.shape[0]
    pos = best = second = None
    if fold:
        pos, best, second = out if out is not None else (np.empty(n, np.int64), np.empty(n),
                                                         np.empty(n))
    if g is not None:
        assert g.dtype == np.float32 and g.flags.c_contiguous and g.shape == (n, prep.k)

    def ptr(a, at=0):
        return None if a is None else a.ctypes.data + at * a.strides[0]

    one_level = bounds is not None and fold and g is None and lib.rank1 is not None
    if one_level:
        e1, e = (np.ascontiguousarray(b, dtype=np.float64) for b in bounds)
        assert e1.shape == (n,) and e.shape == (n,)

    def part(lo, hi):  # rows lo:hi of the request; ctypes lets go of the GIL
        if one_level:
            return lib.rank1(ptr(X, lo if rows is None else 0), X.strides[0], ptr(rows, lo),
                             hi - lo, prep.d, ptr(prep.packed), prep.np, prep.kb, ptr(prep.ch),
                             ptr(prep.cl), ptr(prep.csq), prep.k, ptr(prep.lrow), ptr(e1, lo),
                             ptr(e, lo), ptr(pos, lo), ptr(best, lo), ptr(second, lo))
        return lib.rank(ptr(X, lo if rows is None else 0), X.strides[0], ptr(rows, lo), hi - lo,
                        prep.d,
                        ptr(prep.packed), prep.np, prep.kb, ptr(prep.ch), ptr(prep.cl),
                        ptr(prep.csq), prep.k, ptr(g, lo), prep.k, ptr(pos, lo),
                        ptr(best, lo), ptr(second, lo))

    # Below a few hundred rows a thread costs more than it saves.
    parts = max(1, min(int(threads), n // _MIN_ROWS_PER_THREAD))
    if parts == 1:
        codes = [part(0, n)] if n else []
    else:
        cuts = [n * i // parts for i in range(parts + 1)]
        codes = list(shared_pool("kd-rank", parts).map(part, cuts[:-1], cuts[1:]))
    bad = [c for c in codes if c != 0]
    if bad:
        raise RuntimeError(f"the {lib.kernel} ranking failed (code {bad[0]})")
    return pos, best, second


_MIN_ROWS_PER_THREAD = 256
