"""Zarr v3 stores: the only module that knows their layout.

Every output a job writes goes through here, always under a temporary name
that is renamed into place only once complete:

data store (``<dataset>.zarr``)
    attributes ``format = "kmeans-dask/data"``, ``dataset``, ``class_names``,
    ``image_shape``; one group per split (``train``, ``test``) holding
    ``images`` (n, 784) uint8 and ``labels`` (n,) uint8, both chunked by rows,
    with the split's source, payload checksums and the CRC-32C of every
    chunk (``chunk_crc32c``) in its attributes.

result store (``RESULT.zarr``)
    attributes ``format = "kmeans-dask/result"`` and the run's record
    (parameters, inertia, history, input store and its fingerprint,
    versions); arrays ``centroids`` (k, d) float32 and ``labels`` (n,) int32
    chunked like the input rows.

labels store, evaluation and sweep directories
    ``format`` ``kmeans-dask/labels``, ``kmeans-dask/evaluation`` and
    ``kmeans-dask/sweep`` (directories carry it in ``kmeans-dask.json``).

Guards:

* ``--overwrite`` replaces only an earlier output of the same kind
  (:func:`check_output`), never an input of the same job nor a path that
  contains one, and the old output stays readable until the new one is
  complete.
* Every data chunk is checked against its recorded CRC-32C where it is read
  (:func:`open_data`, :func:`read_rows`): a missing, swapped, or corrupt
  chunk is an error naming the store, the array and the rows, never zeros.
* Every reader checks the schema (format tag, arrays, dtype, shape and the
  type of every attribute) and refuses a store that fails by naming it.
  Nothing is ever unpickled.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import google_crc32c
import numcodecs.blosc
import numpy as np
import zarr
from dask.base import tokenize

from . import config, datasets
from .errors import IDXFormatError, StoreError

log = logging.getLogger(__name__)

DATA_FORMAT = "kmeans-dask/data"
RESULT_FORMAT = "kmeans-dask/result"
LABELS_FORMAT = "kmeans-dask/labels"
EVALUATION_FORMAT = "kmeans-dask/evaluation"
SWEEP_FORMAT = "kmeans-dask/sweep"
CHECKPOINT_FORMAT = "kmeans-dask/checkpoint"
REPORT_KIND = "dask-performance-report"
# 2: data stores record a CRC-32C per chunk, results their input's fingerprint.
SCHEMA_VERSION = 2
N_FEATURES = datasets.IMAGE_SHAPE[0] * datasets.IMAGE_SHAPE[1]
DEFAULT_CHUNK_ROWS = 10_000
MANIFEST = "kmeans-dask.json"
EMPTY_DIR = "an empty directory"
# On object storage a store's contents live under NAME.zarr/gen-<hex>/, and its root
# zarr.json, written last, names that generation: see atomic_zarr.
GENERATION_PREFIX = "gen-"
GENERATION_ATTR = "kmeans-dask/generation"
INCOMPLETE = "an interrupted kmeans-dask write (no committed zarr.json)"


# --------------------------------------------------------------------------- locations


class URL:
    """A location on an fsspec file system: ``s3://bucket/prefix/name.zarr``, ``gs://``,
    ``az://``, ``memory://``...

    Path-like where the store code needs it (``name``, ``parent``, ``/``,
    ``with_name``), with no ``__fspath__``, so it can never be taken for a
    local path by mistake.  It carries the storage options it was made with
    (``cluster.yaml``'s ``storage_options``), so a worker handed it opens the
    same file system; they never appear in ``str`` or ``repr``.  Without
    options, s3fs, gcsfs and adlfs read the standard variables and profiles
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
    ``AWS_PROFILE``, ...) in whichever process opens the URL.
    """

    __slots__ = ("url", "options")

    def __init__(self, url: str, options: dict | None = None):
        protocol, _, rest = str(url).partition("://")
        rest = "/".join(part for part in rest.split("/") if part)
        if not protocol or not rest:
            raise StoreError(f"{url}: not a URL of the form SCHEME://BUCKET/PATH")
        self.url = f"{protocol.lower()}://{rest}"
        self.options = dict(options or {})

    @property
    def protocol(self) -> str:
        return self.url.partition("://")[0]

    @property
    def key(self) -> str:
        """The path after the scheme: ``bucket/prefix/name.zarr``."""
        return self.url.partition("://")[2]

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"URL({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, URL) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __dask_tokenize__(self):
        return ("kmeans-dask-url", self.url)

    def __truediv__(self, name) -> URL:
        return URL(f"{self.url}/{name}", self.options)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def parent(self) -> URL:
        head = self.key.rpartition("/")[0]
        return URL(f"{self.protocol}://{head}", self.options) if head else self

    @property
    def parents(self) -> list:
        out, here = [], self
        while here.parent != here:
            here = here.parent
            out.append(here)
        return out

    def with_name(self, name: str) -> URL:
        return self.parent / name if self.parent != self else URL(f"{self.protocol}://{name}")

    def is_relative_to(self, other) -> bool:
        return isinstance(other, URL) and (self == other or other in self.parents)

    def resolve(self) -> URL:
        return self


# Per scheme, options for its fsspec file system (``cluster.yaml``'s ``storage_options``);
# URLs made while they are set carry them.
_STORAGE_OPTIONS: dict = {}


def set_storage_options(options: dict | None) -> None:
    """Use ``options`` (``{"s3": {"endpoint_url": ..., "profile": ...}, ...}``) for the URLs
    made from now on in this process."""
    _STORAGE_OPTIONS.clear()
    _STORAGE_OPTIONS.update({k: dict(v) for k, v in (options or {}).items()})


def is_url(path) -> bool:
    """True for an fsspec URL other than ``file://`` (a local path)."""
    if isinstance(path, URL):
        return True
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    return isinstance(text, str) and "://" in text and not text.startswith("file://")


def absolute(path) -> Path | URL:
    """A local path made absolute (a worker started elsewhere resolves it as the client
    does), or a :class:`URL` for an fsspec URL; ``file://`` URLs are local paths."""
    if isinstance(path, URL):
        return path
    if is_url(path):
        url = URL(path)
        url.options = dict(_STORAGE_OPTIONS.get(url.protocol, {}))
        return url
    if isinstance(path, str) and path.startswith("file://"):
        path = path[len("file://"):]
    return Path(os.path.abspath(os.fspath(path)))


def _filesystem(loc: URL):
    """``(fs, path)`` for a URL: fsspec's file system for its scheme (instances are cached)."""
    import fsspec
    from fsspec.registry import known_implementations

    try:
        cls = fsspec.get_filesystem_class(loc.protocol)
    except ImportError as exc:
        package = known_implementations.get(loc.protocol, {}).get("class", "").split(".")[0]
        hint = f"; install it with: pip install {package}" if package else ""
        raise StoreError(f"{loc}: {loc.protocol}:// URLs need a package that is not installed "
                         f"({exc}){hint}") from None
    except ValueError:
        raise StoreError(f"{loc}: unknown URL scheme {loc.protocol}:// (fsspec has no file "
                         f"system for it)") from None
    try:
        fs = cls(**loc.options)
    except Exception as exc:  # bad options: never echo them, they may hold secrets
        raise StoreError(f"{loc}: cannot open the {loc.protocol}:// file system "
                         f"({type(exc).__name__})") from None
    return fs, fs._strip_protocol(loc.url)


def storage_error(loc, exc: BaseException) -> StoreError:
    """A one-line :class:`StoreError` naming ``loc`` and why object storage refused it:
    a missing bucket, wrong credentials, an unreachable endpoint."""
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else name
    bucket = loc.key.split("/", 1)[0] if isinstance(loc, URL) else None
    if isinstance(exc, FileNotFoundError) and "bucket" in text.lower():
        why = f"the bucket {bucket!r} does not exist"
    elif isinstance(exc, PermissionError) or name in ("NoCredentialsError",
                                                      "PartialCredentialsError"):
        why = (f"access denied ({text}); check the credentials (AWS_ACCESS_KEY_ID and "
               f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or cluster.yaml's storage_options)")
    elif name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                  "ServerTimeoutError") or isinstance(exc, (ConnectionError, TimeoutError)):
        why = f"cannot reach the storage endpoint ({text})"
    else:
        why = f"{name}: {text}"
    return StoreError(f"{loc}: {why}")


