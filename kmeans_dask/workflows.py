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
import time
import uuid
from pathlib import Path

import numpy as np

from . import dashboard, features, metrics, plots, store
from .cluster import active_client
from .errors import StoreError
from .kmeans import KMeans, from_result, save
from .minibatch import make_estimator

log = logging.getLogger(__name__)


def check_workers_see(data_paths=(), out_paths=()) -> None:
    """Before any work, check that every worker sees the stores as the client does.

    Each worker compares its view of every data store (root attributes and
    every split's fingerprint) with the client's, and reads a probe file the
    client writes where each output will go.  Paths are absolute by then, so
    a worker started in another directory resolves them as the client does;
    a worker on another machine without the same files is named.

    Raises
    ------
    ClusterError
    """
    import uuid

    from .errors import ClusterError

    client = active_client()
    if client is None:
        return
    data_paths = [store.absolute(p) for p in data_paths]
    want = {str(p): store.fingerprint(p) for p in data_paths}
    probes = []
    try:
        for out in out_paths:
            parent = store.absolute(out).parent
            if isinstance(parent, Path):
                parent.mkdir(parents=True, exist_ok=True)
            token = uuid.uuid4().hex
            probe = parent / f".kmeans-dask-probe-{token}"
            store.write_text(probe, token)
            probes.append((probe, token))
        # Locations, not strings: a URL carries its storage options to the worker.
        seen = client.run(_worker_view, data_paths, probes)
    finally:
        for probe, _ in probes:
            store.remove(probe)
    for worker, view in sorted(seen.items()):
        for path, fp in want.items():
            got = view["data"].get(path)
            if got != fp:
                why = got if isinstance(got, str) else "it sees different contents"
                raise ClusterError(f"worker {worker} cannot see {path} as the client does ({why}); "
                                   f"use a shared file system or an object store URL")
        for probe, _ in probes:
            if not view["probes"].get(str(probe)):
                raise ClusterError(f"worker {worker} cannot see {probe.parent} as the client "
                                   f"does (it cannot read a file the client wrote there); use a "
                                   f"shared file system or an object store URL")


def _worker_view(data_paths: list, probes: list) -> dict:
    """Runs on each worker: its fingerprint of each store, and which probes it reads."""
    data = {}
    for path in data_paths:
        try:
            data[str(path)] = store.fingerprint(path)
        except Exception as exc:
            data[str(path)] = f"{type(exc).__name__}: {exc}"
    seen = {}
    for probe, token in probes:
        try:
            seen[str(probe)] = store.read_text(probe) == token
        except (OSError, StoreError):
            seen[str(probe)] = False
    return {"data": data, "probes": seen}


def report_path(result_path) -> Path:
    """Where the Dask performance report of a fit goes: next to the result."""
    result_path = store.absolute(result_path)
    return result_path.with_name(result_path.name.removesuffix(".zarr") + "-report.html")


@contextlib.contextmanager
def performance_report(path, *, overwrite=False):
    """Dask's HTML performance report, kept only if the block succeeds."""
    from distributed import performance_report as _report

    path = store.check_output(path, store.REPORT_KIND, overwrite=overwrite)
    with store.atomic_file(path, suffix=".html") as tmp:
        report = _report(filename=str(tmp))
        report.__enter__()
        try:
            yield path
        except BaseException as exc:
            # The report is dropped; closing it can fail too (a lost scheduler),
            # which must not hide why the block failed.
            try:
                report.__exit__(type(exc), exc, exc.__traceback__)
            except Exception as exit_exc:
                log.debug("performance report not closed: %s", exit_exc)
            raise
        report.__exit__(None, None, None)


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
        "store": str(data.path),
        "split": data.split,
        "dataset": data.store_attrs.get("dataset"),
        "n_rows": int(data.images.shape[0]),
        "payload_sha256": data.attrs.get("payload_sha256"),
        "fingerprint": data.fingerprint,
        "class_names": data.class_names,
    }


