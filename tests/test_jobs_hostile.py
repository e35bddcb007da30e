"""Jobs run as a hostile user would: no data loss, no silent wrong answer, no traceback.

Each case runs a job script in a process of its own (forked by conftest's
``jobs`` server, which has imported the jobs' modules once) on real stores (the bundled
10,000-image test splits, in chunks of 2,000 rows) and checks the exact
``error:`` line, exit status 2, and that nothing the user had was changed or
left behind.  Cases whose checks must come before any cluster work run
without a scheduler and check that none was started; the others share one
scheduler on 127.0.0.1.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from kmeans_dask import datasets, store, workflows

from conftest import leftovers
from test_store_guards import damage_chunk, images_chunk, snapshot

CHUNK = 2000
STARTED = "scheduler tcp://"  # what a job prints once it has a cluster


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Both data sets' bundled test splits, and a K=10 fit of Fashion-MNIST's."""
    out = tmp_path_factory.mktemp("pristine")
    for name in datasets.DATASETS:
        src = {"test": datasets.resolve_split(name, "test", datasets.BUNDLED_DIR, download=False)}
        store.ingest(name, out / "data", src, chunk_rows=CHUNK)
    data = store.open_data(out / "data" / "fashion-mnist.zarr", "test")
    workflows.fit_store(data, out / "fashion-k10.zarr",
                        {"n_clusters": 10, "random_state": 0, "max_iter": 20}, with_report=False)
    return out


@pytest.fixture
def work(pristine, tmp_path):
    """A private copy of the pristine stores and result, with a file of the user's beside them."""
    shutil.copytree(pristine, tmp_path, dirs_exist_ok=True)
    (tmp_path / "notes.txt").write_text("the user's own notes")
    return tmp_path


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                      host="127.0.0.1", dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


def refused(res, expect: str):
    """Exit status 2 and ``expect`` as the last line, with no traceback."""
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last == expect or last.startswith(expect), res.stderr
    assert "Traceback" not in res.stderr, res.stderr


# --------------------------------------------------------------------------- data loss


@pytest.mark.parametrize("case", ["input as output", "folder holding the inputs", "a user's file",
                                  "model as predict output", "another kind", "inside the input"])
def test_overwrite_never_deletes_what_is_not_an_earlier_output(case, work, jobs):
    data = work / "data" / "fashion-mnist.zarr"
    result = work / "fashion-k10.zarr"
    fit = ["fit", "--data", data, "--split", "test", "--k", 10, "--overwrite"]
    job, expect = {
        "input as output": (fit + ["--out", data],
                            f"error: refusing to write {data}: it is the input {data} of this job"),
        "folder holding the inputs": (fit + ["--out", work / "data"],
                                      f"error: refusing to write {work}/data: it contains the "
                                      f"input {data} of this job"),
        "a user's file": (fit + ["--out", work / "notes.txt"],
                          f"error: refusing to overwrite {work}/notes.txt: it is a file, not a "
                          f"kmeans-dask/result output"),
        "model as predict output": (
            ["predict", "--result", result, "--data", data, "--out", result, "--overwrite"],
            f"error: refusing to write {result}: it is the input {result} of this job"),
        "another kind": (fit + ["--out", work / "data" / "mnist.zarr"],
                         f"error: refusing to overwrite {work}/data/mnist.zarr: it is a "
                         f"kmeans-dask/data output, not a kmeans-dask/result output"),
        "inside the input": (fit + ["--out", data / "test" / "r.zarr"],
                             f"error: refusing to write {data}/test/r.zarr: it lies inside the "
                             f"input {data} of this job"),
    }[case]
    before = snapshot(work)
    res = jobs.run(*job)
    refused(res, expect)
    assert STARTED not in res.stderr  # refused before any cluster started
    assert snapshot(work) == before


def test_evaluate_keeps_an_existing_output_unless_told(work, scheduler, jobs):
    result = work / "fashion-k10.zarr"
    out = work / "fashion-k10-eval-test"
    first = jobs.run("evaluate", "--result", result, "--scheduler", scheduler)
    assert first.returncode == 0, first.stderr
    before = snapshot(work)
    res = jobs.run("evaluate", "--result", result, "--scheduler", scheduler)
    refused(res, f"error: {out} already exists (a kmeans-dask/evaluation output); pass "
                 f"--overwrite to replace it")
    assert STARTED not in res.stderr and snapshot(work) == before
    res = jobs.run("evaluate", "--result", result, "--out", work / "data", "--overwrite")
    refused(res, f"error: refusing to overwrite {work}/data: it is a directory that is not a "
                 f"kmeans-dask output, not a kmeans-dask/evaluation output")
    assert snapshot(work) == before
    again = jobs.run("evaluate", "--result", result, "--overwrite", "--scheduler", scheduler)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "centroids.png", "confusion.png", "kmeans-dask.json", "members.png", "metrics.json"]


