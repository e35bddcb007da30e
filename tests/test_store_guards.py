"""The store's guards, without a cluster: overwrite by kind, inputs, verified chunks, schemas.

Every case damages or misuses a real store (the bundled MNIST test split, in
chunks of 2,000 rows) and checks the exact message and that nothing the user
had was changed or left behind.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from kmeans_dask import datasets, store
from kmeans_dask.errors import StoreError

from conftest import killed_after, leftovers

CHUNK = 2000


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """MNIST's 10,000 test images (bundled with the package) in 5 chunks."""
    out = tmp_path_factory.mktemp("pristine")
    src = {"test": datasets.resolve_split("mnist", "test", datasets.BUNDLED_DIR, download=False)}
    return store.ingest("mnist", out, src, chunk_rows=CHUNK).path


@pytest.fixture
def data_store(pristine, tmp_path):
    """A private copy of the pristine store, to damage."""
    dest = tmp_path / "data" / "mnist.zarr"
    shutil.copytree(pristine, dest)
    return dest


def snapshot(path):
    """Every file under ``path`` with its bytes: to show nothing was changed."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def images_chunk(store_path, i):
    return store_path / "test" / "images" / "c" / str(i) / "0"


def damage_chunk(store_path, i: int, how: str, other: int = 1) -> str:
    """Damage chunk ``i`` of the test images as a disk or a user might; returns the
    reason the read must give."""
    target = images_chunk(store_path, i)
    if how == "deleted":
        target.unlink()
        return "chunk missing (it would read as zeros)"
    if how == "swapped":
        twin = images_chunk(store_path, other)
        a, b = target.read_bytes(), twin.read_bytes()
        target.write_bytes(b)
        twin.write_bytes(a)
        return "checksum mismatch"
    target.write_bytes(np.random.default_rng(0).bytes(5000))
    return "unreadable (RuntimeError"


# --------------------------------------------------------------------------- verified reads


def test_every_chunk_has_a_checksum_and_reads_back(data_store):
    data = store.open_data(data_store, "test")
    sums = data.attrs["chunk_crc32c"]
    assert len(sums["images"]) == len(sums["labels"]) == 5
    block = data.images[:CHUNK].compute()
    assert store.crc32c(block) == sums["images"][0]
    rows = store.read_rows(data_store, "test", "images", 1990, 2010)
    np.testing.assert_array_equal(rows, data.images[1990:2010].compute())


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_chunks_read_straight_from_their_files_equal_zarrs_read(tmp_path, pristine, codec,
                                                                 monkeypatch):
    """LZ4 stores' chunks are decoded straight from their files (the last, shorter
    one too); other codecs are read by zarr; the bytes are the same either way."""
    import dask

    src = {"test": datasets.resolve_split("mnist", "test", datasets.BUNDLED_DIR, download=False)}
    with dask.config.set({"kmeans_dask.store-codec": codec}):
        path = store.ingest("mnist", tmp_path / codec, src, chunk_rows=3000).path
    want = zarr.open_array(pristine / "test" / "images", mode="r")[:]
    arr = zarr.open_array(path / "test" / "images", mode="r")
    straight = [store._local_blosc_chunk(arr, i, min(3000, 10000 - 3000 * i)) for i in range(4)]
    if codec == "zstd":
        assert straight == [None] * 4
    else:
        assert [len(b) for b in straight] == [3000, 3000, 3000, 1000]
        np.testing.assert_array_equal(np.concatenate(straight), want)
    calls = []
    monkeypatch.setattr(zarr.Array, "__getitem__",
                        lambda self, key, get=zarr.Array.__getitem__: calls.append(key)
                        or get(self, key))
    np.testing.assert_array_equal(store.open_data(path, "test").images.compute(), want)
    assert bool(calls) == (codec == "zstd")


@pytest.mark.parametrize("damage", ["deleted", "swapped", "random bytes"])
def test_damaged_chunk_is_an_error_naming_store_array_and_rows(data_store, damage):
    why = damage_chunk(data_store, 3, damage)
    data = store.open_data(data_store, "test")
    where = f"{data_store}/test/images chunk 3 (rows 6000\u20137999): {why}"
    with pytest.raises(StoreError) as err:
        data.images[6000:6001].compute()
    assert str(err.value).startswith(where)
    with pytest.raises(StoreError) as err:
        store.read_rows(data_store, "test", "images", 5990, 6010)
    assert str(err.value).startswith(where)
    with pytest.raises(StoreError) as err:
        store.verify_data(data_store)
    assert f"{data_store}/test/images chunk " in str(err.value)


def test_a_damaged_store_is_not_up_to_date(data_store):
    images_chunk(data_store, 2).unlink()
    src = {"test": datasets.resolve_split("mnist", "test", datasets.BUNDLED_DIR, download=False)}
    with pytest.raises(StoreError, match=r"chunk 2 \(rows 4000\u20135999\): chunk missing"):
        store.ingest("mnist", data_store.parent, src, chunk_rows=CHUNK)
    report = store.ingest("mnist", data_store.parent, src, chunk_rows=CHUNK, overwrite=True)
    assert not report.skipped
    store.verify_data(data_store)
    assert store.ingest("mnist", data_store.parent, src, chunk_rows=CHUNK).skipped


def test_chunk_rows_larger_than_the_rows_makes_one_chunk(tmp_path):
    src = {"test": datasets.resolve_split("mnist", "test", datasets.BUNDLED_DIR, download=False)}
    path = store.ingest("mnist", tmp_path, src, chunk_rows=10**9).path
    data = store.open_data(path, "test")
    assert data.images.chunks[0] == (10000,)
    assert data.store_attrs["chunk_rows"] == 10**9


def test_stores_of_the_older_schema_are_refused_with_a_hint(data_store):
    zarr.open_group(str(data_store), mode="a").attrs["schema_version"] = 1
    with pytest.raises(StoreError, match=r"schema_version 1, expected 2; it was written by an "
                                         r"older kmeans-dask without chunk checksums"):
        store.open_data(data_store, "test")


@pytest.mark.parametrize("where,key,value,expect", [
    ("root", "class_names", 5, "attribute 'class_names' is 5; expected a list of 1 to 256 strings"),
    ("root", "image_shape", [10, 10], "attribute 'image_shape' is [10, 10]; expected [28, 28]"),
    ("split", "chunk_crc32c", "x", "attribute 'chunk_crc32c' is 'x'; expected"),
    ("split", "n_rows", "many", "attribute 'n_rows' is 'many'; expected a non-negative integer"),
    ("split", "n_rows", 9999, "attribute 'n_rows' is 9999, but images holds 10000 rows"),
])
def test_data_store_attributes_are_schema_checked(data_store, where, key, value, expect):
    group = zarr.open_group(str(data_store if where == "root" else data_store / "test"), mode="a")
    group.attrs[key] = value
    with pytest.raises(StoreError) as err:
        store.open_data(data_store, "test")
    assert expect in str(err.value) and str(data_store) in str(err.value)


# --------------------------------------------------------------------------- output guards


def test_output_kinds(data_store, tmp_path):
    assert store.output_kind(tmp_path / "none") is None
    assert store.output_kind(data_store) == store.DATA_FORMAT
    (tmp_path / "notes.txt").write_text("mine")
    assert store.output_kind(tmp_path / "notes.txt") == "a file"
    (tmp_path / "empty").mkdir()
    assert store.output_kind(tmp_path / "empty") == "an empty directory"
    assert store.output_kind(data_store.parent) == "a directory that is not a kmeans-dask output"


@pytest.mark.parametrize("case", ["the input", "holds the input", "inside the input",
                                  "a file", "another kind", "a plain directory", "no overwrite"])
def test_check_output_refuses_and_changes_nothing(case, data_store, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    path, kind, expect = {
        "the input": (data_store, store.RESULT_FORMAT,
                      f"refusing to write {data_store}: it is the input {data_store} of this job"),
        "holds the input": (data_store.parent, store.RESULT_FORMAT,
                            f"refusing to write {data_store.parent}: it contains the input "
                            f"{data_store} of this job"),
        "inside the input": (data_store / "test" / "r.zarr", store.RESULT_FORMAT,
                             f"refusing to write {data_store}/test/r.zarr: it lies inside the "
                             f"input {data_store} of this job"),
        "a file": (tmp_path / "notes.txt", store.RESULT_FORMAT,
                   f"refusing to overwrite {tmp_path}/notes.txt: it is a file, not a "
                   f"kmeans-dask/result output"),
        "another kind": (data_store, store.LABELS_FORMAT, None),
        "a plain directory": (tmp_path / "mine", store.EVALUATION_FORMAT,
                              f"refusing to overwrite {tmp_path}/mine: it is a directory that is "
                              f"not a kmeans-dask output, not a kmeans-dask/evaluation output"),
        "no overwrite": (tmp_path / "notes.txt", store.RESULT_FORMAT,
                         f"{tmp_path}/notes.txt already exists (a file); pass --overwrite to "
                         f"replace it"),
    }[case]
    inputs = [data_store] if case != "another kind" else []
    if case == "another kind":
        expect = (f"refusing to overwrite {data_store}: it is a kmeans-dask/data output, not a "
                  f"kmeans-dask/labels output")
    before = snapshot(tmp_path)
    with pytest.raises(StoreError) as err:
        with store.atomic_path(path, kind, overwrite=case != "no overwrite", inputs=inputs):
            raise AssertionError("must not be reached")
    assert str(err.value).startswith(expect), str(err.value)
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_the_same_kind_only_when_the_new_one_is_complete(tmp_path):
    final = tmp_path / "eval"
    with store.output_dir(final, store.EVALUATION_FORMAT) as tmp:
        (tmp / "metrics.json").write_text("old")
    assert json.loads((final / store.MANIFEST).read_text())["format"] == store.EVALUATION_FORMAT
    with pytest.raises(RuntimeError):
        with store.output_dir(final, store.EVALUATION_FORMAT, overwrite=True) as tmp:
            (tmp / "metrics.json").write_text("new, half")
            assert (final / "metrics.json").read_text() == "old"  # still readable meanwhile
            raise RuntimeError("the job died")
    assert (final / "metrics.json").read_text() == "old"
    assert leftovers(tmp_path) == ["eval"]
    with store.output_dir(final, store.EVALUATION_FORMAT, overwrite=True) as tmp:
        (tmp / "metrics.json").write_text("new")
    assert (final / "metrics.json").read_text() == "new"
    assert leftovers(tmp_path) == ["eval"]


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from kmeans_dask import store
final = Path(sys.argv[1])
with store.atomic_path(final, store.EVALUATION_FORMAT, overwrite=True) as tmp:
    (tmp / "metrics.json").write_text("half")
    with store.atomic_file(final.parent / "notes.json") as part:
        part.write_text("half")
        print("ready", flush=True)
        time.sleep(60)
"""


