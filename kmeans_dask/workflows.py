"""The steps the jobs run, as functions over stores: fit, predict, evaluate, sweep, blobs.

Job scripts parse arguments, open a cluster and call these; the demo calls
several of them on one cluster.  Each function writes its outputs under
temporary names and renames them when complete, and checks its inputs before
it starts any work.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from . import metrics, plots, store
from .cluster import active_client
from .errors import StoreError
from .kmeans import KMeans, from_result, load, save

log = logging.getLogger(__name__)


def write_text_atomic(path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_output(path, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite`` (checked before any work starts)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"{path} already exists; pass --overwrite to replace it")
    return path


def report_path(result_path) -> Path:
    """Where the Dask performance report of a fit goes: next to the result."""
    result_path = Path(result_path)
    return result_path.with_name(result_path.name.removesuffix(".zarr") + "-report.html")


@contextlib.contextmanager
def performance_report(path):
    """Dask's HTML performance report, kept only if the block succeeds."""
    from distributed import performance_report as _report

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".html", dir=path.parent)
    os.close(fd)
    try:
        with _report(filename=tmp):
            yield path
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------- fit


def open_fit_input(data_path, split: str, n_clusters: int) -> store.DataSplit:
    """Open the rows to fit and check K against them, before any cluster work."""
    data = store.open_data(data_path, split)
    n = data.images.shape[0]
    if not isinstance(n_clusters, int) or n_clusters < 1:
        raise StoreError(f"--k must be a positive integer, got {n_clusters!r}")
    if n_clusters > n:
        raise StoreError(f"--k {n_clusters} is larger than the {n} rows of {data_path}/{split}")
    return data


def data_record(data: store.DataSplit) -> dict:
    return {
        "store": str(Path(data.path).resolve()),
        "split": data.split,
        "dataset": data.store_attrs.get("dataset"),
        "n_rows": int(data.images.shape[0]),
        "payload_sha256": data.attrs.get("payload_sha256"),
        "class_names": data.class_names,
    }


def _same_run(doc: dict, record: dict, path: Path) -> None:
    for key in ("params", "data"):
        if doc[key] != record[key]:
            diff = sorted(k for k in set(doc[key]) | set(record[key])
                          if doc[key].get(k) != record[key].get(k))
            raise StoreError(f"{path}: the checkpoint belongs to another run ({key} differ in "
                             f"{diff}); rerun without --resume, or with the same arguments")


def _client_status() -> str | None:
    client = active_client()
    return None if client is None else client.status


def _scheduler_address() -> str | None:
    client = active_client()
    try:
        return client.scheduler.address
    except AttributeError:  # no client, or one without a scheduler connection
        return None


def fit_store(data: store.DataSplit, out, params: dict, *, overwrite=False, callback=None,
              with_report=True, resume=False) -> tuple[KMeans, Path]:
    """Fit K-Means on a data split and write the result store (and its performance report).

    Lloyd fits with ``n_init=1`` write a checkpoint after every iteration
    (:func:`kmeans_dask.store.checkpoint_path`), removed once the result is
    complete; ``resume=True`` continues from it and ends with the centres an
    uninterrupted fit would have.

    Returns the fitted model and the result path.

    Raises
    ------
    ClusterError
        The scheduler was lost; the message says where the last checkpoint is.
    """
    from concurrent.futures import CancelledError

    from .errors import ClusterError

    out = Path(out)
    ckpt = store.checkpoint_path(out)
    record = {"params": dict(sorted(params.items())), "data": data_record(data)}
    state = None
    if resume:
        if out.exists():
            raise StoreError(f"{out} is already complete; there is nothing to resume")
        doc = store.read_checkpoint(ckpt)
        _same_run(doc, record, ckpt)
        state = {"centers": doc["centers"], "init": doc["init"], "history": doc["history"]}
        _remove_stale_temporaries(out)
    else:
        check_output(out, overwrite)
    model = KMeans(**params)
    checkpoint = None
    if model.algorithm == "lloyd" and model.n_init == 1:
        def checkpoint(st):
            store.write_checkpoint(ckpt, st, record)
    address = _scheduler_address()
    start = time.perf_counter()
    ctx = performance_report(report_path(out)) if with_report else contextlib.nullcontext()
    try:
        with ctx:
            model.fit(data.images, callback=callback, checkpoint=checkpoint, resume=state)
            elapsed = time.perf_counter() - start
            save(model, out, data=data_record(data), overwrite=overwrite,
                 extra={"elapsed_s": elapsed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "resumed_from": len(state["history"]) if state else None})
    except (CancelledError, OSError) as exc:
        if address is None or _client_status() == "running":
            raise
        where = (f"the last checkpoint is {ckpt} (iteration {store.read_checkpoint(ckpt)['iteration']}); "
                 f"rerun with --resume once a scheduler is back" if ckpt.exists()
                 else "no checkpoint was written")
        raise ClusterError(f"lost the scheduler at {address} ({type(exc).__name__}); {where}") from exc
    ckpt.unlink(missing_ok=True)
    log.info("fit K=%d on %s/%s: inertia %.6g, %d iterations, %.1f s", model.n_clusters,
             data.path, data.split, model.inertia_, model.n_iter_, elapsed)
    return model, out


