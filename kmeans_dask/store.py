"""Zarr v3 stores: the only module that knows their layout.

Two kinds of store are written here, always under a temporary name that is
renamed into place only once complete:

data store (``<dataset>.zarr``)
    attributes ``format = "kmeans-dask/data"``, ``dataset``, ``class_names``,
    ``image_shape``; one group per split (``train``, ``test``) holding
    ``images`` (n, 784) uint8 and ``labels`` (n,) uint8, both chunked by rows,
    with the split's source and payload checksums in its attributes.

result store (``RESULT.zarr``)
    attributes ``format = "kmeans-dask/result"`` and the run's record
    (parameters, inertia, history, input store, versions); arrays
    ``centroids`` (k, d) float32 and ``labels`` (n,) int32 chunked like the
    input rows.

Every reader checks the schema (format tag, arrays present, dtype, shape) and
refuses a store that fails by naming it.  Nothing is ever unpickled.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr

from . import datasets
from .errors import IDXFormatError, StoreError

log = logging.getLogger(__name__)

DATA_FORMAT = "kmeans-dask/data"
RESULT_FORMAT = "kmeans-dask/result"
SCHEMA_VERSION = 1
N_FEATURES = datasets.IMAGE_SHAPE[0] * datasets.IMAGE_SHAPE[1]
DEFAULT_CHUNK_ROWS = 10_000


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(final, *, overwrite: bool = False):
    """Yield a temporary sibling path; rename it to ``final`` if the block succeeds.

    On any exception the temporary path is removed and ``final`` is left as
    it was.  With ``overwrite`` an existing ``final`` is replaced only after
    the new one is complete.

    Raises
    ------
    StoreError
        ``final`` exists and ``overwrite`` is false.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise StoreError(f"{final} already exists; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open_group(path, fmt: str, what: str) -> zarr.Group:
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: {what} not found")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a non-store
        raise StoreError(f"{path}: not a Zarr group ({exc})") from exc
    attrs = dict(group.attrs)
    if attrs.get("format") != fmt:
        raise StoreError(
            f"{path}: not a {what}: attribute 'format' is {attrs.get('format')!r}, expected {fmt!r}"
        )
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema_version {attrs.get('schema_version')!r}, expected {SCHEMA_VERSION}"
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


# --------------------------------------------------------------------------- data stores


@dataclass(frozen=True)
class DataSplit:
    """One split of a data store, opened lazily as Dask arrays."""

    path: Path
    split: str
    images: da.Array  # (n, 784) uint8, chunked by rows
    labels: da.Array  # (n,) uint8, same row chunks
    attrs: dict  # the split group's attributes
    store_attrs: dict  # the root's attributes (dataset, class names, ...)

    @property
    def class_names(self) -> list[str]:
        return list(self.store_attrs["class_names"])


def data_store_path(out_dir, dataset: str) -> Path:
    return Path(out_dir) / f"{dataset}.zarr"


def list_splits(path) -> list[str]:
    """The splits a data store holds, in the order train, test."""
    group = _open_group(path, DATA_FORMAT, "data store")
    return [s for s in datasets.SPLITS if s in group]


def open_data(path, split: str) -> DataSplit:
    """Open ``split`` of a data store as Dask arrays, after checking its schema.

    Raises
    ------
    StoreError
        The store is missing, is not a data store, lacks ``split``, or its
        arrays have the wrong dtype, shape or chunking.
    """
    path = Path(path)
    root = _open_group(path, DATA_FORMAT, "data store")
    if split not in root:
        have = [s for s in datasets.SPLITS if s in root]
        raise StoreError(f"{path}: split {split!r} not in the store (it holds {have})")
    group = root[split]
    where = f"{path}/{split}"
    images = _array(group, "images", where, np.uint8, 2)
    labels = _array(group, "labels", where, np.uint8, 1)
    if images.shape[1] != N_FEATURES:
        raise StoreError(f"{where}/images: shape {images.shape}, expected (n, {N_FEATURES})")
    if labels.shape[0] != images.shape[0]:
        raise StoreError(
            f"{where}: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise StoreError(f"{where}: the split holds no rows")
    if images.chunks[1] != N_FEATURES or images.chunks[0] != labels.chunks[0]:
        raise StoreError(
            f"{where}: images chunked {images.chunks} and labels {labels.chunks}; expected "
            f"whole rows and the same row chunks"
        )
    return DataSplit(
        path=path,
        split=split,
        images=da.from_zarr(images),
        labels=da.from_zarr(labels),
        attrs=dict(group.attrs),
        store_attrs=dict(root.attrs),
    )


def _copy_rows(raw_path: str, offset: int, row_bytes: int, start: int, stop: int, target) -> int:
    """Task body: copy rows [start, stop) of a raw IDX payload into a Zarr array."""
    count = (stop - start) * row_bytes
    block = np.fromfile(raw_path, dtype=np.uint8, count=count, offset=offset + start * row_bytes)
    if block.size != count:
        raise IDXFormatError(f"{raw_path}: short read at rows {start}:{stop}")
    target[start:stop] = block.reshape((stop - start,) + target.shape[1:])
    return stop - start


def _store_matches(path: Path, spec, splits, chunk_rows: int) -> bool:
    try:
        root = _open_group(path, DATA_FORMAT, "data store")
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
) -> IngestReport:
    """Write the IDX files of ``sources`` into ``out_dir/<dataset>.zarr``.

    Each split's files are decompressed once, checked (format, sizes,
    payload SHA-256) and then copied into Zarr by one Dask task per chunk,
    so the chunks are written in parallel by whatever scheduler is active.

    Parameters
    ----------
    dataset : {"mnist", "fashion-mnist"}
    out_dir : path-like
    sources : dict of str to datasets.SplitSource
        As returned by :func:`kmeans_dask.datasets.resolve`.
    chunk_rows : int, default=10000
        Rows per chunk of the written arrays.
    overwrite : bool, default=False
        Replace an existing store that does not match.

    Returns
    -------
    IngestReport

    Raises
    ------
    StoreError
        The output exists, differs and ``overwrite`` is false.
    IDXFormatError, ChecksumError
        A source file is malformed or not the published bytes; nothing is
        written.
    """
    spec = datasets.get_spec(dataset)
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise StoreError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    final = data_store_path(out_dir, dataset)
    if final.exists() and not overwrite:
        if _store_matches(final, spec, list(sources), chunk_rows):
            log.info("%s already holds %s %s; nothing to do", final, dataset, sorted(sources))
            rows = {s: spec.files[s]["labels"].n_items for s in sources}
            return IngestReport(final, rows, sources, skipped=True)
        raise StoreError(
            f"{final} already exists and does not match {dataset} {sorted(sources)} with "
            f"chunk_rows={chunk_rows}; pass --overwrite to replace it"
        )
    rows = {}
    with atomic_path(final, overwrite=True) as tmp, tempfile.TemporaryDirectory(
        prefix=f".{final.name}.raw-", dir=final.parent
    ) as raw_dir:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs.update(
            format=DATA_FORMAT,
            schema_version=SCHEMA_VERSION,
            dataset=spec.name,
            class_names=list(spec.class_names),
            image_shape=list(datasets.IMAGE_SHAPE),
            chunk_rows=chunk_rows,
        )
        tasks = []
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
            group = root.create_group(split)
            group.attrs.update(
                split=split,
                n_rows=n,
                source=src.origin,
                source_files={"images": str(src.images), "labels": str(src.labels)},
                payload_sha256={k: f.raw_sha256 for k, f in files.items()},
            )
            images = group.create_array(
                "images", shape=(n, N_FEATURES), chunks=(chunk_rows, N_FEATURES), dtype="uint8"
            )
            labels = group.create_array("labels", shape=(n,), chunks=(chunk_rows,), dtype="uint8")
            for start in range(0, n, chunk_rows):
                stop = min(start + chunk_rows, n)
                tasks.append(dask.delayed(_copy_rows, pure=False)(
                    str(raw["images"]), hdr_img.offset, N_FEATURES, start, stop, images))
                tasks.append(dask.delayed(_copy_rows, pure=False)(
                    str(raw["labels"]), hdr_lab.offset, 1, start, stop, labels))
            rows[split] = n
        log.info("writing %d chunks", len(tasks))
        dask.compute(*tasks)
    return IngestReport(final, rows, sources, skipped=False)


# --------------------------------------------------------------------------- result stores


@dataclass(frozen=True)
class Result:
    """A result store, read back and checked."""

    path: Path
    centroids: np.ndarray  # (k, d) float32 (float64 for float64 models)
    labels: da.Array  # (n,) int32
    attrs: dict
    init: np.ndarray | None = None  # (k, d) float64 initial centres, when stored


RESULT_REQUIRED_ATTRS = ("params", "inertia", "n_iter", "history", "data", "scale", "n_features")


def write_result(path, centroids: np.ndarray, labels: da.Array, attrs: dict, *, init=None,
                 overwrite=False) -> Path:
    """Write a result store atomically.

    ``labels`` is stored by the workers chunk by chunk (one task per chunk of
    the Dask array); the client only sends the k × d centroids.
    """
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs.update(format=RESULT_FORMAT, schema_version=SCHEMA_VERSION, **attrs)
        # float32 for images (as fitted), float64 only when the model is float64.
        dtype = np.float64 if centroids.dtype == np.float64 else np.float32
        cent = root.create_array("centroids", shape=centroids.shape, chunks=centroids.shape,
                                 dtype=dtype)
        cent[...] = centroids.astype(dtype)
        if init is not None:
            arr = root.create_array("init", shape=init.shape, chunks=init.shape, dtype="float64")
            arr[...] = init
        _write_labels(root, labels)
    return path


def _write_labels(root: zarr.Group, labels: da.Array) -> None:
    """Store ``labels`` as int32, one task per chunk, each writing whole Zarr chunks."""
    rows = labels.chunks[0]
    lab = root.create_array("labels", shape=labels.shape, chunks=(max(rows),), dtype="int32")
    if len(set(rows[:-1])) > 1 or rows[-1] > rows[0]:
        # Zarr chunks are regular; rechunk so no two tasks write into one Zarr chunk.
        labels = labels.rechunk(max(rows))
    da.store(labels.astype(np.int32), lab, lock=False)


LABELS_FORMAT = "kmeans-dask/labels"


def write_labels(path, labels: da.Array, attrs: dict, *, overwrite=False) -> Path:
    """Write a labels store (``labels`` (n,) int32 plus attributes) atomically."""
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs.update(format=LABELS_FORMAT, schema_version=SCHEMA_VERSION, **attrs)
        _write_labels(root, labels)
    return path


def read_labels(path) -> tuple[da.Array, dict]:
    """Open a labels store written by :func:`write_labels`, schema checked."""
    root = _open_group(path, LABELS_FORMAT, "labels store")
    return da.from_zarr(_array(root, "labels", str(path), np.int32, 1)), dict(root.attrs)


def read_result(path) -> Result:
    """Open a result store and check its schema.

    Raises
    ------
    StoreError
        Missing store, wrong format, missing arrays or attributes, or arrays
        of the wrong dtype or shape.
    """
    path = Path(path)
    root = _open_group(path, RESULT_FORMAT, "result store")
    attrs = dict(root.attrs)
    missing = [a for a in RESULT_REQUIRED_ATTRS if a not in attrs]
    if missing:
        raise StoreError(f"{path}: result store lacks attribute(s) {missing}")
    cent = root.get("centroids")
    dtype = cent.dtype if isinstance(cent, zarr.Array) and cent.dtype == np.float64 else np.float32
    cent = _array(root, "centroids", str(path), dtype, 2)
    labels = _array(root, "labels", str(path), np.int32, 1)
    k = attrs["params"].get("n_clusters")
    if cent.shape != (k, attrs["n_features"]):
        raise StoreError(f"{path}/centroids: shape {cent.shape}, expected ({k}, {attrs['n_features']})")
    init = None
    if "init" in root:
        init = np.asarray(_array(root, "init", str(path), np.float64, 2)[...])
        if init.shape != cent.shape:
            raise StoreError(f"{path}/init: shape {init.shape}, expected {cent.shape}")
    return Result(path, np.asarray(cent[...]), da.from_zarr(labels), attrs, init)


# --------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = "kmeans-dask/checkpoint"


def checkpoint_path(result_path) -> Path:
    """Where a fit writing ``RESULT.zarr`` keeps its checkpoint: ``RESULT.zarr.checkpoint.json``."""
    result_path = Path(result_path)
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
    path = Path(path)
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`write_checkpoint`, schema checked.

    Returns the document with ``centers`` and ``init`` decoded to arrays.

    Raises
    ------
    StoreError
        Missing, unreadable or malformed checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no checkpoint to resume from")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable checkpoint ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise StoreError(f"{path}: not a kmeans-dask checkpoint")
    for key in ("iteration", "shape", "centers", "init", "history", "params", "data"):
        if key not in doc:
            raise StoreError(f"{path}: checkpoint lacks {key!r}")
    shape = tuple(doc["shape"])
    doc["centers"] = _unb64(doc["centers"], shape, f"{path}: centers")
    doc["init"] = _unb64(doc["init"], shape, f"{path}: init")
    if len(doc["history"]) != doc["iteration"]:
        raise StoreError(f"{path}: {len(doc['history'])} history entries for iteration {doc['iteration']}")
    return doc