def _killed_writer(final):
    """A real process killed while it holds a temporary directory and a temporary
    file beside its outputs; returns its pid."""
    return killed_after(_KILLED_WRITER, final, marker="ready")


def test_a_killed_writers_temporaries_go_with_the_next_write_of_that_output(tmp_path):
    final = tmp_path / "eval"
    with store.output_dir(final, store.EVALUATION_FORMAT) as tmp:
        (tmp / "metrics.json").write_text("old")
    pid = _killed_writer(final)
    left = [n for n in leftovers(tmp_path) if n not in ("eval",)]
    assert len(left) == 2 and all(f"-{pid}-" in n for n in left), left
    # A live writer's temporaries (this process's) are never touched.
    mine = tmp_path / (store.temp_prefix(final, "tmp") + "live")
    mine.mkdir()
    with store.output_dir(final, store.EVALUATION_FORMAT, overwrite=True) as tmp:
        (tmp / "metrics.json").write_text("new")
    assert (final / "metrics.json").read_text() == "new"
    with store.atomic_file(tmp_path / "notes.json") as part:
        part.write_text("whole")
    assert leftovers(tmp_path) == sorted(["eval", "notes.json", mine.name])


def test_a_replace_interrupted_between_its_renames_gets_the_old_output_back(tmp_path):
    final = tmp_path / "eval"
    with store.output_dir(final, store.EVALUATION_FORMAT) as tmp:
        (tmp / "metrics.json").write_text("old")
    pid = _killed_writer(tmp_path / "other")  # a pid that is no longer running
    # What _replace leaves when killed after moving the old output aside.
    aside = tmp_path / f".eval.old-{store._HOST}-{pid}-abc123"
    aside.mkdir()
    final.rename(aside / "x")
    assert store.output_kind(final) is None
    # The next writer of that output finds it moved back before it decides anything.
    with pytest.raises(StoreError, match="already exists"):
        store.check_output(final, store.EVALUATION_FORMAT)
    assert store.output_kind(final) == store.EVALUATION_FORMAT
    assert (final / "metrics.json").read_text() == "old"
    assert not aside.exists()