def test_sweep_refuses_a_folder_that_is_not_a_sweep(work, jobs):
    before = snapshot(work)
    res = jobs.run("sweep", "--data", work / "data" / "mnist.zarr", "--ks", "2,3",
                  "--out", work, "--overwrite")
    refused(res, f"error: refusing to write {work}: it contains the input "
                 f"{work}/data/mnist.zarr of this job")
    (work / "mine").mkdir()
    (work / "mine" / "x.csv").write_text("1,2")
    before = snapshot(work)
    res = jobs.run("sweep", "--data", work / "data" / "mnist.zarr", "--ks", "2,3",
                  "--out", work / "mine", "--overwrite")
    refused(res, f"error: refusing to overwrite {work}/mine: it is a directory that is not a "
                 f"kmeans-dask output, not a kmeans-dask/sweep output")
    assert snapshot(work) == before


def test_a_failed_refit_leaves_the_old_result_readable(work, scheduler, jobs):
    data = work / "data" / "fashion-mnist.zarr"
    result = work / "fashion-k10.zarr"
    images_chunk(data, 4).unlink()
    before = snapshot(result)
    res = jobs.run("fit", "--data", data, "--split", "test", "--k", 10, "--out", result,
                  "--overwrite", "--scheduler", scheduler)
    refused(res, f"error: {data}/test/images chunk 4 (rows 8000\u20139999): chunk missing")
    assert snapshot(result) == before
    assert leftovers(work) == ["data", "fashion-k10.zarr", "notes.txt"]


# --------------------------------------------------------------------------- silent wrong answers


@pytest.mark.parametrize("damage", ["deleted", "swapped", "random bytes"])
def test_fit_on_a_damaged_store_names_the_chunk(damage, work, scheduler, jobs):
    data = work / "data" / "mnist.zarr"
    why = damage_chunk(data, 3, damage, other=0)
    out = work / "out" / "r.zarr"
    res = jobs.run("fit", "--data", data, "--split", "test", "--k", 10, "--out", out,
                  "--scheduler", scheduler)
    if damage == "swapped":  # chunk 0 is read first by some pass
        assert res.returncode == 2 and "checksum mismatch" in res.stderr.strip().splitlines()[-1]
    else:
        refused(res, f"error: {data}/test/images chunk 3 (rows 6000\u20137999): {why}")
    assert len(res.stderr.strip().splitlines()[-1]) < 300
    assert leftovers(work / "out") == []


def test_ingest_does_not_call_a_damaged_store_up_to_date(work, scheduler, jobs):
    data = work / "data" / "mnist.zarr"
    images_chunk(data, 1).write_bytes(images_chunk(data, 2).read_bytes())
    args = ["ingest", "--dataset", "mnist", "--source", datasets.BUNDLED_DIR, "--out",
            work / "data", "--chunk-rows", CHUNK, "--no-download", "--scheduler", scheduler]
    res = jobs.run(*args)
    refused(res, f"error: {data}/test/images chunk 1 (rows 2000\u20133999): checksum mismatch")
    fixed = jobs.run(*args, "--overwrite")
    assert fixed.returncode == 0, fixed.stderr
    again = jobs.run(*args)
    assert again.returncode == 0 and "already up to date" in again.stdout, again.stderr


def test_a_result_is_not_evaluated_on_another_data_set(work, scheduler, pristine, jobs):
    result = work / "fashion-k10.zarr"
    mnist = work / "data" / "mnist.zarr"
    res = jobs.run("evaluate", "--result", result, "--data", mnist, "--scheduler", scheduler)
    refused(res, f"error: {result} was fitted on fashion-mnist "
                 f"({pristine}/data/fashion-mnist.zarr), "
                 f"but {mnist} holds mnist; pass --allow-other-data to apply it anyway")
    res = jobs.run("predict", "--result", result, "--data", mnist, "--out", work / "l.zarr")
    refused(res, f"error: {result} was fitted on fashion-mnist")
    assert STARTED not in res.stderr
    ok = jobs.run("evaluate", "--result", result, "--data", mnist, "--allow-other-data",
                 "--out", work / "other", "--scheduler", scheduler)
    assert ok.returncode == 0, ok.stderr


def test_a_result_is_not_evaluated_on_other_rows_of_the_same_data_set(work, scheduler, pristine,
                                                                      jobs):
    """Another store of the same data set whose fitted split differs (here: re-ingested
    with other chunks, so its fingerprint differs) cannot be used to map clusters."""
    result = work / "fashion-k10.zarr"
    other = work / "other"
    src = {"test": datasets.resolve_split("fashion-mnist", "test", datasets.BUNDLED_DIR,
                                          download=False)}
    path = store.ingest("fashion-mnist", other, src, chunk_rows=5000).path
    res = jobs.run("evaluate", "--result", result, "--data", path, "--scheduler", scheduler)
    refused(res, f"error: {path}/test is not the split {result} was fitted on (its contents differ")