def check_fit_outputs(data: store.DataSplit, out, *, overwrite=False, resume=False,
                      with_report=True) -> Path:
    """Every output a fit writes may be written (before a cluster starts): the result,
    its performance report, its checkpoint."""
    out = store.absolute(out)
    if resume:
        # An interrupted write at a URL is what a resume finishes (and removes first).
        if store.output_kind(out) not in (None, store.INCOMPLETE):
            raise StoreError(f"{out} is already complete; there is nothing to resume")
    else:
        store.check_output(out, store.RESULT_FORMAT, overwrite=overwrite, inputs=[data.path])
    if with_report:
        store.check_output(report_path(out), store.REPORT_KIND, overwrite=overwrite or resume,
                           inputs=[data.path])
    ckpt = store.checkpoint_path(out)
    if not resume:
        store.check_output(ckpt, store.CHECKPOINT_FORMAT, overwrite=True, inputs=[data.path])
    return out


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

    if resume and params.get("algorithm") == "minibatch":
        raise ValueError("--resume continues a Lloyd fit (--n-init 1); a mini-batch fit writes "
                         "no checkpoint")
    out = check_fit_outputs(data, out, overwrite=overwrite, resume=resume, with_report=with_report)
    ckpt = store.checkpoint_path(out)
    record = {"params": dict(sorted(params.items())), "data": data_record(data)}
    state = None
    if resume:
        doc = store.read_checkpoint(ckpt)
        _same_run(doc, record, ckpt)
        state = {"centers": doc["centers"], "init": doc["init"], "history": doc["history"]}
        _remove_stale_temporaries(out)
    model = make_estimator(params)
    n_components = features.parse(params.get("features"))
    check_workers_see([data.path], [out])
    fit_kw = {"callback": callback}
    if isinstance(model, KMeans):
        fit_kw["resume"] = state
        if model.algorithm == "lloyd" and _single_init(model):
            def checkpoint(st):
                store.write_checkpoint(ckpt, st, record)

            fit_kw["checkpoint"] = checkpoint
    address = _scheduler_address()
    start = time.perf_counter()
    ctx = (performance_report(report_path(out), overwrite=overwrite or resume) if with_report
           else contextlib.nullcontext())
    try:
        with ctx:
            X, pca = data.images, None
            if n_components:
                # Principal components on the workers, then K-Means on them.
                scale = 1 / 255 if X.dtype == np.uint8 else 1.0
                pca = features.PCAFeatures(n_components, scale=scale,
                                           random_state=params.get("random_state") or 0).fit(X)
                log.info("pca:%d keeps %.1f %% of the variance", n_components,
                         100 * pca.explained_variance_ratio_)
                X = pca.transform(X)
            model.fit(X, **fit_kw)
            elapsed = time.perf_counter() - start
            save(model, out, data=data_record(data), overwrite=overwrite, inputs=[data.path],
                 extra={"elapsed_s": elapsed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "resumed_from": len(state["history"]) if state else None},
                 features=None if pca is None else {
                     **pca.to_arrays(), "scale": pca.scale,
                     "explained_variance_ratio": pca.explained_variance_ratio_})
            if pca is not None:
                model = features.FeatureKMeans(pca, model)
    except (CancelledError, OSError) as exc:
        if address is None or _client_status() == "running":
            raise
        where = (f"the last checkpoint is {ckpt} (iteration {store.read_checkpoint(ckpt)['iteration']}); "
                 f"rerun with --resume once a scheduler is back" if store.exists(ckpt)
                 else "no checkpoint was written")
        raise ClusterError(f"lost the scheduler at {address} ({type(exc).__name__}); {where}") from exc
    store.remove(ckpt)
    log.info("fit K=%d on %s/%s: inertia %.6g, %d iterations, %.1f s", model.n_clusters,
             data.path, data.split, model.inertia_, model.n_iter_, elapsed)
    return model, out


def _single_init(model: KMeans) -> bool:
    """One initialisation (``n_init=1``, or scikit-learn's "auto" for a k-means++ or
    k-means|| start): the fits that keep a checkpoint."""
    if model.n_init == "auto":
        return not (callable(model.init) or (isinstance(model.init, str)
                                             and model.init == "random"))
    return model.n_init == 1


def _remove_stale_temporaries(out: Path) -> None:
    """What the killed run being resumed left of its result at a URL.

    A killed write at a URL leaves only generations under the output's prefix,
    with no root zarr.json.  Local temporaries need nothing here: every write
    of the result, report and checkpoint first sweeps those of dead writers
    (:func:`store.sweep_leftovers`).
    """
    if isinstance(out, store.URL) and store.output_kind(out) == store.INCOMPLETE:
        store.remove(out)


# --------------------------------------------------------------------------- predict


def check_same_data(result_attrs: dict, data: store.DataSplit, result_path, *,
                    allow_other_data: bool = False) -> None:
    """Refuse to apply a result to rows of another data set, unless the user says so."""
    fitted = result_attrs.get("data") or {}
    want, got = fitted.get("dataset"), data.store_attrs.get("dataset")
    if allow_other_data or want is None or want == got:
        return
    raise StoreError(f"{result_path} was fitted on {want} ({fitted.get('store')}), but "
                     f"{data.path} holds {got}; pass --allow-other-data to apply it anyway")


