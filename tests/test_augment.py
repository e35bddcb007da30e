"""jobs/augment.py and kmeans_dask/augment.py: elastic deformations of MNIST as Dask work.

Most tests use a small source store made from the bundled MNIST test images
(1,000 "train" rows, 500 test rows), so they need neither ../shared nor much
time; the accuracy test uses the full MNIST store of conftest.
"""

from __future__ import annotations

import hashlib

import dask.array as da
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, map_coordinates

from kmeans_dask import augment, datasets, store
from kmeans_dask.augment import Deformation
from kmeans_dask.errors import ConfigError, StoreError

from conftest import leftovers, run_job

N0 = 1000


@pytest.fixture(scope="module")
def bundled():
    """The bundled MNIST test images and labels (10,000 rows)."""
    spec = datasets.get_spec("mnist")
    src = datasets.BUNDLED_DIR / "mnist"
    files = spec.files["test"]
    images = datasets.read_idx(src / files["images"].name, "images").reshape(-1, 784)
    labels = datasets.read_idx(src / files["labels"].name, "labels")
    return images, labels


@pytest.fixture(scope="module")
def small_source(bundled, tmp_path_factory):
    """A data store of 1,000 train rows (chunks of 300) and 500 test rows (chunks of 200)."""
    images, labels = bundled
    path = tmp_path_factory.mktemp("augment-source") / "mnist-small.zarr"

    def split(lo, hi, rows):
        return store.SplitData(images=da.from_array(images[lo:hi], chunks=(rows, 784)),
                               labels=da.from_array(labels[lo:hi], chunks=rows),
                               attrs={"source": "bundled test rows", "payload_sha256": {}})

    store.write_data(path, dataset="mnist", splits={"train": split(0, N0, 300),
                                                    "test": split(9000, 9500, 200)})
    return path


def read_split(path, split="train"):
    data = store.open_data(path, split)
    return data.images.compute(), data.labels.compute(), data


# --------------------------------------------------------------------------- the deformation


@pytest.mark.parametrize("sigma", [2.0, 4.0, 6.5])
def test_smoothing_is_scipys_gaussian_filter(sigma):
    noise = augment._noise(augment._draws(7, 123, 6))
    got = augment.smooth(noise, sigma) * 2.0**-48
    want = gaussian_filter(noise / 2**16, sigma=(0, 0, sigma, sigma), mode="reflect")
    # Only the 16-bit fixed-point kernel differs.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())


def test_smoothing_is_exact_integer_arithmetic():
    """The float64 GEMMs give the exact integer result, so no BLAS blocking or summation
    order can change a bit."""
    noise = augment._noise(augment._draws(1, 0, 40))
    g = augment.smoothing_matrix(4.0).astype(np.int64)
    exact = g @ noise.astype(np.int64).reshape(-1, 28, 28) @ g.T
    assert np.abs(exact).max() < 2**53
    assert np.array_equal(augment.smooth(noise, 4.0).reshape(-1, 28, 28), exact.astype(np.float64))
    # ... and the same rows in another block give the same values.
    part = augment.smooth(np.ascontiguousarray(noise[13:17]), 4.0)
    assert np.array_equal(part, augment.smooth(noise, 4.0)[13:17])


def test_resampling_is_bilinear_map_coordinates(bundled):
    images = bundled[0][:20]
    deformation = Deformation(alpha=30.0, max_shift=2.0)
    d, t = augment.fields(5000, 20, 3, deformation)
    out = augment.deform(images, 5000, 3, deformation)
    rr, cc = np.mgrid[0:28, 0:28]
    for k in range(20):
        coords = [grid + d[k, axis].astype(np.float64) + t[k, axis]
                  for axis, grid in enumerate((rr, cc))]
        want = map_coordinates(images[k].reshape(28, 28).astype(np.float64), coords, order=1,
                               mode="constant", cval=0.0)
        diff = np.abs(np.clip(np.rint(want), 0, 255) - out[k].reshape(28, 28))
        # float32 against float64 coordinates: at most a rounding step, rarely.
        assert diff.max() <= 1 and (diff > 0).sum() <= 3


def test_field_strength_is_as_documented():
    d, t = augment.fields(0, 2000, 0, Deformation(alpha=20.0, sigma=4.0, max_shift=1.0))
    rms = float(np.sqrt((d.astype(np.float64) ** 2).mean()))
    assert 0.9 < rms < 1.1  # about 0.05 * alpha pixels
    assert np.abs(t).max() <= 1.0 and np.abs(t).max() > 0.99 and abs(float(t.mean())) < 0.05
    assert augment.fields(0, 5, 0, Deformation(alpha=0.0))[0].max() == 0