@contextlib.contextmanager
def _io(loc):
    """Object-storage failures inside the block become a :func:`storage_error`."""
    try:
        yield
    except StoreError:
        raise
    except (OSError, ValueError) as exc:
        raise storage_error(loc, exc) from exc
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp",
                                                  "google", "azure", "gcsfs", "adlfs"):
            raise storage_error(loc, exc) from exc
        raise


def check_reachable(loc) -> None:
    """For a URL, fail now, naming it, if its bucket is missing, the credentials are
    refused or the endpoint cannot be reached; nothing for a local path."""
    if not isinstance(loc, URL):
        return
    fs, path = _filesystem(loc)
    bucket = path.split("/", 1)[0]
    if loc.protocol in ("memory", "file", "local") or not bucket:
        return
    with _io(loc):
        try:
            fs.info(bucket)
        except FileNotFoundError:
            raise StoreError(f"{loc}: the bucket {bucket!r} does not exist") from None


def exists(loc) -> bool:
    loc = absolute(loc)
    if isinstance(loc, Path):
        return loc.exists()
    fs, path = _filesystem(loc)
    with _io(loc):
        fs.invalidate_cache(path)
        return fs.exists(path)


def read_bytes(loc) -> bytes:
    loc = absolute(loc)
    if isinstance(loc, Path):
        return loc.read_bytes()
    fs, path = _filesystem(loc)
    with _io(loc):
        return fs.cat_file(path)


def read_text(loc) -> str:
    return read_bytes(loc).decode()


def remove(loc) -> None:
    """Remove a file, or everything under a URL's prefix; nothing if absent."""
    loc = absolute(loc)
    if isinstance(loc, Path):
        if loc.is_dir() and not loc.is_symlink():
            shutil.rmtree(loc, ignore_errors=True)
        else:
            loc.unlink(missing_ok=True)
        return
    fs, path = _filesystem(loc)
    with _io(loc):
        fs.invalidate_cache(path)
        with contextlib.suppress(FileNotFoundError):
            if fs.isdir(path):
                fs.rm(path, recursive=True)
            else:
                fs.rm_file(path)


def _children(loc: URL) -> list[str]:
    """The names directly under a URL's prefix (none when nothing is there)."""
    fs, path = _filesystem(loc)
    with _io(loc):
        fs.invalidate_cache(path)
        try:
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
    return sorted({n.rstrip("/").rsplit("/", 1)[-1] for n in names} - {""})


def _zstore(loc, *, read_only: bool):
    """A Zarr store over a local directory or a URL (zarr's FsspecStore)."""
    if isinstance(loc, Path):
        return zarr.storage.LocalStore(str(loc), read_only=read_only)
    _filesystem(loc)  # a missing package or unknown scheme, named
    with _io(loc):
        return zarr.storage.FsspecStore.from_url(loc.url, storage_options=loc.options or None,
                                                 read_only=read_only)


def crc32c(block: np.ndarray) -> int:
    """CRC-32C of an array's bytes (about 0.5 ms for a 7.8 MB chunk)."""
    return int(google_crc32c.extend(0, np.ascontiguousarray(block)))


# --------------------------------------------------------------------------- output guards


def output_kind(path) -> str | None:
    """What ``path`` holds, as far as overwriting it is concerned.

    ``None`` when it does not exist; a format string such as
    ``"kmeans-dask/result"`` for a kmeans-dask output; a description such as
    ``"a file"`` or ``"an empty directory"`` for anything else.
    """
    path = absolute(path)
    if isinstance(path, URL):
        return _url_kind(path)
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink():
        return "a symbolic link"
    if path.is_dir():
        for marker, key in (("zarr.json", "attributes"), (MANIFEST, None)):
            meta = path / marker
            if meta.is_file():
                try:
                    doc = json.loads(meta.read_text())
                    fmt = (doc.get(key) or {}) if key else doc
                    fmt = fmt.get("format") if isinstance(fmt, dict) else None
                except (OSError, ValueError, AttributeError):
                    fmt = None
                if isinstance(fmt, str):
                    return fmt
                return "a directory that is not a kmeans-dask output"
        if not any(path.iterdir()):
            return EMPTY_DIR
        return "a directory that is not a kmeans-dask output"
    if path.suffix == ".json":
        try:
            fmt = json.loads(path.read_text()).get("format")
            if isinstance(fmt, str) and fmt.startswith("kmeans-dask/"):
                return fmt
        except (OSError, ValueError, AttributeError):
            pass
    if path.suffix == ".html":
        with contextlib.suppress(OSError):
            with open(path, "rb") as fh:
                if b"Dask Performance Report" in fh.read(1 << 16):
                    return REPORT_KIND
    return "a file"


def _format_of(doc: bytes, key: str | None):
    try:
        doc = json.loads(doc)
        fmt = (doc.get(key) or {}) if key else doc
        fmt = fmt.get("format") if isinstance(fmt, dict) else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        fmt = None
    return fmt if isinstance(fmt, str) else None


def _url_kind(loc: URL) -> str | None:
    """:func:`output_kind` on object storage, where a "directory" is a prefix."""
    check_reachable(loc)
    fs, path = _filesystem(loc)
    with _io(loc):
        fs.invalidate_cache(path)
        if fs.isfile(path):
            head = fs.cat_file(path, start=0, end=1 << 16)
            if loc.suffix == ".json":
                fmt = _format_of(fs.cat_file(path), None)
                if fmt and fmt.startswith("kmeans-dask/"):
                    return fmt
            if loc.suffix == ".html" and b"Dask Performance Report" in head:
                return REPORT_KIND
            return "a file"
    names = _children(loc)
    if not names:
        return None
    for marker, key in (("zarr.json", "attributes"), (MANIFEST, None)):
        if marker in names:
            fmt = _format_of(read_bytes(loc / marker), key)
            return fmt or "a directory that is not a kmeans-dask output"
    if all(n.startswith(GENERATION_PREFIX) for n in names):
        return INCOMPLETE
    return "a directory that is not a kmeans-dask output"


def _describe(kind: str) -> str:
    return f"a {kind} output" if kind.startswith(("kmeans-dask/", REPORT_KIND)) else kind


def _related(a, b) -> bool:
    return a == b or a in b.parents or b in a.parents


def _resolved(p):
    return p.resolve() if isinstance(p, Path) else p


def exists_error(path, what: str) -> StoreError:
    """The refusal of an existing output: ``what`` says what it holds."""
    return StoreError(f"{path} already exists {what}; pass --overwrite to replace it")


# Temporaries beside an output are named for the host and process that made
# them: a killed job runs no clean-up of its own, so the next writer of the same
# output removes those whose process is gone (see sweep_leftovers).
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_TEMP_KINDS = ("tmp", "old", "raw", "staging", "part")


def temp_prefix(final, what: str) -> str:
    """The name prefix of a temporary beside ``final`` (``what``: one of _TEMP_KINDS)."""
    return f".{final.name}.{what}-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def sweep_leftovers(final) -> list[str]:
    """Remove the temporaries beside ``final`` left by writers on this host that are
    no longer running (a killed ingest's staged payloads, a killed fit's partial
    store); returns their names.

    An interrupted replace can have moved the previous output aside before the
    new one took its place: when ``final`` is missing, that previous output is
    moved back rather than removed.  Temporaries from other hosts are left
    alone, since whether their writers still run cannot be told from here.
    """
    final = absolute(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.({'|'.join(_TEMP_KINDS)})-"
                         rf"{re.escape(_HOST)}-(\d+)-[A-Za-z0-9_]+(\.[A-Za-z0-9]+)?")
    try:
        if isinstance(final, URL):
            names = _children(final.parent)
        else:
            names = os.listdir(final.parent) if final.parent.is_dir() else []
    except (OSError, StoreError):
        return []
    found = []
    for name in sorted(names):
        m = pattern.fullmatch(name)
        if m is None or _alive(int(m.group(2))):
            continue
        loc = final.parent / name
        if (m.group(1) == "old" and isinstance(final, Path) and not final.exists()
                and (loc / "x").exists()):
            os.replace(loc / "x", final)
            log.warning("restored %s: an interrupted replace had moved it to %s", final, loc)
        with contextlib.suppress(OSError, StoreError):
            remove(loc)
            found.append(name)
    if found:
        log.info("removed what interrupted writes of %s left: %s", final, ", ".join(found))
    return found


