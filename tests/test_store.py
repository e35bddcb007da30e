"""Zarr data stores: ingest round trip, atomic writes, schema checks (store.py)."""

from __future__ import annotations

import os
import shutil
import stat

import dask
import numpy as np
import pytest
import zarr

from kmeans_dask import datasets, store
from kmeans_dask.errors import ChecksumError, IDXFormatError, StoreError

from conftest import leftovers, raw_payload, write_gz


@pytest.mark.parametrize("name", sorted(datasets.DATASETS))
@pytest.mark.parametrize("split", datasets.SPLITS)
def test_round_trip_is_byte_for_byte(data_root, shared_datasets, name, split):
    data = store.open_data(data_root / f"{name}.zarr", split)
    files = datasets.get_spec(name).files[split]
    images = raw_payload(shared_datasets / name / files["images"].name)[16:]
    labels = raw_payload(shared_datasets / name / files["labels"].name)[8:]
    assert data.images.dtype == np.uint8 and data.images.shape == (len(labels), 784)
    assert data.images.chunks[0] == data.labels.chunks[0]
    assert data.images.compute().tobytes() == images
    assert data.labels.compute().tobytes() == labels


def test_store_attributes(fashion_store):
    data = store.open_data(fashion_store, "train")
    assert data.store_attrs["dataset"] == "fashion-mnist"
    assert data.class_names[9] == "Ankle boot"
    assert data.store_attrs["image_shape"] == [28, 28]
    assert data.attrs["source"] == "explicit"
    spec = datasets.get_spec("fashion-mnist")
    assert data.attrs["payload_sha256"]["images"] == spec.files["train"]["images"].raw_sha256
    assert data.images.chunks[0] == (10000,) * 6


def _one_split_source(tmp_path, shared_datasets, name="mnist", split="test"):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for f in datasets.get_spec(name).files[split].values():
        shutil.copy(shared_datasets / name / f.name, src / f.name)
    return src


@pytest.mark.t10k
def test_store_codec_is_lz4_unless_configured(tmp_path, shared_datasets):
    # Every pass over streamed rows decodes them: LZ4 by default, for speed.
    src = _one_split_source(tmp_path, shared_datasets)
    sources = {"test": datasets.resolve_split("mnist", "test", src, download=False)}
    want = raw_payload(src / datasets.get_spec("mnist").files["test"]["images"].name)[16:]
    for setting, kind in ((None, zarr.codecs.BloscCodec), ("zstd", zarr.codecs.ZstdCodec)):
        with dask.config.set({"kmeans_dask.store-codec": setting} if setting else {}):
            path = store.ingest("mnist", tmp_path / f"out-{setting}", sources).path
        for name in ("images", "labels"):
            (codec,) = zarr.open_array(path / "test" / name, mode="r").compressors
            assert isinstance(codec, kind)
        assert store.open_data(path, "test").images.compute().tobytes() == want
    with dask.config.set({"kmeans_dask.store-codec": "gzip"}):
        with pytest.raises(ValueError, match="kmeans_dask.store-codec must be one of"):
            store.ingest("mnist", tmp_path / "out-bad", sources)
    assert not (tmp_path / "out-bad" / "mnist.zarr").exists()


@pytest.mark.t10k
def test_rerun_is_a_no_op_and_overwrite_replaces(tmp_path, shared_datasets):
    src = _one_split_source(tmp_path, shared_datasets)
    sources = {"test": datasets.resolve_split("mnist", "test", src, download=False)}
    out = tmp_path / "out"
    first = store.ingest("mnist", out, sources, chunk_rows=4000)
    assert not first.skipped and first.splits == {"test": 10000}
    assert store.open_data(first.path, "test").images.chunks[0] == (4000, 4000, 2000)
    mtime = (first.path / "zarr.json").stat().st_mtime_ns
    again = store.ingest("mnist", out, sources, chunk_rows=4000)
    assert again.skipped and (first.path / "zarr.json").stat().st_mtime_ns == mtime
    with pytest.raises(StoreError) as err:
        store.ingest("mnist", out, sources, chunk_rows=3000)
    assert str(err.value) == (
        f"{first.path} already exists and does not match mnist ['test'] with chunk_rows=3000; "
        "pass --overwrite to replace it")
    store.ingest("mnist", out, sources, chunk_rows=3000, overwrite=True)
    assert store.open_data(first.path, "test").images.chunks[0] == (3000,) * 3 + (1000,)
    assert leftovers(out) == ["mnist.zarr"]


def _bad_source(tmp_path, shared_datasets, mutate_images=None, mutate_labels=None):
    src = _one_split_source(tmp_path, shared_datasets)
    files = datasets.get_spec("mnist").files["test"]
    for kind, mutate in (("images", mutate_images), ("labels", mutate_labels)):
        if mutate is not None:
            path = src / files[kind].name
            mutate(path)
    return {"test": datasets.SplitSource("test", src / files["images"].name,
                                         src / files["labels"].name, "explicit")}