def predict_store(result_path, data_path, split: str, out, *, overwrite=False,
                  allow_other_data=False) -> Path:
    """Label every row of ``data_path``/``split`` with a fitted result; write LABELS.zarr."""
    result = store.read_result(result_path)
    model = from_result(result)
    data = store.open_data(data_path, split)
    check_same_data(result.attrs, data, result_path, allow_other_data=allow_other_data)
    inputs = [result.path, data.path]
    out = store.check_output(out, store.LABELS_FORMAT, overwrite=overwrite, inputs=inputs)
    check_workers_see([data.path], [out])
    labels = model.predict(data.images)
    return store.write_labels(out, labels, {
        "result": str(result.path),
        "data": data_record(data),
        "n_clusters": model.n_clusters,
    }, overwrite=overwrite, inputs=inputs)


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


def evaluation_dir(result_path, split: str, out_dir=None) -> Path:
    """Where an evaluation goes: ``out_dir``, or RESULT-eval-SPLIT next to the result."""
    if out_dir:
        return store.absolute(out_dir)
    result_path = store.absolute(result_path)
    return result_path.with_name(result_path.name.removesuffix(".zarr") + f"-eval-{split}")


def open_evaluation_input(result_path, split: str, data_path=None, *,
                          allow_other_data: bool = False):
    """The result, its fitted split and the split to score, every check done (no cluster
    work): returns ``(result, fit_data, target)``."""
    result = store.read_result(result_path)
    fitted = result.attrs["data"]
    data_path = data_path or fitted.get("store")
    if not data_path:
        raise StoreError(f"{result.path}: the result does not record its data store; pass --data")
    fit_split = fitted.get("split")
    if not fit_split:
        raise StoreError(f"{result.path}: the result does not record which split it was fitted on")
    fit_data = store.open_data(data_path, fit_split)
    check_same_data(result.attrs, fit_data, result.path, allow_other_data=allow_other_data)
    if fitted.get("fingerprint") != fit_data.fingerprint and not allow_other_data:
        raise StoreError(
            f"{fit_data.path}/{fit_split} is not the split {result.path} was fitted on (its "
            f"contents differ: fingerprint {fit_data.fingerprint}, recorded "
            f"{fitted.get('fingerprint')}); pass --allow-other-data to map clusters on it anyway")
    target = fit_data if split == fit_split else store.open_data(data_path, split)
    return result, fit_data, target


def evaluate_result(result_path, split: str = "test", *, data_path=None, out_dir=None,
                    per_cluster: int = 10, overwrite: bool = False,
                    allow_other_data: bool = False) -> dict:
    """Majority-label accuracy and clustering scores of a fitted result on a split.

    Each cluster is mapped to the most common true label of its members in
    the split the model was fitted on (normally ``train``); that mapping is
    then scored on ``split``.  Writes ``metrics.json``, the centroid grid,
    the confusion matrix and member strips into ``out_dir``, a directory
    written whole or not at all.

    A ``data_path`` other than the one the result records must hold the
    same data set, and its fitted split the same rows (by fingerprint);
    ``allow_other_data`` lifts both checks (the mapping is then learned from
    the model's predictions on that split).
    """
    result, fit_data, target = open_evaluation_input(
        result_path, split, data_path, allow_other_data=allow_other_data)
    model = from_result(result)
    fit_split = fit_data.split
    same_rows = result.attrs["data"].get("fingerprint") == fit_data.fingerprint
    out_dir = evaluation_dir(result.path, split, out_dir)
    inputs = [result.path, fit_data.path]
    store.check_output(out_dir, store.EVALUATION_FORMAT, overwrite=overwrite, inputs=inputs)
    check_workers_see([fit_data.path], [out_dir])
    names = fit_data.class_names
    k = model.n_clusters
    fit_pred = np.asarray((model.labels_ if same_rows else model.predict(fit_data.images)).compute())
    fit_true = np.asarray(fit_data.labels.compute())
    if fit_pred.shape != fit_true.shape:
        raise StoreError(f"{result.path}: {fit_pred.size} labels but {fit_data.path}/{fit_split} "
                         f"has {fit_true.size} rows")
    mapping = metrics.majority_mapping(fit_true, fit_pred, k, len(names))
    pred = fit_pred if target is fit_data else np.asarray(model.predict(target.images).compute())
    true = fit_true if target is fit_data else np.asarray(target.labels.compute())
    report = metrics.cluster_report(true, pred, mapping, names)
    report.update(
        format=store.EVALUATION_FORMAT, result=str(result.path), data=str(fit_data.path),
        dataset=fit_data.store_attrs.get("dataset"), split=split, mapping_split=fit_split, k=k,
        mapping=[names[m] for m in mapping], inertia=-model.score(target.images),
    )
    titles = [f"{j}: {names[m]}" for j, m in enumerate(mapping)]
    dataset = report["dataset"]
    with store.output_dir(out_dir, store.EVALUATION_FORMAT, overwrite=overwrite,
                          inputs=inputs) as tmp:
        plots.centroid_grid(
            getattr(model, "pixel_centers_", model.cluster_centers_), tmp / "centroids.png",
            titles=titles,
            title=f"{dataset}: K = {k} centroids (label: majority on {fit_split})")
        plots.confusion_matrix(
            metrics.contingency(true, pred, k, len(names)), names, tmp / "confusion.png",
            title=f"{dataset} {split}: clusters x true labels (accuracy {report['accuracy']:.3f})")
        plots.member_strips(
            _samples(target.images, pred, k, per_cluster), tmp / "members.png", titles=titles)
        report["pictures"] = {name: str(out_dir / f"{name}.png")
                              for name in ("centroids", "confusion", "members")}
        (tmp / "metrics.json").write_text(json.dumps(report, indent=2))
    report["metrics_path"] = str(out_dir / "metrics.json")
    return report


