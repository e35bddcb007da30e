"""scikit-learn's own K-Means tests, run against kmeans-dask's estimators.

The installed ``sklearn/cluster/tests/test_k_means.py`` is executed with
``sklearn.cluster.KMeans`` and ``MiniBatchKMeans`` replaced by ours while it
imports, so its parametrizations and module-level names refer to ours.  Its
two global fixtures are supplied here.  What is left out (sparse input,
``algorithm="elkan"``, tests of scikit-learn's private helpers and its
functions ``k_means``/``kmeans_plusplus``) is listed in ``LEFT_OUT`` with the
reason, and reported as skipped with it; the README says the same.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import sklearn.cluster
from sklearn.cluster.tests import test_k_means as _installed

import kmeans_dask


def _load_with_ours():
    spec = importlib.util.spec_from_file_location("_sklearn_test_k_means", _installed.__file__)
    module = importlib.util.module_from_spec(spec)
    saved = sklearn.cluster.KMeans, sklearn.cluster.MiniBatchKMeans
    sklearn.cluster.KMeans, sklearn.cluster.MiniBatchKMeans = (kmeans_dask.KMeans,
                                                               kmeans_dask.MiniBatchKMeans)
    try:
        spec.loader.exec_module(module)
    finally:
        sklearn.cluster.KMeans, sklearn.cluster.MiniBatchKMeans = saved
    return module


_suite = _load_with_ours()

# Test name (or "name[" prefix of a parametrization id) -> why it is not run.
LEFT_OUT = {
    "sparse": "sparse input: kmeans-dask clusters dense arrays",
    "elkan": 'algorithm="elkan": kmeans-dask has one algorithm, Lloyd with Yinyang bounds',
    "test_minibatch_update_consistency": "tests scikit-learn's private _mini_batch_step",
    "test_relocate_empty_clusters": "tests scikit-learn's private _relocate_empty_clusters_*",
    "test_euclidean_distance": "tests scikit-learn's private distance helpers",
    "test_inertia": "tests scikit-learn's private _inertia_* helpers",
    "test_is_same_clustering": "tests scikit-learn's private _is_same_clustering",
    "test_k_means_function": "tests scikit-learn's k_means function, not an estimator",
    "test_kmeans_plusplus_wrong_params": "tests scikit-learn's kmeans_plusplus function",
    "test_kmeans_plusplus_output": "tests scikit-learn's kmeans_plusplus function",
    "test_kmeans_plusplus_norms": "tests scikit-learn's kmeans_plusplus function",
    "test_kmeans_plusplus_dataorder": "tests scikit-learn's kmeans_plusplus function",
    "test_kmeans_elkan_iter_attribute": 'algorithm="elkan"',
    "test_warning_elkan_1_cluster": 'algorithm="elkan"',
    "test_kmeans_elkan_results": 'compares algorithm="elkan" with Lloyd',
    "test_sample_weight_init": "calls scikit-learn's private _init_centroids",
    "test_sample_weight_zero": "calls scikit-learn's private _init_centroids",
    "test_kmeans_copyx": "copy_x: kmeans-dask never modifies X, and has no copy_x parameter",
}


def left_out(name: str, params: dict) -> str | None:
    """Why the collected test ``name`` with call parameters ``params`` is not run, or None."""
    base = name.split("[", 1)[0]
    if base in LEFT_OUT:
        return LEFT_OUT[base]
    for value in params.values():
        text = value if isinstance(value, str) else getattr(value, "__name__", "")
        if text == "elkan":
            return LEFT_OUT["elkan"]
        if "csr" in text.lower() or "sparse" in text.lower():
            return LEFT_OUT["sparse"]
        if getattr(value, "format", None) == "csr":
            return LEFT_OUT["sparse"]
    return None


@pytest.fixture(autouse=True)
def _skip_left_out(request):
    callspec = getattr(request.node, "callspec", None)
    reason = left_out(request.node.name, callspec.params if callspec else {})
    if reason:
        pytest.skip(reason)


@pytest.fixture
def global_random_seed():
    return 42


@pytest.fixture(params=[np.float32, np.float64])
def global_dtype(request):
    return request.param


globals().update({name: test for name, test in vars(_suite).items()
                  if name.startswith("test_") and callable(test)})