def _rewrite(fn):
    def mutate(path):
        write_gz(path, fn(raw_payload(path)))
    return mutate


def _flip_gz(path):
    data = path.read_bytes()
    path.write_bytes(data[:40] + bytes(b ^ 0xFF for b in data[40:80]) + data[80:])


BAD_INPUTS = {
    "corrupt gzip": (dict(mutate_images=_flip_gz), IDXFormatError, "{images}: corrupt gzip data"),
    "truncated idx": (dict(mutate_images=_rewrite(lambda b: b[:-100])), IDXFormatError,
                      "{images}: truncated payload: header (10000, 28, 28) needs 7840000 bytes, file holds 7839900"),
    "trailing bytes": (dict(mutate_labels=_rewrite(lambda b: b + b"\0")), IDXFormatError,
                       "{labels}: 1 trailing bytes after the payload of (10000,)"),
    "wrong magic": (dict(mutate_images=_rewrite(lambda b: b"\0\0\x08\x01" + b[4:])), IDXFormatError,
                    "{images}: wrong magic number 0x00000801: 1 dimensions, expected 3 for images (0x00000803)"),
    "wrong dimensions": (dict(mutate_images=_rewrite(lambda b: b[:8] + (27).to_bytes(4, "big") + b[12:])),
                         IDXFormatError, "{images}: wrong dimensions (10000, 27, 28): expected (n, 28, 28) images"),
    "count mismatch": (dict(mutate_labels=_rewrite(lambda b: b[:4] + (9999).to_bytes(4, "big") + b[8:-1])),
                       IDXFormatError, "{images} holds 10000 images but {labels} holds 9999 labels"),
    "checksum": (dict(mutate_labels=_rewrite(lambda b: b[:-1] + bytes([(b[-1] + 1) % 10]))), ChecksumError,
                 "{labels}: decompressed payload does not match the published t10k-labels-idx1-ubyte.gz"),
}


@pytest.mark.t10k
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_and_leaves_nothing(tmp_path, shared_datasets, case):
    mutate, exc_type, message = BAD_INPUTS[case]
    sources = _bad_source(tmp_path, shared_datasets, **mutate)
    out = tmp_path / "out"
    with pytest.raises(exc_type) as err:
        store.ingest("mnist", out, sources)
    src = sources["test"]
    assert str(err.value).startswith(message.format(images=src.images, labels=src.labels))
    assert leftovers(out) == []


def test_open_data_errors(tmp_path, mnist_store):
    with pytest.raises(StoreError, match=r"nope.zarr: data store not found"):
        store.open_data(tmp_path / "nope.zarr", "train")
    with pytest.raises(StoreError) as err:
        store.open_data(mnist_store, "validation")
    assert str(err.value) == f"{mnist_store}: split 'validation' not in the store (it holds ['train', 'test'])"


def _copy_store(src, tmp_path):
    dst = tmp_path / "copy.zarr"
    shutil.copytree(src, dst)
    return dst


def test_wrong_dtype_is_refused(tmp_path, mnist_store):
    bad = _copy_store(mnist_store, tmp_path)
    g = zarr.open_group(str(bad / "test"), mode="a")
    del g["labels"]
    g.create_array("labels", shape=(10000,), chunks=(10000,), dtype="int64")
    with pytest.raises(StoreError) as err:
        store.open_data(bad, "test")
    assert str(err.value) == f"{bad}/test/labels: dtype int64, expected uint8"


def test_missing_array_and_wrong_format_are_refused(tmp_path, mnist_store):
    bad = _copy_store(mnist_store, tmp_path)
    shutil.rmtree(bad / "test" / "images")
    with pytest.raises(StoreError) as err:
        store.open_data(bad, "test")
    assert str(err.value) == f"{bad}/test: missing array 'images'"
    zarr.open_group(str(bad), mode="a").attrs["format"] = "something-else"
    with pytest.raises(StoreError, match=r"not a data store: attribute 'format' is 'something-else'"):
        store.open_data(bad, "train")


def test_wrong_shape_is_refused(tmp_path, mnist_store):
    bad = _copy_store(mnist_store, tmp_path)
    g = zarr.open_group(str(bad / "test"), mode="a")
    del g["images"]
    g.create_array("images", shape=(10000, 783), chunks=(10000, 783), dtype="uint8")
    with pytest.raises(StoreError) as err:
        store.open_data(bad, "test")
    assert str(err.value) == f"{bad}/test/images: shape (10000, 783), expected (n, 784)"


