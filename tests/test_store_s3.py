"""Stores at fsspec URLs: memory:// in this process, s3:// on a real S3 API server (moto).

The commit of a store at a URL is one PUT of its root ``zarr.json`` (see
``store.atomic_zarr``): these tests check that nothing before it reads as a
store, that a replaced store stays readable until it, and that a failed or
killed write leaves nothing a reader would take for a store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import dask
import dask.array as da
import fsspec
import numpy as np
import pytest

from kmeans_dask import datasets, store
from kmeans_dask.errors import StoreError
from conftest import killed_after
from s3_server import make_bucket, s3_env, s3_server  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def t10k(test_sources):
    return {"test": datasets.resolve_split("fashion-mnist", "test", test_sources, download=False)}


@pytest.fixture
def bucket(s3_env, request):
    name = "kd-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid()}"
    return make_bucket(name[:63])


def _s3():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def _objects(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True)
    try:
        return sorted(fs.find(path))
    except FileNotFoundError:
        return []


def _labels(n: int, value: int, *, fail_at=None, hook=None, after=None):
    """A Dask array of ``n`` labels in 4 chunks; chunk ``fail_at`` raises (once the
    event ``after``, if given, is set), and ``hook`` runs inside every chunk's task
    (while the store is being written)."""
    step = -(-n // 4)

    def block(i, a, b):
        if hook is not None:
            hook()
        if i == fail_at:
            if after is not None:
                after.wait(10)
            raise RuntimeError(f"chunk {i} failed on purpose")
        return np.full(b - a, value, dtype=np.int32)

    parts = [da.from_delayed(dask.delayed(block)(i, a, min(a + step, n)), (min(a + step, n) - a,),
                             dtype=np.int32)
             for i, a in enumerate(range(0, n, step))]
    return da.concatenate(parts)


def _attrs(k=2, d=3):
    return {"params": {"n_clusters": k}, "inertia": 1.0, "n_iter": 1, "history": [],
            "data": {}, "scale": 1.0, "n_features": d}


def test_url_locations_are_path_like_and_keep_their_options_out_of_sight():
    store.set_storage_options({"s3": {"key": "AKIA-not-a-real-key", "secret": "s3cr3t"}})
    try:
        url = store.absolute("s3://bucket//prefix/name.zarr/")
    finally:
        store.set_storage_options(None)
    assert str(url) == "s3://bucket/prefix/name.zarr" and url.name == "name.zarr"
    assert url.parent == store.absolute("s3://bucket/prefix")
    assert store.checkpoint_path(url) == store.absolute("s3://bucket/prefix/name.zarr.checkpoint.json")
    assert url.options == {"key": "AKIA-not-a-real-key", "secret": "s3cr3t"}
    assert "s3cr3t" not in repr(url) + str(url) and "AKIA" not in repr(url)
    assert store.absolute("file:///tmp/x.zarr") == store.Path("/tmp/x.zarr")
    with pytest.raises(TypeError):
        os.fspath(url)  # never taken for a local path


def test_memory_store_round_trip_matches_the_local_store(t10k, tmp_path):
    local = store.ingest("fashion-mnist", tmp_path, t10k, chunk_rows=2500).path
    url = "memory://kd-round-trip"
    mem = store.ingest("fashion-mnist", url, t10k, chunk_rows=2500)
    assert str(mem.path) == f"{url}/fashion-mnist.zarr"
    a, b = store.open_data(local, "test"), store.open_data(mem.path, "test")
    assert a.fingerprint == b.fingerprint and a.attrs["chunk_crc32c"] == b.attrs["chunk_crc32c"]
    np.testing.assert_array_equal(a.images[:3000].compute(), b.images[:3000].compute())
    # A re-run finds it up to date; nothing is left of the staged payloads.
    assert store.ingest("fashion-mnist", url, t10k, chunk_rows=2500).skipped
    names = {p.split("/")[2] for p in fsspec.filesystem("memory").find("/kd-round-trip")}
    assert names == {"fashion-mnist.zarr"}


def test_s3_ingest_layout_is_one_generation_committed_last(s3_env, bucket, t10k):
    rep = store.ingest("fashion-mnist", f"{bucket}/data", t10k, chunk_rows=5000)
    objs = _objects(f"{bucket}/data")
    root = f"{bucket[5:]}/data/fashion-mnist.zarr"
    gens = {o[len(root) + 1:].split("/")[0] for o in objs} - {"zarr.json"}
    assert len(gens) == 1 and gens.pop().startswith(store.GENERATION_PREFIX)
    assert f"{root}/zarr.json" in objs
    assert not [o for o in objs if "staging" in o]
    assert store.output_kind(rep.path) == store.DATA_FORMAT
    assert store.list_splits(rep.path) == ["test"]
    assert store.open_data(rep.path, "test").labels.sum().compute() == 45000


def test_checkpoint_at_s3_round_trips(s3_env, bucket):
    ckpt = store.checkpoint_path(f"{bucket}/r.zarr")
    state = {"iteration": 2, "centers": np.arange(6.0).reshape(2, 3) / 7,
             "init": np.ones((2, 3)), "history": [{"iteration": i, "inertia": 1.0,
                                                   "center_shift": 0.5} for i in (1, 2)]}
    store.write_checkpoint(ckpt, state, {"params": {"k": 2}, "data": {"x": 1}})
    doc = store.read_checkpoint(ckpt)
    np.testing.assert_array_equal(doc["centers"], state["centers"])
    assert store.output_kind(ckpt) == store.CHECKPOINT_FORMAT
    store.remove(ckpt)
    with pytest.raises(StoreError, match="no checkpoint to resume from"):
        store.read_checkpoint(ckpt)


def test_failed_write_leaves_no_object_and_the_old_store_readable(s3_env, bucket, monkeypatch):
    url = f"{bucket}/res.zarr"
    with pytest.raises(RuntimeError, match="failed on purpose"):
        store.write_result(url, np.ones((2, 3), np.float32), _labels(100, 1, fail_at=2), _attrs())
    assert _objects(url) == []
    # A chunk still being written when another fails is waited for before the
    # clean-up (its object used to land after it).
    writing, store_chunk = threading.Event(), store._store_chunk

    def slow_first_chunk(start, *args):
        if start == 0:
            writing.set()
            time.sleep(1.0)
        return store_chunk(start, *args)

    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="failed on purpose"):
        patch.setattr(store, "_store_chunk", slow_first_chunk)
        store.write_result(url, np.ones((2, 3), np.float32),
                           _labels(100, 1, fail_at=2, after=writing), _attrs())
    time.sleep(1.5)
    assert writing.is_set() and _objects(url) == []
    store.write_result(url, np.ones((2, 3), np.float32), _labels(100, 1), _attrs())
    before = _objects(url)
    with pytest.raises(RuntimeError, match="failed on purpose"):
        store.write_result(url, np.zeros((2, 3), np.float32), _labels(100, 0, fail_at=3),
                           _attrs(), overwrite=True)
    assert _objects(url) == before
    old = store.read_result(url)
    assert old.centroids.max() == 1 and (old.labels.compute() == 1).all()


def test_replaced_store_stays_readable_until_the_new_one_is_committed(s3_env, bucket):
    url = f"{bucket}/res.zarr"
    store.write_result(url, np.ones((2, 3), np.float32), _labels(100, 1), _attrs())
    seen = []

    def read_old():  # runs while the new labels are being written
        r = store.read_result(url)
        seen.append((float(r.centroids.max()), int(r.labels.compute().max())))

    store.write_result(url, np.full((2, 3), 2, np.float32), _labels(100, 0, hook=read_old),
                       _attrs(), overwrite=True)
    assert seen and set(seen) == {(1.0, 1)}
    new = store.read_result(url)
    assert new.centroids.max() == 2 and (new.labels.compute() == 0).all()
    children = {o.split("/")[2] for o in _objects(url)}
    assert len(children) == 2 and "zarr.json" in children  # the old generation is gone


_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import dask, dask.array as da, numpy as np
    from kmeans_dask import store
    url, value = sys.argv[1], int(sys.argv[2])
    n, c = 4 * 500, 500

    def block(i):
        if i > 0:
            time.sleep(30)  # killed here, after the first chunk is written
        return np.full((c, store.N_FEATURES), value, np.uint8)

    images = da.concatenate([da.from_delayed(dask.delayed(block)(i), (c, store.N_FEATURES),
                                             dtype=np.uint8) for i in range(4)])
    labels = da.zeros(n, dtype=np.uint8, chunks=c)
    # Threads: chunk 0 is written while the others wait.
    with dask.config.set(scheduler="threads", num_workers=4):
        store.write_data(url, dataset="mnist", overwrite=True,
                         splits={"test": store.SplitData(images, labels, {})})
""")