def _remove_stale_temporaries(out: Path) -> None:
    """Temporaries of an earlier run of the same output that was killed before its cleanup."""
    import shutil

    report = report_path(out)
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*", f".{report.name}.*.html",
                    f".{store.checkpoint_path(out).name}.*"):
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


# --------------------------------------------------------------------------- predict


def predict_store(result_path, data_path, split: str, out, *, overwrite=False) -> Path:
    """Label every row of ``data_path``/``split`` with a fitted result; write LABELS.zarr."""
    model = load(result_path)
    data = store.open_data(data_path, split)
    check_output(out, overwrite)
    labels = model.predict(data.images)
    return store.write_labels(out, labels, {
        "result": str(Path(result_path).resolve()),
        "data": data_record(data),
        "n_clusters": model.n_clusters,
    }, overwrite=overwrite)


# --------------------------------------------------------------------------- evaluate


def _samples(images, labels: np.ndarray, k: int, per_cluster: int, seed: int = 0) -> list:
    """Up to ``per_cluster`` member images of each cluster (gathers only those rows)."""
    rng = np.random.default_rng(seed)
    picks = []
    for j in range(k):
        members = np.flatnonzero(labels == j)
        picks.append(np.sort(rng.choice(members, size=min(per_cluster, len(members)),
                                        replace=False)) if len(members) else members)
    flat = np.concatenate(picks) if picks else np.empty(0, np.int64)
    rows = images[np.sort(flat)].compute() if flat.size else np.empty((0, images.shape[1]))
    where = {int(i): r for i, r in zip(np.sort(flat), rows)}
    return [[where[int(i)] for i in p] for p in picks]


def evaluate_result(result_path, split: str = "test", *, data_path=None, out_dir=None,
                    per_cluster: int = 10, overwrite: bool = True) -> dict:
    """Majority-label accuracy and clustering scores of a fitted result on a split.

    Each cluster is mapped to the most common true label of its members in
    the split the model was fitted on (normally ``train``); that mapping is
    then scored on ``split``.  Writes ``metrics.json``, the centroid grid,
    the confusion matrix and member strips into ``out_dir``.
    """
    result_path = Path(result_path)
    result = store.read_result(result_path)
    model = from_result(result)
    attrs = result.attrs
    data_path = Path(data_path or attrs["data"].get("store") or "")
    fit_split = attrs["data"].get("split")
    if not fit_split:
        raise StoreError(f"{result_path}: the result does not record which split it was fitted on")
    fit_data = store.open_data(data_path, fit_split)
    target = fit_data if split == fit_split else store.open_data(data_path, split)
    names = fit_data.class_names
    k = model.n_clusters
    fit_pred = np.asarray(model.labels_.compute())
    fit_true = np.asarray(fit_data.labels.compute())
    if fit_pred.shape != fit_true.shape:
        raise StoreError(f"{result_path}: {fit_pred.size} labels but {data_path}/{fit_split} "
                         f"has {fit_true.size} rows")
    mapping = metrics.majority_mapping(fit_true, fit_pred, k, len(names))
    pred = fit_pred if target is fit_data else np.asarray(model.predict(target.images).compute())
    true = fit_true if target is fit_data else np.asarray(target.labels.compute())
    report = metrics.cluster_report(true, pred, mapping, names)
    report.update(
        result=str(result_path), data=str(data_path), dataset=fit_data.store_attrs.get("dataset"),
        split=split, mapping_split=fit_split, k=k, mapping=[names[m] for m in mapping],
        inertia=-model.score(target.images),
    )
    out_dir = Path(out_dir) if out_dir else result_path.with_name(
        result_path.name.removesuffix(".zarr") + f"-eval-{split}")
    out_dir.mkdir(parents=True, exist_ok=True)
    titles = [f"{j}: {names[m]}" for j, m in enumerate(mapping)]
    dataset = report["dataset"]
    pictures = {
        "centroids": plots.centroid_grid(
            model.cluster_centers_, out_dir / "centroids.png", titles=titles,
            title=f"{dataset}: K = {k} centroids (label: majority on {fit_split})"),
        "confusion": plots.confusion_matrix(
            metrics.contingency(true, pred, k, len(names)), names, out_dir / "confusion.png",
            title=f"{dataset} {split}: clusters x true labels (accuracy {report['accuracy']:.3f})"),
        "members": plots.member_strips(
            _samples(target.images, pred, k, per_cluster), out_dir / "members.png", titles=titles),
    }
    report["pictures"] = {name: str(p) for name, p in pictures.items()}
    write_text_atomic(out_dir / "metrics.json", json.dumps(report, indent=2))
    report["metrics_path"] = str(out_dir / "metrics.json")
    return report