def check_output(path, kind: str, *, overwrite: bool = False, inputs=()) -> Path:
    """Check that ``path`` may be written as an output of ``kind``; returns it absolute.

    Refused, with the path and what it holds named: an existing output
    without ``overwrite``; with ``overwrite``, anything that is not an
    earlier output of the same ``kind``; and always any path that is, holds
    or lies inside one of ``inputs``.  Called before a job starts its
    cluster and again when the output is written.

    Raises
    ------
    StoreError
    """
    final = absolute(path)
    sweep_leftovers(final)
    for inp in inputs:
        if inp is None:
            continue
        inp = absolute(inp)
        if type(inp) is not type(final):
            continue
        if _related(final, _resolved(inp)) or _related(_resolved(final), _resolved(inp)):
            what = ("is" if _resolved(final) == _resolved(inp) else
                    "contains" if _resolved(inp).is_relative_to(_resolved(final))
                    else "lies inside")
            raise StoreError(f"refusing to write {final}: it {what} the input {inp} of this job")
    if isinstance(final, Path):
        for parent in final.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise StoreError(f"cannot write {final}: {parent} is a file, not a directory")
                break
    have = output_kind(final)
    if have is None:
        return final
    if not overwrite:
        raise exists_error(final, f"({_describe(have)})")
    # Replacing an empty directory, or the leftovers of an interrupted write, loses nothing.
    if have != kind and have not in (EMPTY_DIR, INCOMPLETE):
        raise StoreError(f"refusing to overwrite {final}: it is {_describe(have)}, not "
                         f"{_describe(kind)}; remove it yourself or choose another path")
    return final


@contextlib.contextmanager
def atomic_path(final, kind: str, *, overwrite: bool = False, inputs=()):
    """Yield a temporary sibling path; rename it to ``final`` if the block succeeds.

    :func:`check_output` decides first whether ``final`` may be written.  On
    any exception the temporary path is removed and ``final`` is left as it
    was; an existing ``final`` is replaced only after the new one is complete.
    """
    final = check_output(final, kind, overwrite=overwrite, inputs=inputs)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final, "tmp"), dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's private mode would survive the rename
    try:
        yield tmp
        _replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, final: Path) -> None:
    if final.exists() or final.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(final, "old"), dir=final.parent))
        os.replace(final, old / "x")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_zarr(final, kind: str, *, overwrite: bool = False, inputs=()):
    """Yield an empty Zarr group to fill; it becomes the store ``final`` only if the
    block succeeds, and the writer sets the root attributes (``format`` ...) last.

    On a local file system the group is a temporary sibling directory renamed
    into place (:func:`atomic_path`).  Object stores have no rename, so a store
    at a URL is written under a fresh prefix ``final/gen-<hex>/`` and committed
    by one PUT of ``final/zarr.json``, the root group's metadata, holding the
    attributes and the generation's name; readers go through that object
    only.  Before it exists the store is incomplete and every reader refuses
    it; while an older store is replaced, its ``zarr.json`` still names the
    old generation, which stays readable until the new ``zarr.json`` replaces
    it and is deleted afterwards.  On any exception the new generation is
    deleted, so a failed write leaves no object behind.
    """
    final = check_output(final, kind, overwrite=overwrite, inputs=inputs)
    if isinstance(final, Path):
        with atomic_path(final, kind, overwrite=overwrite, inputs=inputs) as tmp:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            yield group, tmp
        return
    import uuid

    generation = f"{GENERATION_PREFIX}{uuid.uuid4().hex[:16]}"
    content = final / generation
    try:
        group = zarr.open_group(_zstore(content, read_only=False), mode="w", zarr_format=3)
        yield group, content
        attrs = dict(group.attrs)
        if attrs.get("format") != kind:
            raise StoreError(f"{final}: the writer set format {attrs.get('format')!r}, "
                             f"expected {kind!r}")
        root = {"zarr_format": 3, "node_type": "group",
                "attributes": {**attrs, GENERATION_ATTR: generation}}
        fs, path = _filesystem(final)
        with _io(final):
            fs.pipe_file(f"{path}/zarr.json", json.dumps(root).encode())  # the commit
    except BaseException:
        with contextlib.suppress(Exception):
            remove(content)
        raise
    _drop_old_generations(final, keep=generation)


def _drop_old_generations(final: URL, keep: str) -> None:
    """After a commit: delete what the committed ``zarr.json`` no longer names (the
    replaced generation, leftovers of interrupted writes, an older flat layout)."""
    for name in _children(final):
        if name not in ("zarr.json", keep):
            try:
                remove(final / name)
            except StoreError as exc:
                log.warning("could not remove the replaced %s: %s", final / name, exc)