def _kill_between_chunks(url: str, value: int, env) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, url, str(value)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0].decode()
            if any(o.endswith("/images/c/0/0") for o in _objects(url)):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the writer wrote no chunk in 60 s")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_writer_killed_between_chunks_never_reads_as_a_store(s3_env, bucket):
    env = {**os.environ}
    url = f"{bucket}/killed.zarr"
    _kill_between_chunks(url, 7, env)
    assert any(o.endswith("/images/c/0/0") for o in _objects(url))
    assert store.output_kind(url) == store.INCOMPLETE
    with pytest.raises(StoreError, match="incomplete data store: its root zarr.json, written "
                                         "last, is missing"):
        store.open_data(url, "test")
    with pytest.raises(StoreError, match=r"already exists \(an interrupted kmeans-dask write"):
        store.check_output(url, store.DATA_FORMAT)
    # Replacing a committed store: killed half-way, the old one still reads, whole.
    good = f"{bucket}/good.zarr"
    images = da.full((1000, store.N_FEATURES), 3, dtype=np.uint8, chunks=(500, -1))
    store.write_data(good, dataset="mnist", splits={
        "test": store.SplitData(images, da.zeros(1000, dtype=np.uint8, chunks=500), {})})
    fp = store.fingerprint(good)
    _kill_between_chunks(good, 9, env)
    assert store.fingerprint(good) == fp
    assert int(store.open_data(good, "test").images.max().compute()) == 3
    # The next complete write replaces it, and what the killed one left is removed.
    store.write_data(good, dataset="mnist", overwrite=True, splits={
        "test": store.SplitData(images + 1, da.zeros(1000, dtype=np.uint8, chunks=500), {})})
    assert int(store.open_data(good, "test").images.max().compute()) == 4
    assert len({o.split("/")[2] for o in _objects(good)}) == 2