def test_deform_does_not_depend_on_blocks_or_neighbours(bundled):
    images = bundled[0][:700]
    p = Deformation()
    whole = augment.deform(images, 60_000, 11, p)
    for block in (1, 64, 512, 700):
        assert np.array_equal(augment.deform(images, 60_000, 11, p, block_rows=block), whole)
    assert np.array_equal(augment.deform(images[350:420], 60_350, 11, p), whole[350:420])
    assert not np.array_equal(augment.deform(images, 60_000, 12, p), whole)  # another seed


def test_no_deformation_is_the_identity_and_values_saturate(bundled):
    images = bundled[0][:50]
    same = augment.deform(images, 0, 0, Deformation(alpha=0.0, max_shift=0.0))
    assert np.array_equal(same, images)
    white = np.full((20, 784), 255, np.uint8)
    out = augment.deform(white, 0, 0, Deformation(alpha=60.0, max_shift=0.0)).reshape(20, 28, 28)
    # Inside, bright pixels stay at 255 (clipped, never wrapped to 0); outside is 0.
    assert (out[:, 10:18, 10:18] == 255).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": -1.0}, "alpha"), ({"alpha": float("nan")}, "alpha"), ({"sigma": 0.0}, "sigma"),
    ({"max_shift": 5.0}, "max_shift"), ({"alpha": "3"}, "alpha"), ({"alpha": True}, "alpha"),
])
def test_bad_deformation_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Deformation(**kwargs)


# --------------------------------------------------------------------------- the store


@pytest.fixture(scope="module")
def full_run(small_source, tmp_path_factory):
    """3,700 rows (1,000 originals, 2,700 deformations: 2.7 cycles), in chunks of 700, on a
    LocalCluster of 2 worker processes."""
    from distributed import Client, LocalCluster

    out = tmp_path_factory.mktemp("augment-full") / "a.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster, Client(cluster):
        seen = []
        report = augment.augment(small_source, out, 3700, seed=5, chunk_rows=700,
                                 progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (6 + 3, 6 + 3) and not report.skipped  # train and test chunks
    return out


def test_same_bytes_on_one_worker_and_other_chunkings(small_source, full_run, tmp_path):
    from distributed import Client, LocalCluster

    want = read_split(full_run)[:2]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster):
        for rows in (500, 1024, 3700):
            out = augment.augment(small_source, tmp_path / f"c{rows}.zarr", 3700, seed=5,
                                  chunk_rows=rows).path
            images, labels, data = read_split(out)
            assert data.images.chunks[0][0] == rows
            assert np.array_equal(images, want[0]) and np.array_equal(labels, want[1])


def test_graph_is_one_task_per_chunk(small_source, tmp_path):
    plan = augment.prepare(small_source, tmp_path / "g.zarr", 3700, chunk_rows=700)
    images, labels = augment.train_arrays(plan)
    assert images.chunks == ((700,) * 5 + (200,), (784,)) and labels.chunks == (images.chunks[0],)
    for arr in (images, labels):
        deps = arr.__dask_graph__().get_all_dependencies()
        # Six tasks, none depending on another: each builds its chunk from the source store.
        assert len(deps) == 6 and not any(deps.values())
    again = augment.train_arrays(augment.prepare(small_source, tmp_path / "g.zarr", 3700,
                                                 chunk_rows=700))
    assert again[0].name == images.name  # same arguments, same keys
    assert augment.train_arrays(augment.prepare(small_source, tmp_path / "g.zarr", 3700,
                                                chunk_rows=700, seed=1))[0].name != images.name


def test_a_chunk_regenerated_alone_equals_the_full_run(small_source, full_run):
    images, labels, _ = read_split(full_run)
    p = Deformation()
    # Originals only, across the originals' end, inside a cycle, across a cycle's end.
    for a, b in [(100, 400), (900, 1300), (1500, 1600), (2950, 3100), (0, 3700)]:
        got_images, got_labels = augment.make_chunk(str(small_source), N0, a, b, 5, p)
        assert np.array_equal(got_images, images[a:b]) and np.array_equal(got_labels, labels[a:b])


def test_one_deforming_task_per_chunk(small_source, tmp_path, monkeypatch):
    """Each chunk's images are computed once, though write_data hands images and labels
    over separately (a task shared by both would be fused into each and run twice)."""
    import dask

    calls = []
    real = augment.make_images
    monkeypatch.setattr(augment, "make_images", lambda *a: calls.append(a[2:4]) or real(*a))
    with dask.config.set(scheduler="synchronous"):
        augment.augment(small_source, tmp_path / "o.zarr", 2500, chunk_rows=1000)
    assert sorted(calls) == [(0, 1000), (1000, 2000), (2000, 2500)]


