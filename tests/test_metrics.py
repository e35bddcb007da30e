"""Majority mapping and clustering scores (metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from kmeans_dask import metrics


def test_contingency_and_majority_mapping():
    true = np.array([0, 0, 1, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 1])
    table = metrics.contingency(true, pred, 3, 3)
    assert table.tolist() == [[2, 1, 0], [0, 2, 2], [0, 0, 0]]
    # cluster 1 ties between classes 1 and 2: the lower wins; empty cluster 2: most common class.
    assert metrics.majority_mapping(true, pred, 3, 3).tolist() == [0, 1, 1]


def test_cluster_report_numbers():
    true = np.array([0, 0, 1, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 1])
    mapping = metrics.majority_mapping(true, pred, 2, 3)
    rep = metrics.cluster_report(true, pred, mapping, ["a", "b", "c"])
    assert rep["accuracy"] == pytest.approx(4 / 7)
    assert rep["nmi"] == pytest.approx(normalized_mutual_info_score(true, pred))
    assert rep["clusters"][0] == {"cluster": 0, "size": 3, "label": "a", "top": [["a", 2], ["b", 1]]}
    assert rep["clusters"][1]["top"] == [["b", 2], ["c", 2]]
    text = metrics.format_report(rep, "title")
    assert text.splitlines()[0] == "title" and "accuracy 0.5714" in text


def test_perfect_clustering_scores_one():
    true = np.repeat([0, 1, 2], 5)
    pred = np.repeat([2, 0, 1], 5)
    rep = metrics.cluster_report(true, pred, metrics.majority_mapping(true, pred, 3, 3), list("abc"))
    assert rep["accuracy"] == 1 and rep["nmi"] == pytest.approx(1) and rep["ari"] == pytest.approx(1)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.contingency([0, 1], [0], 2, 2)