# --------------------------------------------------------------------------- result stores


@pytest.fixture
def result_store(tmp_path):
    import dask.array as da

    from kmeans_dask import KMeans, save

    X = np.random.default_rng(0).random((100, 4))
    km = KMeans(3, random_state=0).fit(da.from_array(X, chunks=30))
    return save(km, tmp_path / "r.zarr", data={"split": "x"})


@pytest.mark.parametrize("key,value,expect", [
    ("params", [1, 2], "attribute 'params' is [1, 2]; expected a mapping with an integer n_clusters"),
    ("history", 5, "attribute 'history' is 5; expected a list of per-iteration records"),
    ("scale", -1.0, "attribute 'scale' is -1.0; expected a finite number > 0"),
    ("scale", "nan", "attribute 'scale' is 'nan'; expected a finite number > 0"),
    ("inertia", -3.0, "attribute 'inertia' is -3.0; expected a finite number >= 0"),
    ("n_iter", "7", "attribute 'n_iter' is '7'; expected a non-negative integer"),
])
def test_result_attributes_are_schema_checked(result_store, key, value, expect):
    zarr.open_group(str(result_store), mode="a").attrs[key] = value
    with pytest.raises(StoreError) as err:
        store.read_result(result_store)
    assert str(err.value) == f"{result_store}: {expect}" or str(err.value).startswith(
        f"{result_store}: {expect}")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_centroids_are_refused(result_store, value):
    cent = zarr.open_array(str(result_store / "centroids"), mode="a")
    c = cent[...]
    c[1, 2] = value
    cent[...] = c
    with pytest.raises(StoreError) as err:
        store.read_result(result_store)
    assert str(err.value) == f"{result_store}/centroids: centre(s) [1] hold NaN or infinite values"