_KILLED_INGEST = textwrap.dedent("""
    import sys, time
    from kmeans_dask import datasets, store
    url, source = sys.argv[1], sys.argv[2]

    def write_data(*args, **kwargs):
        print("staged", flush=True)
        time.sleep(60)  # killed here: the payload is uploaded, no chunk written yet

    store.write_data = write_data
    src = {"test": datasets.resolve_split("fashion-mnist", "test", source, download=False)}
    store.ingest("fashion-mnist", url, src, chunk_rows=5000)
""")


def test_an_ingest_killed_after_staging_leaves_what_the_next_ingest_removes(
        s3_env, bucket, test_sources):
    url = f"{bucket}/data"
    pid = killed_after(_KILLED_INGEST, url, test_sources, marker="staged", env={**os.environ})
    staged = [o for o in _objects(url) if ".staging-" in o]
    assert staged and all(f"-{pid}-" in o for o in staged), _objects(url)
    src = {"test": datasets.resolve_split("fashion-mnist", "test", test_sources, download=False)}
    rep = store.ingest("fashion-mnist", url, src, chunk_rows=5000)
    assert store.output_kind(rep.path) == store.DATA_FORMAT
    assert not [o for o in _objects(url) if ".staging-" in o], _objects(url)


def test_output_dir_at_s3_lists_its_files_in_the_manifest_written_last(s3_env, bucket):
    url = f"{bucket}/eval"
    with store.output_dir(url, store.EVALUATION_FORMAT) as tmp:
        (tmp / "metrics.json").write_text("{}")
        (tmp / "old.png").write_bytes(b"x")
    assert store.output_kind(url) == store.EVALUATION_FORMAT
    with store.output_dir(url, store.EVALUATION_FORMAT, overwrite=True) as tmp:
        (tmp / "metrics.json").write_text('{"a": 1}')
    objs = [o.rsplit("/", 1)[1] for o in _objects(url)]
    assert sorted(objs) == ["kmeans-dask.json", "metrics.json"]
    manifest = json.loads(store.read_text(f"{url}/kmeans-dask.json"))
    assert list(manifest["files"]) == ["metrics.json"]
    with pytest.raises(StoreError, match="refusing to overwrite"):
        store.check_output(url, store.SWEEP_FORMAT, overwrite=True)


def test_inputs_are_never_outputs_at_urls(s3_env, bucket):
    data = f"{bucket}/data/x.zarr"
    for out, what in ((data, "is"), (f"{bucket}/data", "contains"), (f"{data}/inner", "lies inside")):
        with pytest.raises(StoreError, match=f"it {what} the input"):
            store.check_output(out, store.RESULT_FORMAT, inputs=[data])


def test_missing_bucket_and_unknown_schemes_are_named(s3_env):
    with pytest.raises(StoreError, match=r"s3://kd-no-such-bucket/x.zarr: the bucket "
                                         r"'kd-no-such-bucket' does not exist"):
        store.open_data("s3://kd-no-such-bucket/x.zarr", "train")
    with pytest.raises(StoreError, match="the bucket 'kd-no-such-bucket' does not exist"):
        store.check_output("s3://kd-no-such-bucket/r.zarr", store.RESULT_FORMAT)
    with pytest.raises(StoreError, match=r"unknown URL scheme nosuch://"):
        store.open_data("nosuch://b/x.zarr", "train")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(StoreError, match=r"gs:// URLs need a package that is not installed "
                                             r".*pip install gcsfs"):
            store.open_data("gs://b/x.zarr", "train")