def test_rows_past_the_originals_are_new_images_with_their_sources_labels(small_source, full_run):
    images, labels, data = read_split(full_run)
    src_images, src_labels, _ = read_split(small_source)
    assert images.dtype == np.uint8 and labels.dtype == np.uint8
    assert np.array_equal(images[:N0], src_images) and np.array_equal(labels[:N0], src_labels)
    rows = np.arange(N0, 3700)
    source = augment.source_rows(rows, N0)
    assert np.array_equal(source[[0, 999, 1000, 2699]], [0, 999, 0, 699])
    assert np.array_equal(labels[N0:], src_labels[source])
    originals = {hashlib.sha1(r.tobytes()).digest() for r in src_images}
    sample = np.random.default_rng(0).choice(rows, 300, replace=False)
    assert not any(hashlib.sha1(images[i].tobytes()).digest() in originals for i in sample)
    # Deformed, yet close to their source (same ink, mostly the same place).
    diff = np.abs(images[sample].astype(int) - src_images[source[sample - N0]].astype(int))
    assert 5 < diff.mean() < 60
    ink = images[sample].sum(axis=1) / src_images[source[sample - N0]].sum(axis=1)
    assert 0.8 < np.median(ink) < 1.2
    assert images[N0:].max() == 255 and images[N0:].min() == 0


def test_test_split_and_attributes(small_source, full_run):
    test, src_test = store.open_data(full_run, "test"), store.open_data(small_source, "test")
    assert np.array_equal(test.images.compute(), src_test.images.compute())
    assert np.array_equal(test.labels.compute(), src_test.labels.compute())
    assert test.attrs["chunk_crc32c"] == src_test.attrs["chunk_crc32c"]
    assert test.attrs["source"] == src_test.attrs["source"]
    train = store.open_data(full_run, "train")
    assert len(train.attrs["chunk_crc32c"]["images"]) == 6  # one checksum per chunk
    assert train.attrs["originals"] == N0
    rec = train.store_attrs["augment"]
    assert rec["rows"] == 3700 and rec["seed"] == 5 and rec["originals"] == N0
    assert rec["chunk_rows"] == 700
    assert rec["deformation"]["alpha"] == Deformation().alpha
    assert rec["deformation"]["sigma"] == Deformation().sigma
    assert rec["source"]["path"] == str(store.absolute(small_source))
    src_train = store.open_data(small_source, "train")
    assert rec["source"]["splits"]["train"]["fingerprint"] == src_train.fingerprint
    assert rec["source"]["splits"]["test"]["chunk_crc32c"] == src_test.attrs["chunk_crc32c"]
    assert train.store_attrs["dataset"] == "mnist"
    assert train.class_names == list(datasets.get_spec("mnist").class_names)


def test_prepare_checks_everything_before_any_work(small_source, full_run, tmp_path):
    plan = augment.prepare(small_source, full_run, 3700, seed=5, chunk_rows=700)
    assert plan.up_to_date
    assert not augment.prepare(small_source, full_run, 3700, seed=5, chunk_rows=700,
                               overwrite=True).up_to_date
    with pytest.raises(StoreError, match=r"another augmentation \(rows, seed differ\)"):
        augment.prepare(small_source, full_run, 3800, seed=6, chunk_rows=700)
    with pytest.raises(ConfigError, match="at least 1000"):
        augment.prepare(small_source, tmp_path / "x.zarr", 999)
    for bad in (0, -5, 2.5):
        with pytest.raises(ConfigError, match="chunk-rows"):
            augment.prepare(small_source, tmp_path / "x.zarr", 2000, chunk_rows=bad)
    with pytest.raises(ConfigError, match="seed"):
        augment.prepare(small_source, tmp_path / "x.zarr", 2000, seed=-1)
    with pytest.raises(StoreError, match="not found"):
        augment.prepare(tmp_path / "nothing.zarr", tmp_path / "x.zarr", 2000)
    with pytest.raises(StoreError, match="input"):
        augment.prepare(small_source, small_source / "inside.zarr", 2000)
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- the job