@pytest.mark.parametrize("what,key,value,expect", [
    ("result", "params", [1, 2], "attribute 'params' is [1, 2]; expected a mapping"),
    ("result", "history", 5, "attribute 'history' is 5; expected a list of per-iteration"),
    ("result", "scale", -1.0, "attribute 'scale' is -1.0; expected a finite number > 0"),
    ("centroids", None, np.nan, "centroids: centre(s) [0] hold NaN or infinite values"),
    ("data", "class_names", 5, "attribute 'class_names' is 5; expected a list of 1 to 256 strings"),
])
def test_hostile_stores_are_refused_before_any_work(what, key, value, expect, work, jobs):
    result = work / "fashion-k10.zarr"
    data = work / "data" / "fashion-mnist.zarr"
    if what == "result":
        zarr.open_group(str(result), mode="a").attrs[key] = value
    elif what == "data":
        zarr.open_group(str(data), mode="a").attrs[key] = value
    else:
        cent = zarr.open_array(str(result / "centroids"), mode="a")
        c = cent[...]
        c[0, 0] = value
        cent[...] = c
    where = data if what == "data" else result
    for job in (["evaluate", "--result", result, "--data", data],
                ["predict", "--result", result, "--data", data, "--out", work / "l.zarr"]):
        res = jobs.run(*job)
        refused(res, f"error: {where}")
        assert expect in res.stderr.strip().splitlines()[-1], res.stderr
        assert STARTED not in res.stderr
    assert leftovers(work) == ["data", "fashion-k10.zarr", "notes.txt"]


# --------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize("job,args,expect", [
    ("fit", ["--max-iter", 0], "error: The 'max_iter' parameter of KMeans must be an int >= 1; got 0"),
    ("fit", ["--tol", -1], "error: The 'tol' parameter of KMeans must be a float >= 0; got -1.0"),
    ("fit", ["--out", "."], "error: refusing to write {work}: it contains the input"),
    ("sweep", ["--ks", "0,3"], "error: --ks must be positive integers, got [0]"),
    ("sweep", ["--ks", "3,x"], "error: --ks must be comma-separated integers, got '3,x'"),
    ("fit", ["--cluster", "memory_limit: '-5'"], "error: {cfg}: local.memory_limit: expected "
                                                  "'auto', a number of bytes > 0"),
    ("fit", ["--cluster", "dashboard_address: nope"], "error: {cfg}: local.dashboard_address: "
                                                       "expected HOST:PORT or :PORT"),
    ("fit", ["--cluster", "remote.timeout: -5"], "error: {cfg}: remote.timeout: expected a "
                                                  "number of seconds > 0, got -5"),
])
def test_bad_parameters_are_refused_before_a_cluster_starts(job, args, expect, work, jobs):
    data = work / "data" / "mnist.zarr"
    base = {"fit": ["--data", data, "--split", "test", "--k", 10, "--out", work / "r.zarr"],
            "sweep": ["--data", data, "--out", work / "sweep"]}[job]
    cfg = work / "cluster.yaml"
    if args[0] == "--cluster":
        key, value = args[1].split(": ")
        if key.startswith("remote."):
            cfg.write_text(f"mode: remote\nremote:\n  address: tcp://127.0.0.1:1\n"
                           f"  timeout: {value}\n")
        else:
            cfg.write_text(f"local:\n  {key}: {value}\n")
        args = ["--cluster", cfg]
    flags = dict(zip(base[::2], base[1::2]))
    flags.update(dict(zip(args[::2], args[1::2])))
    before = snapshot(work)
    res = jobs.run(job, *[v for kv in flags.items() for v in kv], cwd=work)
    refused(res, expect.format(work=work, cfg=cfg))
    assert STARTED not in res.stderr
    assert snapshot(work) == before


def test_fewer_distinct_rows_than_k_warns_once_and_stops():
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from kmeans_dask import KMeans

    X = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]), 4, axis=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        km = KMeans(10, random_state=0).fit(X)
    msgs = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert msgs == ["Number of distinct clusters (3) found smaller than n_clusters (10). "
                    "Possibly due to duplicate points in X."]
    assert km.n_iter_ < 5 and km.inertia_ == 0.0
    assert len(np.unique(km.cluster_centers_, axis=0)) >= 3
    exact = KMeans(12, random_state=0).fit(np.random.default_rng(0).random((12, 3)))
    assert exact.inertia_ >= 0.0


def test_non_finite_rows_are_refused_by_every_method():
    from kmeans_dask import KMeans

    X = np.random.default_rng(0).random((40, 3))
    km = KMeans(3, random_state=0).fit(X)
    bad = X.copy()
    bad[7, 1] = np.nan
    for method in (km.predict, km.transform, km.score, KMeans(3).fit):
        with pytest.raises(ValueError, match="Input X contains NaN"):
            method(bad)
