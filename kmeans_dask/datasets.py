"""MNIST and Fashion-MNIST: what the files are, where to find them, how to read them.

This module knows the two data sets' file names, official mirrors, class names
and checksums; it resolves a split's files from the first source that holds
them; and it parses IDX files, refusing anything that is not a well-formed
unsigned-byte IDX payload of the expected kind.

Checksums are taken on the *decompressed* IDX payload (SHA-256 and size), so
any faithful mirror is accepted, recompressed copies such as Debian's
included.  Downloads from the official mirrors are also checked against the
upstream ``.gz`` MD5.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ChecksumError, IDXFormatError, SourceError

log = logging.getLogger(__name__)

IMAGE_SHAPE = (28, 28)
SPLITS = ("train", "test")
DEBIAN_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
BUNDLED_DIR = Path(__file__).parent / "data"
_BLOCK = 1 << 20
_IDX_UBYTE = 0x08
_NDIM = {"images": 3, "labels": 1}


@dataclass(frozen=True)
class IDXFile:
    """One published IDX file.

    Attributes
    ----------
    name : str
        File name as published, ending in ``.gz``.
    kind : {"images", "labels"}
    raw_sha256 : str
        SHA-256 of the decompressed payload.
    raw_size : int
        Size in bytes of the decompressed payload.
    gz_md5 : str
        MD5 of the upstream ``.gz`` file.
    """

    name: str
    kind: str
    raw_sha256: str
    raw_size: int
    gz_md5: str

    @property
    def n_items(self) -> int:
        header = 16 if self.kind == "images" else 8
        per_item = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] if self.kind == "images" else 1
        return (self.raw_size - header) // per_item


@dataclass(frozen=True)
class DatasetSpec:
    """Everything known about one data set before any file is opened."""

    name: str
    class_names: tuple[str, ...]
    mirrors: tuple[str, ...]
    files: dict  # split -> {"images": IDXFile, "labels": IDXFile}


def _split_files(prefix, img_sha, img_md5, lab_sha, lab_md5, n):
    return {
        "images": IDXFile(f"{prefix}-images-idx3-ubyte.gz", "images", img_sha, 16 + n * 784, img_md5),
        "labels": IDXFile(f"{prefix}-labels-idx1-ubyte.gz", "labels", lab_sha, 8 + n, lab_md5),
    }


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        class_names=tuple(str(d) for d in range(10)),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        files={
            "train": _split_files(
                "train",
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "d53e105ee54ea40749a09fcbcd1e9432",
                60000,
            ),
            "test": _split_files(
                "t10k",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "9fb629c4189551a2d022fa330f9573f3",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                "ec29112dd5afa0611ce80d1b7f02629c",
                10000,
            ),
        },
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        class_names=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        mirrors=(
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
            "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
        ),
        files={
            "train": _split_files(
                "train",
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "25c81989df183df01b3e8a0aad5dffbe",
                60000,
            ),
            "test": _split_files(
                "t10k",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "bef4ecab320f06d8554ea6380940ec79",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                "bb300cfdad3c16e7a12a480ee83cd310",
                10000,
            ),
        },
    ),
}


def get_spec(dataset: str) -> DatasetSpec:
    """Return the :class:`DatasetSpec` of ``dataset`` ("mnist" or "fashion-mnist")."""
    try:
        return DATASETS[dataset]
    except KeyError:
        raise SourceError(
            f"unknown data set {dataset!r}: expected one of {sorted(DATASETS)}"
        ) from None


# --------------------------------------------------------------------------- IDX parsing


@dataclass(frozen=True)
class IDXHeader:
    """A validated IDX header: what the payload holds and where it starts."""

    kind: str
    shape: tuple[int, ...]
    offset: int
    sha256: str = ""  # of the whole decompressed file, when it was read through

    @property
    def payload_size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def parse_header(head: bytes, total_size: int, name: str, kind: str) -> IDXHeader:
    """Validate an IDX header against the file's total size.

    Parameters
    ----------
    head : bytes
        At least the first 16 bytes of the decompressed file (fewer if the
        file is shorter).
    total_size : int
        Size of the decompressed file in bytes.
    name : str
        File name used in error messages.
    kind : {"images", "labels"}
        What the file must hold: images are ``(n, 28, 28)``, labels ``(n,)``.

    Returns
    -------
    IDXHeader

    Raises
    ------
    IDXFormatError
        On a wrong magic number, type byte or dimensions, a truncated payload
        or trailing bytes.
    """
    ndim = _NDIM[kind]
    expected_magic = 0x0800 | ndim
    if len(head) < 4:
        raise IDXFormatError(f"{name}: truncated IDX header: {len(head)} bytes, expected at least 4")
    magic = struct.unpack(">I", head[:4])[0]
    if head[0] != 0 or head[1] != 0:
        raise IDXFormatError(
            f"{name}: wrong magic number 0x{magic:08x}: expected 0x{expected_magic:08x} "
            f"(IDX {kind}); the first two bytes must be zero"
        )
    if head[2] != _IDX_UBYTE:
        raise IDXFormatError(
            f"{name}: wrong magic number 0x{magic:08x}: type byte 0x{head[2]:02x} is not "
            f"0x08 (unsigned byte); expected 0x{expected_magic:08x}"
        )
    if head[3] != ndim:
        raise IDXFormatError(
            f"{name}: wrong magic number 0x{magic:08x}: {head[3]} dimensions, expected "
            f"{ndim} for {kind} (0x{expected_magic:08x})"
        )
    offset = 4 + 4 * ndim
    if len(head) < offset:
        raise IDXFormatError(
            f"{name}: truncated IDX header: {len(head)} bytes, expected {offset}"
        )
    shape = struct.unpack(">" + "I" * ndim, head[4:offset])
    if kind == "images" and tuple(shape[1:]) != IMAGE_SHAPE:
        raise IDXFormatError(
            f"{name}: wrong dimensions {shape}: expected (n, 28, 28) images"
        )
    header = IDXHeader(kind, tuple(int(s) for s in shape), offset)
    have = total_size - offset
    if have < header.payload_size:
        raise IDXFormatError(
            f"{name}: truncated payload: header {shape} needs {header.payload_size} bytes, "
            f"file holds {have}"
        )
    if have > header.payload_size:
        raise IDXFormatError(
            f"{name}: {have - header.payload_size} trailing bytes after the payload of {shape}"
        )
    return header


def parse_idx_bytes(data: bytes, kind: str, name: str = "<bytes>") -> np.ndarray:
    """Parse a decompressed IDX file held in memory.

    Returns
    -------
    numpy.ndarray of uint8
        Shape ``(n, 28, 28)`` for images, ``(n,)`` for labels; a read-only
        view of ``data``.
    """
    header = parse_header(data[:16], len(data), name, kind)
    arr = np.frombuffer(data, dtype=np.uint8, offset=header.offset)
    return arr.reshape(header.shape)


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as fh:
        is_gzip = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if is_gzip else open(path, "rb")


def decompress_idx(path, kind: str, dst=None, expected: IDXFile | None = None) -> IDXHeader:
    """Stream an IDX file (gzip or raw) through validation, optionally to ``dst``.

    The payload is read in blocks, so memory stays bounded whatever the size.

    Parameters
    ----------
    path : path-like
        The ``.gz`` (or already decompressed) IDX file.
    kind : {"images", "labels"}
    dst : path-like, optional
        Where to write the decompressed bytes; nothing is written when None.
    expected : IDXFile, optional
        When given, the payload's size and SHA-256 must match it.

    Returns
    -------
    IDXHeader

    Raises
    ------
    IDXFormatError
        Corrupt gzip stream or malformed IDX content.
    ChecksumError
        Well-formed, but not the published bytes.
    """
    path = Path(path)
    digest = hashlib.sha256()
    head = b""
    total = 0
    out = open(dst, "wb") if dst is not None else None
    try:
        with _open_maybe_gzip(path) as src:
            while True:
                block = src.read(_BLOCK)
                if not block:
                    break
                if len(head) < 16:
                    head += block[: 16 - len(head)]
                digest.update(block)
                total += len(block)
                if out is not None:
                    out.write(block)
    except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise SourceError(f"{path}: file not found") from exc
        raise IDXFormatError(f"{path}: corrupt gzip data: {exc}") from exc
    finally:
        if out is not None:
            out.close()
    header = parse_header(head, total, str(path), kind)
    header = IDXHeader(header.kind, header.shape, header.offset, digest.hexdigest())
    if expected is not None:
        verify_checksum(path, header, expected)
    return header


def verify_checksum(path, header: IDXHeader, expected: IDXFile) -> None:
    """Raise :class:`ChecksumError` unless ``header``'s payload is ``expected``'s."""
    size = header.offset + header.payload_size
    if size != expected.raw_size or header.sha256 != expected.raw_sha256:
        raise ChecksumError(
            f"{path}: decompressed payload does not match the published {expected.name}: "
            f"SHA-256 {header.sha256} ({size} bytes), expected {expected.raw_sha256} "
            f"({expected.raw_size} bytes)"
        )


def read_idx(path, kind: str, expected: IDXFile | None = None) -> np.ndarray:
    """Read a whole IDX file into memory, validated (and checksummed if ``expected``)."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "payload.idx"
        header = decompress_idx(path, kind, raw, expected)
        data = np.fromfile(raw, dtype=np.uint8, offset=header.offset)
    return data.reshape(header.shape)


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SplitSource:
    """Where one split's two files were found."""

    split: str
    images: Path
    labels: Path
    origin: str  # "explicit", "debian", "bundled", "cache" or "download"

    def describe(self) -> str:
        return f"{self.origin} ({self.images.parent})"