def test_job_writes_reruns_as_a_no_op_and_overwrites(small_source, tmp_path, jobs):
    out = tmp_path / "out.zarr"
    args = ["--data", small_source, "--rows", 2500, "--out", out, "--chunk-rows", 600]
    one_worker = ["--cluster", _one_worker(tmp_path)]
    res = run_job("augment", *args, "--grid", tmp_path / "grid.png", *one_worker)
    assert res.returncode == 0, res.stderr
    assert f"wrote {out} (train: 2500 rows, test: 500 rows; 1500 deformed)" in res.stdout
    assert "dashboard http://127.0.0.1:" in res.stderr
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = store.open_data(out, "train").attrs["chunk_crc32c"]
    # The first run was a new process from scratch; the others are forked by ``jobs``.
    again = jobs.run("augment", *args)
    assert again.returncode == 0, again.stderr
    assert f"already up to date {out}" in again.stdout
    assert "scheduler" not in again.stderr  # nothing to do: no cluster started
    other = jobs.run("augment", *args, "--seed", 1)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1] == (
        f"error: {out} already exists and holds another augmentation (seed differ); pass "
        f"--overwrite to replace it")
    replaced = jobs.run("augment", *args, "--seed", 1, "--overwrite", *one_worker)
    assert replaced.returncode == 0, replaced.stderr
    assert store.open_data(out, "train").store_attrs["augment"]["seed"] == 1
    assert store.open_data(out, "train").attrs["chunk_crc32c"]["images"][0] == first["images"][0]
    assert store.open_data(out, "train").attrs["chunk_crc32c"] != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.yaml", "grid.png", "out.zarr"]


def _one_worker(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("mode: local\nlocal:\n  n_workers: 1\n  dashboard_address: 127.0.0.1:0\n")
    return path


@pytest.mark.parametrize("case", ["rows", "not-a-store", "labels-store", "exists", "inside"])
def test_job_errors_exit_2_before_any_cluster(case, small_source, tmp_path, jobs):
    """The job's own refusals (prepare's others are tested above, in-process)."""
    out = tmp_path / "out.zarr"
    data, rows = small_source, 2000
    if case == "rows":
        rows = 999
        want = f"--rows must be an integer of at least 1000, the train rows of {small_source}"
    elif case == "not-a-store":
        data = tmp_path / "plain.zarr"
        data.mkdir()
        (data / "zarr.json").write_text(
            '{"zarr_format": 3, "node_type": "group", "attributes": {}}')
        want = f"{data}: not a data store: attribute 'format' is None"
    elif case == "labels-store":
        data = tmp_path / "labels.zarr"
        store.write_labels(data, da.zeros(10, dtype=np.int32, chunks=5), {})
        want = f"{data}: not a data store: attribute 'format' is 'kmeans-dask/labels'"
    elif case == "exists":
        out.mkdir()
        (out / "x").write_text("x")
        want = f"{out} already exists (a directory that is not a kmeans-dask output)"
    else:
        out = small_source / "train" / "out.zarr"
        want = f"refusing to write {out}: it lies inside the input {small_source}"
    before = leftovers(tmp_path)
    res = jobs.run("augment", "--data", data, "--rows", rows, "--out", out)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {want}"), last
    assert "scheduler" not in res.stderr  # refused before a cluster was started
    assert leftovers(tmp_path) == before


# --------------------------------------------------------------------------- does it help?


def test_k10_on_a_3x_store_is_no_worse_than_on_the_originals(mnist_store, tmp_path):
    """The 180,000-row store (60,000 originals + 120,000 deformations) clusters the test
    images at least as well as the 60,000 originals, less 0.02."""
    from distributed import Client, LocalCluster

    from kmeans_dask import KMeans, metrics

    test = store.open_data(mnist_store, "test")
    test_labels = test.labels.compute()

    def test_accuracy(data):
        # tol 1e-3 rather than 1e-4: the same accuracies (0.5886 and 0.5935 against 0.5891
        # and 0.5935), in 54 instead of 86 iterations on the 180,000 rows.
        km = KMeans(n_clusters=10, random_state=0, tol=1e-3).fit(data.images)
        mapping = metrics.majority_mapping(data.labels.compute(), km.labels_.compute(), 10, 10)
        pred = km.predict(test.images).compute()
        return float((mapping[pred] == test_labels).mean())

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster, Client(cluster):
        out = augment.augment(mnist_store, tmp_path / "mnist3x.zarr", 180_000).path
        big = store.open_data(out, "train")
        assert big.images.shape == (180_000, 784)
        base = test_accuracy(store.open_data(mnist_store, "train"))
        grown = test_accuracy(big)
    print(f"test accuracy: 60,000 rows {base:.4f}, 180,000 rows {grown:.4f}")
    assert grown >= base - 0.02