# --------------------------------------------------------------------------- sweep


SWEEP_COLUMNS = ("k", "train_inertia", "test_inertia", "accuracy", "homogeneity", "nmi",
                 "completeness", "v_measure", "n_iter", "seconds", "n_train", "n_test")


def sweep(data_path, ks, params: dict, out_dir, *, progress=None) -> list[dict]:
    """The elbow study: for every K, train and test inertia, accuracy, homogeneity and NMI.

    Fits on ``train`` (or on ``test`` when the store holds no train split,
    which the result then says), assigns the test rows to the trained
    centres, maps clusters to majority labels learned on the fitted split.
    Writes ``sweep.csv``, ``sweep.json`` and ``elbow.png`` into ``out_dir``.
    """
    splits = store.list_splits(data_path)
    fit_split = "train" if "train" in splits else splits[0]
    eval_split = "test" if "test" in splits else fit_split
    fit_data = store.open_data(data_path, fit_split)
    test = store.open_data(data_path, eval_split)
    names = fit_data.class_names
    n = fit_data.images.shape[0]
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise StoreError(f"K {bad} outside 1..{n} (the rows of {data_path}/{fit_split})")
    fit_true = np.asarray(fit_data.labels.compute())
    test_true = np.asarray(test.labels.compute())
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        model = KMeans(**{**params, "n_clusters": k}).fit(fit_data.images)
        fit_pred = np.asarray(model.labels_.compute())
        mapping = metrics.majority_mapping(fit_true, fit_pred, k, len(names))
        test_pred = np.asarray(model.predict(test.images).compute())
        rep = metrics.cluster_report(test_true, test_pred, mapping, names)
        row = {
            "k": k, "train_inertia": model.inertia_,
            "test_inertia": -model.score(test.images) if eval_split != fit_split else None,
            "accuracy": rep["accuracy"], "homogeneity": rep["homogeneity"], "nmi": rep["nmi"],
            "completeness": rep["completeness"], "v_measure": rep["v_measure"],
            "n_iter": model.n_iter_, "seconds": time.perf_counter() - t0,
            "n_train": int(n), "n_test": int(test_true.size),
        }
        rows.append(row)
        log.info("K=%d: train inertia %.6g, accuracy %.4f, NMI %.4f (%.1f s)", k,
                 row["train_inertia"], row["accuracy"], row["nmi"], row["seconds"])
        if progress is not None:
            progress(row)
    out_dir = Path(out_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SWEEP_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out_dir / "sweep.csv", buf.getvalue())
    meta = {"data": str(data_path), "fit_split": fit_split, "eval_split": eval_split,
            "params": {k: v for k, v in params.items() if k != "n_clusters"}, "rows": rows}
    write_text_atomic(out_dir / "sweep.json", json.dumps(meta, indent=2))
    dataset = fit_data.store_attrs.get("dataset")
    plots.elbow(rows, out_dir / "elbow.png",
                title=f"{dataset}: K sweep ({params.get('algorithm', 'lloyd')}, fit on {fit_split})")
    return rows


# --------------------------------------------------------------------------- blobs


def make_blobs(n_per_blob: int = 100, seed: int = 0):
    """Two Gaussian blobs, means (1, 1) and (5, 5), standard deviation 1."""
    rng = np.random.default_rng(seed)
    X = np.vstack([rng.normal((1.0, 1.0), 1.0, (n_per_blob, 2)),
                   rng.normal((5.0, 5.0), 1.0, (n_per_blob, 2))])
    return X, np.repeat([0, 1], n_per_blob)


def blobs_demo(out_dir, *, init: str = "random", seed: int = 0) -> dict:
    """Cluster the two blobs with K = 2 and draw the data, initial and final centres."""
    X, truth = make_blobs(seed=seed)
    model = KMeans(2, init=init, random_state=seed).fit(X)
    labels = np.asarray(model.labels_.compute())
    path = plots.blobs(X, truth, model.init_centers_, labels, model.cluster_centers_,
                       Path(out_dir) / "blobs2d.png",
                       title=f"two Gaussian blobs, K = 2, init={init}, {model.n_iter_} iterations")
    from sklearn.metrics import adjusted_rand_score

    return {"centers": model.cluster_centers_.tolist(), "init": model.init_centers_.tolist(),
            "inertia": model.inertia_, "n_iter": model.n_iter_,
            "ari": float(adjusted_rand_score(truth, labels)), "picture": str(path)}