def default_cache_dir() -> Path:
    """``$KMEANS_DASK_CACHE``, else ``$XDG_CACHE_HOME/kmeans-dask``, else ``~/.cache/kmeans-dask``."""
    env = os.environ.get("KMEANS_DASK_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kmeans-dask"


def _find(directory: Path, f: IDXFile) -> Path | None:
    for candidate in (directory / f.name, directory / f.name[: -len(".gz")]):
        if candidate.is_file():
            return candidate
    return None


def _split_in(directory: Path, spec: DatasetSpec, split: str, origin: str) -> SplitSource | None:
    files = spec.files[split]
    found = {kind: _find(directory, f) for kind, f in files.items()}
    if all(v is None for v in found.values()):
        return None
    missing = [files[k].name for k, v in found.items() if v is None]
    if missing:
        raise SourceError(
            f"{directory}: holds only part of the {spec.name} {split} split: "
            f"missing {', '.join(missing)}"
        )
    return SplitSource(split, found["images"], found["labels"], origin)


def _explicit_dir(source, spec: DatasetSpec) -> Path | None:
    if source is None:
        source = os.environ.get("KMEANS_DASK_DATA") or None
    if source is None:
        return None
    root = Path(source)
    if not root.is_dir():
        raise SourceError(f"{root}: data source directory does not exist")
    sub = root / spec.name
    return sub if sub.is_dir() else root


def resolve_split(
    dataset: str,
    split: str,
    source=None,
    *,
    download: bool = True,
    cache_dir=None,
    mirrors=None,
    timeout: float = 30.0,
) -> SplitSource | None:
    """Find one split's files, trying the sources in their documented order.

    1. ``source`` (or ``$KMEANS_DASK_DATA``): a directory holding ``mnist/``
       and ``fashion-mnist/`` subfolders, or the files themselves;
    2. Debian's ``/usr/share/datasets/fashion-mnist/``;
    3. the test splits bundled with this package;
    4. the user cache, then a download from the mirrors into it.

    Returns
    -------
    SplitSource or None
        None when no source holds the split and download is disabled or fails
        for want of a network (the reason is logged).

    Raises
    ------
    SourceError
        A source holds one of the split's two files but not the other, or a
        downloaded file fails its checksums on every mirror.
    """
    spec = get_spec(dataset)
    if split not in spec.files:
        raise SourceError(f"unknown split {split!r}: expected one of {list(spec.files)}")
    explicit = _explicit_dir(source, spec)
    candidates = []
    if explicit is not None:
        candidates.append((explicit, "explicit"))
    if spec.name in DEBIAN_DIRS:
        candidates.append((DEBIAN_DIRS[spec.name], "debian"))
    candidates.append((BUNDLED_DIR / spec.name, "bundled"))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    candidates.append((cache / spec.name, "cache"))
    for directory, origin in candidates:
        if directory.is_dir():
            found = _split_in(directory, spec, split, origin)
            if found is not None:
                return found
    if not download:
        return None
    try:
        paths = {
            kind: download_file(spec, f, cache / spec.name, mirrors=mirrors, timeout=timeout)
            for kind, f in spec.files[split].items()
        }
    except _Unreachable as exc:
        log.warning("%s %s split not downloaded: %s", spec.name, split, exc)
        return None
    return SplitSource(split, paths["images"], paths["labels"], "download")


def resolve(dataset: str, source=None, **kwargs) -> dict[str, SplitSource]:
    """Resolve every split that some source holds: ``{split: SplitSource}``."""
    spec = get_spec(dataset)
    out = {}
    for split in spec.files:
        found = resolve_split(dataset, split, source, **kwargs)
        if found is not None:
            out[split] = found
    if not out:
        raise SourceError(f"no source holds any split of {dataset}")
    return out


# --------------------------------------------------------------------------- download


class _Unreachable(SourceError):
    """No mirror could be reached at all (as opposed to one serving bad bytes)."""


class _MirrorFailed(Exception):
    """One mirror failed; the next is tried."""


def _check_url(url: str) -> None:
    parsed = urllib.parse.urlparse(url)
    loopback = parsed.hostname in ("127.0.0.1", "localhost", "::1")
    if parsed.scheme != "https" and not (parsed.scheme == "http" and loopback):
        raise SourceError(f"refusing to download {url}: only https:// mirrors are allowed")


def download_file(
    spec: DatasetSpec,
    f: IDXFile,
    dest_dir,
    *,
    mirrors=None,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download ``f`` into ``dest_dir``, trying each mirror in turn.

    The file is written under a temporary name, checked (upstream ``.gz`` MD5,
    then the decompressed payload's size and SHA-256) and only then renamed to
    its final name, so the cache never holds a partial or unverified file.

    Raises
    ------
    SourceError
        Every mirror failed; the message lists each mirror's failure.  When
        none could even be reached, the subclass ``_Unreachable`` is raised so
        callers can fall back to another split.
    """
    from tqdm.auto import tqdm

    from .store import atomic_file  # store imports this module

    mirrors = list(mirrors if mirrors is not None else spec.mirrors)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / f.name
    failures = []
    reached = False
    for base in mirrors:
        url = urllib.parse.urljoin(base if base.endswith("/") else base + "/", f.name)
        _check_url(url)
        try:
            with atomic_file(final, suffix=".part") as tmp:
                md5 = hashlib.md5()
                try:
                    with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                        reached = True
                        total = int(resp.headers.get("Content-Length") or 0) or None
                        with tqdm(total=total, unit="B", unit_scale=True, desc=f.name,
                                  disable=not progress, leave=False) as bar:
                            while True:
                                block = resp.read(_BLOCK)
                                if not block:
                                    break
                                md5.update(block)
                                out.write(block)
                                bar.update(len(block))
                except urllib.error.HTTPError as exc:
                    reached = True
                    raise _MirrorFailed(f"HTTP {exc.code}") from None
                except (urllib.error.URLError, OSError) as exc:
                    raise _MirrorFailed(getattr(exc, "reason", exc)) from None
                if md5.hexdigest() != f.gz_md5:
                    raise _MirrorFailed(f"MD5 {md5.hexdigest()} does not match the published {f.gz_md5}")
                try:
                    decompress_idx(tmp, f.kind, expected=f)
                except (IDXFormatError, ChecksumError) as exc:
                    raise _MirrorFailed(exc) from None
        except _MirrorFailed as exc:
            failures.append(f"{url}: {exc}")
            continue
        log.info("downloaded %s from %s", f.name, url)
        return final
    kind = SourceError if reached else _Unreachable
    raise kind(f"could not download {f.name}: " + "; ".join(failures))