def test_atomic_path_cleans_up_on_failure(tmp_path):
    final = tmp_path / "result.zarr"
    with pytest.raises(RuntimeError):
        with store.atomic_path(final, store.RESULT_FORMAT) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert leftovers(tmp_path) == []
    with store.atomic_path(final, store.RESULT_FORMAT) as tmp:
        (tmp / "done").write_text("x")
    with pytest.raises(StoreError, match=r"already exists \(a directory that is not a kmeans-dask "
                                         r"output\); pass --overwrite"):
        with store.atomic_path(final, store.RESULT_FORMAT):
            pass
    assert leftovers(tmp_path) == ["result.zarr"]


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_atomic_file_is_readable_as_the_umask_says(tmp_path, umask):
    path = tmp_path / "sub" / "a.txt"
    with store.atomic_file(path, suffix=".part") as tmp:
        assert tmp.parent == path.parent and not path.exists()
        tmp.write_text("new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    store.write_text(path, "newer")
    assert path.read_text() == "newer" and stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert leftovers(path.parent) == ["a.txt"]


def test_atomic_file_failure_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with store.atomic_file(path) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert path.read_text() == "old" and leftovers(tmp_path) == ["a.txt"]
    (tmp_path / "d" / "x").mkdir(parents=True)
    with pytest.raises(OSError):  # the rename itself fails
        with store.atomic_file(tmp_path / "d") as tmp:
            tmp.write_text("x")
    assert leftovers(tmp_path) == ["a.txt", "d"] and leftovers(tmp_path / "d") == ["x"]


def test_empty_split_is_refused(tmp_path, mnist_store):
    bad = _copy_store(mnist_store, tmp_path)
    g = zarr.open_group(str(bad / "test"), mode="a")
    del g["images"], g["labels"]
    g.create_array("images", shape=(0, 784), chunks=(10, 784), dtype="uint8")
    g.create_array("labels", shape=(0,), chunks=(10,), dtype="uint8")
    with pytest.raises(StoreError) as err:
        store.open_data(bad, "test")
    assert str(err.value) == f"{bad}/test: the split holds no rows"


@pytest.fixture
def result_store(tmp_path):
    import dask.array as da

    from kmeans_dask import KMeans, save

    X = np.random.default_rng(0).random((100, 4))
    km = KMeans(3, random_state=0).fit(da.from_array(X, chunks=30))
    return save(km, tmp_path / "r.zarr", data={"split": "x"}), km


def test_result_store_round_trip_and_schema_checks(result_store, mnist_store, tmp_path):
    from kmeans_dask import load

    path, km = result_store
    model = load(path)
    np.testing.assert_array_equal(model.cluster_centers_, km.cluster_centers_)
    np.testing.assert_array_equal(model.init_centers_, km.init_centers_)
    assert model.get_params() == km.get_params() and model.history_ == km.history_
    with pytest.raises(StoreError, match=r"not a result store: attribute 'format' is 'kmeans-dask/data'"):
        store.read_result(mnist_store)
    bad = tmp_path / "bad.zarr"
    shutil.copytree(path, bad)
    root = zarr.open_group(str(bad), mode="a")
    del root.attrs["history"]
    with pytest.raises(StoreError) as err:
        store.read_result(bad)
    assert str(err.value) == f"{bad}: attribute 'history' is missing"
    shutil.rmtree(bad)
    shutil.copytree(path, bad)
    root = zarr.open_group(str(bad), mode="a")
    del root["centroids"]
    root.create_array("centroids", shape=(2, 4), chunks=(2, 4), dtype="float64")
    with pytest.raises(StoreError) as err:
        load(bad)
    assert str(err.value) == f"{bad}/centroids: shape (2, 4), expected (3, 4)"


def test_checkpoint_round_trip_and_refusals(tmp_path):
    path = tmp_path / "r.zarr.checkpoint.json"
    centers = np.random.default_rng(0).random((3, 5))
    state = {"iteration": 2, "centers": centers, "init": centers * 2,
             "history": [{"iteration": i, "inertia": 9.0 - i, "center_shift": 0.5 / i}
                         for i in (1, 2)]}
    store.write_checkpoint(path, state, {"params": {"k": 3}, "data": {"split": "train"}})
    doc = store.read_checkpoint(path)
    assert np.array_equal(doc["centers"], centers) and np.array_equal(doc["init"], centers * 2)
    assert doc["iteration"] == 2 and leftovers(tmp_path) == [path.name]
    path.write_text("{not json")
    with pytest.raises(StoreError, match=r"unreadable checkpoint"):
        store.read_checkpoint(path)
    path.write_text('{"format": "something"}')
    with pytest.raises(StoreError, match=r"not a kmeans-dask checkpoint"):
        store.read_checkpoint(path)
    with pytest.raises(StoreError, match=r"no checkpoint to resume from"):
        store.read_checkpoint(tmp_path / "none.json")