# --------------------------------------------------------------------------- sweep


SWEEP_COLUMNS = ("k", "train_inertia", "test_inertia", "accuracy", "homogeneity", "nmi",
                 "completeness", "v_measure", "n_iter", "seconds", "n_train", "n_test")


def sweep(data_path, ks, params: dict, out_dir, *, progress=None, overwrite=False) -> list[dict]:
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
    out_dir = store.check_output(out_dir, store.SWEEP_FORMAT, overwrite=overwrite,
                                 inputs=[fit_data.path])
    check_workers_see([fit_data.path], [out_dir])
    fit_true = np.asarray(fit_data.labels.compute())
    test_true = np.asarray(test.labels.compute())
    rows = []
    client = active_client()
    sweep_id = uuid.uuid4().hex
    for k in ks:
        t0 = time.perf_counter()
        model = make_estimator({**params, "n_clusters": k}).fit(fit_data.images)
        fit_pred = np.asarray(model.labels_)
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
        if client is not None:
            dashboard.publish_sweep(client, sweep_id, k, row["train_inertia"])
        if progress is not None:
            progress(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SWEEP_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    meta = {"format": store.SWEEP_FORMAT, "data": str(fit_data.path), "fit_split": fit_split,
            "eval_split": eval_split,
            "params": {k: v for k, v in params.items() if k != "n_clusters"}, "rows": rows}
    dataset = fit_data.store_attrs.get("dataset")
    with store.output_dir(out_dir, store.SWEEP_FORMAT, overwrite=overwrite,
                          inputs=[fit_data.path]) as tmp:
        (tmp / "sweep.csv").write_text(buf.getvalue())
        (tmp / "sweep.json").write_text(json.dumps(meta, indent=2))
        plots.elbow(rows, tmp / "elbow.png",
                    title=f"{dataset}: K sweep ({params.get('algorithm', 'lloyd')}, fit on {fit_split})")
    return rows


# --------------------------------------------------------------------------- blobs


def make_blobs(n_per_blob: int = 100, seed: int = 0):
    """Two Gaussian blobs, means (1, 1) and (5, 5), standard deviation 1."""
    rng = np.random.default_rng(seed)
    X = np.vstack([rng.normal((1.0, 1.0), 1.0, (n_per_blob, 2)),
                   rng.normal((5.0, 5.0), 1.0, (n_per_blob, 2))])
    return X, np.repeat([0, 1], n_per_blob)


BLOBS_FORMAT = "kmeans-dask/blobs"


def blobs_demo(out_dir, *, init: str = "random", seed: int = 0, overwrite: bool = False) -> dict:
    """Cluster the two blobs with K = 2 and draw the data, initial and final centres."""
    out_dir = store.check_output(out_dir, BLOBS_FORMAT, overwrite=overwrite)
    X, truth = make_blobs(seed=seed)
    model = KMeans(2, init=init, random_state=seed).fit(X)
    labels = np.asarray(model.labels_)
    with store.output_dir(out_dir, BLOBS_FORMAT, overwrite=overwrite) as tmp:
        plots.blobs(X, truth, model.init_centers_, labels, model.cluster_centers_,
                    tmp / "blobs2d.png",
                    title=f"two Gaussian blobs, K = 2, init={init}, {model.n_iter_} iterations")
    path = out_dir / "blobs2d.png"
    from sklearn.metrics import adjusted_rand_score

    return {"centers": model.cluster_centers_.tolist(), "init": model.init_centers_.tolist(),
            "inertia": model.inertia_, "n_iter": model.n_iter_,
            "ari": float(adjusted_rand_score(truth, labels)), "picture": str(path)}