def test_labels_are_checked_where_read(result_store):
    chunk = result_store / "labels" / "c" / "1"
    chunk.unlink()
    result = store.read_result(result_store)
    with pytest.raises(StoreError, match=r"labels chunk 1 \(rows 30\u201359\): chunk missing"):
        result.labels.compute()


@pytest.mark.parametrize("key,value,expect", [
    ("history", 5, "attribute 'history' is 5; expected a list of per-iteration records "
                    "(iteration, inertia, center_shift)"),
    ("iteration", "2", "attribute 'iteration' is '2'; expected an integer >= 1"),
    ("shape", [3], "attribute 'shape' is [3]; expected [n_clusters, n_features]"),
])
def test_checkpoints_are_schema_checked(tmp_path, key, value, expect):
    path = tmp_path / "r.zarr.checkpoint.json"
    centers = np.zeros((3, 5))
    history = [{"iteration": i, "inertia": 1.0, "center_shift": 0.1} for i in (1, 2)]
    store.write_checkpoint(path, {"iteration": 2, "centers": centers, "init": centers,
                                  "history": history}, {"params": {}, "data": {}})
    doc = json.loads(path.read_text())
    doc[key] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreError) as err:
        store.read_checkpoint(path)
    assert str(err.value) == f"{path}: {expect}"


def test_an_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError) as err:
        store.check_output(tmp_path / "notes.txt" / "r.zarr", store.RESULT_FORMAT)
    assert str(err.value) == (f"cannot write {tmp_path}/notes.txt/r.zarr: {tmp_path}/notes.txt "
                              f"is a file, not a directory")
    assert (tmp_path / "notes.txt").read_text() == "mine"