@contextlib.contextmanager
def output_dir(final, kind: str, *, overwrite: bool = False, inputs=()):
    """A directory output (evaluation, sweep): written in a temporary directory that
    gets a ``kmeans-dask.json`` manifest naming its kind and is renamed when complete.

    At a URL the files are made in a local temporary directory and uploaded
    when complete, each in one PUT (so each object is whole, old or new), the
    manifest last with the SHA-256 of every file; objects of a replaced output
    that the new one does not hold are deleted afterwards.  A failed upload of a
    new output removes what it had uploaded.
    """
    final = check_output(final, kind, overwrite=overwrite, inputs=inputs)
    if isinstance(final, Path):
        with atomic_path(final, kind, overwrite=overwrite, inputs=inputs) as tmp:
            yield tmp
            (tmp / MANIFEST).write_text(json.dumps(
                {"format": kind, "schema_version": SCHEMA_VERSION}, indent=1))
        return
    import hashlib

    with tempfile.TemporaryDirectory(prefix="kmeans-dask-out-") as tmp:
        tmp = Path(tmp)
        yield tmp
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"format": kind, "schema_version": SCHEMA_VERSION,
                    "files": {p.relative_to(tmp).as_posix():
                              hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}
        check_output(final, kind, overwrite=overwrite, inputs=inputs)
        fresh = output_kind(final) is None
        fs, path = _filesystem(final)
        try:
            with _io(final):
                for p in files:
                    fs.put_file(str(p), f"{path}/{p.relative_to(tmp).as_posix()}")
                fs.pipe_file(f"{path}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        except BaseException:
            if fresh:
                with contextlib.suppress(Exception):
                    remove(final)
            raise
    keep = set(manifest["files"]) | {MANIFEST}
    with _io(final):
        fs.invalidate_cache(path)
        for name in fs.find(path):
            rel = name[len(path):].lstrip("/")
            if rel not in keep:
                fs.rm_file(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the umask (``mkstemp``'s is private)."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_file(path, suffix: str = ""):
    """Yield a temporary sibling of ``path``; on a clean exit it is fsynced, made
    readable as the umask says and renamed to ``path``.

    On any exception the temporary is removed and an existing ``path`` is left as
    it was.  Callers run :func:`check_output` themselves where ``path`` is an output.
    """
    path = absolute(path)
    if isinstance(path, URL):
        # Made locally, then one PUT: an object is replaced whole or not at all.
        fd, name = tempfile.mkstemp(prefix="kmeans-dask-", suffix=suffix)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            fs, key = _filesystem(path)
            with _io(path):
                fs.put_file(str(tmp), key)
        finally:
            tmp.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(path)
    fd, name = tempfile.mkstemp(prefix=temp_prefix(path, "part"), suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.chmod(file_mode())  # mkstemp's private mode would survive the rename
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> Path:
    """Replace a small file atomically (:func:`atomic_file`)."""
    path = absolute(path)
    if isinstance(path, URL):
        fs, key = _filesystem(path)
        with _io(path):
            fs.pipe_file(key, text.encode())  # one PUT: whole or not at all
        return path
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path


def _open_group(path, fmt: str, what: str) -> zarr.Group:
    """The store's group after its schema checks: for a store at a URL, the generation
    its committed root ``zarr.json`` names (see :func:`atomic_zarr`)."""
    path = absolute(path)
    if isinstance(path, URL):
        return _open_url_group(path, fmt, what)
    if not path.exists():
        raise StoreError(f"{path}: {what} not found")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a non-store
        raise StoreError(f"{path}: not a Zarr group ({exc})") from exc
    return _check_group(path, group, fmt, what)


def _open_url_group(path: URL, fmt: str, what: str) -> zarr.Group:
    check_reachable(path)
    if not exists(path / "zarr.json"):
        if _children(path):
            raise StoreError(f"{path}: incomplete {what}: its root zarr.json, written last, "
                             f"is missing (a write was interrupted or is in progress)")
        raise StoreError(f"{path}: {what} not found")
    try:
        group = zarr.open_group(_zstore(path, read_only=True), mode="r")
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"{path}: not a Zarr group ({type(exc).__name__}: {exc})") from exc
    _check_group(path, group, fmt, what)
    generation = dict(group.attrs).get(GENERATION_ATTR)
    if generation is None:
        return group  # a flat store (copied there as it is on disk)
    if not (isinstance(generation, str) and generation.startswith(GENERATION_PREFIX)
            and "/" not in generation):
        raise StoreError(f"{path}: attribute {GENERATION_ATTR!r} is {generation!r}")
    try:
        content = zarr.open_group(_zstore(path / generation, read_only=True), mode="r")
    except Exception as exc:
        raise StoreError(f"{path}: the committed generation {generation} is unreadable "
                         f"({type(exc).__name__}: {exc})") from exc
    return _check_group(path, content, fmt, what)


def _check_group(path, group: zarr.Group, fmt: str, what: str) -> zarr.Group:
    attrs = dict(group.attrs)
    if attrs.get("format") != fmt:
        raise StoreError(
            f"{path}: not a {what}: attribute 'format' is {attrs.get('format')!r}, expected {fmt!r}"
        )
    if attrs.get("schema_version") != SCHEMA_VERSION:
        hint = ("; it was written by an older kmeans-dask without chunk checksums: write it "
                "again (with --overwrite)") if attrs.get("schema_version") == 1 else ""
        raise StoreError(
            f"{path}: schema_version {attrs.get('schema_version')!r}, expected {SCHEMA_VERSION}{hint}"
        )
    return group


def _array(group: zarr.Group, name: str, where: str, dtype, ndim: int) -> zarr.Array:
    try:
        arr = group[name]
    except KeyError:
        raise StoreError(f"{where}: missing array {name!r}") from None
    if not isinstance(arr, zarr.Array):
        raise StoreError(f"{where}: {name!r} is not an array")
    if arr.dtype != np.dtype(dtype):
        raise StoreError(f"{where}/{name}: dtype {arr.dtype}, expected {np.dtype(dtype)}")
    if arr.ndim != ndim:
        raise StoreError(f"{where}/{name}: shape {arr.shape}, expected {ndim} dimension(s)")
    return arr


# --------------------------------------------------------------------------- attribute schemas


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _int_list(v) -> bool:
    return isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)


def check_attrs(attrs: dict, schema: dict, where: str) -> None:
    """Check the attributes named in ``schema`` (``{name: (test, what)}``); a missing
    or mistyped one is a :class:`StoreError` naming it and what was expected."""
    for name, (test, what) in schema.items():
        if name not in attrs:
            raise StoreError(f"{where}: attribute {name!r} is missing")
        if not test(attrs[name]):
            raise StoreError(f"{where}: attribute {name!r} is {attrs[name]!r}; expected {what}")


DATA_ROOT_SCHEMA = {
    "dataset": (lambda v: isinstance(v, str) and v != "", "a data set name"),
    "class_names": (lambda v: _str_list(v) and 1 <= len(v) <= 256, "a list of 1 to 256 strings"),
    "image_shape": (lambda v: v == list(datasets.IMAGE_SHAPE), f"{list(datasets.IMAGE_SHAPE)}"),
}
DATA_SPLIT_SCHEMA = {
    "n_rows": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "chunk_crc32c": (lambda v: isinstance(v, dict) and set(v) == {"images", "labels"}
                     and all(_int_list(x) for x in v.values()),
                     "{'images': [...], 'labels': [...]}, one CRC-32C per chunk"),
}
# --------------------------------------------------------------------------- data stores


@dataclass(frozen=True)
class DataSplit:
    """One split of a data store, opened lazily as Dask arrays whose every chunk is
    checked against its recorded CRC-32C where it is read."""

    path: Path
    split: str
    images: da.Array  # (n, 784) uint8, chunked by rows
    labels: da.Array  # (n,) uint8, same row chunks
    attrs: dict  # the split group's attributes
    store_attrs: dict  # the root's attributes (dataset, class names, ...)

    @property
    def class_names(self) -> list[str]:
        return list(self.store_attrs["class_names"])

    @property
    def fingerprint(self) -> str:
        """One checksum over every chunk's checksum: the split's contents, in short."""
        return split_fingerprint(self.attrs)


def split_fingerprint(split_attrs: dict) -> str:
    sums = split_attrs["chunk_crc32c"]
    return f"{crc32c(np.asarray(sums['images'] + sums['labels'], dtype='<u4')):08x}"


@dataclass(frozen=True)
class SplitData:
    """What :func:`write_data` writes as one split: row-chunked Dask arrays and attributes."""

    images: da.Array  # (n, 784) uint8
    labels: da.Array  # (n,) uint8, same row chunks
    attrs: dict


def data_store_path(out_dir, dataset: str) -> Path:
    return absolute(out_dir) / f"{dataset}.zarr"


def list_splits(path) -> list[str]:
    """The splits a data store holds, in the order train, test."""
    group = _open_data_root(path)
    return [s for s in datasets.SPLITS if s in group]


def _open_data_root(path) -> zarr.Group:
    root = _open_group(path, DATA_FORMAT, "data store")
    check_attrs(dict(root.attrs), DATA_ROOT_SCHEMA, str(path))
    return root


def _chunk_bounds(n: int, rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


def _read_chunk(arr: zarr.Array, i: int, start: int, stop: int, expected: int,
                where: str) -> np.ndarray:
    """Task body: chunk ``i`` (rows ``start``..``stop``) of ``arr``, checked against its CRC-32C."""
    label = f"{where} chunk {i} (rows {start}\u2013{stop - 1})"
    try:
        block = _local_blosc_chunk(arr, i, stop - start)
        if block is None:
            block = arr[start:stop]
    except Exception as exc:  # a codec error on damaged bytes; zarr has no common type
        raise StoreError(f"{label}: unreadable ({type(exc).__name__}: {exc})") from None
    if crc32c(block) != expected:
        key = f"{arr.path}/{arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))}"
        missing = _missing(arr, key)
        raise StoreError(f"{label}: " + ("chunk missing (it would read as zeros)" if missing
                                         else "checksum mismatch"))
    return block


def _local_blosc_chunk(arr: zarr.Array, i: int, rows: int) -> np.ndarray | None:
    """Row chunk ``i`` (its first ``rows`` rows) decoded straight from its file, or
    None where zarr must read it.

    zarr's read of a whole chunk (its event loop, two thread hand-offs and a
    copy of the decoded chunk into the result) costs about 2 ms beside the
    2.5 ms Blosc's LZ4 takes for 10,000 MNIST images, and a streamed
    mini-batch fit of MNIST8M reads its 810 chunks four times.  Only the
    layout this package's stores have takes this path: a local zarr v3
    array of single bytes, whole rows per chunk, the bytes codec then one
    Blosc codec.  A missing file also goes to zarr, which reads the fill
    value (and the checksum then says the chunk is missing).
    """
    meta = arr.metadata
    if (not isinstance(arr.store, zarr.storage.LocalStore) or meta.zarr_format != 3
            or arr.ndim != 2 or arr.dtype.itemsize != 1 or arr.chunks[1] != arr.shape[1]
            or len(meta.codecs) != 2 or not isinstance(meta.codecs[0], zarr.codecs.BytesCodec)
            or not isinstance(meta.codecs[1], zarr.codecs.BloscCodec)):
        return None
    path = Path(arr.store.root) / arr.path / meta.encode_chunk_key((i, 0))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    # Edge chunks are stored whole (zarr pads them), so decode the whole chunk.
    out = np.empty(arr.chunks, dtype=arr.dtype)
    numcodecs.blosc.decompress(raw, out)
    return out if rows == out.shape[0] else out[:rows]


def _missing(arr: zarr.Array, key: str) -> bool:
    root = getattr(arr.store, "root", None)
    if root is not None:
        return not (Path(root) / key).exists()
    fs = getattr(arr.store, "fs", None)  # an FsspecStore: ask its file system
    try:
        import fsspec

        sync_fs = fsspec.filesystem(fs.protocol if isinstance(fs.protocol, str)
                                    else fs.protocol[0], **fs.storage_options)
        return not sync_fs.exists(f"{arr.store.path}/{key}")
    except Exception:  # only the message's wording depends on it
        return False


def _verified(arr: zarr.Array, sums: list, where: str) -> da.Array:
    """A Dask array over ``arr``'s row chunks, each task reading and checking one chunk."""
    n, rows = arr.shape[0], arr.chunks[0]
    bounds = _chunk_bounds(n, rows)
    if len(sums) != len(bounds):
        raise StoreError(f"{where}: {len(sums)} chunk checksums recorded for {len(bounds)} chunks")
    name = f"read-{arr.basename}-{tokenize(where, sums, arr.shape, arr.chunks)}"
    tail = (0,) * (arr.ndim - 1)
    dsk = {(name, i, *tail): (_read_chunk, arr, i, a, b, int(sums[i]), where)
           for i, (a, b) in enumerate(bounds)}
    chunks = (tuple(b - a for a, b in bounds),) + tuple((s,) for s in arr.shape[1:])
    return da.Array(dsk, name, chunks, dtype=arr.dtype,
                    meta=np.empty((0,) * arr.ndim, dtype=arr.dtype))


def _split_arrays(path, split: str):
    path = absolute(path)
    root = _open_data_root(path)
    if split not in root:
        have = [s for s in datasets.SPLITS if s in root]
        raise StoreError(f"{path}: split {split!r} not in the store (it holds {have})")
    group = root[split]
    where = f"{path}/{split}"
    attrs = dict(group.attrs)
    check_attrs(attrs, DATA_SPLIT_SCHEMA, where)
    images = _array(group, "images", where, np.uint8, 2)
    labels = _array(group, "labels", where, np.uint8, 1)
    if images.shape[1] != N_FEATURES:
        raise StoreError(f"{where}/images: shape {images.shape}, expected (n, {N_FEATURES})")
    if labels.shape[0] != images.shape[0]:
        raise StoreError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise StoreError(f"{where}: the split holds no rows")
    if attrs["n_rows"] != images.shape[0]:
        raise StoreError(f"{where}: attribute 'n_rows' is {attrs['n_rows']}, but images holds "
                         f"{images.shape[0]} rows")
    if images.chunks[1] != N_FEATURES or images.chunks[0] != labels.chunks[0]:
        raise StoreError(
            f"{where}: images chunked {images.chunks} and labels {labels.chunks}; expected "
            f"whole rows and the same row chunks"
        )
    return path, root, attrs, images, labels


def open_data(path, split: str) -> DataSplit:
    """Open ``split`` of a data store as Dask arrays, after checking its schema.

    The store's path is made absolute, so workers started in another
    directory read the same files.  Each chunk is checked against its
    recorded CRC-32C by the task that reads it.

    Raises
    ------
    StoreError
        The store is missing, is not a data store, lacks ``split``, or its
        arrays or attributes are of the wrong type, dtype, shape or
        chunking.  When the rows are read: a chunk that is missing,
        unreadable or differs from its checksum.
    """
    path, root, attrs, images, labels = _split_arrays(path, split)
    where = f"{path}/{split}"
    sums = attrs["chunk_crc32c"]
    return DataSplit(
        path=path,
        split=split,
        images=_verified(images, sums["images"], f"{where}/images"),
        labels=_verified(labels, sums["labels"], f"{where}/labels"),
        attrs=attrs,
        store_attrs=dict(root.attrs),
    )


def read_rows(path, split: str, name: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start``..``stop`` of array ``name`` of a split, read where this runs (a
    worker) and checked chunk by chunk against the recorded CRC-32C."""
    path, _, attrs, images, labels = _split_arrays(path, split)
    arr = {"images": images, "labels": labels}[name]
    rows, n = arr.chunks[0], arr.shape[0]
    if not 0 <= start <= stop <= n:
        raise StoreError(f"{path}/{split}/{name}: rows {start}:{stop} outside 0:{n}")
    sums = attrs["chunk_crc32c"][name]
    where = f"{path}/{split}/{name}"
    parts = [_read_chunk(arr, i, a, b, int(sums[i]), where)
             for i, (a, b) in enumerate(_chunk_bounds(n, rows)) if a < stop and b > start]
    if not parts:
        return arr[start:stop]
    first = (start // rows) * rows
    return np.concatenate(parts)[start - first:stop - first]


def fingerprint(path) -> dict:
    """What a process sees at a data store's path: its root attributes and every
    split's fingerprint (compared between the client and each worker)."""
    root = _open_data_root(path)
    out = {"attrs": dict(root.attrs)}
    for split in datasets.SPLITS:
        if split in root:
            attrs = dict(root[split].attrs)
            check_attrs(attrs, DATA_SPLIT_SCHEMA, f"{path}/{split}")
            out[split] = split_fingerprint(attrs)
    return out


def verify_data(path) -> None:
    """Read every chunk of every split once and check it (ingest's up-to-date test)."""
    parts = [open_data(path, split) for split in list_splits(path)]
    dask.compute(*[arr.sum() for d in parts for arr in (d.images, d.labels)])


def _store_chunk(start: int, stop: int, targets: tuple, *blocks) -> tuple:
    """Task body: write one chunk of rows into each target; returns the CRC-32C of each
    block as written."""
    sums = []
    for target, block in zip(targets, blocks):
        want = (stop - start,) + target.shape[1:]
        if block.shape != want:
            raise StoreError(f"rows {start}:{stop}: got a block of shape {block.shape}, "
                             f"expected {want}")
        block = np.ascontiguousarray(block, dtype=target.dtype)
        target[start:stop] = block
        sums.append(crc32c(block))
    return tuple(sums)


# Every chunk is written, even one equal to the fill value, so a chunk file that is
# missing always means damage.
_ALL_CHUNKS = {"write_empty_chunks": True}


def _rows_codec():
    """The compressor of a data store's arrays (``kmeans_dask.store-codec``).

    Every Lloyd pass over streamed rows, and every load of a fit, decodes
    the whole split: LZ4 (through Blosc) decodes uint8 images about four
    times as fast as Zstandard (Zarr's default), for larger files.
    """
    if config.store_codec() == "zstd":
        return zarr.codecs.ZstdCodec(level=0)
    return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")


def _compute(tasks: list, progress=None) -> list:
    """Compute ``tasks`` on the active scheduler, calling ``progress(done, total)``.

    When one task fails, the others that are already writing are waited for before
    the error is raised: the caller then removes what was written, and a write still
    under way would otherwise land after that removal.
    """
    from .cluster import active_client

    client = active_client()
    total = len(tasks)
    if client is None:
        out = _compute_here(tasks)
        if progress is not None:
            progress(total, total)
        return out
    from distributed import as_completed, wait

    futures = client.compute(tasks)
    try:
        for done, _ in enumerate(as_completed(futures), 1):
            if progress is not None:
                progress(done, total)
        return client.gather(futures)
    except Exception:
        with contextlib.suppress(Exception):
            wait(futures, timeout=_SETTLE_TIMEOUT)
        raise
    finally:
        for f in futures:
            f.release()


# How long a failed write waits for its other tasks (seconds): a chunk write
# takes well under this, and a hung store must not hang the error too.
_SETTLE_TIMEOUT = 120


def _compute_here(tasks: list) -> list:
    """``dask.compute`` without a client; on the threaded scheduler, a failure is raised
    only once the tasks already running have ended (queued ones are dropped)."""
    from concurrent.futures import ThreadPoolExecutor

    import dask.threaded

    if dask.base.get_scheduler(collections=tasks) is not dask.threaded.get:
        return list(dask.compute(*tasks))
    workers = dask.config.get("num_workers", None) or dask.threaded.CPU_COUNT
    pool = ThreadPoolExecutor(workers)
    try:
        return list(dask.compute(*tasks, scheduler="threads", pool=pool))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_data(path, *, dataset: str, splits: dict, attrs: dict | None = None,
               overwrite: bool = False, inputs=(), progress=None) -> Path:
    """Write a data store atomically: one task per chunk of rows, on the workers.

    Parameters
    ----------
    path : path-like
        The store (``NAME.zarr``).
    dataset : str
        A name known to :mod:`kmeans_dask.datasets`; gives the class names.
    splits : dict of str to SplitData
        Per split, uint8 rows chunked by rows in regular chunks (the last
        may be shorter) and extra split attributes.
    attrs : dict, optional
        Extra root attributes (where the data came from, parameters).
    overwrite : bool, default=False
        Replace an earlier data store at ``path``.
    inputs : sequence of path-like
        Stores this write reads: ``path`` must not be or contain them.
    progress : callable, optional
        ``progress(done, total)`` as chunks are written.

    Returns
    -------
    pathlib.Path
        The absolute path of the store.
    """
    spec = datasets.get_spec(dataset)
    final = check_output(path, DATA_FORMAT, overwrite=overwrite, inputs=inputs)
    for split, sd in splits.items():
        if split not in datasets.SPLITS:
            raise StoreError(f"{final}: unknown split {split!r} (expected {list(datasets.SPLITS)})")
        n = sd.images.shape[0]
        if sd.images.ndim != 2 or sd.images.shape[1] != N_FEATURES or sd.labels.shape != (n,):
            raise StoreError(f"{final}/{split}: images {sd.images.shape} and labels "
                             f"{sd.labels.shape}; expected (n, {N_FEATURES}) and (n,)")
        rows = sd.images.chunks[0]
        if n == 0 or len(set(rows[:-1])) > 1 or rows[-1] > rows[0] or \
                sd.labels.chunks[0] != rows or len(sd.images.chunks[1]) != 1:
            raise StoreError(f"{final}/{split}: rows must be chunked regularly by rows, images "
                             f"and labels alike (got {sd.images.chunks} and {sd.labels.chunks})")
    codec = _rows_codec()
    with atomic_zarr(final, DATA_FORMAT, overwrite=overwrite, inputs=inputs) as (root, _):
        tasks, where = [], []
        groups = {}
        for split, sd in splits.items():
            n, c = sd.images.shape[0], sd.images.chunks[0][0]
            group = root.create_group(split)
            img = group.create_array("images", shape=(n, N_FEATURES), chunks=(c, N_FEATURES),
                                     dtype="uint8", config=_ALL_CHUNKS,
                                     compressors=codec)
            lab = group.create_array("labels", shape=(n,), chunks=(c,), dtype="uint8",
                                     config=_ALL_CHUNKS, compressors=codec)
            groups[split] = (group, sd, n, c)
            blocks = zip(sd.images.to_delayed().ravel(), sd.labels.to_delayed().ravel())
            for (a, b), (ib, lb) in zip(_chunk_bounds(n, c), blocks):
                tasks.append(dask.delayed(_store_chunk, pure=False)(a, b, (img, lab), ib, lb))
                where.append(split)
        log.info("writing %d chunks to %s", len(tasks), final)
        sums = _compute(tasks, progress)
        for split, (group, sd, n, c) in groups.items():
            mine = [s for s, w in zip(sums, where) if w == split]
            group.attrs.update(split=split, n_rows=n, **sd.attrs, chunk_crc32c={
                "images": [s[0] for s in mine], "labels": [s[1] for s in mine]})
        chunk_rows = {split: c for split, (_, _, _, c) in groups.items()}
        # The root's attributes last: a store without them is not a data store.
        root.attrs.update({
            "format": DATA_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "dataset": spec.name,
            "class_names": list(spec.class_names),
            "image_shape": list(datasets.IMAGE_SHAPE),
            "chunk_rows": max(chunk_rows.values()),
            **(attrs or {}),
        })
    return final


@contextlib.contextmanager
def _removed_after(loc):
    try:
        yield
    finally:
        if loc is not None:
            with contextlib.suppress(Exception):
                remove(loc)


def _upload(local: Path, loc: URL) -> URL:
    fs, key = _filesystem(loc)
    with _io(loc):
        fs.put_file(str(local), key)
    return loc


def _raw_rows(raw_path, offset: int, row_bytes: int, start: int, stop: int) -> np.ndarray:
    """Task body: rows [start, stop) of a decompressed IDX payload (a local path or a URL)."""
    count = (stop - start) * row_bytes
    if isinstance(raw_path, URL):
        fs, key = _filesystem(raw_path)
        first = offset + start * row_bytes
        with _io(raw_path):
            data = fs.cat_file(key, start=first, end=first + count)
        block = np.frombuffer(data, dtype=np.uint8)
    else:
        block = np.fromfile(raw_path, dtype=np.uint8, count=count,
                            offset=offset + start * row_bytes)
    if block.size != count:
        raise IDXFormatError(f"{raw_path}: short read at rows {start}:{stop}")
    return block.reshape((stop - start, row_bytes) if row_bytes > 1 else (stop - start,))


def _raw_array(raw_path, offset: int, row_bytes: int, n: int, rows: int) -> da.Array:
    name = f"idx-rows-{tokenize(str(raw_path), offset, row_bytes, n, rows)}"
    raw_path = raw_path if isinstance(raw_path, URL) else str(raw_path)
    bounds = _chunk_bounds(n, rows)
    tail = (0,) if row_bytes > 1 else ()
    dsk = {(name, i, *tail): (_raw_rows, raw_path, offset, row_bytes, a, b)
           for i, (a, b) in enumerate(bounds)}
    chunks = (tuple(b - a for a, b in bounds),) + (((row_bytes,),) if row_bytes > 1 else ())
    return da.Array(dsk, name, chunks, dtype=np.uint8,
                    meta=np.empty((0,) * len(chunks), dtype=np.uint8))


def _store_matches(path: Path, spec, splits, chunk_rows: int) -> bool:
    try:
        root = _open_data_root(path)
    except StoreError:
        return False
    attrs = dict(root.attrs)
    if attrs.get("dataset") != spec.name or attrs.get("chunk_rows") != chunk_rows:
        return False
    if sorted(s for s in datasets.SPLITS if s in root) != sorted(splits):
        return False
    for split in splits:
        want = {k: f.raw_sha256 for k, f in spec.files[split].items()}
        if dict(root[split].attrs).get("payload_sha256") != want:
            return False
    return True


@dataclass(frozen=True)
class IngestReport:
    path: Path
    splits: dict  # split -> number of rows
    sources: dict  # split -> SplitSource
    skipped: bool  # True when a matching store was already there


def ingest(
    dataset: str,
    out_dir,
    sources: dict,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    overwrite: bool = False,
    progress=None,
) -> IngestReport:
    """Write the IDX files of ``sources`` into ``out_dir/<dataset>.zarr``.

    Each split's files are decompressed once, checked (format, sizes,
    payload SHA-256) and then copied into Zarr by one Dask task per chunk,
    so the chunks are written in parallel by whatever scheduler is active.
    A store already there is left alone when its attributes match and every
    one of its chunks still matches its checksum.

    Parameters
    ----------
    dataset : {"mnist", "fashion-mnist"}
    out_dir : path-like
    sources : dict of str to datasets.SplitSource
        As returned by :func:`kmeans_dask.datasets.resolve`.
    chunk_rows : int, default=10000
        Rows per chunk of the written arrays (a split with fewer rows is one chunk).
    overwrite : bool, default=False
        Replace an existing data store that does not match.
    progress : callable, optional
        ``progress(done, total)`` as chunks are written.

    Returns
    -------
    IngestReport

    Raises
    ------
    StoreError
        The output exists, differs and ``overwrite`` is false; or it holds a
        damaged chunk (named) and ``overwrite`` is false.
    IDXFormatError, ChecksumError
        A source file is malformed or not the published bytes; nothing is
        written.
    """
    spec = datasets.get_spec(dataset)
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
        raise StoreError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    final = absolute(data_store_path(out_dir, dataset))
    if output_kind(final) is not None and not overwrite:
        if _store_matches(final, spec, list(sources), chunk_rows):
            verify_data(final)  # a damaged chunk is an error naming it, not "up to date"
            log.info("%s already holds %s %s; nothing to do", final, dataset, sorted(sources))
            rows = {s: spec.files[s]["labels"].n_items for s in sources}
            return IngestReport(final, rows, sources, skipped=True)
        if output_kind(final) == DATA_FORMAT:
            raise exists_error(final, f"and does not match {dataset} {sorted(sources)} with "
                                      f"chunk_rows={chunk_rows}")
    check_output(final, DATA_FORMAT, overwrite=overwrite)
    local = isinstance(final, Path)
    if local:
        final.parent.mkdir(parents=True, exist_ok=True)
    splits = {}
    # The decompressed payloads are where the workers read them: beside a local store,
    # or, for a store at a URL, uploaded next to it (workers share no directory then).
    staging = None if local else final.with_name(
        f"{temp_prefix(final, 'staging')}{os.urandom(8).hex()}")
    with tempfile.TemporaryDirectory(prefix=temp_prefix(final, "raw"),
                                     dir=final.parent if local else None) as raw_dir, \
            _removed_after(staging):
        for split, src in sources.items():
            files = spec.files[split]
            raw = {k: Path(raw_dir) / f"{split}-{k}.idx" for k in files}
            log.info("checking %s %s from %s", dataset, split, src.describe())
            hdr_img = datasets.decompress_idx(src.images, "images", raw["images"])
            hdr_lab = datasets.decompress_idx(src.labels, "labels", raw["labels"])
            n = hdr_img.shape[0]
            if hdr_lab.shape[0] != n:
                raise IDXFormatError(
                    f"{src.images} holds {n} images but {src.labels} holds "
                    f"{hdr_lab.shape[0]} labels"
                )
            datasets.verify_checksum(src.images, hdr_img, files["images"])
            datasets.verify_checksum(src.labels, hdr_lab, files["labels"])
            if staging is not None:
                raw = {k: _upload(p, staging / p.name) for k, p in raw.items()}
            rows = min(chunk_rows, n)
            splits[split] = SplitData(
                images=_raw_array(raw["images"], hdr_img.offset, N_FEATURES, n, rows),
                labels=_raw_array(raw["labels"], hdr_lab.offset, 1, n, rows),
                attrs={
                    "source": src.origin,
                    "source_files": {"images": str(src.images), "labels": str(src.labels)},
                    "payload_sha256": {k: f.raw_sha256 for k, f in files.items()},
                },
            )
        write_data(final, dataset=dataset, splits=splits, overwrite=overwrite,
                   attrs={"chunk_rows": chunk_rows}, progress=progress)
    rows = {split: sd.images.shape[0] for split, sd in splits.items()}
    return IngestReport(final, rows, sources, skipped=False)


# --------------------------------------------------------------------------- result stores


@dataclass(frozen=True)
class Result:
    """A result store, read back and checked."""

    path: Path
    centroids: np.ndarray  # (k, d) float32 (float64 for float64 models)
    labels: da.Array  # (n,) int32, each chunk checked against its CRC-32C when read
    attrs: dict
    init: np.ndarray | None = None  # (k, d) float64 initial centres, when stored
    # The feature transform the centroids are in (``mean``, ``components``, ``scale``).
    features: dict | None = None


def _history_ok(v) -> bool:
    keys = ("iteration", "inertia", "center_shift")
    return isinstance(v, list) and all(
        isinstance(h, dict) and all(_is_num(h.get(k)) for k in keys) for h in v)


RESULT_SCHEMA = {
    "params": (lambda v: isinstance(v, dict) and _is_int(v.get("n_clusters"))
               and v["n_clusters"] >= 1, "a mapping with an integer n_clusters >= 1"),
    "inertia": (lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    "n_iter": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "history": (_history_ok, "a list of per-iteration records (iteration, inertia, center_shift)"),
    "data": (lambda v: isinstance(v, dict), "a mapping describing the input rows"),
    "scale": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    "n_features": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "labels_crc32c": (_int_list, "a list of one CRC-32C per label chunk"),
}
DATA_RECORD_SCHEMA = {
    "class_names": (lambda v: v is None or _str_list(v), "a list of strings"),
}
LABELS_SCHEMA = {
    "labels_crc32c": (_int_list, "a list of one CRC-32C per label chunk"),
}


def write_result(path, centroids: np.ndarray, labels: da.Array, attrs: dict, *, init=None,
                 overwrite=False, inputs=(), features: dict | None = None) -> Path:
    """Write a result store atomically.

    ``labels`` is stored by the workers chunk by chunk (one task per chunk of
    the Dask array); the client only sends the k × d centroids.
    """
    if not np.isfinite(centroids).all():
        raise StoreError(f"{path}: refusing to write centroids that are NaN or infinite")
    with atomic_zarr(path, RESULT_FORMAT, overwrite=overwrite, inputs=inputs) as (root, tmp):
        # float32 for images (as fitted), float64 only when the model is float64.
        dtype = np.float64 if centroids.dtype == np.float64 else np.float32
        cent = root.create_array("centroids", shape=centroids.shape, chunks=centroids.shape,
                                 dtype=dtype)
        cent[...] = centroids.astype(dtype)
        if init is not None:
            arr = root.create_array("init", shape=init.shape, chunks=init.shape, dtype="float64")
            arr[...] = init
        extra = {}
        if features is not None:
            # The transform the centroids live after: rows -> (rows * scale - mean) @ components.T
            for name in ("mean", "components"):
                value = np.asarray(features[name], dtype=np.float32)
                arr = root.create_array(f"features_{name}", shape=value.shape,
                                        chunks=value.shape, dtype="float32")
                arr[...] = value
            extra["features"] = {"kind": "pca", "scale": float(features["scale"]),
                                 "explained_variance_ratio":
                                     float(features["explained_variance_ratio"])}
        sums = _write_labels(root, labels, tmp)
        root.attrs.update(format=RESULT_FORMAT, schema_version=SCHEMA_VERSION,
                          labels_crc32c=sums, **attrs, **extra)
    return absolute(path)


def _write_labels(root: zarr.Group, labels: da.Array, where: Path) -> list[int]:
    """Store ``labels`` as int32, one task per chunk, each writing whole Zarr chunks;
    returns their CRC-32C.  The fill value -1 is no label, so a chunk that did not
    arrive can never read as cluster 0."""
    rows = labels.chunks[0]
    if len(set(rows[:-1])) > 1 or rows[-1] > rows[0]:
        # Zarr chunks are regular; rechunk so no two tasks write into one Zarr chunk.
        labels = labels.rechunk(max(rows))
        rows = labels.chunks[0]
    lab = root.create_array("labels", shape=labels.shape, chunks=(rows[0],), dtype="int32",
                            fill_value=-1, config=_ALL_CHUNKS)
    bounds = _chunk_bounds(labels.shape[0], rows[0])
    tasks = [dask.delayed(_store_chunk, pure=False)(a, b, (lab,), blk)
             for (a, b), blk in zip(bounds, labels.astype(np.int32).to_delayed().ravel())]
    sums = [s[0] for s in _compute(tasks)]
    if lab.nchunks_initialized != lab.nchunks:
        raise StoreError(
            f"{where}: the workers wrote {lab.nchunks} label chunks, but only "
            f"{lab.nchunks_initialized} are visible here: the workers do not see this path as "
            f"the client does; use a shared file system or an object store URL")
    return sums


def write_labels(path, labels: da.Array, attrs: dict, *, overwrite=False, inputs=()) -> Path:
    """Write a labels store (``labels`` (n,) int32 plus attributes) atomically."""
    with atomic_zarr(path, LABELS_FORMAT, overwrite=overwrite, inputs=inputs) as (root, tmp):
        sums = _write_labels(root, labels, tmp)
        root.attrs.update(format=LABELS_FORMAT, schema_version=SCHEMA_VERSION,
                          labels_crc32c=sums, **attrs)
    return absolute(path)


def read_labels(path) -> tuple[da.Array, dict]:
    """Open a labels store written by :func:`write_labels`, schema checked."""
    path = absolute(path)
    root = _open_group(path, LABELS_FORMAT, "labels store")
    attrs = dict(root.attrs)
    check_attrs(attrs, LABELS_SCHEMA, str(path))
    lab = _array(root, "labels", str(path), np.int32, 1)
    return _verified(lab, attrs["labels_crc32c"], f"{path}/labels"), attrs


def read_result(path) -> Result:
    """Open a result store and check its schema: arrays, attribute types, finite values.

    Raises
    ------
    StoreError
        Missing store, wrong format, missing or mistyped attributes, arrays
        of the wrong dtype or shape, or centroids that are not finite.
    """
    path = absolute(path)
    root = _open_group(path, RESULT_FORMAT, "result store")
    attrs = dict(root.attrs)
    check_attrs(attrs, RESULT_SCHEMA, str(path))
    if "class_names" in attrs["data"]:
        check_attrs(attrs["data"], DATA_RECORD_SCHEMA, f"{path}: attribute 'data'")
    cent = root.get("centroids")
    dtype = cent.dtype if isinstance(cent, zarr.Array) and cent.dtype == np.float64 else np.float32
    cent = _array(root, "centroids", str(path), dtype, 2)
    labels = _array(root, "labels", str(path), np.int32, 1)
    k = attrs["params"]["n_clusters"]
    if cent.shape != (k, attrs["n_features"]):
        raise StoreError(f"{path}/centroids: shape {cent.shape}, expected ({k}, {attrs['n_features']})")
    centroids = np.asarray(cent[...])
    if not np.isfinite(centroids).all():
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(centroids))[:, 0]})
        raise StoreError(f"{path}/centroids: centre(s) {bad[:10]} hold NaN or infinite values")
    init = None
    if "init" in root:
        init = np.asarray(_array(root, "init", str(path), np.float64, 2)[...])
        if init.shape != cent.shape:
            raise StoreError(f"{path}/init: shape {init.shape}, expected {cent.shape}")
        if not np.isfinite(init).all():
            raise StoreError(f"{path}/init: NaN or infinite values")
    features = None
    if "features" in attrs:
        f = attrs["features"]
        if not (isinstance(f, dict) and f.get("kind") == "pca" and _is_num(f.get("scale"))):
            raise StoreError(f"{path}: attribute 'features' must describe a pca transform, "
                             f"got {f!r}")
        mean = np.asarray(_array(root, "features_mean", str(path), np.float32, 1)[...])
        comps = np.asarray(_array(root, "features_components", str(path), np.float32, 2)[...])
        if comps.shape != (cent.shape[1], mean.shape[0]):
            raise StoreError(f"{path}/features_components: shape {comps.shape}, expected "
                             f"({cent.shape[1]}, {mean.shape[0]})")
        if not (np.isfinite(mean).all() and np.isfinite(comps).all()):
            raise StoreError(f"{path}/features_*: NaN or infinite values")
        features = {"mean": mean, "components": comps, "scale": float(f["scale"])}
    return Result(path, centroids, _verified(labels, attrs["labels_crc32c"], f"{path}/labels"),
                  attrs, init, features)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_path(result_path) -> Path:
    """Where a fit writing ``RESULT.zarr`` keeps its checkpoint: ``RESULT.zarr.checkpoint.json``."""
    result_path = absolute(result_path)
    return result_path.with_name(result_path.name + ".checkpoint.json")


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f8").tobytes()).decode("ascii")


def _unb64(text: str, shape, where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, AttributeError) as exc:
        raise StoreError(f"{where}: not base64 ({exc})") from None
    if len(raw) != 8 * int(np.prod(shape)):
        raise StoreError(f"{where}: {len(raw)} bytes, expected {8 * int(np.prod(shape))} for {shape}")
    return np.frombuffer(raw, dtype="<f8").reshape(shape).astype(np.float64)


def write_checkpoint(path, state: dict, record: dict) -> Path:
    """Replace the checkpoint file atomically (temporary file, fsync, rename).

    ``state`` is what :meth:`KMeans.fit` passes to its ``checkpoint``
    callback; ``record`` identifies the run (parameters, input data) so a
    resume can refuse a checkpoint that belongs to another run.  Centres are
    stored exactly (little-endian float64, base64) in plain JSON.
    """
    path = absolute(path)
    centers = np.asarray(state["centers"], dtype=np.float64)
    doc = {
        "format": CHECKPOINT_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "iteration": int(state["iteration"]),
        "shape": list(centers.shape),
        "centers": _b64(centers),
        "init": _b64(state["init"]),
        "history": state["history"],
        **record,
    }
    return write_text(path, json.dumps(doc))


def read_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`write_checkpoint`, schema checked.

    Returns the document with ``centers`` and ``init`` decoded to arrays.

    Raises
    ------
    StoreError
        Missing, unreadable or malformed checkpoint.
    """
    path = absolute(path)
    if not exists(path):
        raise StoreError(f"{path}: no checkpoint to resume from")
    try:
        doc = json.loads(read_text(path))
    except StoreError:
        raise
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable checkpoint ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise StoreError(f"{path}: not a kmeans-dask checkpoint")
    for key in ("iteration", "shape", "centers", "init", "history", "params", "data"):
        if key not in doc:
            raise StoreError(f"{path}: checkpoint lacks {key!r}")
    check_attrs(doc, CHECKPOINT_SCHEMA, str(path))
    shape = tuple(doc["shape"])
    doc["centers"] = _unb64(doc["centers"], shape, f"{path}: centers")
    doc["init"] = _unb64(doc["init"], shape, f"{path}: init")
    if len(doc["history"]) != doc["iteration"]:
        raise StoreError(f"{path}: {len(doc['history'])} history entries for iteration {doc['iteration']}")
    if not (np.isfinite(doc["centers"]).all() and np.isfinite(doc["init"]).all()):
        raise StoreError(f"{path}: the centres hold NaN or infinite values")
    return doc


CHECKPOINT_SCHEMA = {
    "iteration": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "shape": (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 1
                                                                    for x in v),
              "[n_clusters, n_features]"),
    "centers": (lambda v: isinstance(v, str), "base64 text"),
    "init": (lambda v: isinstance(v, str), "base64 text"),
    "history": (_history_ok, "a list of per-iteration records (iteration, inertia, center_shift)"),
    "params": (lambda v: isinstance(v, dict), "a mapping"),
    "data": (lambda v: isinstance(v, dict), "a mapping"),
}
